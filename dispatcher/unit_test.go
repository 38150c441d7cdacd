package dispatcher

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/trackstar/trackstar/internal/catalog"
	"github.com/trackstar/trackstar/schemas"
)

func TestOffsetTracker(t *testing.T) {
	f := func(start int64, read []int64, done []int64, want int64) {
		t.Helper()
		tr := newOffsetTracker(start)
		for _, o := range read {
			tr.add(o)
		}
		for _, o := range done {
			tr.markDone(o)
		}
		if got := tr.position(); got != want {
			t.Fatalf("start %d, read %v, done %v: position %d, want %d", start, read, done, got, want)
		}
	}
	f(-2, nil, nil, -1)                                 // a new group, nothing read
	f(5, nil, nil, 5)                                   // the committed offset, nothing read
	f(0, []int64{0, 1, 2}, nil, 0)                      // all in flight
	f(0, []int64{0, 1, 2}, []int64{1, 2}, 0)            // the first is still in flight: commit nothing past it
	f(0, []int64{0, 1, 2}, []int64{0, 2}, 1)            // up to the first not done
	f(0, []int64{0, 1, 2}, []int64{2, 0, 1}, 3)         // all done: the next to read
	f(10, []int64{10, 12, 15}, []int64{10, 12}, 15)     // gaps in offsets (compaction, markers)
	f(10, []int64{10, 12, 15}, []int64{10, 12, 15}, 16) // all done across gaps
	f(0, []int64{0, 1}, []int64{7, 0, 0}, 1)            // unknown and repeated marks are harmless
	f(-2, []int64{3, 4}, []int64{3, 4}, 5)              // a new group's first reads

	// Many offsets, done out of order, keep memory bounded and the answer right.
	tr := newOffsetTracker(0)
	for o := int64(0); o < 10000; o++ {
		tr.add(o)
	}
	for o := int64(9999); o >= 1; o-- {
		tr.markDone(o)
	}
	if got := tr.position(); got != 0 {
		t.Fatalf("position %d with offset 0 in flight, want 0", got)
	}
	tr.markDone(0)
	if got, n := tr.position(), tr.pending(); got != 10000 || n != 0 {
		t.Fatalf("position %d, %d pending after all done; want 10000, 0", got, n)
	}
}

func TestBreaker(t *testing.T) {
	t0 := time.Unix(1_700_000_000, 0)
	const threshold, cooldown = 3, 10 * time.Second
	var b breaker
	at := func(d time.Duration) time.Time { return t0.Add(d) }

	for i := 0; i < threshold-1; i++ {
		if from, to := b.record(true, false, at(0), threshold, cooldown); from != breakerClosed || to != breakerClosed {
			t.Fatalf("failure %d moved the breaker %d -> %d", i+1, from, to)
		}
	}
	b.record(false, false, at(0), threshold, cooldown) // a success resets the count
	for i := 0; i < threshold-1; i++ {
		b.record(true, false, at(0), threshold, cooldown)
	}
	if blocked, _ := b.blocked(at(0)); blocked {
		t.Fatalf("paused after %d failures in a row, want %d", threshold-1, threshold)
	}
	if from, to := b.record(true, false, at(time.Second), threshold, cooldown); from != breakerClosed || to != breakerOpen {
		t.Fatalf("failure %d: %d -> %d, want closed -> open", threshold, from, to)
	}
	// A late answer to a request sent before the pause changes nothing.
	if from, to := b.record(false, false, at(2*time.Second), threshold, cooldown); from != breakerOpen || to != breakerOpen {
		t.Fatalf("a late success during the cool-down moved the breaker to %d", to)
	}
	if blocked, until := b.blocked(at(5 * time.Second)); !blocked || !until.Equal(at(11*time.Second)) {
		t.Fatalf("during the cool-down: blocked %v until %v, want until %v", blocked, until, at(11*time.Second))
	}
	if ok, _, until := b.allow(at(5*time.Second), at(20*time.Second)); ok || !until.Equal(at(11*time.Second)) {
		t.Fatalf("allowed during the cool-down")
	}
	// After the cool-down: one probe, the others wait for it.
	ok, probe, _ := b.allow(at(12*time.Second), at(14*time.Second))
	if !ok || !probe {
		t.Fatalf("no probe after the cool-down")
	}
	if ok, _, until := b.allow(at(12*time.Second), at(16*time.Second)); ok || !until.Equal(at(14*time.Second)) {
		t.Fatalf("a second request allowed while probing (until %v)", until)
	}
	// A request sent before the pause, answering now, does not decide.
	if from, to := b.record(false, false, at(13*time.Second), threshold, cooldown); from != breakerHalfOpen || to != breakerHalfOpen {
		t.Fatalf("a late answer to a request sent before the pause moved the probing breaker to %d", to)
	}
	// A failed probe pauses again.
	if from, to := b.record(true, true, at(13*time.Second), threshold, cooldown); from != breakerHalfOpen || to != breakerOpen {
		t.Fatalf("failed probe: %d -> %d, want half-open -> open", from, to)
	}
	if blocked, until := b.blocked(at(20 * time.Second)); !blocked || !until.Equal(at(23*time.Second)) {
		t.Fatalf("after a failed probe: blocked %v until %v", blocked, until)
	}
	// A probe lost without an answer is replaced after its end.
	b.allow(at(24*time.Second), at(26*time.Second))
	if ok, probe, _ := b.allow(at(27*time.Second), at(29*time.Second)); !ok || !probe {
		t.Fatalf("a lost probe was not replaced")
	}
	// A probe taken back (its conversion moved to another host) is
	// replaced at once, not after its end.
	b.dropProbe()
	if ok, probe, _ := b.allow(at(27*time.Second), at(29*time.Second)); !ok || !probe {
		t.Fatalf("a dropped probe was not replaced at once")
	}
	// A successful probe closes it.
	if from, to := b.record(false, true, at(28*time.Second), threshold, cooldown); from != breakerHalfOpen || to != breakerClosed {
		t.Fatalf("successful probe: %d -> %d, want half-open -> closed", from, to)
	}
	if ok, probe, _ := b.allow(at(28*time.Second), at(30*time.Second)); !ok || probe {
		t.Fatalf("closed breaker does not allow plain requests")
	}
}

func TestParseRetryAfter(t *testing.T) {
	now := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	f := func(v string, want time.Duration, wantOK bool) {
		t.Helper()
		got, ok := parseRetryAfter([]byte(v), now)
		if got != want || ok != wantOK {
			t.Fatalf("parseRetryAfter(%q) = %v, %v; want %v, %v", v, got, ok, want, wantOK)
		}
	}
	f("", 0, false)
	f("soon", 0, false)
	f("-5", 0, false)
	f("0", 0, true)
	f(" 120 ", 2*time.Minute, true)
	f("999999999999", maxRetryAfter, true)
	f(now.Add(90*time.Second).Format(http.TimeFormat), 90*time.Second, true)
	f("Sunday, 01-Mar-26 12:00:30 GMT", 30*time.Second, true) // RFC 850
	f(now.Add(-time.Hour).Format(http.TimeFormat), 0, true)
	f(now.Add(48*time.Hour).Format(http.TimeFormat), maxRetryAfter, true)
}

func TestHostOf(t *testing.T) {
	f := func(url, want string) {
		t.Helper()
		if got := hostOf([]byte(url)); got != want {
			t.Fatalf("hostOf(%q) = %q, want %q", url, got, want)
		}
	}
	f("https://Partner.Example/pb?x=1", "partner.example")
	f("http://partner.example:8080?x=1", "partner.example:8080")
	f("http://user:pw@partner.example#frag", "partner.example")
	f("http://[2001:db8::1]:81/x", "[2001:db8::1]:81")
}

// The signature matches what `openssl dgst -sha256 -hmac k3y` gives for
// "1700000000./pb?tx=abc&p=1.75".
func TestSign(t *testing.T) {
	got := sign("k3y", 1700000000, []byte("/pb?tx=abc&p=1.75"))
	want := "t=1700000000,v1=f580ccb0b614e61a4f2e9e137471411f4c51324c91130dbe7e810cc12ad75c35"
	if got != want {
		t.Fatalf("sign = %s, want %s", got, want)
	}
}

// The send-time guard, with the system resolver: names and literals that
// land on non-public addresses are refused unless the config allows them.
func TestDialGuard(t *testing.T) {
	f := func(allowPrivate bool, addr string, wantRefused bool) {
		t.Helper()
		cfg := Config{Brokers: []string{"x"}, DataDir: "x", Catalog: &catalog.Holder{}}
		if err := cfg.setDefaults(); err != nil {
			t.Fatal(err)
		}
		e := &engine{cfg: &cfg}
		conn, err := e.dial(addr, 2*time.Second, allowPrivate)
		if conn != nil {
			conn.Close()
		}
		var refused *refusedError
		if got := errors.As(err, &refused); got != wantRefused {
			t.Fatalf("dial(%s) with allow_private=%v: err %v, want refused=%v", addr, allowPrivate, err, wantRefused)
		}
		if wantRefused && !strings.Contains(err.Error(), "refused") {
			t.Fatalf("refusal says %q", err)
		}
	}
	// Port 9 (discard) on loopback: when allowed, the dial is made (and
	// fails or not), but it is not refused.
	f(false, "localhost:9", true)
	f(false, "127.0.0.1:9", true)
	f(false, "[::ffff:127.0.0.1]:9", true)
	f(false, "10.1.2.3:9", true)
	f(false, "169.254.169.254:80", true)
	f(false, "[fe80::1]:80", true)
	f(false, "0.0.0.0:9", true)
	f(true, "localhost:9", false)
	f(true, "127.0.0.1:9", false)
}

func TestVersionNotes(t *testing.T) {
	s, err := openScheduleStore(t.TempDir(), slog.Default())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	day := func(n int) time.Time { return time.Unix(int64(20000+n)*86400+3600, 0) }
	latest := func(at time.Time) uint32 {
		t.Helper()
		v, err := s.latestVersion("c1", at)
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	note := func(v uint32, at time.Time) {
		t.Helper()
		if err := s.noteVersion("c1", v, at, pebble.Sync); err != nil {
			t.Fatal(err)
		}
	}
	note(1, day(0)) // version 1 is never noted
	if got := latest(day(0)); got != 0 {
		t.Fatalf("latest after noting version 1 = %d, want 0", got)
	}
	note(3, day(0))
	note(2, day(1)) // older than the note: not written
	if got := latest(day(1)); got != 3 {
		t.Fatalf("latest = %d, want 3", got)
	}
	if got := latest(day(7)); got != 3 {
		t.Fatalf("latest seven days on = %d, want 3", got)
	}
	if got := latest(day(8)); got != 0 {
		t.Fatalf("latest eight days on = %d, want 0", got)
	}
	note(4, day(2))
	if err := s.dropOldVersions(day(8)); err != nil {
		t.Fatal(err)
	}
	if got := latest(day(2)); got != 4 {
		t.Fatalf("after dropping notes older than day 1: latest = %d, want 4 (noted on day 2)", got)
	}
	if got := latest(day(0)); got != 0 {
		t.Fatalf("after dropping notes older than day 1: latest on day 0 = %d, want 0", got)
	}
}

// A hand-over commits as soon as revoke's channel closes: by then the
// offsets of the last job read from Kafka must be marked done.
func TestReleaseMarksOffsetsBeforeIdle(t *testing.T) {
	e := &engine{
		log: slog.Default(), metrics: newMetrics(prometheus.NewRegistry()),
		jobs: map[string]*job{}, hosts: map[string]*hostQueue{}, revoked: make(chan struct{}),
	}
	tr := newOffsetTracker(0)
	tr.add(0)
	var idle <-chan struct{}
	j := &job{id: "c/1", acks: []func(){func() {
		select {
		case <-idle:
			t.Errorf("the hand-over was told the engine is idle before the offset was marked done")
		default:
		}
		tr.markDone(0)
	}}}
	e.mu.Lock()
	e.putLocked(j) // in flight
	e.mu.Unlock()
	idle = e.revoke()
	e.release(j) // the finalizer has recorded it
	select {
	case <-idle:
	default:
		t.Fatal("the engine holds no job read from Kafka, yet the hand-over is not told")
	}
	if pos := tr.position(); pos != 1 {
		t.Fatalf("position %d after the release, want 1", pos)
	}
}

// Every labelled series whose labels are known in advance is exported from
// the start, at 0.
func TestMetricsExistBeforeTheirFirstEvent(t *testing.T) {
	reg := prometheus.NewRegistry()
	newMetrics(reg)
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	series := map[string]int{}
	for _, mf := range mfs {
		series[mf.GetName()] = len(mf.GetMetric())
	}
	for name, want := range map[string]int{
		"trackstar_dispatcher_conversions_total":  6,
		"trackstar_dispatcher_deliveries_total":   4,
		"trackstar_dispatcher_deferred_total":     2,
		"trackstar_dispatcher_write_errors_total": 2,
	} {
		if series[name] != want {
			t.Errorf("%s: %d series at start, want %d", name, series[name], want)
		}
	}
}

// A marker learned from another dispatcher's delivery record lasts as long
// as the one its writer keeps: filed in the bucket of the record's time,
// not of the learning. An expired one is not filed at all.
func TestLearnerFilesMarkersByTheRecordsTime(t *testing.T) {
	s, err := openScheduleStore(t.TempDir(), slog.Default())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	const window = time.Hour
	bucketStart := time.Unix(int64(bucketOf(time.Unix(1_800_000_000, 0), window))*3600, 0)
	recorded := bucketStart.Add(50 * time.Minute) // late in its bucket
	learnedAt := recorded.Add(20 * time.Minute)   // the next bucket
	rec := func(id string, version uint32, outcome string, at time.Time) *schemas.Delivery {
		return &schemas.Delivery{ConversionID: id, Version: version, Outcome: outcome, TS: at.UnixMilli()}
	}
	l := s.newLearner(learnedAt, window)
	for _, r := range []*schemas.Delivery{
		rec("dead", 1, schemas.OutcomeDead, recorded),
		rec("expired", 1, schemas.OutcomeDelivered, recorded.Add(-2*window)),
		rec("retrying", 1, schemas.OutcomeRetrying, recorded),
		rec("updated", 2, schemas.OutcomeRetrying, recorded),
		rec("updated", 1, schemas.OutcomeDelivered, recorded),
	} {
		if err := l.add(r); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.finish(); err != nil {
		t.Fatal(err)
	}
	l.close()
	seen := func(id string, at time.Time) bool {
		t.Helper()
		ok, err := s.seen(id, at, window)
		if err != nil {
			t.Fatal(err)
		}
		return ok
	}
	if !seen("dead/1", learnedAt) || !seen("updated/1", learnedAt) {
		t.Fatal("final outcomes not learned")
	}
	if seen("retrying/1", learnedAt) || seen("updated/2", learnedAt) {
		t.Fatal("a retrying record became a marker")
	}
	if seen("expired/1", learnedAt) {
		t.Fatal("a record older than its writer's markers became a marker")
	}
	// The writer's marker is gone two buckets after the record: so is ours.
	if at := bucketStart.Add(2 * window); seen("dead/1", at) {
		t.Fatalf("learned marker still there at %v, two windows after the record's bucket began", at.Sub(recorded))
	}
	if v, err := s.latestVersion("updated", learnedAt); err != nil || v != 2 {
		t.Fatalf("version note %d, %v; want 2", v, err)
	}
}

// A partition whose learning failed and that then moved away (its reader's
// context ended while learn waited to retry) is not left on /readyz.
func TestLearnFailureForgottenWhenThePartitionMoves(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := ln.Addr().String()
	ln.Close() // nothing listens: every try fails at once
	d := &dispatcher{
		cfg: &Config{Brokers: []string{closed}}, log: slog.Default(),
		learned: map[int]bool{}, learnFailing: map[int]error{},
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan bool)
	go func() { done <- d.learn(ctx, 3) }()
	deadline := time.Now().Add(10 * time.Second)
	for d.learnHealth() == nil {
		if time.Now().After(deadline) {
			t.Fatal("learning never failed")
		}
		time.Sleep(5 * time.Millisecond)
	}
	cancel() // the partition moves away during the wait before the next try
	if <-done {
		t.Fatal("learn reported success")
	}
	if err := d.learnHealth(); err != nil {
		t.Fatalf("readiness still fails after the partition moved away: %v", err)
	}
}

// A record of a writer whose clock runs a little ahead (in the learner's
// next bucket) is a marker at once.
func TestLearnedMarkerFromAClockAhead(t *testing.T) {
	s, err := openScheduleStore(t.TempDir(), slog.Default())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	const window = time.Hour
	boundary := time.Unix(int64(bucketOf(time.Unix(1_800_000_000, 0), window)+1)*3600, 0)
	learnedAt := boundary.Add(-time.Second)
	l := s.newLearner(learnedAt, window)
	defer l.close()
	rec := schemas.Delivery{ConversionID: "c", Version: 1, Outcome: schemas.OutcomeDelivered, TS: boundary.Add(500 * time.Millisecond).UnixMilli()}
	if err := l.add(&rec); err != nil {
		t.Fatal(err)
	}
	if err := l.finish(); err != nil {
		t.Fatal(err)
	}
	if ok, err := s.seen("c/1", learnedAt, window); err != nil || !ok {
		t.Fatalf("a delivery recorded 1.5 s ahead of the learner's clock: seen %v, %v; want a marker", ok, err)
	}
}

// A note of an older version written after a newer one's (the follower's
// catch-up batch committing after the engine noted a newer version; two
// writers at once) does not hide the newer: each version has its own key.
// (Before, one key per day and conversion kept whichever came last, and
// the older status could then reach the partner after the newer.)
func TestOlderNoteDoesNotHideANewer(t *testing.T) {
	s, err := openScheduleStore(t.TempDir(), slog.Default())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	now := time.Now()
	l := s.newLearner(now, time.Hour)
	l.notesOnly = true
	if err := l.add(&schemas.Delivery{ConversionID: "c1", Version: 2, Outcome: schemas.OutcomeRetrying, TS: now.UnixMilli()}); err != nil {
		t.Fatal(err)
	}
	if err := s.noteVersion("c1", 3, now, pebble.Sync); err != nil {
		t.Fatal(err)
	}
	if err := l.finish(); err != nil {
		t.Fatal(err)
	}
	l.close()
	if got, err := s.latestVersion("c1", now); err != nil || got != 3 {
		t.Fatalf("latest version of c1 = %d (%v) after notes of 3, then 2, want 3", got, err)
	}

	lost := 0
	for i := range 500 {
		id := fmt.Sprintf("c%d", i)
		done := make(chan struct{})
		go func() {
			defer close(done)
			_ = s.noteVersion(id, 2, now, pebble.NoSync)
		}()
		_ = s.noteVersion(id, 3, now, pebble.NoSync)
		<-done
		if v, _ := s.latestVersion(id, now); v != 3 {
			lost++
		}
	}
	if lost > 0 {
		t.Fatalf("%d of 500 conversions lost their note of version 3 to a concurrent one of 2", lost)
	}

	// A note in the layout of stores written before (one key per day and
	// conversion, the version in its value) still counts, and a
	// conversion whose ID begins with another's is not taken for it.
	old := versionPrefix(dayOf(now), "c1old")
	if err := s.db.Set(old, binary.BigEndian.AppendUint32(nil, 5), pebble.Sync); err != nil {
		t.Fatal(err)
	}
	if err := s.noteVersion("c1old2", 9, now, pebble.Sync); err != nil {
		t.Fatal(err)
	}
	if got, err := s.latestVersion("c1old", now); err != nil || got != 5 {
		t.Fatalf("latest version of c1old = %d (%v), want 5 from its old-style note", got, err)
	}
	if err := s.noteVersion("c1old", 6, now, pebble.Sync); err != nil {
		t.Fatal(err)
	}
	if got, err := s.latestVersion("c1old", now); err != nil || got != 6 {
		t.Fatalf("latest version of c1old = %d (%v), want 6", got, err)
	}
}
