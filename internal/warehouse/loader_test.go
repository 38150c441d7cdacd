package warehouse

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/segmentio/kafka-go"

	"github.com/trackstar/trackstar/internal/bus"
	"github.com/trackstar/trackstar/internal/ops"
	"github.com/trackstar/trackstar/internal/testenv"
	"github.com/trackstar/trackstar/schemas"
)

// loaderDataset is what a test produces to the topics and what it expects
// in ClickHouse afterwards.
type loaderDataset struct {
	clicks, conversions, deliveries []kafka.Message

	uniqueClicks  uint64
	finalConv     map[string]string // conversion_id -> "version status revenue payout" of its last version
	finalDeliv    uint64            // distinct delivery attempts
	approved      uint64
	pending       uint64
	rejected      uint64
	revenue       schemas.Amount
	payout        schemas.Amount
	conversionIDs []string
}

func mustAmount(s string) schemas.Amount {
	a, err := schemas.ParseAmount(s)
	if err != nil {
		panic(err)
	}
	return a
}

// newLoaderDataset builds n clicks from t0 on, every fourth one converting
// in one of four ways, plus conversions of unknown clicks and delivery
// attempts of the approved ones, with redeliveries of clicks, conversion
// versions and attempts along the way.
func newLoaderDataset(t0 time.Time, n int) *loaderDataset {
	d := &loaderDataset{finalConv: make(map[string]string)}
	click := func(i int) schemas.Click {
		ts := t0.Add(time.Duration(i) * 20 * time.Second)
		return schemas.Click{ClickID: schemas.NewID(ts), TS: ts.UnixMilli(), OfferID: uint32(1 + i%2), AdvertiserID: 3,
			AffID: uint32(7 + (i/2)%2), Source: "src", Sub1: "s" + strconv.Itoa(i), IP: "192.0.2.1",
			UserAgent: "Mozilla/5.0", Referer: "https://ref.example/"}
	}
	conv := func(c schemas.Click, version uint32, after time.Duration, status, reason, revenue, payout string) schemas.Conversion {
		return schemas.Conversion{ConversionID: "conv-" + c.ClickID, Version: version,
			PostbackEventID: fmt.Sprintf("pb-%s-%d", c.ClickID, version), ClickID: c.ClickID,
			TS: c.TS + after.Milliseconds(), ClickTS: c.TS, OfferID: c.OfferID, AdvertiserID: c.AdvertiserID, AffID: c.AffID,
			Goal: "default", Status: status, RejectReason: reason, SaleAmount: mustAmount("19.99"),
			Revenue: mustAmount(revenue), Payout: mustAmount(payout), Currency: "USD",
			CTITSeconds: int64(after / time.Second), Source: c.Source, Sub1: c.Sub1}
	}
	emit := func(c schemas.Conversion) {
		d.conversions = append(d.conversions, kafka.Message{Key: []byte(c.ClickID), Value: schemas.EncodeConversion(c)})
	}
	final := func(c schemas.Conversion) {
		d.finalConv[c.ConversionID] = fmt.Sprintf("%d %s %s %s", c.Version, c.Status, c.Revenue, c.Payout)
		d.conversionIDs = append(d.conversionIDs, c.ConversionID)
		switch c.Status {
		case schemas.StatusApproved:
			d.approved++
			d.revenue += c.Revenue
			d.payout += c.Payout
			for attempt := uint32(1); attempt <= 2; attempt++ {
				del := schemas.Delivery{ConversionID: c.ConversionID, Version: c.Version, Status: c.Status, AffID: c.AffID,
					Attempt: attempt, TS: c.TS + int64(attempt)*1000, Method: "GET",
					URL: "https://partner.example/pb?tx=" + c.ConversionID, StatusCode: 503, DurationMS: 12,
					Outcome: schemas.OutcomeRetrying, Error: "503 Service Unavailable"}
				if attempt == 2 {
					del.StatusCode, del.Outcome, del.Error = 200, schemas.OutcomeDelivered, ""
				}
				m := kafka.Message{Key: []byte(c.ConversionID), Value: schemas.EncodeDelivery(del)}
				d.deliveries = append(d.deliveries, m)
				if attempt == 1 {
					d.deliveries = append(d.deliveries, m) // the dispatcher's producer retried
				}
				d.finalDeliv++
			}
		case schemas.StatusPending:
			d.pending++
		case schemas.StatusRejected:
			d.rejected++
		}
	}

	for i := 0; i < n; i++ {
		c := click(i)
		m := kafka.Message{Key: []byte(c.ClickID), Value: c.AppendJSON(nil)}
		d.clicks = append(d.clicks, m)
		if i%6 == 0 {
			d.clicks = append(d.clicks, m) // the edge's producer retried
		}
		d.uniqueClicks++
		if i%4 != 0 {
			continue
		}
		switch i % 16 {
		case 0: // approved at once; some on a percent goal with four decimals
			a := conv(c, 1, 5*time.Minute, schemas.StatusApproved, "", "2.5", "1.75")
			if i%48 == 0 {
				a.Goal, a.Revenue, a.Payout = "sale", mustAmount("1.999"), mustAmount("1.3993")
			}
			emit(a)
			final(a)
		case 4: // held, then approved: the same conversion, version 2
			v1 := conv(c, 1, 5*time.Minute, schemas.StatusPending, "", "2.5", "1.75")
			v2 := conv(c, 2, 30*time.Minute, schemas.StatusApproved, "", "2.5", "1.75")
			emit(v1)
			emit(v2)
			if i%32 == 4 {
				emit(v1) // an old version replayed after the new one
			}
			final(v2)
		case 8: // still pending
			p := conv(c, 1, 5*time.Minute, schemas.StatusPending, "", "2.5", "1.75")
			emit(p)
			final(p)
		case 12: // the advertiser's repeated request
			r := conv(c, 1, 6*time.Minute, schemas.StatusRejected, schemas.RejectDuplicate, "0", "0")
			emit(r)
			emit(r) // the attributor re-emitted it after a crash
			final(r)
		}
	}
	for i := 0; i < 5; i++ {
		ts := t0.Add(time.Duration(i) * time.Minute)
		r := schemas.Conversion{ConversionID: fmt.Sprintf("conv-unknown-%d", i), Version: 1,
			PostbackEventID: fmt.Sprintf("pb-unknown-%d", i), ClickID: schemas.NewID(ts), TS: ts.UnixMilli(),
			AdvertiserID: 3, Goal: "default", Status: schemas.StatusRejected, RejectReason: schemas.RejectUnknownClick}
		emit(r)
		final(r)
	}
	return d
}

// produce writes msgs to topic, keyed as they are.
func produce(t *testing.T, broker, topic string, msgs []kafka.Message) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	w := bus.NewWriter(bus.WriterConfig{Brokers: []string{broker}, Topic: topic})
	defer w.Close()
	for len(msgs) > 0 {
		n := min(len(msgs), 500)
		if err := w.WriteMessages(ctx, msgs[:n]...); err != nil {
			t.Fatalf("cannot produce to %s: %v", topic, err)
		}
		msgs = msgs[n:]
	}
}

func (d *loaderDataset) produce(t *testing.T, broker string) {
	t.Helper()
	produce(t, broker, bus.TopicClicks, d.clicks)
	produce(t, broker, bus.TopicConversions, d.conversions)
	produce(t, broker, bus.TopicDeliveries, d.deliveries)
}

// tWriter sends log lines to t.Log.
type tWriter struct{ t *testing.T }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// startLoader runs RunLoader until the returned stop is called or the test
// ends, and fails the test unless it returns nil.
func startLoader(t *testing.T, cfg LoaderConfig) (stop func()) {
	t.Helper()
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelWarn}))
	}
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- RunLoader(ctx, cfg) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-errc:
				if err != nil {
					t.Errorf("RunLoader returned %v, want nil", err)
				}
			case <-time.After(time.Minute):
				t.Errorf("RunLoader did not return within a minute of its context ending")
			}
		})
	}
	t.Cleanup(stop)
	return stop
}

// eventually polls cond until it returns nil, failing the test with its
// last error after timeout.
func eventually(t *testing.T, what string, timeout time.Duration, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting until %s: %v", timeout, what, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func queryUint64(t *testing.T, conn driver.Conn, query string) uint64 {
	t.Helper()
	var n uint64
	if err := conn.QueryRow(context.Background(), query).Scan(&n); err != nil {
		t.Fatalf("%s: %v", query, err)
	}
	return n
}

// groupOffsets returns the sum over the loader's topics and partitions of
// the group's committed offsets and of the end offsets.
func groupOffsets(broker, group string) (committed, end int64, err error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	client := &kafka.Client{Addr: kafka.TCP(broker)}
	parts := make(map[string][]int)
	last := make(map[string][]kafka.OffsetRequest)
	md, err := client.Metadata(ctx, &kafka.MetadataRequest{Topics: []string{bus.TopicClicks, bus.TopicConversions, bus.TopicDeliveries}})
	if err != nil {
		return 0, 0, err
	}
	for _, tp := range md.Topics {
		for _, p := range tp.Partitions {
			parts[tp.Name] = append(parts[tp.Name], p.ID)
			last[tp.Name] = append(last[tp.Name], kafka.LastOffsetOf(p.ID))
		}
	}
	of, err := client.OffsetFetch(ctx, &kafka.OffsetFetchRequest{GroupID: group, Topics: parts})
	if err != nil {
		return 0, 0, err
	}
	for _, ps := range of.Topics {
		for _, p := range ps {
			committed += max(p.CommittedOffset, 0)
		}
	}
	lo, err := client.ListOffsets(ctx, &kafka.ListOffsetsRequest{Topics: last})
	if err != nil {
		return 0, 0, err
	}
	for _, ps := range lo.Topics {
		for _, p := range ps {
			end += p.LastOffset
		}
	}
	return committed, end, nil
}

// allCommitted waits until the group has committed every record of the
// loader's topics.
func allCommitted(t *testing.T, broker, group string) {
	t.Helper()
	eventually(t, "the loader committed every record", time.Minute, func() error {
		committed, end, err := groupOffsets(broker, group)
		if err != nil {
			return err
		}
		if committed != end {
			return fmt.Errorf("group %s committed %d of %d records", group, committed, end)
		}
		return nil
	})
}

// metricValue returns the value of the counter or gauge name with the
// given label pairs, or 0 when there is none.
func metricValue(t *testing.T, reg *prometheus.Registry, name string, labels ...string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	metrics:
		for _, m := range mf.GetMetric() {
			have := make(map[string]string)
			for _, lp := range m.GetLabel() {
				have[lp.GetName()] = lp.GetValue()
			}
			for i := 0; i+1 < len(labels); i += 2 {
				if have[labels[i]] != labels[i+1] {
					continue metrics
				}
			}
			if c := m.GetCounter(); c != nil {
				return c.GetValue()
			}
			return m.GetGauge().GetValue()
		}
	}
	return 0
}

// checkLoaded compares the tables (read with FINAL) and the report views
// with what the dataset expects.
func (d *loaderDataset) checkLoaded(t *testing.T, conn driver.Conn, db string) {
	t.Helper()
	ctx := context.Background()
	if n := queryUint64(t, conn, "SELECT count() FROM "+db+".clicks FINAL"); n != d.uniqueClicks {
		t.Fatalf("clicks FINAL holds %d rows, want %d", n, d.uniqueClicks)
	}
	if n := queryUint64(t, conn, "SELECT uniqExact(click_id) FROM "+db+".clicks"); n != d.uniqueClicks {
		t.Fatalf("clicks holds %d distinct click IDs, want %d", n, d.uniqueClicks)
	}
	if n := queryUint64(t, conn, "SELECT count() FROM "+db+".postback_deliveries FINAL"); n != d.finalDeliv {
		t.Fatalf("postback_deliveries FINAL holds %d rows, want %d", n, d.finalDeliv)
	}

	rows, err := conn.Query(ctx, "SELECT conversion_id, version, status, toString(revenue), toString(payout) FROM "+db+".conversions FINAL")
	if err != nil {
		t.Fatal(err)
	}
	got := make(map[string]string)
	for rows.Next() {
		var id, status, revenue, payout string
		var version uint32
		if err := rows.Scan(&id, &version, &status, &revenue, &payout); err != nil {
			t.Fatal(err)
		}
		if _, dup := got[id]; dup {
			t.Fatalf("conversions FINAL holds conversion %s twice", id)
		}
		got[id] = fmt.Sprintf("%d %s %s %s", version, status, mustAmount(revenue), mustAmount(payout))
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	rows.Close()
	if !reflect.DeepEqual(got, d.finalConv) {
		for id, want := range d.finalConv {
			if got[id] != want {
				t.Errorf("conversion %s: got %q, want %q", id, got[id], want)
			}
		}
		t.Fatalf("conversions FINAL holds %d conversions, want %d", len(got), len(d.finalConv))
	}

	for _, view := range []string{"report_daily", "report_hourly"} {
		var clicks, approved, pending, rejected uint64
		var revenue, payout, profit string
		if err := conn.QueryRow(ctx, "SELECT sum(clicks), sum(conversions), sum(pending), sum(rejected),"+
			" toString(sum(revenue)), toString(sum(payout)), toString(sum(profit)) FROM "+db+"."+view).
			Scan(&clicks, &approved, &pending, &rejected, &revenue, &payout, &profit); err != nil {
			t.Fatalf("cannot sum %s: %v", view, err)
		}
		gotSums := fmt.Sprintf("clicks=%d approved=%d pending=%d rejected=%d revenue=%s payout=%s profit=%s",
			clicks, approved, pending, rejected, mustAmount(revenue), mustAmount(payout), mustAmount(profit))
		wantSums := fmt.Sprintf("clicks=%d approved=%d pending=%d rejected=%d revenue=%s payout=%s profit=%s",
			d.uniqueClicks, d.approved, d.pending, d.rejected, d.revenue, d.payout, d.revenue-d.payout)
		if gotSums != wantSums {
			t.Fatalf("%s totals:\n got %s\nwant %s", view, gotSums, wantSums)
		}
	}
}

// serverTime returns 2024-01-15 10:00 in the ClickHouse server's time zone,
// so that the days and hours of the reports are the same wherever it runs.
func serverTime(t *testing.T, conn driver.Conn) time.Time {
	t.Helper()
	v, err := conn.ServerVersion()
	if err != nil {
		t.Fatal(err)
	}
	return time.Date(2024, 1, 15, 10, 0, 0, 0, v.Timezone)
}

func migratedDB(t *testing.T, addr, db string) driver.Conn {
	t.Helper()
	ctx := context.Background()
	if err := Migrate(ctx, addr, db); err != nil {
		t.Fatal(err)
	}
	conn, err := Open(ctx, addr, db)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// TestLoaderLoadsEveryRecordOnce loads clicks (some produced twice),
// conversions (status updates, replayed old versions, rejections) and
// delivery attempts, checks that exactly the expected rows and totals come
// out, that every offset is committed and every record inserted once; then
// loads the same topics again in a second group, as after lost offsets, and
// checks that nothing counts twice.
func TestLoaderLoadsEveryRecordOnce(t *testing.T) {
	broker := testenv.KafkaTopics(t, 4)
	chAddr, db := testenv.ClickHouseDB(t)
	conn := migratedDB(t, chAddr, db)

	d := newLoaderDataset(serverTime(t, conn), 600)
	d.produce(t, broker)

	reg := prometheus.NewRegistry()
	stop := startLoader(t, LoaderConfig{Brokers: []string{broker}, ClickHouse: chAddr, Database: db,
		Group: "loader-a", MaxRows: 64, FlushInterval: 50 * time.Millisecond, Registry: reg})
	allCommitted(t, broker, "loader-a")
	d.checkLoaded(t, conn, db)

	// Every record was inserted exactly once: only offsets of inserted
	// rows were committed, and no batch was retried.
	f := func(table string, want int) {
		t.Helper()
		if got := metricValue(t, reg, "trackstar_loader_rows_inserted_total", "table", table); got != float64(want) {
			t.Errorf("rows inserted into %s = %v, want %d", table, got, want)
		}
		if got := queryUint64(t, conn, "SELECT count() FROM "+db+"."+table); got > uint64(want) {
			t.Errorf("%s holds %d rows, more than the %d records produced", table, got, want)
		}
		if got := metricValue(t, reg, "trackstar_loader_buffered_rows", "table", table); got != 0 {
			t.Errorf("buffered rows of %s = %v after everything was committed, want 0", table, got)
		}
	}
	f("clicks", len(d.clicks))
	f("conversions", len(d.conversions))
	f("postback_deliveries", len(d.deliveries))
	eventually(t, "the lag gauge reaches 0", 2*monitorInterval+5*time.Second, func() error {
		for _, topic := range []string{bus.TopicClicks, bus.TopicConversions, bus.TopicDeliveries} {
			if lag := metricValue(t, reg, "trackstar_loader_lag_records", "topic", topic); lag != 0 {
				return fmt.Errorf("lag of %s is %v", topic, lag)
			}
		}
		return nil
	})
	stop()

	// A group that lost its offsets loads everything again.
	startLoader(t, LoaderConfig{Brokers: []string{broker}, ClickHouse: chAddr, Database: db,
		Group: "loader-b", MaxRows: 1000, FlushInterval: 50 * time.Millisecond})
	allCommitted(t, broker, "loader-b")
	d.checkLoaded(t, conn, db)
}

// TestLoaderDeadLettersUndecodableRecords puts records the loader cannot
// decode between good ones and checks that each goes to trackstar.dlq with
// its origin and reason, and that the good records after them land and
// every offset is committed.
func TestLoaderDeadLettersUndecodableRecords(t *testing.T) {
	broker := testenv.KafkaTopics(t, 1)
	chAddr, db := testenv.ClickHouseDB(t)
	conn := migratedDB(t, chAddr, db)

	t0 := serverTime(t, conn)
	good := func(i int) kafka.Message { return goodClick(t0, i) }
	bad := func(key, value string) kafka.Message { return kafka.Message{Key: []byte(key), Value: []byte(value)} }
	produce(t, broker, bus.TopicClicks, []kafka.Message{
		good(0),
		bad("k1", `{"v":1,"click_id":`), // offset 1: truncated JSON
		bad("k2", `{"v":2,"click_id":"x","ts":1}`),  // offset 2: a version from the future
		bad("k3", `{"v":1,"ts":1}`),                 // offset 3: no click ID
		bad("k4", `{"v":1,"click_id":"x","ts":-5}`), // offset 4: no DateTime
		bad("k5", "\xff\xfe not even text"),         // offset 5: binary
		good(1), good(2), good(3),
	})
	conv := schemas.Conversion{ConversionID: "conv-1", Version: 1, ClickID: "c", TS: t0.UnixMilli(), Status: schemas.StatusApproved,
		Revenue: mustAmount("2.5"), Payout: mustAmount("1.75")}
	produce(t, broker, bus.TopicConversions, []kafka.Message{
		bad("c", strings.Replace(string(schemas.EncodeConversion(conv)), `"revenue":"2.5"`, `"revenue":"2,5"`, 1)),
		{Key: []byte("c"), Value: schemas.EncodeConversion(conv)},
	})
	produce(t, broker, bus.TopicDeliveries, []kafka.Message{bad("conv-1", "null")})

	reg := prometheus.NewRegistry()
	startLoader(t, LoaderConfig{Brokers: []string{broker}, ClickHouse: chAddr, Database: db, Group: "loader-dlq",
		MaxRows: 2, FlushInterval: 20 * time.Millisecond, Registry: reg})
	allCommitted(t, broker, "loader-dlq")
	if n := queryUint64(t, conn, "SELECT count() FROM "+db+".clicks FINAL"); n != 4 {
		t.Fatalf("clicks holds %d rows, want the 4 good ones", n)
	}
	if n := queryUint64(t, conn, "SELECT count() FROM "+db+".conversions FINAL WHERE status = 'approved' AND revenue = toDecimal64('2.5', 4)"); n != 1 {
		t.Fatalf("conversions holds %d approved rows of revenue 2.5, want 1", n)
	}

	r := kafka.NewReader(kafka.ReaderConfig{Brokers: []string{broker}, Topic: bus.TopicDLQ, Partition: 0, MaxWait: 100 * time.Millisecond})
	defer r.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	got := make(map[string]DeadLetter)
	for len(got) < 7 {
		m, err := r.ReadMessage(ctx)
		if err != nil {
			t.Fatalf("read %s after %d dead letters: %v", bus.TopicDLQ, len(got), err)
		}
		var dl DeadLetter
		if err := json.Unmarshal(m.Value, &dl); err != nil {
			t.Fatalf("dead letter %q is not JSON: %v", m.Value, err)
		}
		if string(m.Key) != dl.Key {
			t.Errorf("dead letter keyed %q holds key %q", m.Key, dl.Key)
		}
		got[fmt.Sprintf("%s/%d/%d", dl.Topic, dl.Partition, dl.Offset)] = dl
	}
	f := func(where, key, value string, valueBytes []byte, reason string) {
		t.Helper()
		dl, ok := got[where]
		if !ok {
			t.Fatalf("no dead letter for %s; have %v", where, got)
		}
		if dl.Key != key || dl.Value != value || !bytes.Equal(dl.ValueBase64, valueBytes) || !strings.Contains(dl.Error, reason) {
			t.Fatalf("dead letter for %s = %+v, want key %q, value %q (%q), error containing %q", where, dl, key, value, valueBytes, reason)
		}
	}
	f(bus.TopicClicks+"/0/1", "k1", `{"v":1,"click_id":`, nil, "cannot decode click event")
	f(bus.TopicClicks+"/0/2", "k2", `{"v":2,"click_id":"x","ts":1}`, nil, "unknown schema version 2")
	f(bus.TopicClicks+"/0/3", "k3", `{"v":1,"ts":1}`, nil, "without click_id")
	f(bus.TopicClicks+"/0/4", "k4", `{"v":1,"click_id":"x","ts":-5}`, nil, "outside the range of a ClickHouse DateTime")
	f(bus.TopicClicks+"/0/5", "k5", "", []byte("\xff\xfe not even text"), "cannot decode click event")
	f(bus.TopicConversions+"/0/0", "c", strings.Replace(string(schemas.EncodeConversion(conv)), `"revenue":"2.5"`, `"revenue":"2,5"`, 1), nil,
		"not a decimal number")
	f(bus.TopicDeliveries+"/0/0", "conv-1", "null", nil, "unknown schema version 0")

	for topic, want := range map[string]float64{bus.TopicClicks: 5, bus.TopicConversions: 1, bus.TopicDeliveries: 1} {
		if n := metricValue(t, reg, "trackstar_loader_dead_letters_total", "topic", topic); n != want {
			t.Errorf("dead letters of %s = %v, want %v", topic, n, want)
		}
	}
}

// privateClickHouse is a ClickHouse server of one test's own, on a free
// port, which the test may kill and start again without disturbing the
// shared test server.
type privateClickHouse struct {
	t      *testing.T
	bin    string
	args   []string
	dir    string
	addr   string
	cmd    *exec.Cmd
	exited chan struct{}
}

// startPrivateClickHouse starts a server from the clickhouse-server (or
// clickhouse) binary on PATH or in /usr/sbin. Without one, the test fails where ClickHouse
// is required (CI=true or TRACKSTAR_REQUIRE_CLICKHOUSE=1) and is skipped
// otherwise, as testenv does.
func startPrivateClickHouse(t *testing.T) *privateClickHouse {
	t.Helper()
	p := &privateClickHouse{t: t, dir: t.TempDir()}
	// Debian installs the server in /usr/sbin, which a user's PATH may lack.
	const sbin = "/usr/sbin/clickhouse-server"
	if bin, err := exec.LookPath("clickhouse-server"); err == nil {
		p.bin = bin
	} else if bin, err := exec.LookPath("clickhouse"); err == nil {
		p.bin, p.args = bin, []string{"server"}
	} else if _, err := os.Stat(sbin); err == nil {
		p.bin = sbin
	} else {
		if os.Getenv("CI") == "true" || os.Getenv("TRACKSTAR_REQUIRE_CLICKHOUSE") == "1" {
			t.Fatalf("ClickHouse is required but neither clickhouse-server nor clickhouse is on PATH")
		}
		t.Skip("neither clickhouse-server nor clickhouse is on PATH: cannot start a private ClickHouse")
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	p.addr = net.JoinHostPort("127.0.0.1", strconv.Itoa(port))

	users := `<?xml version="1.0"?>
<yandex>
  <profiles><default></default></profiles>
  <users><default><password></password><networks><ip>::/0</ip></networks><profile>default</profile><quota>default</quota></default></users>
  <quotas><default></default></quotas>
</yandex>
`
	config := fmt.Sprintf(`<?xml version="1.0"?>
<yandex>
  <logger><level>warning</level><log>%[1]s/server.log</log><errorlog>%[1]s/server.err.log</errorlog><console>0</console></logger>
  <tcp_port>%[2]d</tcp_port>
  <listen_host>127.0.0.1</listen_host>
  <path>%[1]s/data/</path>
  <tmp_path>%[1]s/tmp/</tmp_path>
  <user_files_path>%[1]s/user_files/</user_files_path>
  <format_schema_path>%[1]s/format_schemas/</format_schema_path>
  <users_config>users.xml</users_config>
  <default_profile>default</default_profile>
  <default_database>default</default_database>
  <mark_cache_size>53687091</mark_cache_size>
</yandex>
`, p.dir, port)
	for name, text := range map[string]string{"users.xml": users, "config.xml": config} {
		if err := os.WriteFile(filepath.Join(p.dir, name), []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	p.start()
	t.Cleanup(p.kill)
	return p
}

// start runs the server and waits until it answers.
func (p *privateClickHouse) start() {
	p.t.Helper()
	out, err := os.OpenFile(filepath.Join(p.dir, "stdout.log"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		p.t.Fatal(err)
	}
	defer out.Close()
	p.cmd = exec.Command(p.bin, append(p.args, "--config-file="+filepath.Join(p.dir, "config.xml"))...)
	p.cmd.Dir = p.dir
	p.cmd.Stdout, p.cmd.Stderr = out, out
	if err := p.cmd.Start(); err != nil {
		p.t.Fatalf("cannot start private ClickHouse: %v", err)
	}
	p.exited = make(chan struct{})
	go func(cmd *exec.Cmd, exited chan struct{}) {
		_ = cmd.Wait()
		close(exited)
	}(p.cmd, p.exited)
	eventually(p.t, "the private ClickHouse answers", time.Minute, func() error {
		select {
		case <-p.exited:
			log, _ := os.ReadFile(filepath.Join(p.dir, "server.err.log"))
			p.t.Fatalf("private ClickHouse exited: %s", log)
		default:
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		conn, err := Open(ctx, p.addr, "")
		if err != nil {
			return err
		}
		return conn.Close()
	})
}

// kill stops the server the hard way, as a crash or a pulled plug would.
func (p *privateClickHouse) kill() {
	if p.cmd == nil {
		return
	}
	_ = p.cmd.Process.Kill()
	<-p.exited
	p.cmd = nil
}

// TestLoaderCatchesUpAfterClickHouseOutage kills ClickHouse while records
// keep coming, checks that the loader reports it, holds no more than its
// bounded buffer and commits nothing it has not inserted, then brings
// ClickHouse back and checks that every record lands, once.
func TestLoaderCatchesUpAfterClickHouseOutage(t *testing.T) {
	broker := testenv.KafkaTopics(t, 2)
	ch := startPrivateClickHouse(t)
	const db = "trackstar"
	conn := migratedDB(t, ch.addr, db)
	t0 := serverTime(t, conn)

	const maxRows = 50
	reg := prometheus.NewRegistry()
	health := &ops.Health{}
	startLoader(t, LoaderConfig{Brokers: []string{broker}, ClickHouse: ch.addr, Database: db, Group: "loader-outage",
		MaxRows: maxRows, FlushInterval: 20 * time.Millisecond, MaxRetryWait: 200 * time.Millisecond,
		Registry: reg, Health: health})

	// A fifth of the records come before the outage, the rest during it.
	d := newLoaderDataset(t0, 1200)
	part := func(msgs []kafka.Message, during bool) []kafka.Message {
		if during {
			return msgs[len(msgs)/5:]
		}
		return msgs[:len(msgs)/5]
	}
	for _, during := range []bool{false, true} {
		if during {
			ch.kill()
		}
		produce(t, broker, bus.TopicClicks, part(d.clicks, during))
		produce(t, broker, bus.TopicConversions, part(d.conversions, during))
		produce(t, broker, bus.TopicDeliveries, part(d.deliveries, during))
		if !during {
			allCommitted(t, broker, "loader-outage")
			if err := health.Ready(); err != nil {
				t.Fatalf("loader not ready with ClickHouse up: %v", err)
			}
		}
	}
	committedBefore := int64(len(d.clicks)/5 + len(d.conversions)/5 + len(d.deliveries)/5)

	eventually(t, "readiness reports ClickHouse unreachable", 30*time.Second, func() error {
		err := health.Ready()
		if err == nil || !strings.Contains(err.Error(), "clickhouse unreachable") {
			return fmt.Errorf("readiness: %v", err)
		}
		return nil
	})
	// The loader reads on until a table has a batch waiting for ClickHouse
	// and the next one full, then stops: no table ever holds more than two
	// batches.
	eventually(t, "a table's buffer fills up to its bound", 30*time.Second, func() error {
		var most float64
		for _, table := range []string{"clicks", "conversions", "postback_deliveries"} {
			n := metricValue(t, reg, "trackstar_loader_buffered_rows", "table", table)
			if n > 2*maxRows {
				t.Fatalf("loader buffers %v rows of %s with ClickHouse down, more than 2 batches of %d", n, table, maxRows)
			}
			most = max(most, n)
		}
		if most <= maxRows {
			return fmt.Errorf("at most %v rows buffered per table", most)
		}
		return nil
	})
	eventually(t, "the loader retried its inserts a few times", 30*time.Second, func() error {
		var n float64
		for _, table := range []string{"clicks", "conversions", "postback_deliveries"} {
			n += metricValue(t, reg, "trackstar_loader_insert_errors_total", "table", table)
		}
		if n < 3 {
			return fmt.Errorf("%v insert errors counted", n)
		}
		return nil
	})
	if committed, _, err := groupOffsets(broker, "loader-outage"); err != nil || committed != committedBefore {
		t.Fatalf("with ClickHouse down the loader committed %d offsets (%v), want the %d from before", committed, err, committedBefore)
	}

	ch.start()
	allCommitted(t, broker, "loader-outage")
	d.checkLoaded(t, conn, db)
	eventually(t, "the loader is ready again", 30*time.Second, health.Ready)
}

// TestLoaderFlushesAtShutdown stops a loader whose batches are far from
// full and checks that it inserted and committed them before returning.
func TestLoaderFlushesAtShutdown(t *testing.T) {
	broker := testenv.KafkaTopics(t, 2)
	chAddr, db := testenv.ClickHouseDB(t)
	conn := migratedDB(t, chAddr, db)
	d := newLoaderDataset(serverTime(t, conn), 100)
	d.produce(t, broker)

	reg := prometheus.NewRegistry()
	stop := startLoader(t, LoaderConfig{Brokers: []string{broker}, ClickHouse: chAddr, Database: db,
		Group: "loader-shutdown", FlushInterval: time.Hour, Registry: reg})
	want := len(d.clicks) + len(d.conversions) + len(d.deliveries)
	eventually(t, "the loader holds every record", 30*time.Second, func() error {
		var n float64
		for _, table := range []string{"clicks", "conversions", "postback_deliveries"} {
			n += metricValue(t, reg, "trackstar_loader_buffered_rows", "table", table)
		}
		if n != float64(want) {
			return fmt.Errorf("%v of %d records buffered", n, want)
		}
		return nil
	})
	if committed, _, err := groupOffsets(broker, "loader-shutdown"); err != nil || committed != 0 {
		t.Fatalf("the loader committed %d offsets (%v) before inserting anything", committed, err)
	}
	stop()
	committed, end, err := groupOffsets(broker, "loader-shutdown")
	if err != nil || committed != end {
		t.Fatalf("after shutdown the loader committed %d of %d records (%v)", committed, end, err)
	}
	d.checkLoaded(t, conn, db)
}

// TestLoadersShareTheGroup starts a second loader in the group mid-stream:
// once the group has split the partitions between them both load records,
// and every record lands once.
func TestLoadersShareTheGroup(t *testing.T) {
	broker := testenv.KafkaTopics(t, 4)
	chAddr, db := testenv.ClickHouseDB(t)
	conn := migratedDB(t, chAddr, db)
	d := newLoaderDataset(serverTime(t, conn), 800)
	half := func(msgs []kafka.Message, second bool) []kafka.Message {
		if second {
			return msgs[len(msgs)/2:]
		}
		return msgs[:len(msgs)/2]
	}
	regs := []*prometheus.Registry{prometheus.NewRegistry(), prometheus.NewRegistry()}
	cfg := LoaderConfig{Brokers: []string{broker}, ClickHouse: chAddr, Database: db, Group: "loader-shared",
		MaxRows: 100, FlushInterval: 20 * time.Millisecond}
	for i, second := range []bool{false, true} {
		cfg.Registry = regs[i]
		startLoader(t, cfg)
		if second {
			waitForGroupSplit(t, broker, "loader-shared", 2)
		}
		produce(t, broker, bus.TopicClicks, half(d.clicks, second))
		produce(t, broker, bus.TopicConversions, half(d.conversions, second))
		produce(t, broker, bus.TopicDeliveries, half(d.deliveries, second))
	}
	allCommitted(t, broker, "loader-shared")
	d.checkLoaded(t, conn, db)
	for i, reg := range regs {
		if n := metricValue(t, reg, "trackstar_loader_rows_inserted_total", "table", "clicks"); n == 0 {
			t.Errorf("loader %d inserted no clicks", i+1)
		}
	}
}

// waitForGroupSplit waits until group is stable with members members, each
// assigned partitions of every topic the loader consumes.
func waitForGroupSplit(t *testing.T, broker, group string, members int) {
	t.Helper()
	client := &kafka.Client{Addr: kafka.TCP(broker), Timeout: 5 * time.Second}
	eventually(t, "the group splits the partitions", time.Minute, func() error {
		resp, err := client.DescribeGroups(context.Background(), &kafka.DescribeGroupsRequest{GroupIDs: []string{group}})
		if err != nil {
			return err
		}
		g := resp.Groups[0]
		if g.Error != nil || g.GroupState != "Stable" || len(g.Members) != members {
			return fmt.Errorf("group %s is %s with %d members (%v)", group, g.GroupState, len(g.Members), g.Error)
		}
		for _, m := range g.Members {
			topics := 0
			for _, tp := range m.MemberAssignments.Topics {
				if len(tp.Partitions) > 0 {
					topics++
				}
			}
			if topics != 3 {
				return fmt.Errorf("member %s has partitions of %d topics", m.MemberID, topics)
			}
		}
		return nil
	})
}

// TestLoaderBatchBytesCap: LoaderConfig.MaxBytes caps the Kafka record
// bytes in one batch. With records of ~700 bytes and MaxBytes 1000, no
// INSERT may carry two records: a record that would take a batch past the
// cap starts the next one.
func TestLoaderBatchBytesCap(t *testing.T) {
	broker := testenv.KafkaTopics(t, 1)
	chAddr, db := testenv.ClickHouseDB(t)
	conn := migratedDB(t, chAddr, db)
	t0 := serverTime(t, conn)

	var msgs []kafka.Message
	size := 0
	for i := range 2 {
		ts := t0.Add(time.Duration(i) * time.Second)
		c := schemas.Click{ClickID: schemas.NewID(ts), TS: ts.UnixMilli(), OfferID: 1, AdvertiserID: 1, AffID: 7,
			UserAgent: strings.Repeat("x", 500)}
		c.V = schemas.Version
		v := c.AppendJSON(nil)
		size = len(v)
		msgs = append(msgs, kafka.Message{Key: []byte(c.ClickID), Value: v})
	}
	const maxBytes = 1000
	if size >= maxBytes || 2*size <= maxBytes {
		t.Fatalf("test setup: record size %d must be below %d and two records above it", size, maxBytes)
	}
	produce(t, broker, bus.TopicClicks, msgs)

	reg := prometheus.NewRegistry()
	startLoader(t, LoaderConfig{Brokers: []string{broker}, ClickHouse: chAddr, Database: db,
		Group: "bytes-cap", MaxBytes: maxBytes, FlushInterval: time.Hour, Registry: reg})

	eventually(t, "a batch inserted", 30*time.Second, func() error {
		if n := metricValue(t, reg, "trackstar_loader_rows_inserted_total", "table", "clicks"); n == 0 {
			return fmt.Errorf("nothing inserted yet")
		}
		return nil
	})
	time.Sleep(500 * time.Millisecond)
	rows := metricValue(t, reg, "trackstar_loader_rows_inserted_total", "table", "clicks")
	inserts := insertCount(t, reg, "clicks")
	if rows > inserts {
		t.Fatalf("%v rows in %v INSERT(s) of clicks: an INSERT carried %d-byte records totalling more than MaxBytes %d",
			rows, inserts, size, maxBytes)
	}
}

func insertCount(t *testing.T, reg *prometheus.Registry, table string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "trackstar_loader_insert_seconds" {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, lp := range m.GetLabel() {
				if lp.GetName() == "table" && lp.GetValue() == table {
					return float64(m.GetHistogram().GetSampleCount())
				}
			}
		}
	}
	return 0
}

// TestLoaderDeadLettersALargeRecord: an undecodable record well within
// what Kafka accepts (300 kB here; the broker takes 1 MB) may make a dead
// letter Kafka refuses, since the dead letter escapes the value as a JSON
// string (a control character takes six bytes, binary grows by a third as
// base64). The loader must still dead-letter it and go on: the records
// after it land and every offset is committed.
func TestLoaderDeadLettersALargeRecord(t *testing.T) {
	broker := testenv.KafkaTopics(t, 1)
	chAddr, db := testenv.ClickHouseDB(t)
	conn := migratedDB(t, chAddr, db)

	t0 := serverTime(t, conn)
	good := func(i int) kafka.Message { return goodClick(t0, i) }
	big := `{"v":1,"click_id":"` + strings.Repeat("\x01", 300_000)
	produce(t, broker, bus.TopicClicks, []kafka.Message{good(0), {Key: []byte("big"), Value: []byte(big)}, good(1), good(2)})
	// Two dead letters of 600 kB each, which fit one at a time but not
	// in one record batch.
	mid := `{"v":1,"click_id":"` + strings.Repeat("\x01", 100_000)
	produce(t, broker, bus.TopicClicks, []kafka.Message{{Key: []byte("mid"), Value: []byte(mid)}})
	produce(t, broker, bus.TopicClicks, []kafka.Message{{Key: []byte("mid"), Value: []byte(mid)}, good(3)})

	reg := prometheus.NewRegistry()
	startLoader(t, LoaderConfig{Brokers: []string{broker}, ClickHouse: chAddr, Database: db, Group: "loader-bigdlq",
		MaxRows: 3, FlushInterval: 200 * time.Millisecond, MaxRetryWait: 200 * time.Millisecond, Registry: reg})
	allCommitted(t, broker, "loader-bigdlq")
	if n := queryUint64(t, conn, "SELECT count() FROM "+db+".clicks FINAL"); n != 4 {
		t.Fatalf("clicks holds %d rows, want the 4 good ones", n)
	}
	if n := metricValue(t, reg, "trackstar_loader_dead_letters_total", "topic", bus.TopicClicks); n != 3 {
		t.Fatalf("dead letters of %s = %v, want 3", bus.TopicClicks, n)
	}
	r := kafka.NewReader(kafka.ReaderConfig{Brokers: []string{broker}, Topic: bus.TopicDLQ, Partition: 0, MaxWait: 100 * time.Millisecond})
	defer r.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	m, err := r.ReadMessage(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var dl DeadLetter
	if err := json.Unmarshal(m.Value, &dl); err != nil {
		t.Fatalf("dead letter is not JSON: %v", err)
	}
	if string(m.Key) != "big" || dl.Offset != 1 || !strings.HasPrefix(big, dl.Value) || dl.Value == "" ||
		!strings.Contains(dl.Error, "cannot decode click event") || !strings.Contains(dl.Error, "truncated") {
		t.Fatalf("dead letter: key %q, offset %d, %d bytes of value, error %q; want key big, offset 1, a prefix of the value, the reason and the truncation",
			m.Key, dl.Offset, len(dl.Value), dl.Error)
	}
}

// goodClick is a click record the loader takes, with an ID i seconds after t0.
func goodClick(t0 time.Time, i int) kafka.Message {
	c := schemas.Click{ClickID: schemas.NewID(t0.Add(time.Duration(i) * time.Second)), TS: t0.UnixMilli(), OfferID: 1, AffID: 7}
	return kafka.Message{Key: []byte(c.ClickID), Value: c.AppendJSON(nil)}
}
