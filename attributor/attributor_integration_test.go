package attributor

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/segmentio/kafka-go"

	"github.com/trackstar/trackstar/internal/bus"
	"github.com/trackstar/trackstar/internal/catalog"
	"github.com/trackstar/trackstar/internal/ops"
	"github.com/trackstar/trackstar/internal/testenv"
	"github.com/trackstar/trackstar/schemas"
)

// The integration tests run the attributor against the embedded broker
// and read what it writes to the conversions topic. A workload covers
// every outcome; its expectations are written out per case below, not
// computed with Decide. The results must be exactly the expected
// conversions once deduplicated the way ReplacingMergeTree does (by
// conversion_id, highest version), and any two records with the same
// conversion_id and version must be byte for byte the same.

const testPartitions = 4

// testGrace is short enough that unknown_click decisions come quickly, and
// long enough that a click produced right after its postback still counts.
const testGrace = 30 * time.Second

type wantConversion struct {
	version         uint32
	status, reason  string
	revenue, payout string
}

type workload struct {
	clicks     []schemas.Click // produced first
	lateClicks []schemas.Click // produced after phase 0's postbacks (the race)
	phases     [2][]schemas.Postback
	copies     map[string]int // event ID -> times the record is produced (replays)
	want       map[string]wantConversion
}

// newWorkload builds n cases of each kind of outcome.
func newWorkload(n int) *workload {
	w := &workload{copies: map[string]int{}, want: map[string]wantConversion{}}
	now := time.Now()
	click := func(offer uint32, at time.Time) schemas.Click {
		c := schemas.Click{V: schemas.Version, ClickID: schemas.NewID(at), TS: at.UnixMilli(), OfferID: offer,
			AdvertiserID: map[uint32]uint32{1: 1, 2: 1, 3: 2}[offer], AffID: 7, Sub1: "s1", IP: "203.0.113.7"}
		w.clicks = append(w.clicks, c)
		return c
	}
	pb := func(phase int, c schemas.Click, mod func(*schemas.Postback)) string {
		p := schemas.Postback{V: schemas.Version, EventID: schemas.NewID(now), ClickID: c.ClickID, TS: now.UnixMilli(),
			AdvertiserID: c.AdvertiserID, IP: "198.51.100.1"}
		if mod != nil {
			mod(&p)
		}
		w.phases[phase] = append(w.phases[phase], p)
		return p.EventID
	}
	want := func(id string, version uint32, status, reason, revenue, payout string) {
		w.want[id] = wantConversion{version, status, reason, revenue, payout}
	}
	approved := func(id string, version uint32, revenue, payout string) {
		want(id, version, schemas.StatusApproved, "", revenue, payout)
	}
	rejected := func(id, reason string) { want(id, 1, schemas.StatusRejected, reason, "0", "0") }
	status := func(s string) func(*schemas.Postback) { return func(p *schemas.Postback) { p.Status = s } }
	hourAgo := now.Add(-time.Hour)

	for i := range n {
		// Approved on the default goal.
		approved(pb(0, click(1, hourAgo), nil), 1, "2.5", "1.75")

		// Pending, then approved after the phase boundary: same ID, version 2.
		c := click(1, hourAgo)
		id := pb(0, c, status(schemas.StatusPending))
		pb(1, c, status(schemas.StatusApproved))
		approved(id, 2, "2.5", "1.75")

		// Pending, and still pending at the end.
		want(pb(0, click(1, hourAgo), status(schemas.StatusPending)), 1, schemas.StatusPending, "", "2.5", "1.75")

		// Pending, then rejected by the advertiser.
		c = click(1, hourAgo)
		id = pb(0, c, status(schemas.StatusPending))
		pb(1, c, status(schemas.StatusRejected))
		want(id, 2, schemas.StatusRejected, schemas.RejectAdvertiserRejected, "0", "0")

		// A second request with the same status: a duplicate of its own.
		c = click(1, hourAgo)
		approved(pb(0, c, nil), 1, "2.5", "1.75")
		rejected(pb(1, c, nil), schemas.RejectDuplicate)

		// A multiple goal: per txn_id, the same txn_id again a duplicate.
		c = click(1, hourAgo)
		sale := func(txn, amount string) func(*schemas.Postback) {
			return func(p *schemas.Postback) { p.Goal, p.TxnID, p.Amount = "sale", fmt.Sprint(txn, i), amount }
		}
		approved(pb(0, c, sale("A", "19.99")), 1, "1.999", "1.3993")
		approved(pb(0, c, sale("B", "100")), 1, "10", "7")
		rejected(pb(1, c, sale("A", "19.99")), schemas.RejectDuplicate)

		// The same txn_id from another click of the offer: a duplicate.
		// (Only clicks of the same partition see each other's txn_ids.)
		other := click(1, hourAgo)
		for bus.PartitionFor([]byte(other.ClickID), testPartitions) != bus.PartitionFor([]byte(c.ClickID), testPartitions) {
			other.ClickID = schemas.NewID(hourAgo)
		}
		w.clicks[len(w.clicks)-1] = other
		rejected(pb(1, other, sale("A", "5")), schemas.RejectDuplicate)

		// Offer 2: 1h window, 10s min_ctit.
		rejected(pb(0, click(2, now.Add(-2*time.Hour)), nil), schemas.RejectExpired)
		c = click(2, now.Add(-time.Minute))
		rejected(pb(0, c, func(p *schemas.Postback) { p.TS = c.TS + 3000 }), schemas.RejectCTITTooShort)

		// Offer 3 belongs to advertiser 2.
		rejected(pb(0, click(3, hourAgo), func(p *schemas.Postback) { p.AdvertiserID = 1 }), schemas.RejectAdvertiserMismatch)
		rejected(pb(0, click(1, hourAgo), func(p *schemas.Postback) { p.Goal = "install" }), schemas.RejectUnknownGoal)
		rejected(pb(0, click(1, hourAgo), status(schemas.StatusRejected)), schemas.RejectAdvertiserRejected)

		// A click that never comes, minted long enough ago that its grace
		// has run out: unknown_click once the clicks partition is caught up.
		ghost := schemas.Click{ClickID: schemas.NewID(now.Add(-10 * time.Minute)), AdvertiserID: 1}
		rejected(pb(0, ghost, nil), schemas.RejectUnknownClick)

		// The same record produced twice: one conversion.
		id = pb(0, click(1, hourAgo), nil)
		w.copies[id] = 2
		approved(id, 1, "2.5", "1.75")

		// The postback produced before its click.
		c = click(1, now)
		w.clicks = w.clicks[:len(w.clicks)-1]
		w.lateClicks = append(w.lateClicks, c)
		approved(pb(0, c, nil), 1, "2.5", "1.75")
	}
	return w
}

func produce(t *testing.T, addr, topic string, msgs []kafka.Message) {
	t.Helper()
	wr := bus.NewWriter(bus.WriterConfig{Brokers: []string{addr}, Topic: topic})
	defer wr.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for len(msgs) > 0 {
		n := min(len(msgs), 500)
		if err := wr.WriteMessages(ctx, msgs[:n]...); err != nil {
			t.Fatalf("produce to %s: %v", topic, err)
		}
		msgs = msgs[n:]
	}
}

// clickMessages makes records of clicks. Their time is left unset, which
// kafka-go writes as timestamp 0: a rebuild cannot find the window's
// beginning by time in such a topic, and must read it from the start.
func clickMessages(cs []schemas.Click) []kafka.Message {
	var msgs []kafka.Message
	for _, c := range cs {
		msgs = append(msgs, kafka.Message{Key: []byte(c.ClickID), Value: c.AppendJSON(nil)})
	}
	return msgs
}

func (w *workload) produceClicks(t *testing.T, addr string) {
	produce(t, addr, bus.TopicClicks, clickMessages(w.clicks))
}

// producePhase produces a phase's postbacks (with their copies); phase 0
// is followed by the clicks that come late.
func (w *workload) producePhase(t *testing.T, addr string, phase int) {
	var msgs []kafka.Message
	for _, p := range w.phases[phase] {
		for range max(w.copies[p.EventID], 1) {
			msgs = append(msgs, kafka.Message{Key: []byte(p.ClickID), Value: p.AppendJSON(nil), Time: time.Now()})
		}
	}
	produce(t, addr, bus.TopicPostbacks, msgs)
	if phase == 0 {
		produce(t, addr, bus.TopicClicks, clickMessages(w.lateClicks))
	}
}

func (w *workload) postbackIDs(phase int) []string {
	var ids []string
	for _, p := range w.phases[phase] {
		ids = append(ids, p.EventID)
	}
	return ids
}

// conversionLog reads the conversions topic from the start, all partitions.
type conversionLog struct {
	mu      sync.Mutex
	records [][]byte
}

func readConversions(t *testing.T, addr string) *conversionLog {
	l := &conversionLog{}
	tailTopic(t, addr, bus.TopicConversions, func(m kafka.Message) {
		l.mu.Lock()
		l.records = append(l.records, m.Value)
		l.mu.Unlock()
	})
	return l
}

// tailTopic reads every partition of topic from the start until the test
// ends, handing each record to add (from several goroutines).
func tailTopic(t *testing.T, addr, topic string, add func(kafka.Message)) {
	ctx, cancel := context.WithCancel(context.Background())
	var done sync.WaitGroup
	for p := range testPartitions {
		r := kafka.NewReader(kafka.ReaderConfig{Brokers: []string{addr}, Topic: topic, Partition: p,
			MaxWait: 200 * time.Millisecond, ReadLagInterval: -1})
		done.Go(func() {
			defer r.Close()
			for {
				m, err := r.ReadMessage(ctx)
				if err != nil {
					return
				}
				add(m)
			}
		})
	}
	t.Cleanup(func() { cancel(); done.Wait() })
}

// answers returns the records read so far that answer one postback.
func (l *conversionLog) answers(eventID string) []schemas.Conversion {
	var out []schemas.Conversion
	for _, c := range l.snapshot() {
		if c.PostbackEventID == eventID {
			out = append(out, c)
		}
	}
	return out
}

func (l *conversionLog) snapshot() []schemas.Conversion {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := make([]schemas.Conversion, 0, len(l.records))
	for _, r := range l.records {
		c, err := schemas.DecodeConversion(r)
		if err != nil {
			panic(fmt.Sprintf("undecodable conversion %s: %v", r, err))
		}
		out = append(out, c)
	}
	return out
}

// answered reports how many of the postbacks have a conversion record.
func (l *conversionLog) answered(ids []string) int {
	seen := map[string]bool{}
	for _, c := range l.snapshot() {
		seen[c.PostbackEventID] = true
	}
	n := 0
	for _, id := range ids {
		if seen[id] {
			n++
		}
	}
	return n
}

// final deduplicates by conversion ID, keeping the highest version, as
// ReplacingMergeTree does.
func (l *conversionLog) final() map[string]schemas.Conversion {
	out := map[string]schemas.Conversion{}
	for _, c := range l.snapshot() {
		if prev, ok := out[c.ConversionID]; !ok || c.Version > prev.Version {
			out[c.ConversionID] = c
		}
	}
	return out
}

// complete reports whether every expected conversion has reached its
// final version.
func (l *conversionLog) complete(want map[string]wantConversion) bool {
	final := l.final()
	for id, w := range want {
		if final[id].Version < w.version {
			return false
		}
	}
	return true
}

// check compares the results with the expectations.
func (l *conversionLog) check(t *testing.T, want map[string]wantConversion) {
	t.Helper()
	l.mu.Lock()
	byVersion := map[string][]byte{}
	dups := 0
	for _, r := range l.records {
		c, _ := schemas.DecodeConversion(r)
		k := fmt.Sprintf("%s/v%d", c.ConversionID, c.Version)
		if prev, ok := byVersion[k]; ok {
			dups++
			if !bytes.Equal(prev, r) {
				l.mu.Unlock()
				t.Fatalf("two different records for %s:\n%s\n%s", k, prev, r)
			}
		}
		byVersion[k] = r
	}
	total := len(l.records)
	l.mu.Unlock()

	final := l.final()
	for id, c := range final {
		if _, ok := want[id]; !ok {
			t.Fatalf("unexpected conversion %s: %+v", id, c)
		}
	}
	bad := 0
	for id, w := range want {
		c, ok := final[id]
		got := wantConversion{c.Version, c.Status, c.RejectReason, c.Revenue.String(), c.Payout.String()}
		if !ok || got != w {
			if bad++; bad <= 10 {
				t.Errorf("conversion %s: got %+v (found %v), want %+v", id, got, ok, w)
			}
		}
	}
	if bad > 0 {
		t.Fatalf("%d of %d conversions wrong", bad, len(want))
	}
	t.Logf("%d conversions as expected, from %d records (%d repeated identically)", len(want), total, dups)
}

func waitUntil(t *testing.T, what string, timeout time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting until %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func testHolder(t testing.TB) *catalog.Holder {
	t.Helper()
	h, err := catalog.NewHolder("testdata/catalog.yaml")
	if err != nil {
		t.Fatal(err)
	}
	return h
}

func testConfig(t testing.TB, addr, dataDir string) Config {
	return Config{
		Brokers:           []string{addr},
		DataDir:           dataDir,
		Catalog:           testHolder(t),
		Grace:             testGrace,
		CommitInterval:    200 * time.Millisecond,
		SessionTimeout:    6 * time.Second,
		RebalanceTimeout:  5 * time.Second,
		HeartbeatInterval: 300 * time.Millisecond,
		Registry:          prometheus.NewRegistry(),
		Logger:            slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo})),
	}
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(b), "\n"))
	return len(b), nil
}

// running is an attributor run in a goroutine.
type running struct {
	cancel context.CancelFunc
	done   chan error
}

func start(cfg Config) *running {
	ctx, cancel := context.WithCancel(context.Background())
	r := &running{cancel: cancel, done: make(chan error, 1)}
	go func() { r.done <- Run(ctx, cfg) }()
	return r
}

func (r *running) stop(t *testing.T) {
	t.Helper()
	r.cancel()
	select {
	case err := <-r.done:
		if err != nil {
			t.Fatalf("Run: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("Run did not return 30s after its context ended")
	}
}

func TestAttributorAllOutcomes(t *testing.T) {
	addr := testenv.KafkaTopics(t, testPartitions)
	w := newWorkload(200)
	log := readConversions(t, addr)
	w.produceClicks(t, addr)

	cfg := testConfig(t, addr, t.TempDir())
	cfg.Health = &ops.Health{}
	if err := cfg.Health.Ready(); err != nil {
		t.Fatalf("ready before start: %v", err)
	}
	r := start(cfg)
	w.producePhase(t, addr, 0)
	w.producePhase(t, addr, 1)
	waitUntil(t, "all conversions are final", 90*time.Second, func() bool { return log.complete(w.want) })
	if err := cfg.Health.Ready(); err != nil {
		t.Fatalf("not ready while running: %v", err)
	}
	r.stop(t)
	if err := cfg.Health.Ready(); err == nil {
		t.Fatalf("ready after stopping")
	}
	log.check(t, w.want)

	n := metricValue(t, cfg.Registry, "trackstar_attributor_postbacks_total")
	if want := float64(len(w.phases[0]) + len(w.phases[1]) + len(w.copies)); n != want {
		t.Fatalf("postbacks_total = %v, want %v", n, want)
	}
}

// Postbacks produced before their clicks, all of them, and in a separate
// batch: every one is held, then attributed.
func TestAttributorPostbacksBeforeClicks(t *testing.T) {
	addr := testenv.KafkaTopics(t, testPartitions)
	log := readConversions(t, addr)
	now := time.Now()
	var clicks []schemas.Click
	var pbs []kafka.Message
	want := map[string]wantConversion{}
	for range 300 {
		c := schemas.Click{V: schemas.Version, ClickID: schemas.NewID(now), TS: now.UnixMilli(), OfferID: 1, AdvertiserID: 1, AffID: 7}
		p := schemas.Postback{V: schemas.Version, EventID: schemas.NewID(now), ClickID: c.ClickID, TS: now.UnixMilli(), AdvertiserID: 1, Goal: "sale", Amount: "19.99", TxnID: "t-" + c.ClickID}
		clicks = append(clicks, c)
		pbs = append(pbs, kafka.Message{Key: []byte(c.ClickID), Value: p.AppendJSON(nil), Time: now})
		want[p.EventID] = wantConversion{1, schemas.StatusApproved, "", "1.999", "1.3993"}
	}
	cfg := testConfig(t, addr, t.TempDir())
	cfg.Grace = time.Hour // the clicks come when the test says so, not by chance
	r := start(cfg)
	produce(t, addr, bus.TopicPostbacks, pbs)
	held := func() float64 { return metricValue(t, cfg.Registry, "trackstar_attributor_held_postbacks") }
	waitUntil(t, "every postback is held", 60*time.Second, func() bool { return held() == 300 })
	if n := len(log.snapshot()); n != 0 {
		t.Fatalf("%d conversions before any click", n)
	}
	produce(t, addr, bus.TopicClicks, clickMessages(clicks))
	waitUntil(t, "all attributed", 60*time.Second, func() bool { return log.complete(want) })
	r.stop(t)
	log.check(t, want)
	if n := held(); n != 0 {
		t.Fatalf("%v postbacks still held", n)
	}
}

// The attributor stops without committing anything in the middle of the
// stream — once right after storing a batch (nothing sent), once right
// after sending one (nothing marked sent, no offsets committed) — and is
// started again on the same store.
func TestAttributorRestartWithoutCommit(t *testing.T) {
	addr := testenv.KafkaTopics(t, testPartitions)
	w := newWorkload(100)
	log := readConversions(t, addr)
	w.produceClicks(t, addr)
	w.producePhase(t, addr, 0)
	dir := t.TempDir()
	phase0 := w.postbackIDs(0)

	for _, step := range []string{"stored", "sent"} {
		cfg := testConfig(t, addr, dir)
		cfg.MaxBatch = 20 // many batches, so that the crash comes mid-stream
		var mu sync.Mutex
		batches := 0
		cfg.hooks = &testHooks{crash: func(s string, records int) bool {
			mu.Lock()
			defer mu.Unlock()
			if s == step && records > 0 {
				batches++
			}
			return batches >= 10
		}}
		before := log.answered(phase0)
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		err := Run(ctx, cfg)
		cancel()
		if !errors.Is(err, errCrashed) {
			t.Fatalf("Run = %v, want the crash", err)
		}
		t.Logf("crashed after %q: %d of %d postbacks answered before, %d now", step, before, len(phase0), log.answered(phase0))
	}
	if n := log.answered(phase0); n == len(phase0) {
		t.Fatalf("all postbacks answered before the last restart: the crashes were not mid-stream")
	}

	cfg := testConfig(t, addr, dir)
	r := start(cfg)
	waitUntil(t, "phase 0 answered", 60*time.Second, func() bool { return log.answered(phase0) == len(phase0) })
	w.producePhase(t, addr, 1)
	waitUntil(t, "all conversions are final", 60*time.Second, func() bool { return log.complete(w.want) })
	r.stop(t)
	log.check(t, w.want)
	if n := metricValue(t, cfg.Registry, "trackstar_attributor_rebuilds_total"); n != 0 {
		t.Fatalf("the restarted attributor rebuilt %v partitions; its own state should have been current", n)
	}
}

// The attributor runs in a child process that is killed (SIGKILL) in the
// middle of the stream, then started again on the same store.
func TestAttributorKilled(t *testing.T) {
	addr := testenv.KafkaTopics(t, testPartitions)
	w := newWorkload(100)
	log := readConversions(t, addr)
	w.produceClicks(t, addr)
	dir := t.TempDir()
	phase0 := w.postbackIDs(0)

	child := startChild(t, addr, dir)
	w.producePhase(t, addr, 0)
	waitUntil(t, "the child answered some postbacks", 60*time.Second, func() bool { return log.answered(phase0) > 0 })
	if err := child.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	child.Wait()
	answered := log.answered(phase0)
	t.Logf("killed with %d of %d postbacks answered", answered, len(phase0))

	child = startChild(t, addr, dir)
	waitUntil(t, "phase 0 answered", 90*time.Second, func() bool { return log.answered(phase0) == len(phase0) })
	w.producePhase(t, addr, 1)
	waitUntil(t, "all conversions are final", 60*time.Second, func() bool { return log.complete(w.want) })
	child.Process.Kill()
	child.Wait()
	log.check(t, w.want)
	if answered == len(phase0) {
		t.Fatalf("the kill came after all of phase 0 was answered: not mid-stream")
	}
}

// TestChildAttributor is the child process of TestAttributorKilled.
func TestChildAttributor(t *testing.T) {
	spec := os.Getenv("TRACKSTAR_ATTRIBUTOR_CHILD")
	if spec == "" {
		t.Skip("runs only as the child process of TestAttributorKilled")
	}
	addr, dir, _ := strings.Cut(spec, ",")
	cfg := testConfig(t, addr, dir)
	cfg.Logger = slog.New(slog.NewTextHandler(os.Stderr, nil))
	cfg.MaxBatch = 10 // many batches, so that the kill comes mid-stream
	if err := Run(context.Background(), cfg); err != nil {
		t.Fatal(err)
	}
}

func startChild(t *testing.T, addr, dir string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestChildAttributor$", "-test.v")
	cmd.Env = append(os.Environ(), "TRACKSTAR_ATTRIBUTOR_CHILD="+addr+","+dir)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		if t.Failed() || testing.Verbose() {
			t.Logf("child output:\n%s", out.String())
		}
	})
	return cmd
}

// Two members in one group, the second joining in the middle of the
// stream: partitions move to it, it rebuilds their state from Kafka, and
// the conversions that span the move (status updates, duplicates) come
// out right.
func TestAttributorMemberJoins(t *testing.T) {
	addr := testenv.KafkaTopics(t, testPartitions)
	w := newWorkload(100)
	log := readConversions(t, addr)
	w.produceClicks(t, addr)
	w.producePhase(t, addr, 0)
	phase0 := w.postbackIDs(0)

	cfgA := testConfig(t, addr, t.TempDir())
	a := start(cfgA)
	waitUntil(t, "phase 0 answered", 60*time.Second, func() bool { return log.answered(phase0) == len(phase0) })

	cfgB := testConfig(t, addr, t.TempDir())
	b := start(cfgB)
	waitUntil(t, "the partitions are split", 60*time.Second, func() bool {
		return metricValue(t, cfgA.Registry, "trackstar_attributor_partitions") == testPartitions/2 &&
			metricValue(t, cfgB.Registry, "trackstar_attributor_partitions") == testPartitions/2
	})
	w.producePhase(t, addr, 1)
	waitUntil(t, "all conversions are final", 60*time.Second, func() bool { return log.complete(w.want) })
	b.stop(t)
	a.stop(t)
	log.check(t, w.want)
	if n := metricValue(t, cfgB.Registry, "trackstar_attributor_rebuilds_total"); n != testPartitions/2 {
		t.Fatalf("member b rebuilt %v partitions, want %d", n, testPartitions/2)
	}
	if n := metricValue(t, cfgB.Registry, "trackstar_attributor_restored_conversions_total"); n == 0 {
		t.Fatalf("member b restored no conversions from the conversions topic")
	}
	// Member a dropped the state of the partitions it gave away.
	db, err := openStore(filepath.Join(cfgA.DataDir, "attributor"), StoreOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if have, err := statePartitions(db); err != nil || len(have) != testPartitions/2 {
		t.Fatalf("member a has state for partitions %v (%v), want only its %d", have, err, testPartitions/2)
	}
}

// metricValue returns a metric of the registry, summed over its label values.
func metricValue(t testing.TB, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	sum := 0.0
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			sum += m.GetCounter().GetValue() + m.GetGauge().GetValue()
		}
	}
	return sum
}

// A postback record the attributor cannot decode (a schema version it does
// not know, not JSON, no event ID) is dead-lettered to trackstar.dlq, since
// nothing else reads postbacks: the edge answered 200 for it. The dead
// letter goes through the outbox like a conversion, so a crash after the
// batch is stored (its offsets past the bad records) still sends it on
// restart; the records after the bad ones are decided as usual.
func TestAttributorDeadLettersUndecodablePostbacks(t *testing.T) {
	addr := testenv.KafkaTopics(t, testPartitions)
	log := readConversions(t, addr)
	now := time.Now()
	c := schemas.Click{V: schemas.Version, ClickID: schemas.NewID(now), TS: now.UnixMilli(), OfferID: 1, AdvertiserID: 1, AffID: 7}
	good := schemas.Postback{V: schemas.Version, EventID: schemas.NewID(now), ClickID: c.ClickID, TS: now.UnixMilli(), AdvertiserID: 1, Goal: "default", Amount: "19.99"}
	key := []byte(c.ClickID)
	nulID := good
	nulID.EventID = "\x00" + schemas.NewID(now)
	bad := [][]byte{
		[]byte(`{"v":2,"event_id":"` + schemas.NewID(now) + `","click_id":"` + c.ClickID + `"}`),
		{0xff, 0xfe, '{'},
		[]byte(`{"v":1,"click_id":"` + c.ClickID + `","ts":1}`),
		// Not an ID the edge mints; its first byte would make its outbox
		// entry read as a dead letter's.
		nulID.AppendJSON(nil),
	}
	produce(t, addr, bus.TopicClicks, clickMessages([]schemas.Click{c}))
	var msgs []kafka.Message
	for _, v := range bad {
		msgs = append(msgs, kafka.Message{Key: key, Value: v, Time: now})
	}
	msgs = append(msgs, kafka.Message{Key: key, Value: good.AppendJSON(nil), Time: now})
	produce(t, addr, bus.TopicPostbacks, msgs)

	dir := t.TempDir()
	cfg := testConfig(t, addr, dir)
	cfg.hooks = &testHooks{crash: func(step string, records int) bool { return step == "stored" && records > 0 }}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	err := Run(ctx, cfg)
	cancel()
	if !errors.Is(err, errCrashed) {
		t.Fatalf("Run = %v, want the crash after storing the batch of the bad records", err)
	}
	// The crash came with the first batch that had records to send: the
	// one of the first bad record, maybe of more.
	first := cfg.Registry

	dlq := readDeadLetters(t, addr)
	cfg = testConfig(t, addr, dir)
	r := start(cfg)
	want := map[string]wantConversion{good.EventID: {1, schemas.StatusApproved, "", "2.5", "1.75"}}
	waitUntil(t, "the good postback's conversion", 60*time.Second, func() bool { return log.complete(want) })
	waitUntil(t, "a dead letter for each bad record", 30*time.Second, func() bool { return len(dlq.messages()) >= len(bad) })
	r.stop(t)
	log.check(t, want)
	const invalid = "trackstar_attributor_invalid_records_total"
	if n := metricValue(t, first, invalid) + metricValue(t, cfg.Registry, invalid); n != float64(len(bad)) {
		t.Fatalf("invalid_records_total = %v over both runs, want %d", n, len(bad))
	}

	part := bus.PartitionFor(key, testPartitions)
	got := dlq.messages()
	if len(got) != len(bad) {
		t.Fatalf("%d dead letters, want %d", len(got), len(bad))
	}
	for i, m := range got {
		var dl schemas.DeadLetter
		if err := json.Unmarshal(m.Value, &dl); err != nil {
			t.Fatalf("dead letter %q: %v", m.Value, err)
		}
		value := []byte(dl.Value)
		if dl.ValueBase64 != nil {
			value = dl.ValueBase64
		}
		if !bytes.Equal(m.Key, key) || dl.V != schemas.Version || dl.Topic != bus.TopicPostbacks || dl.Partition != part ||
			dl.Offset != int64(i) || dl.Key != string(key) || !bytes.Equal(value, bad[i]) ||
			!strings.HasPrefix(dl.Error, "cannot decode postback event") || dl.TS == 0 {
			t.Fatalf("dead letter %d (key %q) = %s; want offset %d of %s/%d, value %q", i, m.Key, m.Value, i, bus.TopicPostbacks, part, bad[i])
		}
		t.Logf("dead letter %d: %s", i, m.Value)
	}
}

// deadLetterLog reads trackstar.dlq from the start, all partitions.
type deadLetterLog struct {
	mu   sync.Mutex
	msgs []kafka.Message
}

func readDeadLetters(t *testing.T, addr string) *deadLetterLog {
	l := &deadLetterLog{}
	tailTopic(t, addr, bus.TopicDLQ, func(m kafka.Message) {
		l.mu.Lock()
		l.msgs = append(l.msgs, m)
		l.mu.Unlock()
	})
	return l
}

func (l *deadLetterLog) messages() []kafka.Message {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.msgs)
}

// A member that comes back to a partition another member had meanwhile
// does not trust its state when the other decided postbacks there without
// moving the group's offsets: here the other resolved a waiting postback
// as unknown_click once its grace ran out, while an earlier one still
// waited and held the commit back. (Before, the returning member found its
// own offsets, trusted its state, in which that postback still waited,
// and attributed it when its click came late: two different records of
// the same conversion and version.)
func TestReturningMemberSeesPostbacksAnotherDecided(t *testing.T) {
	addr := testenv.KafkaTopics(t, testPartitions)
	log := readConversions(t, addr)
	now := time.Now()
	// h1 waits for x1 ten minutes; h2 for x2 until 4 s + grace from now.
	h2, x2 := produceTwoWaiting(t, addr, now, 4*time.Second)
	config := func(dir string) Config {
		cfg := testConfig(t, addr, dir)
		cfg.Grace = 3 * time.Second
		return cfg
	}

	// A holds both, and stops before h2's grace runs out.
	dirA := t.TempDir()
	cfgA := config(dirA)
	a := start(cfgA)
	waitUntil(t, "A to hold both postbacks", 30*time.Second, func() bool {
		return metricValue(t, cfgA.Registry, "trackstar_attributor_held_postbacks") == 2
	})
	time.Sleep(500 * time.Millisecond) // a commit or two
	a.stop(t)

	// B takes the partition over and decides h2 once its grace is over.
	b := start(config(t.TempDir()))
	decided := func() []schemas.Conversion { return log.answers(h2.EventID) }
	waitUntil(t, "B to decide h2", 60*time.Second, func() bool { return len(decided()) > 0 })
	b.stop(t)

	// A comes back, and h2's click comes late.
	cfgA = config(dirA)
	a = start(cfgA)
	produce(t, addr, bus.TopicClicks, clickMessages([]schemas.Click{x2}))
	waitUntil(t, "A to answer h2 again", 60*time.Second, func() bool { return len(decided()) > 1 })
	time.Sleep(time.Second)
	a.stop(t)
	first := decided()[0]
	for _, c := range decided()[1:] {
		if c != first {
			t.Errorf("postback h2 answered %s/%s v%d, then %s/%s v%d (conversion %s): the returning member trusted stale state",
				first.Status, first.RejectReason, first.Version, c.Status, c.RejectReason, c.Version, c.ConversionID)
		}
	}
	if n := metricValue(t, cfgA.Registry, "trackstar_attributor_rebuilds_total"); n < 1 {
		t.Errorf("A rebuilt %v partitions on its return, want partition 0 rebuilt", n)
	}
}

// produceTwoWaiting produces two postbacks of partition 0 whose clicks
// have not come: h1, waiting ten minutes for its click, and then h2, whose
// click x2 is due after (it waits until then plus grace). It returns h2
// and x2, to produce late.
func produceTwoWaiting(t *testing.T, addr string, now time.Time, after time.Duration) (h2 schemas.Postback, x2 schemas.Click) {
	t.Helper()
	inPartition0 := func(at time.Time) string {
		for {
			if id := schemas.NewID(at); bus.PartitionFor([]byte(id), testPartitions) == 0 {
				return id
			}
		}
	}
	x1 := inPartition0(now.Add(10 * time.Minute))
	x2 = schemas.Click{V: schemas.Version, ClickID: inPartition0(now.Add(after)), TS: now.Add(after).UnixMilli(),
		OfferID: 1, AdvertiserID: 1, AffID: 7}
	h1 := schemas.Postback{V: schemas.Version, EventID: schemas.NewID(now), ClickID: x1, TS: now.Add(10 * time.Minute).UnixMilli(), AdvertiserID: 1}
	h2 = schemas.Postback{V: schemas.Version, EventID: schemas.NewID(now), ClickID: x2.ClickID, TS: now.Add(time.Minute).UnixMilli(), AdvertiserID: 1}
	produce(t, addr, bus.TopicPostbacks, []kafka.Message{
		{Key: []byte(x1), Value: h1.AppendJSON(nil), Time: now},
		{Key: []byte(x2.ClickID), Value: h2.AppendJSON(nil), Time: now},
	})
	return h2, x2
}
