package warehouse

import (
	"context"
	"fmt"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"

	"github.com/trackstar/trackstar/internal/testenv"
	"github.com/trackstar/trackstar/schemas"
)

func TestCheckDatabaseName(t *testing.T) {
	f := func(name string, ok bool) {
		t.Helper()
		if err := CheckDatabaseName(name); (err == nil) != ok {
			t.Fatalf("CheckDatabaseName(%q) = %v, want ok=%v", name, err, ok)
		}
	}
	f("trackstar", true)
	f("_t1", true)
	f("Track_Star_2", true)
	f("", false)
	f("1trackstar", false)
	f("track-star", false)
	f("trackstar; DROP DATABASE x", false)
	f("track.star", false)
	f("`trackstar`", false)

	// Migrate refuses before it connects anywhere.
	if err := Migrate(context.Background(), "127.0.0.1:1", "bad name"); err == nil || !strings.Contains(err.Error(), "invalid ClickHouse database name") {
		t.Fatalf("Migrate with a bad database name: %v, want an invalid name error", err)
	}
}

// migratedTableColumns is the schema the loader and the analysts rely on.
var migratedTableColumns = map[string]string{
	"clicks": "click_id String, ts DateTime, offer_id UInt32, advertiser_id UInt32, aff_id UInt32, source String, " +
		"sub1 String, sub2 String, sub3 String, sub4 String, sub5 String, ip String, user_agent String, referer String",
	"conversions": "conversion_id String, version UInt32, postback_event_id String, click_id String, ts DateTime, " +
		"click_ts DateTime, offer_id UInt32, advertiser_id UInt32, aff_id UInt32, goal String, status String, " +
		"reject_reason String, txn_id String, sale_amount Decimal(18, 4), revenue Decimal(18, 4), payout Decimal(18, 4), " +
		"currency String, ctit_seconds Int64, source String, sub1 String, sub2 String, sub3 String, sub4 String, sub5 String",
	"postback_deliveries": "conversion_id String, version UInt32, status String, aff_id UInt32, attempt UInt32, ts DateTime, " +
		"method String, url String, status_code UInt16, duration_ms UInt32, outcome String, error String",
	"schema_migrations": "name String, applied_at DateTime",
	"report_facts": "ts DateTime, kind String, offer_id UInt32, advertiser_id UInt32, aff_id UInt32, source String, " +
		"sub1 String, sub2 String, sub3 String, sub4 String, sub5 String, goal String, status String, reject_reason String, " +
		"revenue Decimal(18, 4), payout Decimal(18, 4), currency String",
}

// migratedReportColumns are the columns of both reports after the time
// bucket; the money sums are wider decimals whose precision differs between
// releases.
const migratedReportColumns = "offer_id UInt32, aff_id UInt32, clicks UInt64, conversions UInt64, pending UInt64, rejected UInt64, " +
	"cr Float64, revenue Decimal, payout Decimal, profit Decimal, epc Float64, rpc Float64, currency String"

func TestMigrate(t *testing.T) {
	addr, db := testenv.ClickHouseDB(t)
	ctx := context.Background()
	for i := 0; i < 2; i++ {
		if err := Migrate(ctx, addr, db); err != nil {
			t.Fatalf("migration run %d: %v", i+1, err)
		}
	}
	conn, err := Open(ctx, addr, db)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()

	// Every migration is recorded, once: the second run applied nothing.
	var names []string
	rows, err := conn.Query(ctx, "SELECT name FROM "+db+".schema_migrations ORDER BY name")
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var n string
		if err := rows.Scan(&n); err != nil {
			t.Fatal(err)
		}
		names = append(names, n)
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	var want []string
	for _, m := range schemas.Migrations() {
		want = append(want, m.Name)
	}
	if !reflect.DeepEqual(names, want) {
		t.Fatalf("schema_migrations lists %q, want %q", names, want)
	}

	got := schemaColumns(t, conn, db)
	f := func(table, want string) {
		t.Helper()
		if got[table] != want {
			t.Fatalf("columns of %s.%s:\n got %s\nwant %s", db, table, got[table], want)
		}
	}
	for table, cols := range migratedTableColumns {
		f(table, cols)
	}
	f("report_daily", "day Date, "+migratedReportColumns)
	f("report_hourly", "hour DateTime, "+migratedReportColumns)
	if len(got) != len(migratedTableColumns)+2 {
		t.Fatalf("database %s holds %d tables and views, want %d: %v", db, len(got), len(migratedTableColumns)+2, got)
	}

	// Every field of an event (see eventColumnNames) has a column.
	fields := func(table string, event any) {
		t.Helper()
		for _, c := range eventColumnNames(event) {
			if !strings.Contains(", "+got[table]+",", ", "+c+" ") {
				t.Fatalf("%T field %q has no column in %s", event, c, table)
			}
		}
	}
	fields("clicks", schemas.Click{})
	fields("conversions", schemas.Conversion{})
	fields("postback_deliveries", schemas.Delivery{})
}

// TestMigrateAppliesWhatIsMissing takes a database back to "only the first
// migration applied, views gone" and checks that Migrate brings the rest.
func TestMigrateAppliesWhatIsMissing(t *testing.T) {
	addr, db := testenv.ClickHouseDB(t)
	ctx := context.Background()
	if err := Migrate(ctx, addr, db); err != nil {
		t.Fatal(err)
	}
	conn, err := Open(ctx, addr, db)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	for _, q := range []string{
		"DROP TABLE " + db + ".report_daily",
		"DROP TABLE " + db + ".report_hourly",
		"DROP TABLE " + db + ".report_facts",
		"TRUNCATE TABLE " + db + ".schema_migrations",
	} {
		if err := conn.Exec(ctx, q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	first := schemas.Migrations()[0].Name
	if err := recordMigration(ctx, conn, db, first); err != nil {
		t.Fatal(err)
	}

	if err := Migrate(ctx, addr, db); err != nil {
		t.Fatal(err)
	}
	got := schemaColumns(t, conn, db)
	for _, view := range []string{"report_facts", "report_daily", "report_hourly"} {
		if got[view] == "" {
			t.Fatalf("Migrate did not create %s again: %v", view, got)
		}
	}
	if n, want := countRows(t, conn, "SELECT count() FROM "+db+".schema_migrations"), uint64(len(schemas.Migrations())); n != want {
		t.Fatalf("schema_migrations holds %d rows, want %d (one per migration)", n, want)
	}
}

// TestMigrateConcurrent runs Migrates at once on a database that does not
// exist yet, as deploy jobs started together do. Without the lock, one's
// DROP of a view lands between another's CREATEs and that one fails.
func TestMigrateConcurrent(t *testing.T) {
	addr, db := testenv.ClickHouseDB(t)
	ctx := context.Background()
	conn, err := Open(ctx, addr, "")
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	const rounds, migrates = 3, 4
	for round := 1; round <= rounds; round++ {
		if err := conn.Exec(ctx, "DROP DATABASE IF EXISTS "+db); err != nil {
			t.Fatal(err)
		}
		errs := make(chan error, migrates)
		for range migrates {
			go func() { errs <- Migrate(ctx, addr, db) }()
		}
		var failed []error // every Migrate ends before the test does
		for range migrates {
			if err := <-errs; err != nil {
				failed = append(failed, err)
			}
		}
		if len(failed) > 0 {
			t.Fatalf("round %d: %d of %d concurrent Migrates failed: %v", round, len(failed), migrates, failed)
		}
		got := schemaColumns(t, conn, db)
		for _, table := range []string{"clicks", "conversions", "postback_deliveries", "report_facts", "report_daily", "report_hourly"} {
			if got[table] == "" {
				t.Fatalf("round %d: %s is missing after concurrent Migrates: %v", round, table, got)
			}
		}
		if len(got) != len(migratedTableColumns)+2 {
			t.Fatalf("round %d: database %s holds %d tables and views, want %d (is the lock left?): %v",
				round, db, len(got), len(migratedTableColumns)+2, got)
		}
		// Each migration applied and recorded by one Migrate only.
		if n, want := countRows(t, conn, "SELECT count() FROM "+db+".schema_migrations"), uint64(len(schemas.Migrations())); n != want {
			t.Fatalf("round %d: schema_migrations holds %d rows, want %d (one per migration)", round, n, want)
		}
	}
}

// TestMigrateWaitsForTheLock holds the lock as another Migrate would: a
// Migrate waits for it, gives up when its context ends, and goes on once
// the lock is gone; a lock older than migrationLockStale is dropped.
func TestMigrateWaitsForTheLock(t *testing.T) {
	addr, db := testenv.ClickHouseDB(t)
	ctx := context.Background()
	conn, err := Open(ctx, addr, "")
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	lock := db + "." + migrationLockTable
	hold := func() {
		t.Helper()
		if err := conn.Exec(ctx, "CREATE TABLE "+lock+" (holder String) ENGINE = Memory"); err != nil {
			t.Fatal(err)
		}
	}
	hold()

	short, cancel := context.WithTimeout(ctx, 700*time.Millisecond)
	err = Migrate(short, addr, db)
	cancel()
	if err == nil || !strings.Contains(err.Error(), "held by another migrate") {
		t.Fatalf("Migrate while the lock is held, until its context ends: %v, want a wait for the lock that gave up", err)
	}
	if got := schemaColumns(t, conn, db); got["clicks"] != "" {
		t.Fatalf("Migrate created tables without the lock: %v", got)
	}

	done := make(chan error, 1)
	go func() { done <- Migrate(ctx, addr, db) }()
	select {
	case err := <-done:
		t.Fatalf("Migrate returned %v while the lock was held", err)
	case <-time.After(700 * time.Millisecond):
	}
	if err := conn.Exec(ctx, "DROP TABLE "+lock); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Migrate once the lock was gone: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Migrate still waits 30s after the lock was dropped")
	}
	if got := schemaColumns(t, conn, db); got["report_daily"] == "" || got[migrationLockTable] != "" {
		t.Fatalf("after Migrate: want the views and no lock, got %v", got)
	}

	// A lock whose Migrate died: dropped once older than migrationLockStale.
	defer func(d time.Duration) { migrationLockStale = d }(migrationLockStale)
	migrationLockStale = time.Second
	hold()
	start := time.Now()
	stale, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := Migrate(stale, addr, db); err != nil {
		t.Fatalf("Migrate with a stale lock: %v", err)
	}
	if waited := time.Since(start); waited < time.Second {
		t.Fatalf("Migrate took a lock younger than migrationLockStale (%s) for stale: waited %s", migrationLockStale, waited)
	}
	if got := schemaColumns(t, conn, db); got[migrationLockTable] != "" {
		t.Fatalf("the lock is left after Migrate: %v", got)
	}
}

// schemaColumns returns "name Type, ..." per table of db, in column order, with
// the precision of wide decimals and the time zone of DateTime left out.
func schemaColumns(t *testing.T, conn driver.Conn, db string) map[string]string {
	t.Helper()
	rows, err := conn.Query(context.Background(),
		"SELECT table, name, type FROM system.columns WHERE database = ?", db)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	cols := make(map[string][]string)
	for rows.Next() {
		var table, name, typ string
		if err := rows.Scan(&table, &name, &typ); err != nil {
			t.Fatal(err)
		}
		if strings.HasPrefix(typ, "Decimal(") && typ != "Decimal(18, 4)" {
			typ = "Decimal"
		}
		if strings.HasPrefix(typ, "DateTime(") { // toStartOfHour names the server's zone on some releases
			typ = "DateTime"
		}
		cols[table] = append(cols[table], name+" "+typ)
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	out := make(map[string]string)
	for table, c := range cols {
		out[table] = strings.Join(c, ", ")
	}
	return out
}

// eventColumnNames returns the column names of an event's fields: their JSON
// names (see fieldColumn).
func eventColumnNames(event any) []string {
	typ := reflect.TypeOf(event)
	var cols []string
	for i := 0; i < typ.NumField(); i++ {
		if name, ok := fieldColumn(typ.Field(i)); ok {
			cols = append(cols, name)
		}
	}
	return cols
}

// fieldColumn returns the column of an event's field, its JSON name; not
// columns are the schema version, and ts to the nanosecond, which orders
// status updates in the attributor (the tables keep ts in seconds).
func fieldColumn(f reflect.StructField) (string, bool) {
	name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
	return name, name != "v" && name != "ts_ns"
}

// insertEvents writes events, each an INSERT of its own so that each is a part of
// its own, with the columns named after their fields: Unix milliseconds
// become DateTime, Amounts decimal strings.
func insertEvents(t *testing.T, conn driver.Conn, table string, events ...any) {
	t.Helper()
	ctx := context.Background()
	for _, e := range events {
		v := reflect.ValueOf(e)
		cols := eventColumnNames(e)
		batch, err := conn.PrepareBatch(ctx, "INSERT INTO "+table+" ("+strings.Join(cols, ", ")+")")
		if err != nil {
			t.Fatalf("cannot prepare insert into %s: %v", table, err)
		}
		var vals []any
		for i := 0; i < v.NumField(); i++ {
			if _, ok := fieldColumn(v.Type().Field(i)); !ok {
				continue
			}
			switch x := v.Field(i).Interface().(type) {
			case schemas.Amount:
				vals = append(vals, x.String())
			case int64:
				if name := cols[len(vals)]; name == "ts" || name == "click_ts" {
					vals = append(vals, time.UnixMilli(x))
				} else {
					vals = append(vals, x)
				}
			default:
				vals = append(vals, x)
			}
		}
		if err := batch.Append(vals...); err != nil {
			t.Fatalf("cannot append %+v to %s: %v", e, table, err)
		}
		if err := batch.Send(); err != nil {
			t.Fatalf("cannot insert %+v into %s: %v", e, table, err)
		}
	}
}

func countRows(t *testing.T, conn driver.Conn, query string) uint64 {
	t.Helper()
	var n uint64
	if err := conn.QueryRow(context.Background(), query).Scan(&n); err != nil {
		t.Fatalf("%s: %v", query, err)
	}
	return n
}

type reportViewRow struct {
	Clicks, Conversions, Pending, Rejected uint64
	CR                                     float64
	Revenue, Payout, Profit                schemas.Amount
	EPC, RPC                               float64
	Currency                               string
}

// readReportView returns the rows of a report view keyed "bucket/offer_id/aff_id".
func readReportView(t *testing.T, conn driver.Conn, view, bucket string) map[string]reportViewRow {
	t.Helper()
	rows, err := conn.Query(context.Background(), "SELECT toString("+bucket+"), offer_id, aff_id, clicks, conversions, pending, rejected, cr,"+
		" toString(revenue), toString(payout), toString(profit), epc, rpc, currency FROM "+view)
	if err != nil {
		t.Fatalf("cannot query %s: %v", view, err)
	}
	defer rows.Close()
	out := make(map[string]reportViewRow)
	for rows.Next() {
		var b, revenue, payout, profit string
		var offer, aff uint32
		var r reportViewRow
		if err := rows.Scan(&b, &offer, &aff, &r.Clicks, &r.Conversions, &r.Pending, &r.Rejected, &r.CR,
			&revenue, &payout, &profit, &r.EPC, &r.RPC, &r.Currency); err != nil {
			t.Fatalf("cannot read %s: %v", view, err)
		}
		for _, m := range []struct {
			dst *schemas.Amount
			s   string
		}{{&r.Revenue, revenue}, {&r.Payout, payout}, {&r.Profit, profit}} {
			if *m.dst, err = schemas.ParseAmount(m.s); err != nil {
				t.Fatalf("%s: bad amount %q: %v", view, m.s, err)
			}
		}
		out[fmt.Sprintf("%s/%d/%d", b, offer, aff)] = r
	}
	if err := rows.Err(); err != nil {
		t.Fatalf("cannot read %s: %v", view, err)
	}
	return out
}

// TestReportsCountEachEventOnce inserts a redelivered click, a conversion
// in two versions (the second one redelivered) and a redelivered delivery
// attempt, with merges stopped so that every duplicate is a row of its own,
// and checks that the reports count each click and conversion once, by its
// latest version; then lets the server merge and checks that the tables'
// sorting keys collapse exactly the duplicates.
func TestReportsCountEachEventOnce(t *testing.T) {
	addr, db := testenv.ClickHouseDB(t)
	ctx := context.Background()
	if err := Migrate(ctx, addr, db); err != nil {
		t.Fatal(err)
	}
	conn, err := Open(ctx, addr, db)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	tables := []string{db + ".clicks", db + ".conversions", db + ".postback_deliveries"}
	for _, table := range tables {
		if err := conn.Exec(ctx, "SYSTEM STOP MERGES "+table); err != nil {
			t.Fatal(err)
		}
	}

	// 10:00 in the server's time zone, so that the expected day and hours
	// hold wherever the server is; mid-January has no DST change anywhere.
	v, err := conn.ServerVersion()
	if err != nil {
		t.Fatal(err)
	}
	t0 := time.Date(2024, 1, 15, 10, 0, 0, 0, v.Timezone)
	at := func(min int) int64 { return t0.Add(time.Duration(min) * time.Minute).UnixMilli() }
	amount := func(s string) schemas.Amount {
		t.Helper()
		a, err := schemas.ParseAmount(s)
		if err != nil {
			t.Fatal(err)
		}
		return a
	}

	click := func(id string, min int, offer, aff uint32) schemas.Click {
		return schemas.Click{ClickID: id, TS: at(min), OfferID: offer, AdvertiserID: 3, AffID: aff, Source: "src",
			Sub1: "s1", IP: "192.0.2.1", UserAgent: "ua", Referer: "https://ref.example/"}
	}
	c1 := click("c1", 0, 1, 7)
	insertEvents(t, conn, db+".clicks", c1, c1, click("c2", 60, 1, 7), click("c3", 65, 1, 7), click("c4", 0, 2, 8))

	conv := func(id string, version uint32, min int, offer, aff uint32, status, reason, revenue, payout string) schemas.Conversion {
		return schemas.Conversion{ConversionID: id, Version: version, PostbackEventID: fmt.Sprintf("pb-%s-%d", id, version),
			ClickID: "c-" + id, TS: at(min), ClickTS: at(0), OfferID: offer, AdvertiserID: 3, AffID: aff, Goal: "default",
			Status: status, RejectReason: reason, SaleAmount: amount("19.99"), Revenue: amount(revenue), Payout: amount(payout),
			Currency: "USD", CTITSeconds: int64(min * 60), Source: "src", Sub1: "s1"}
	}
	approvedA := conv("A", 2, 70, 1, 7, schemas.StatusApproved, "", "2.5", "1.75")
	unknown := conv("E", 1, 6, 0, 0, schemas.StatusRejected, schemas.RejectUnknownClick, "0", "0")
	unknown.ClickTS, unknown.Currency = 0, ""
	insertEvents(t, conn, db+".conversions",
		conv("A", 1, 4, 1, 7, schemas.StatusPending, "", "2.5", "1.75"),
		approvedA,
		approvedA,
		conv("B", 1, 2, 1, 7, schemas.StatusPending, "", "2.5", "1.75"),
		conv("C", 1, 3, 1, 7, schemas.StatusRejected, schemas.RejectDuplicate, "0", "0"),
		conv("D", 1, 5, 2, 8, schemas.StatusApproved, "", "10", "7.5"),
		unknown,
	)
	attempt := func(n uint32, outcome string, code uint16) schemas.Delivery {
		return schemas.Delivery{ConversionID: "A", Version: 2, Status: schemas.StatusApproved, AffID: 7, Attempt: n,
			TS: at(70 + int(n)), Method: "GET", URL: "https://partner.example/pb?tx=A", StatusCode: code, DurationMS: 12,
			Outcome: outcome}
	}
	first := attempt(1, schemas.OutcomeRetrying, 503)
	insertEvents(t, conn, db+".postback_deliveries", first, first, attempt(2, schemas.OutcomeDelivered, 200))

	day, hour10, hour11 := "2024-01-15", "2024-01-15 10:00:00", "2024-01-15 11:00:00"
	wantDaily := map[string]reportViewRow{
		day + "/1/7": {Clicks: 3, Conversions: 1, Pending: 1, Rejected: 1, CR: 0.333333,
			Revenue: amount("2.5"), Payout: amount("1.75"), Profit: amount("0.75"), EPC: 0.5833, RPC: 0.8333, Currency: "USD"},
		day + "/2/8": {Clicks: 1, Conversions: 1, CR: 1,
			Revenue: amount("10"), Payout: amount("7.5"), Profit: amount("2.5"), EPC: 7.5, RPC: 10, Currency: "USD"},
		day + "/0/0": {Rejected: 1},
	}
	wantHourly := map[string]reportViewRow{
		// A was pending at 10:04 and approved at 11:10: it counts once, at 11.
		hour10 + "/1/7": {Clicks: 1, Pending: 1, Rejected: 1},
		hour11 + "/1/7": {Clicks: 2, Conversions: 1, CR: 0.5,
			Revenue: amount("2.5"), Payout: amount("1.75"), Profit: amount("0.75"), EPC: 0.875, RPC: 1.25, Currency: "USD"},
		hour10 + "/2/8": wantDaily[day+"/2/8"],
		hour10 + "/0/0": {Rejected: 1},
	}
	check := func(stage string) {
		t.Helper()
		f := func(view, bucket string, want map[string]reportViewRow) {
			t.Helper()
			got := readReportView(t, conn, db+"."+view, bucket)
			if !reflect.DeepEqual(got, want) {
				t.Fatalf("%s: %s:\n got %+v\nwant %+v", stage, view, got, want)
			}
		}
		f("report_daily", "day", wantDaily)
		f("report_hourly", "hour", wantHourly)
	}
	rawCounts := func(stage string, clicks, conversions, deliveries uint64) {
		t.Helper()
		for i, want := range []uint64{clicks, conversions, deliveries} {
			if n := countRows(t, conn, "SELECT count() FROM "+tables[i]); n != want {
				t.Fatalf("%s: %s holds %d rows, want %d", stage, tables[i], n, want)
			}
		}
	}

	rawCounts("before merges", 5, 7, 3) // the duplicates are there...
	check("before merges")              // ...and the reports do not see them

	for _, table := range tables {
		if err := conn.Exec(ctx, "SYSTEM START MERGES "+table); err != nil {
			t.Fatal(err)
		}
		if err := conn.Exec(ctx, "OPTIMIZE TABLE "+table+" FINAL"); err != nil {
			t.Fatal(err)
		}
	}
	rawCounts("after merges", 4, 5, 2)
	check("after merges")

	var status string
	var version uint32
	if err := conn.QueryRow(ctx, "SELECT status, version FROM "+db+".conversions WHERE conversion_id = 'A'").Scan(&status, &version); err != nil {
		t.Fatal(err)
	}
	if status != schemas.StatusApproved || version != 2 {
		t.Fatalf("after merges conversion A is %s version %d, want approved version 2", status, version)
	}
	var outcomes []string
	rows, err := conn.Query(ctx, "SELECT outcome FROM "+db+".postback_deliveries ORDER BY attempt")
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var o string
		if err := rows.Scan(&o); err != nil {
			t.Fatal(err)
		}
		outcomes = append(outcomes, o)
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	if want := []string{schemas.OutcomeRetrying, schemas.OutcomeDelivered}; !reflect.DeepEqual(outcomes, want) {
		t.Fatalf("after merges the delivery attempts are %q, want %q", outcomes, want)
	}
}
