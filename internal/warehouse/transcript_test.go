package warehouse

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"reflect"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/shopspring/decimal"

	"github.com/trackstar/trackstar/internal/testenv"
	"github.com/trackstar/trackstar/schemas"
)

// transcriptEntry is one statement of a transcript: SQL text with its
// arguments inlined, and for a query the rows the test server returned.
type transcriptEntry struct {
	SQL       string     `json:"sql"`
	Query     bool       `json:"query,omitempty"`
	Unordered bool       `json:"unordered,omitempty"` // compare the rows as a set
	Rows      [][]string `json:"rows,omitempty"`      // nil for a query whose answer varies
	ErrorCode int        `json:"error_code,omitempty"`
}

// TestSQLTranscript runs the SQL Trackstar sends ClickHouse on the test
// server: the migrations, the loader's inserts (through the loader's own
// insert path) and the report queries, and checks the report. With
// TRACKSTAR_SQL_TRANSCRIPT=<file> it also writes every statement of that
// session, replayable as text (the migrations with their bookkeeping, the
// inserts as VALUES), with the rows each query returned here.
// scripts/check-clickhouse-current.sh replays the file on a current
// ClickHouse release and compares: the DDL and the queries must run, and
// answer the same, on 18.16 and on current servers.
func TestSQLTranscript(t *testing.T) {
	addr, db := testenv.ClickHouseDB(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	conn := migratedDB(t, addr, db)

	var tr []transcriptEntry
	exec := func(sql string) { tr = append(tr, transcriptEntry{SQL: sql}) }

	// Migrate's session, as text.
	exec("DROP DATABASE IF EXISTS " + db)
	exec("CREATE DATABASE IF NOT EXISTS " + db)
	exec(lockTableSQL(db))
	tr = append(tr, transcriptEntry{SQL: inline(lockAgeSQL, db, migrationLockTable), Query: true}) // an age: varies
	tr = append(tr, transcriptEntry{SQL: lockTableSQL(db), ErrorCode: codeTableExists})
	exec(migrationsTableSQL(db))
	var names [][]string
	for _, m := range schemas.Migrations() {
		for _, stmt := range m.For(db) {
			exec(stmt)
		}
		exec(recordMigrationSQL(db) + " VALUES (" + literal(m.Name) + ", now())")
		names = append(names, []string{m.Name})
	}
	tr = append(tr, transcriptEntry{SQL: appliedMigrationsSQL(db), Query: true, Unordered: true, Rows: names})
	exec("DROP TABLE IF EXISTS " + db + "." + migrationLockTable)

	// The loader's inserts: here through its own path, in the transcript
	// as VALUES. A click and a conversion version come twice, as a retried
	// batch would bring them.
	day := time.Date(2026, 11, 20, 0, 0, 0, 0, time.UTC)
	at := func(d time.Duration) int64 { return day.Add(d).UnixMilli() }
	click := func(id string, ts int64, offer, aff uint32, source string) []byte {
		c := schemas.Click{V: schemas.Version, ClickID: id, TS: ts, OfferID: offer, AdvertiserID: 1, AffID: aff,
			Source: source, Sub1: "s'1\\x", IP: "203.0.113.1", UserAgent: "Mozilla/5.0", Referer: "https://ref.example/"}
		return c.AppendJSON(nil)
	}
	conv := func(id string, version uint32, clickID string, ts, clickTS int64, offer, aff uint32, status, reason, sale, revenue, payout, cur string) []byte {
		return schemas.EncodeConversion(schemas.Conversion{V: schemas.Version, ConversionID: id, Version: version,
			PostbackEventID: id + "-e" + strconv.Itoa(int(version)), ClickID: clickID, TS: ts, ClickTS: clickTS,
			OfferID: offer, AdvertiserID: 1, AffID: aff, Goal: "default", Status: status, RejectReason: reason,
			TxnID: "t-" + id, SaleAmount: mustAmount(sale), Revenue: mustAmount(revenue), Payout: mustAmount(payout), Currency: cur,
			CTITSeconds: (ts - clickTS) / 1000})
	}
	records := map[string][][]byte{
		"clicks": {
			click("c1", at(10*time.Hour+5*time.Minute), 1, 7, "fb"),
			click("c1", at(10*time.Hour+5*time.Minute), 1, 7, "fb"),
			click("c2", at(10*time.Hour+6*time.Minute), 1, 8, "tt"),
			click("c3", at(11*time.Hour), 2, 7, ""),
			click("c4", at(24*time.Hour+30*time.Minute), 2, 7, ""),
		},
		"conversions": {
			conv("v1", 1, "c1", at(10*time.Hour+10*time.Minute), at(10*time.Hour+5*time.Minute), 1, 7, "pending", "", "19.99", "2.5", "1.3993", "USD"),
			conv("v1", 2, "c1", at(10*time.Hour+15*time.Minute), at(10*time.Hour+5*time.Minute), 1, 7, "approved", "", "19.99", "2.5", "1.3993", "USD"),
			conv("v1", 2, "c1", at(10*time.Hour+15*time.Minute), at(10*time.Hour+5*time.Minute), 1, 7, "approved", "", "19.99", "2.5", "1.3993", "USD"),
			conv("v2", 1, "c2", at(10*time.Hour+20*time.Minute), at(10*time.Hour+6*time.Minute), 1, 8, "approved", "", "99999999999999.9999", "99999999999999.9999", "0.0001", "EUR"),
			conv("v3", 1, "c3", at(11*time.Hour+30*time.Minute), at(11*time.Hour), 2, 7, "rejected", "duplicate", "0", "0", "0", ""),
		},
		"postback_deliveries": {
			schemas.EncodeDelivery(schemas.Delivery{V: schemas.Version, ConversionID: "v1", Version: 2, Status: "approved", AffID: 7,
				Attempt: 1, TS: at(10*time.Hour + 15*time.Minute + time.Second), Method: "GET", URL: "https://p.example/pb?c=c1&s=a%20b",
				StatusCode: 200, DurationMS: 12, Outcome: "delivered"}),
			// The pending version, held back behind the approval.
			schemas.EncodeDelivery(schemas.Delivery{V: schemas.Version, ConversionID: "v1", Version: 1, Status: "pending", AffID: 7,
				Attempt: 2, TS: at(10*time.Hour + 16*time.Minute), Outcome: "failed", Error: "not sent: superseded by version 2 of the conversion"}),
			// A postback that never got through.
			schemas.EncodeDelivery(schemas.Delivery{V: schemas.Version, ConversionID: "v2", Version: 1, Status: "approved", AffID: 8,
				Attempt: 1, TS: at(10*time.Hour + 21*time.Minute), Method: "GET", URL: "https://q.example/pb",
				StatusCode: 502, DurationMS: 30, Outcome: "retrying", Error: "partner answered 502"}),
			schemas.EncodeDelivery(schemas.Delivery{V: schemas.Version, ConversionID: "v2", Version: 1, Status: "approved", AffID: 8,
				Attempt: 2, TS: at(10*time.Hour + 22*time.Minute), Method: "GET", URL: "https://q.example/pb",
				StatusCode: 502, DurationMS: 31, Outcome: "dead", Error: "partner answered 502"}),
		},
	}
	for _, table := range loaderTables {
		var rows [][]any
		var values []string
		for _, rec := range records[table.name] {
			row, err := table.row(rec)
			if err != nil {
				t.Fatalf("%s row: %v", table.name, err)
			}
			rows = append(rows, row)
			lits := make([]string, len(row))
			for i, v := range row {
				lits[i] = literal(v)
			}
			values = append(values, "("+strings.Join(lits, ", ")+")")
		}
		if err := sendRows(ctx, conn, db, table, rows); err != nil {
			t.Fatal(err)
		}
		exec(table.insertStatement(db) + " VALUES " + strings.Join(values, ", "))
	}

	// The report queries, and what the tables hold.
	query := func(sql string, unordered bool) [][]string {
		t.Helper()
		got := queryStrings(ctx, t, conn, sql)
		tr = append(tr, transcriptEntry{SQL: sql, Query: true, Unordered: unordered, Rows: got})
		return got
	}
	for _, byHour := range []bool{false, true} {
		_, q, args := reportQuery(ReportOptions{From: day, To: day.Add(48 * time.Hour), ByHour: byHour, Database: db})
		got := query(inline(q, args...), false)
		want := [][]string{
			{"2026-11-20", "1", "7", "1", "1", "0", "0", "1", "2.5", "1.3993", "1.1007", "1.3993", "USD"},
			{"2026-11-20", "1", "8", "1", "1", "0", "0", "1", "99999999999999.9999", "0.0001", "99999999999999.9998", "0.0001", "EUR"},
			{"2026-11-20", "2", "7", "1", "0", "0", "1", "0", "0", "0", "0", "0", ""},
			{"2026-11-21", "2", "7", "1", "0", "0", "0", "0", "0", "0", "0", "0", ""},
		}
		if byHour {
			want[0][0], want[1][0], want[2][0], want[3][0] = "2026-11-20 10:00:00", "2026-11-20 10:00:00", "2026-11-20 11:00:00", "2026-11-21 00:00:00"
		}
		if !sameRows(got, want) {
			t.Fatalf("report (by hour %v):\n got %q\nwant %q", byHour, got, want)
		}
	}
	query("SELECT conversion_id, version, status, toString(sale_amount), toString(payout), toUnixTimestamp(ts), ctit_seconds FROM "+db+".conversions FINAL ORDER BY conversion_id", false)
	query("SELECT click_id, sub1, toUnixTimestamp(ts) FROM "+db+".clicks FINAL ORDER BY click_id", false)
	query("SELECT conversion_id, version, attempt, url, status_code, outcome FROM "+db+".postback_deliveries FINAL", true)

	// The example queries of docs/analyst.md, as written there.
	doc, err := os.ReadFile("../../docs/analyst.md")
	if err != nil {
		t.Fatal(err)
	}
	examples := regexp.MustCompile("(?s)```sql\n(.*?)```").FindAllSubmatch(doc, -1)
	if len(examples) < 4 {
		t.Fatalf("docs/analyst.md has %d sql examples, want at least 4", len(examples))
	}
	for _, m := range examples {
		sql := strings.TrimSuffix(strings.TrimSpace(string(m[1])), ";")
		got := query(strings.ReplaceAll(sql, "trackstar.", db+"."), true)
		if strings.Contains(sql, "postback_deliveries") {
			want := [][]string{{"v2", "1", "8", "2", "dead", "partner answered 502"}}
			if !sameRows(got, want) {
				t.Fatalf("docs/analyst.md's postbacks that never got through:\n got %q\nwant %q", got, want)
			}
		}
	}

	if path := os.Getenv("TRACKSTAR_SQL_TRANSCRIPT"); path != "" {
		b, err := json.MarshalIndent(tr, "", " ")
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, b, 0o644); err != nil {
			t.Fatal(err)
		}
		t.Logf("wrote %d statements to %s", len(tr), path)
	}
}

// inline puts args in place of the ?s of sql, as SQL literals.
func inline(sql string, args ...any) string {
	for _, a := range args {
		sql = strings.Replace(sql, "?", literal(a), 1)
	}
	return sql
}

// literal writes v as a ClickHouse SQL literal.
func literal(v any) string {
	switch v := v.(type) {
	case string:
		return "'" + strings.NewReplacer(`\`, `\\`, `'`, `\'`).Replace(v) + "'"
	case time.Time:
		return "toDateTime(" + strconv.FormatInt(v.Unix(), 10) + ")"
	case decimal.Decimal:
		return v.String()
	case int64, int32, uint64, uint32, uint16, uint8, int:
		return fmt.Sprint(v)
	}
	panic(fmt.Sprintf("no SQL literal for %T", v))
}

// queryStrings runs sql and returns its rows as text: numbers in their
// shortest form, strings as they are.
func queryStrings(ctx context.Context, t *testing.T, conn driver.Conn, sql string) [][]string {
	t.Helper()
	rows, err := conn.Query(ctx, sql)
	if err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
	defer rows.Close()
	types := rows.ColumnTypes()
	var out [][]string
	for rows.Next() {
		dst := make([]any, len(types))
		for i, ct := range types {
			dst[i] = reflect.New(ct.ScanType()).Interface()
		}
		if err := rows.Scan(dst...); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
		row := make([]string, len(dst))
		for i, d := range dst {
			switch v := reflect.ValueOf(d).Elem().Interface().(type) {
			case float64:
				row[i] = strconv.FormatFloat(v, 'f', -1, 64)
			case decimal.Decimal:
				row[i] = v.String()
			case []float64: // as ClickHouse writes an array in TSV
				parts := make([]string, len(v))
				for j, f := range v {
					parts[j] = strconv.FormatFloat(f, 'f', -1, 64)
				}
				row[i] = "[" + strings.Join(parts, ",") + "]"
			default:
				row[i] = fmt.Sprint(v)
			}
		}
		out = append(out, row)
	}
	if err := rows.Err(); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
	return out
}

// sameRows compares rows cell by cell, numbers by value ("2.5000" is 2.5).
func sameRows(got, want [][]string) bool {
	if len(got) != len(want) {
		return false
	}
	for i := range got {
		if len(got[i]) != len(want[i]) {
			return false
		}
		for j := range got[i] {
			if !sameCell(got[i][j], want[i][j]) {
				return false
			}
		}
	}
	return true
}

func sameCell(a, b string) bool {
	if a == b {
		return true
	}
	x, errA := decimal.NewFromString(a)
	y, errB := decimal.NewFromString(b)
	return errA == nil && errB == nil && x.Equal(y)
}
