package warehouse

import (
	"context"
	"fmt"
	"io"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"

	"github.com/trackstar/trackstar/schemas"
)

// ReportOptions selects what Report prints.
type ReportOptions struct {
	// From and To select the days (hours) that overlap [From, To), days
	// and hours being those of the ClickHouse server's time zone. A zero
	// From starts at the first, a zero To ends at the last.
	From, To time.Time

	// ByHour reports by hour (view report_hourly) instead of by day
	// (report_daily).
	ByHour bool

	// Database holds the report views. Default: conn's current database.
	Database string
}

// reportLine is one row of a report view.
type reportLine struct {
	bucket                              string // day or hour
	offer, aff                          uint32
	clicks, approved, pending, rejected uint64
	cr                                  float64 // approved / clicks
	revenue, payout, profit             schemas.Amount
	epc                                 float64 // payout / clicks
	currency                            string
}

// Report prints the standard report to w as a table for a terminal: per day
// (or hour), offer and affiliate, the clicks, the approved, pending and
// rejected conversions, the conversion rate (approved / clicks), revenue,
// payout and profit of the approved conversions, and EPC (payout per
// click), then a totals line. It reads the report views, which count each
// click and conversion once. Money totals are per currency when the rows
// have several.
func Report(ctx context.Context, conn driver.Conn, w io.Writer, opts ReportOptions) error {
	lines, err := queryReport(ctx, conn, opts)
	if err != nil {
		return err
	}
	if _, err := io.WriteString(w, renderReport(lines, opts)); err != nil {
		return fmt.Errorf("cannot write report: %w", err)
	}
	return nil
}

func queryReport(ctx context.Context, conn driver.Conn, opts ReportOptions) ([]reportLine, error) {
	if opts.Database != "" {
		if err := CheckDatabaseName(opts.Database); err != nil {
			return nil, err
		}
	}
	view, query, args := reportQuery(opts)
	rows, err := conn.Query(ctx, query, args...)
	if err != nil {
		return nil, fmt.Errorf("cannot query %s: %w", view, err)
	}
	defer rows.Close()
	var lines []reportLine
	for rows.Next() {
		var l reportLine
		var revenue, payout, profit string
		if err := rows.Scan(&l.bucket, &l.offer, &l.aff, &l.clicks, &l.approved, &l.pending, &l.rejected, &l.cr,
			&revenue, &payout, &profit, &l.epc, &l.currency); err != nil {
			return nil, fmt.Errorf("cannot read %s: %w", view, err)
		}
		// Servers before 21.x write a Decimal's trailing zeros ("2.5000"),
		// later ones do not ("2.5"): ParseAmount reads both.
		for _, m := range []struct {
			dst  *schemas.Amount
			text string
		}{{&l.revenue, revenue}, {&l.payout, payout}, {&l.profit, profit}} {
			if *m.dst, err = schemas.ParseAmount(m.text); err != nil {
				return nil, fmt.Errorf("cannot read %s: bad amount %q: %w", view, m.text, err)
			}
		}
		if opts.ByHour {
			l.bucket = strings.TrimSuffix(l.bucket, ":00") // "2024-01-15 10:00"
		}
		lines = append(lines, l)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("cannot read %s: %w", view, err)
	}
	return lines, nil
}

// reportQuery returns the view a report reads, and its query with the
// query's arguments (Unix seconds).
func reportQuery(opts ReportOptions) (view, query string, args []any) {
	view, bucket, start := "report_daily", "day", "toDate(toDateTime(?))"
	if opts.ByHour {
		view, bucket, start = "report_hourly", "hour", "toStartOfHour(toDateTime(?))"
	}
	if opts.Database != "" {
		view = opts.Database + "." + view
	}
	var where []string
	// A bucket overlaps [From, To) when it starts at or after the start of
	// From's bucket and before To.
	if !opts.From.IsZero() {
		where = append(where, bucket+" >= "+start)
		args = append(args, opts.From.Unix())
	}
	if !opts.To.IsZero() {
		where = append(where, "toDateTime("+bucket+") < toDateTime(?)")
		args = append(args, opts.To.Unix())
	}
	query = "SELECT toString(" + bucket + "), offer_id, aff_id, clicks, conversions, pending, rejected, cr," +
		" toString(revenue), toString(payout), toString(profit), epc, currency FROM " + view
	if len(where) > 0 {
		query += " WHERE " + strings.Join(where, " AND ")
	}
	query += " ORDER BY " + bucket + ", offer_id, aff_id"
	return view, query, args
}

// renderReport lays out the lines as an aligned text table with a totals line.
func renderReport(lines []reportLine, opts ReportOptions) string {
	var sb strings.Builder
	period := "day"
	if opts.ByHour {
		period = "hour"
	}
	sb.WriteString("Clicks and conversions by " + period + ", offer and affiliate")
	const layout = "2006-01-02 15:04 MST"
	switch {
	case !opts.From.IsZero() && !opts.To.IsZero():
		sb.WriteString(", from " + opts.From.Format(layout) + " to " + opts.To.Format(layout))
	case !opts.From.IsZero():
		sb.WriteString(", from " + opts.From.Format(layout))
	case !opts.To.IsZero():
		sb.WriteString(", until " + opts.To.Format(layout))
	}
	sb.WriteString("\n\n")

	table := [][]string{{strings.ToUpper(period), "OFFER", "AFF", "CLICKS", "APPROVED", "PENDING", "REJECTED",
		"CR", "REVENUE", "PAYOUT", "PROFIT", "EPC", "CUR"}}
	if len(lines) == 0 {
		sb.WriteString(formatTable(table))
		sb.WriteString("(no clicks or conversions)\n")
		return sb.String()
	}

	var clicks, approved, pending, rejected uint64
	type money struct{ revenue, payout, profit schemas.Amount }
	byCurrency := make(map[string]*money)
	for _, l := range lines {
		table = append(table, []string{l.bucket, reportID(l.offer), reportID(l.aff),
			strconv.FormatUint(l.clicks, 10), strconv.FormatUint(l.approved, 10),
			strconv.FormatUint(l.pending, 10), strconv.FormatUint(l.rejected, 10),
			percent(l.cr), formatMoney(l.revenue), formatMoney(l.payout), formatMoney(l.profit),
			strconv.FormatFloat(l.epc, 'f', 4, 64), l.currency})
		clicks += l.clicks
		approved += l.approved
		pending += l.pending
		rejected += l.rejected
		if l.currency == "" {
			continue // no approved conversions, no money
		}
		m := byCurrency[l.currency]
		if m == nil {
			m = &money{}
			byCurrency[l.currency] = m
		}
		m.revenue += l.revenue
		m.payout += l.payout
		m.profit += l.profit
	}
	total := []string{"TOTAL", "", "", strconv.FormatUint(clicks, 10), strconv.FormatUint(approved, 10),
		strconv.FormatUint(pending, 10), strconv.FormatUint(rejected, 10), percent(conversionRate(approved, clicks))}
	switch len(byCurrency) {
	case 0:
		total = append(total, "0.00", "0.00", "0.00", "0.0000", "")
		table = append(table, total)
	case 1:
		for cur, m := range byCurrency {
			total = append(total, formatMoney(m.revenue), formatMoney(m.payout), formatMoney(m.profit),
				strconv.FormatFloat(perClick(m.payout, clicks), 'f', 4, 64), cur)
		}
		table = append(table, total)
	default:
		// Money in different currencies does not add up: one line each.
		table = append(table, append(total, "", "", "", "", ""))
		currencies := make([]string, 0, len(byCurrency))
		for cur := range byCurrency {
			currencies = append(currencies, cur)
		}
		sort.Strings(currencies)
		for _, cur := range currencies {
			m := byCurrency[cur]
			table = append(table, []string{"TOTAL " + cur, "", "", "", "", "", "", "",
				formatMoney(m.revenue), formatMoney(m.payout), formatMoney(m.profit), "", cur})
		}
	}
	sb.WriteString(formatTable(table))
	return sb.String()
}

// formatTable aligns cells in columns two spaces apart: the first column to
// the left, the others (numbers) to the right, but the last (currency).
func formatTable(table [][]string) string {
	widths := make([]int, len(table[0]))
	for _, row := range table {
		for i, cell := range row {
			widths[i] = max(widths[i], len(cell))
		}
	}
	var sb strings.Builder
	for _, row := range table {
		var line strings.Builder
		for i, cell := range row {
			if i > 0 {
				line.WriteString("  ")
			}
			pad := strings.Repeat(" ", widths[i]-len(cell))
			if i == 0 || i == len(row)-1 {
				line.WriteString(cell + pad)
			} else {
				line.WriteString(pad + cell)
			}
		}
		sb.WriteString(strings.TrimRight(line.String(), " "))
		sb.WriteByte('\n')
	}
	return sb.String()
}

// id shows an offer or affiliate ID; 0 is a conversion of an unknown click.
func reportID(v uint32) string {
	if v == 0 {
		return "-"
	}
	return strconv.FormatUint(uint64(v), 10)
}

// conversionRate is approved / clicks; 0 without clicks.
func conversionRate(approved, clicks uint64) float64 {
	if clicks == 0 {
		return 0
	}
	return float64(approved) / float64(clicks)
}

// perClick divides an amount by the clicks; 0 without clicks.
func perClick(a schemas.Amount, clicks uint64) float64 {
	if clicks == 0 {
		return 0
	}
	return float64(a.Units()) / 1e4 / float64(clicks)
}

func percent(r float64) string {
	return strconv.FormatFloat(r*100, 'f', 2, 64) + "%"
}

// formatMoney shows an amount with two decimals, or more when it has them
// ("2.50", "1.3993").
func formatMoney(a schemas.Amount) string {
	s := a.String()
	dot := strings.IndexByte(s, '.')
	switch {
	case dot < 0:
		return s + ".00"
	case len(s)-dot == 2:
		return s + "0"
	}
	return s
}
