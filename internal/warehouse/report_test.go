package warehouse

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"

	"github.com/trackstar/trackstar/internal/testenv"
	"github.com/trackstar/trackstar/schemas"
)

func TestFormatMoney(t *testing.T) {
	f := func(in, want string) {
		t.Helper()
		if got := formatMoney(mustAmount(in)); got != want {
			t.Fatalf("formatMoney(%s) = %q, want %q", in, got, want)
		}
	}
	f("0", "0.00")
	f("2", "2.00")
	f("2.5", "2.50")
	f("19.99", "19.99")
	f("1.3993", "1.3993")
	f("0.001", "0.001")
	f("-0.75", "-0.75")
	f("1234567.1", "1234567.10")
}

func TestRenderReport(t *testing.T) {
	f := func(lines []reportLine, opts ReportOptions, want string) {
		t.Helper()
		if got := renderReport(lines, opts); got != want {
			t.Fatalf("renderReport:\n%s\nwant:\n%s", got, want)
		}
	}
	f(nil, ReportOptions{}, `Clicks and conversions by day, offer and affiliate

DAY  OFFER  AFF  CLICKS  APPROVED  PENDING  REJECTED  CR  REVENUE  PAYOUT  PROFIT  EPC  CUR
(no clicks or conversions)
`)

	usd := []reportLine{
		{bucket: "2024-01-15 10:00", offer: 1, aff: 7, clicks: 3, approved: 1, pending: 1, rejected: 1, cr: 0.333333,
			revenue: mustAmount("2.5"), payout: mustAmount("1.75"), profit: mustAmount("0.75"), epc: 0.5833, currency: "USD"},
		{bucket: "2024-01-15 10:00", rejected: 1},
		{bucket: "2024-01-15 11:00", offer: 12, aff: 7, clicks: 1200, approved: 31, cr: 0.025833,
			revenue: mustAmount("619.69"), payout: mustAmount("43.3783"), profit: mustAmount("576.3117"), epc: 0.0361, currency: "USD"},
	}
	from := time.Date(2024, 1, 15, 10, 0, 0, 0, time.UTC)
	f(usd, ReportOptions{ByHour: true, From: from, To: from.Add(2 * time.Hour)},
		`Clicks and conversions by hour, offer and affiliate, from 2024-01-15 10:00 UTC to 2024-01-15 12:00 UTC

HOUR              OFFER  AFF  CLICKS  APPROVED  PENDING  REJECTED      CR  REVENUE   PAYOUT    PROFIT     EPC  CUR
2024-01-15 10:00      1    7       3         1        1         1  33.33%     2.50     1.75      0.75  0.5833  USD
2024-01-15 10:00      -    -       0         0        0         1   0.00%     0.00     0.00      0.00  0.0000
2024-01-15 11:00     12    7    1200        31        0         0   2.58%   619.69  43.3783  576.3117  0.0361  USD
TOTAL                           1203        32        1         2   2.66%   622.19  45.1283  577.0617  0.0375  USD
`)

	// Money in two currencies is totalled per currency.
	mixed := []reportLine{
		{bucket: "2024-01-15", offer: 1, aff: 7, clicks: 10, approved: 1, cr: 0.1,
			revenue: mustAmount("2.5"), payout: mustAmount("1.75"), profit: mustAmount("0.75"), epc: 0.175, currency: "USD"},
		{bucket: "2024-01-15", offer: 2, aff: 7, clicks: 10, approved: 2, cr: 0.2,
			revenue: mustAmount("4"), payout: mustAmount("3"), profit: mustAmount("1"), epc: 0.3, currency: "EUR"},
	}
	f(mixed, ReportOptions{To: from}, `Clicks and conversions by day, offer and affiliate, until 2024-01-15 10:00 UTC

DAY         OFFER  AFF  CLICKS  APPROVED  PENDING  REJECTED      CR  REVENUE  PAYOUT  PROFIT     EPC  CUR
2024-01-15      1    7      10         1        0         0  10.00%     2.50    1.75    0.75  0.1750  USD
2024-01-15      2    7      10         2        0         0  20.00%     4.00    3.00    1.00  0.3000  EUR
TOTAL                       20         3        0         0  15.00%
TOTAL EUR                                                               4.00    3.00    1.00          EUR
TOTAL USD                                                               2.50    1.75    0.75          USD
`)
}

// loadEvents inserts encoded events into a table the way the loader does.
func loadEvents(t *testing.T, conn driver.Conn, db, table string, values ...[]byte) {
	t.Helper()
	for _, lt := range loaderTables {
		if lt.name != table {
			continue
		}
		var rows [][]any
		for _, v := range values {
			row, err := lt.row(v)
			if err != nil {
				t.Fatalf("cannot make a %s row of %s: %v", table, v, err)
			}
			rows = append(rows, row)
		}
		if err := sendRows(context.Background(), conn, db, lt, rows); err != nil {
			t.Fatal(err)
		}
		return
	}
	t.Fatalf("the loader has no table %s", table)
}

// TestReportFromViews prints the report of a small known data set by day,
// by hour, and for a time range, and checks its numbers.
func TestReportFromViews(t *testing.T) {
	addr, db := testenv.ClickHouseDB(t)
	conn := migratedDB(t, addr, db)
	t0 := serverTime(t, conn) // 2024-01-15 10:00
	at := func(min int) int64 { return t0.Add(time.Duration(min) * time.Minute).UnixMilli() }

	click := func(id string, min int, offer, aff uint32) []byte {
		c := schemas.Click{ClickID: id, TS: at(min), OfferID: offer, AdvertiserID: 3, AffID: aff}
		return c.AppendJSON(nil)
	}
	c1 := click("c1", 0, 1, 7)
	loadEvents(t, conn, db, "clicks", c1, c1, click("c2", 30, 1, 7), click("c3", 70, 1, 7),
		click("d1", 0, 2, 8), click("e1", 23*60, 1, 7)) // e1: 09:00 the next day

	conv := func(id string, version uint32, min int, offer, aff uint32, status, reason, revenue, payout string) []byte {
		return schemas.EncodeConversion(schemas.Conversion{ConversionID: id, Version: version, ClickID: "c-" + id,
			TS: at(min), ClickTS: at(0), OfferID: offer, AdvertiserID: 3, AffID: aff, Goal: "default",
			Status: status, RejectReason: reason, Revenue: mustAmount(revenue), Payout: mustAmount(payout), Currency: "USD"})
	}
	loadEvents(t, conn, db, "conversions",
		conv("A", 1, 5, 1, 7, schemas.StatusApproved, "", "2.5", "1.75"),
		conv("B", 1, 40, 1, 7, schemas.StatusPending, "", "2.5", "1.75"),
		conv("B", 2, 80, 1, 7, schemas.StatusApproved, "", "2.5", "1.75"), // approved at 11:20
		conv("C", 1, 45, 1, 7, schemas.StatusRejected, schemas.RejectDuplicate, "0", "0"),
		conv("D", 1, 15, 2, 8, schemas.StatusApproved, "", "19.99", "1.3992"),
		conv("E", 1, 50, 0, 0, schemas.StatusRejected, schemas.RejectUnknownClick, "0", "0"),
	)

	f := func(opts ReportOptions, title string, want ...string) {
		t.Helper()
		var sb strings.Builder
		if err := Report(context.Background(), conn, &sb, opts); err != nil {
			t.Fatal(err)
		}
		t.Logf("\n%s", sb.String())
		lines := strings.Split(strings.TrimSuffix(sb.String(), "\n"), "\n")
		if !strings.HasPrefix(lines[0], title) || lines[1] != "" {
			t.Fatalf("report starts %q, want the title %q and an empty line", lines[:2], title)
		}
		var got []string
		for _, l := range lines[2:] {
			got = append(got, strings.Join(strings.Fields(l), " "))
		}
		if strings.Join(got, "\n") != strings.Join(want, "\n") {
			t.Fatalf("report:\n%s\nwant (spacing aside):\n%s", sb.String(), strings.Join(want, "\n"))
		}
	}
	header := func(period string) string {
		return period + " OFFER AFF CLICKS APPROVED PENDING REJECTED CR REVENUE PAYOUT PROFIT EPC CUR"
	}
	f(ReportOptions{}, "Clicks and conversions by day, offer and affiliate",
		header("DAY"),
		"2024-01-15 - - 0 0 0 1 0.00% 0.00 0.00 0.00 0.0000",
		"2024-01-15 1 7 3 2 0 1 66.67% 5.00 3.50 1.50 1.1667 USD",
		"2024-01-15 2 8 1 1 0 0 100.00% 19.99 1.3992 18.5908 1.3992 USD",
		"2024-01-16 1 7 1 0 0 0 0.00% 0.00 0.00 0.00 0.0000",
		"TOTAL 5 3 0 2 60.00% 24.99 4.8992 20.0908 0.9798 USD",
	)
	f(ReportOptions{ByHour: true, Database: db}, "Clicks and conversions by hour, offer and affiliate",
		header("HOUR"),
		"2024-01-15 10:00 - - 0 0 0 1 0.00% 0.00 0.00 0.00 0.0000",
		"2024-01-15 10:00 1 7 2 1 0 1 50.00% 2.50 1.75 0.75 0.8750 USD",
		"2024-01-15 10:00 2 8 1 1 0 0 100.00% 19.99 1.3992 18.5908 1.3992 USD",
		"2024-01-15 11:00 1 7 1 1 0 0 100.00% 2.50 1.75 0.75 1.7500 USD",
		"2024-01-16 09:00 1 7 1 0 0 0 0.00% 0.00 0.00 0.00 0.0000",
		"TOTAL 5 3 0 2 60.00% 24.99 4.8992 20.0908 0.9798 USD",
	)
	// Buckets that overlap [From, To): 11:00 for 11:30 to 12:00, the 16th
	// for the 16th 08:59 onwards.
	f(ReportOptions{ByHour: true, From: t0.Add(90 * time.Minute), To: t0.Add(2 * time.Hour)},
		"Clicks and conversions by hour, offer and affiliate, from 2024-01-15 11:30",
		header("HOUR"),
		"2024-01-15 11:00 1 7 1 1 0 0 100.00% 2.50 1.75 0.75 1.7500 USD",
		"TOTAL 1 1 0 0 100.00% 2.50 1.75 0.75 1.7500 USD",
	)
	f(ReportOptions{From: t0.Add(23*time.Hour - time.Minute)},
		"Clicks and conversions by day, offer and affiliate, from 2024-01-16 08:59",
		header("DAY"),
		"2024-01-16 1 7 1 0 0 0 0.00% 0.00 0.00 0.00 0.0000",
		"TOTAL 1 0 0 0 0.00% 0.00 0.00 0.00 0.0000",
	)
	f(ReportOptions{To: t0}, "Clicks and conversions by day, offer and affiliate, until 2024-01-15 10:00",
		header("DAY"),
		"2024-01-15 - - 0 0 0 1 0.00% 0.00 0.00 0.00 0.0000",
		"2024-01-15 1 7 3 2 0 1 66.67% 5.00 3.50 1.50 1.1667 USD",
		"2024-01-15 2 8 1 1 0 0 100.00% 19.99 1.3992 18.5908 1.3992 USD",
		"TOTAL 4 3 0 2 75.00% 24.99 4.8992 20.0908 1.2248 USD",
	)
	f(ReportOptions{From: t0.Add(72 * time.Hour)}, "Clicks and conversions by day",
		header("DAY"),
		"(no clicks or conversions)",
	)
}
