package attributor

import (
	"context"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/segmentio/kafka-go"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/trackstar/trackstar/internal/bus"
	"github.com/trackstar/trackstar/internal/testenv"
	"github.com/trackstar/trackstar/schemas"
)

// TestChildStalledAttributor is member A of
// TestStalledMemberDoesNotTakeAnothersConversionsForItsOwn.
func TestChildStalledAttributor(t *testing.T) {
	spec := os.Getenv("TRACKSTAR_STALLED_CHILD")
	if spec == "" {
		t.Skip("runs only as the child process of TestStalledMemberDoesNotTakeAnothersConversionsForItsOwn")
	}
	addr, dir, _ := strings.Cut(spec, ",")
	cfg := testConfig(t, addr, dir)
	cfg.Grace = 3 * time.Second
	cfg.Logger = slog.New(slog.NewTextHandler(os.Stderr, nil))
	if err := Run(t.Context(), cfg); err != nil {
		t.Fatal(err)
	}
}

// Member A is stalled (SIGSTOP: a GC pause, a VM freeze) past its
// session; B takes the partition and decides a postback whose grace ran
// out, without moving the offsets (an earlier postback still waits). When
// A resumes, its generation ends and its shutdown notes where the
// partition's conversions end: it checks that the records since are its
// own, finds B's, and marks its state stale, so that when it gets the
// partition back it rebuilds. (Before, it noted B's record as its own,
// trusted its stale state, and attributed the postback when its click came
// late.)
func TestStalledMemberDoesNotTakeAnothersConversionsForItsOwn(t *testing.T) {
	addr := testenv.KafkaTopics(t, testPartitions)
	log := readConversions(t, addr)
	now := time.Now()
	h2, x2 := produceTwoWaiting(t, addr, now, 15*time.Second)

	// A, a process of its own, holds both postbacks.
	dirA := t.TempDir()
	var out testenv.Buffer
	cmd := exec.Command(os.Args[0], "-test.run=^TestChildStalledAttributor$", "-test.v")
	cmd.Env = append(os.Environ(), "TRACKSTAR_STALLED_CHILD="+addr+","+dirA)
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGCONT)
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		t.Logf("A's output:\n%s", out.String())
	})
	waitUntil(t, "A's worker of partition 0 to start", 30*time.Second, func() bool {
		return workerStarts(out.String()) >= 1
	})
	time.Sleep(2 * time.Second) // both postbacks read and held, offsets committed
	if err := cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	t.Logf("A stopped (SIGSTOP) at +%v", time.Since(now))

	// B takes over once A misses the rebalance, and decides h2 when its
	// grace is over.
	b := start(func() Config { c := testConfig(t, addr, t.TempDir()); c.Grace = 3 * time.Second; return c }())
	decided := func() []schemas.Conversion { return log.answers(h2.EventID) }
	waitUntil(t, "B to decide h2", 60*time.Second, func() bool { return len(decided()) > 0 })
	t.Logf("B decided h2 at +%v: %s/%s", time.Since(now), decided()[0].Status, decided()[0].RejectReason)
	b.stop(t)

	// A resumes; h2's click comes late.
	produce(t, addr, bus.TopicClicks, clickMessages([]schemas.Click{x2}))
	if err := cmd.Process.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "A's worker of partition 0 to start again", 60*time.Second, func() bool {
		return workerStarts(out.String()) >= 2
	})
	time.Sleep(3 * time.Second)
	starts := workerStarts(out.String())
	stale := strings.Count(out.String(), "local state is stale")
	t.Logf("A: %d starts of partition 0's worker, %d 'stale' lines", starts, stale)
	for _, line := range strings.Split(out.String(), "\n") {
		if strings.Contains(line, "partition=0") && (strings.Contains(line, "worker started") || strings.Contains(line, "stale") || strings.Contains(line, "rebuilt")) {
			t.Logf("A: %s", line)
		}
	}
	ds := decided()
	for _, c := range ds[1:] {
		if c != ds[0] {
			t.Errorf("postback h2 answered %s/%s v%d by B, then %s/%s v%d (conversion %s): A trusted stale state",
				ds[0].Status, ds[0].RejectReason, ds[0].Version, c.Status, c.RejectReason, c.Version, c.ConversionID)
		}
	}
	if stale == 0 {
		t.Errorf("A returned to partition 0 after B decided h2 there, and did not find its state stale")
	}
}

func workerStarts(out string) int {
	n := 0
	for _, line := range strings.Split(out, "\n") {
		if strings.Contains(line, "partition worker started") && strings.Contains(line, " partition=0 ") {
			n++
		}
	}
	return n
}

// A member that sent more than maxOwnCheck conversions of a partition
// within one noteInterval (a catch-up after an outage, a busy partition)
// moves its mark on across them: every one is its own. (Before, the
// running note applied the start's bound and marked its own state stale.)
func TestOwnBurstIsNotMarkedStale(t *testing.T) {
	defer func(n int64) { maxOwnCheck = n }(maxOwnCheck)
	maxOwnCheck = 1000
	addr := testenv.KafkaTopics(t, testPartitions)
	w := newTestWorker(t, addr)
	db := w.a.db

	n := 5 * int(maxOwnCheck)
	wr := &kafka.Writer{Addr: kafka.TCP(addr), Topic: bus.TopicConversions,
		Balancer:  kafka.BalancerFunc(func(kafka.Message, ...int) int { return 0 }),
		BatchSize: 2000, BatchBytes: 1_000_000, BatchTimeout: time.Millisecond, RequiredAcks: kafka.RequireAll}
	defer wr.Close()
	b := db.NewBatch()
	var msgs []kafka.Message
	now := time.Now()
	for i := 0; i < n; i++ {
		c := schemas.Conversion{V: schemas.Version, ConversionID: schemas.NewID(now), Version: 1,
			ClickID: schemas.NewID(now), TS: now.UnixMilli(), Status: schemas.StatusRejected, RejectReason: schemas.RejectUnknownClick}
		c.PostbackEventID = c.ConversionID
		rec := appendString(nil, c.ClickID)
		rec = append(rec, schemas.EncodeConversion(c)...)
		if err := b.Set(eventKey(nil, 0, c.PostbackEventID), rec, nil); err != nil {
			t.Fatal(err)
		}
		k, v, _ := splitRecord(rec)
		msgs = append(msgs, kafka.Message{Key: k, Value: v, Time: now})
		if len(msgs) == 5000 || i == n-1 {
			if err := wr.WriteMessages(context.Background(), msgs...); err != nil {
				t.Fatal(err)
			}
			msgs = msgs[:0]
		}
	}
	if err := b.Commit(pebble.Sync); err != nil {
		t.Fatal(err)
	}
	st := time.Now()
	w.noteConversionsEnd()
	t.Logf("note took %v", time.Since(st))
	if got := w.p.meta.ConversionsEnd; got != int64(n) {
		t.Fatalf("%d conversions, all this store's own byte for byte: the mark is %d, want %d (staleMark is %d)", n, got, n, staleMark)
	}
}

// A note of the conversions' end under way (a broker slow to answer, or
// seconds of output to read back) does not hold the partition's
// postbacks up. (Before, a commit noted in place: a broker that took 4 s
// to answer held the postback 5 s; reading back 10 s of output at 1,000
// conversions/s moved scripts/bench.sh e2e's p99 from 140 to 490–630 ms.)
func TestPostbacksDoNotWaitForTheNote(t *testing.T) {
	defer func(d time.Duration) { noteInterval = d }(noteInterval)
	noteInterval = 0 // a note at every commit
	var slow atomic.Bool
	noting := make(chan struct{}, 1)
	addr := testenv.KafkaControlled(t, testPartitions, kmsg.ListOffsets, func(c *kfake.Cluster, req kmsg.Request) kmsg.Response {
		if r := req.(*kmsg.ListOffsetsRequest); slow.Load() && len(r.Topics) > 0 && r.Topics[0].Topic == bus.TopicConversions {
			select {
			case noting <- struct{}{}:
			default:
			}
			c.SleepControl(func() { time.Sleep(4 * time.Second) })
		}
		return nil
	})
	log := readConversions(t, addr)
	r := start(testConfig(t, addr, t.TempDir()))
	defer r.stop(t)

	now := time.Now()
	click := func() schemas.Click {
		return schemas.Click{V: schemas.Version, ClickID: schemas.NewID(now), TS: now.UnixMilli(), OfferID: 1, AdvertiserID: 1, AffID: 7}
	}
	// postback produces an approval of c, and returns its event ID.
	postback := func(c schemas.Click) string {
		pb := schemas.Postback{V: schemas.Version, EventID: schemas.NewID(time.Now()), ClickID: c.ClickID, TS: time.Now().UnixMilli(),
			AdvertiserID: 1, Status: schemas.StatusApproved}
		produce(t, addr, bus.TopicPostbacks, []kafka.Message{{Key: []byte(c.ClickID), Value: pb.AppendJSON(nil)}})
		return pb.EventID
	}
	decided := func(eventID string) bool { return len(log.answers(eventID)) > 0 }

	// Warm up: the workers run.
	c0 := click()
	produce(t, addr, bus.TopicClicks, clickMessages([]schemas.Click{c0}))
	p0 := postback(c0)
	waitUntil(t, "the first postback is decided", 60*time.Second, func() bool { return decided(p0) })

	// A click, whose commit starts a note that the broker holds.
	slow.Store(true)
	c1 := click()
	produce(t, addr, bus.TopicClicks, clickMessages([]schemas.Click{c1}))
	select {
	case <-noting:
	case <-time.After(30 * time.Second):
		t.Fatal("no note began after the click")
	}
	st := time.Now()
	p1 := postback(c1)
	waitUntil(t, "the second postback is decided", 30*time.Second, func() bool { return decided(p1) })
	if took := time.Since(st); took > 2*time.Second {
		t.Fatalf("the postback took %v to decide while a note waited for the broker", took)
	}
	slow.Store(false)
}

// A broker slow to answer ListOffsets is asked again at the next
// noteInterval, not at every commit, nor while a note waits for it.
func TestSlowBrokerIsNotAskedAtEveryCommit(t *testing.T) {
	var slow atomic.Bool
	var asked atomic.Int32
	addr := testenv.KafkaControlled(t, testPartitions, kmsg.ListOffsets, func(c *kfake.Cluster, _ kmsg.Request) kmsg.Response {
		if slow.Load() {
			asked.Add(1)
			c.SleepControl(func() { time.Sleep(6 * time.Second) })
		}
		return nil
	})
	w := newTestWorker(t, addr)
	slow.Store(true)
	// What commitGroup does at each commit (CommitInterval, 1 s by
	// default), and run with the note's result.
	st := time.Now()
	w.startNote()
	w.startNote() // one under way: no second
	if !w.noting {
		t.Fatal("no note began")
	}
	w.applyNote(<-w.noteDone)
	w.noting = false
	w.startNote() // within the interval
	t.Logf("the note took %v; the broker was asked %d times", time.Since(st), asked.Load())
	if w.noting || asked.Load() != 1 {
		t.Fatalf("the broker did not answer ListOffsets in time, yet it was asked %d times within %v (a note under way: %v)", asked.Load(), noteInterval, w.noting)
	}
	if got := w.p.meta.ConversionsEnd; got != 0 {
		t.Fatalf("the mark moved to %d without an answer", got)
	}
}

// A postback minted before the expiry cut (an edge that drains a spool it
// kept for longer than keepFor, after days offline) is decided and sent
// like any other, and the next expiry pass drops its record: the note does
// not take that conversion for another member's. (Before, it marked the
// state stale.)
func TestOwnConversionExpiredBeforeTheNoteIsNotStale(t *testing.T) {
	addr := testenv.KafkaTopics(t, testPartitions)
	cat := loadTestCatalog(t)
	w := newTestWorker(t, addr)
	now := time.Now()
	old := now.Add(-keepFor(cat, time.Second) - time.Hour)
	pb := schemas.Postback{V: schemas.Version, EventID: schemas.NewID(old), ClickID: schemas.NewID(old.Add(-time.Minute)),
		TS: old.UnixMilli(), AdvertiserID: 1, Status: "approved"}
	w.p.clicksCaughtUp = true // the click never came
	wk := w.p.begin()
	if err := w.p.addPostback(wk, cat, 0, []byte(pb.ClickID), pb.AppendJSON(nil), now); err != nil {
		t.Fatal(err)
	}
	out := wk.out
	if err := w.p.commit(wk); err != nil {
		t.Fatal(err)
	}
	if len(out) != 1 || out[0].dlq {
		t.Fatalf("want one conversion, got %+v", out)
	}
	wr := &kafka.Writer{Addr: kafka.TCP(addr), Topic: bus.TopicConversions,
		Balancer:     kafka.BalancerFunc(func(kafka.Message, ...int) int { return 0 }),
		BatchTimeout: time.Millisecond, RequiredAcks: kafka.RequireAll}
	defer wr.Close()
	if err := wr.WriteMessages(context.Background(), kafka.Message{Key: out[0].key, Value: out[0].value, Time: now}); err != nil {
		t.Fatal(err)
	}
	if err := w.p.acked(out); err != nil {
		t.Fatal(err)
	}
	w.p.postbacksCaughtUp = true
	if err := w.p.expire(cat, now); err != nil { // ExpireInterval (1 m) passed
		t.Fatal(err)
	}
	w.noteConversionsEnd()
	if got := w.p.meta.ConversionsEnd; got != 1 {
		t.Fatalf("the partition holds one conversion, this member's own: the mark is %d, want 1 (staleMark %d)", got, staleMark)
	}
}

// newTestWorker is the worker of partition 0 of an attributor of its own
// (a store, metrics, a client of addr) that has seen none of the
// partition's conversions yet: meta.ConversionsEnd 0.
func newTestWorker(t *testing.T, addr string) *worker {
	t.Helper()
	db, err := openStore(filepath.Join(t.TempDir(), "a"), StoreOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	a := &attributor{
		cfg:    Config{Brokers: []string{addr}, Grace: time.Second},
		log:    slog.New(slog.NewTextHandler(testWriter{t}, nil)),
		db:     db,
		m:      newMetrics(prometheus.NewRegistry()),
		client: &kafka.Client{Addr: kafka.TCP(addr), Timeout: 10 * time.Second},
	}
	w := &worker{a: a, id: 0, noteCtx: t.Context(), noteDone: make(chan noteResult, 1)}
	w.p = newPartition(db, 0, time.Second, a.m)
	w.p.meta.ConversionsEnd = 0
	return w
}
