package dispatcher_test

import (
	"context"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/segmentio/kafka-go"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/trackstar/trackstar/dispatcher"
	"github.com/trackstar/trackstar/internal/bus"
	"github.com/trackstar/trackstar/internal/ops"
	"github.com/trackstar/trackstar/internal/testenv"
	"github.com/trackstar/trackstar/schemas"
)

// A dispatcher removed from the group for good runs once more with
// DrainRetries on its data directory: it sends the retries it had
// scheduled, reads no conversions (they are the group's), and stops by
// itself once no retry is left.
func TestDrainRetriesSendsTheScheduleAndStops(t *testing.T) {
	var failing atomic.Bool
	failing.Store(true)
	var mu sync.Mutex
	delivered := map[string]int{}
	p := newPartner(t, func(w http.ResponseWriter, r *http.Request, nth int) {
		if failing.Load() {
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
		mu.Lock()
		delivered[r.Header.Get("X-Trackstar-Conversion-Id")]++
		mu.Unlock()
	})
	deliveredTo := func(c schemas.Conversion) int {
		mu.Lock()
		defer mu.Unlock()
		return delivered[c.ConversionID]
	}
	addr := testenv.KafkaTopics(t, 1)
	recs := collect(t, addr, bus.TopicDeliveries, 1)
	h := holder(t, true, "2s", "[1s, 1s, 1s, 1s, 1s, 1s, 1s, 1s]", affiliate(7, p.srv.URL+"/pb?tx={conversion_id}"))
	drain := func(data string) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		start := time.Now()
		err := dispatcher.Run(ctx, dispatcher.Config{Brokers: []string{addr}, DataDir: data, Catalog: h, DrainRetries: true, Logger: testLogger(t)})
		if err != nil || ctx.Err() != nil {
			t.Fatalf("draining: Run returned %v after %v (context: %v), want nil before the deadline", err, time.Since(start), ctx.Err())
		}
	}

	// No schedule there (a mistyped directory): an error, not a drain of
	// nothing. An empty schedule: it stops at once.
	missing := t.TempDir()
	err := dispatcher.Run(context.Background(), dispatcher.Config{Brokers: []string{addr}, DataDir: missing, Catalog: h, DrainRetries: true})
	if err == nil || !strings.Contains(err.Error(), "no retry schedule to drain") {
		t.Fatalf("draining a directory without a schedule: %v, want an error saying so", err)
	}
	empty := t.TempDir()
	if err := os.Mkdir(filepath.Join(empty, "dispatcher"), 0o755); err != nil {
		t.Fatal(err)
	}
	drain(empty)

	data := t.TempDir()
	_, stop := startStoppableDispatcher(t, dispatcher.Config{Brokers: []string{addr}, DataDir: data, Catalog: h})
	c1 := newConversion(7)
	produce(t, addr, c1)
	waitFor(t, "the first attempt's retrying record", func() bool {
		return recs.hasOutcome(t, c1.ConversionID, schemas.OutcomeRetrying)
	})
	stop() // the member leaves for good; its retry stays in its schedule

	c2 := newConversion(7)
	produce(t, addr, c2)
	failing.Store(false)
	drain(data)
	if n := deliveredTo(c1); n != 1 {
		t.Fatalf("the drain delivered the scheduled retry %d times, want 1", n)
	}
	waitFor(t, "the retry's delivered record", func() bool {
		return recs.hasOutcome(t, c1.ConversionID, schemas.OutcomeDelivered)
	})
	if n := len(p.requestsFor(c2.ConversionID)); n != 0 {
		t.Fatalf("the drain sent a conversion it was not to read (%d requests)", n)
	}

	// The group's next member sends the conversion the drain left alone,
	// and not the one the drain delivered.
	startDispatcher(t, dispatcher.Config{Brokers: []string{addr}, Catalog: h})
	waitFor(t, "the next member to deliver the other conversion", func() bool { return deliveredTo(c2) == 1 })
	time.Sleep(500 * time.Millisecond)
	if n := deliveredTo(c1); n != 1 {
		t.Fatalf("the retried conversion was delivered %d times, want 1", n)
	}
}

// A drain does not send an older status after a newer one another member
// sent, before the drain started or while it ran: it follows the group's
// delivery records as it goes.
func TestDrainDoesNotSendAnOlderStatusAfterANewer(t *testing.T) {
	// Member A schedules the retries of two pending statuses, and leaves;
	// member B delivers the approval of one before the drain starts...
	sc := newOlderStatusScene(t, "3s")
	p, addr, cat, data, during := sc.p, sc.addr, sc.cat, sc.dataA, sc.during

	// ...and of the other while the drain runs, right after the drain has
	// tried its pending status (the next try is 3 s later).
	tried := len(p.requestsFor(during.ConversionID))
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	drained := make(chan error, 1)
	go func() {
		drained <- dispatcher.Run(ctx, dispatcher.Config{Brokers: []string{addr}, DataDir: data, Catalog: cat,
			DrainRetries: true, Logger: testLogger(t)})
	}()
	waitFor(t, "the drain to try the second pending status", func() bool { return len(p.requestsFor(during.ConversionID)) > tried })
	produce(t, addr, approval(during))
	if err := <-drained; err != nil || ctx.Err() != nil {
		t.Fatalf("the drain returned %v (context: %v), want nil once its schedule is empty", err, ctx.Err())
	}

	sc.check(t)
}

// A drain reads the group's deliveries back to its oldest scheduled
// conversion, not only DedupWindow: a retry can wait for hours (the
// default schedule reaches 12 h), and a newer status sent since is
// older than that window when the drain starts.
func TestDrainSeesANewerStatusSentLongBefore(t *testing.T) {
	p := newPartner(t, func(w http.ResponseWriter, r *http.Request, nth int) {
		if nth == 1 {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
	})
	addr := testenv.KafkaTopics(t, 1)
	recs := collect(t, addr, bus.TopicDeliveries, 1)
	cat := holder(t, true, "5s", "[3s, 3s]",
		affiliate(7, p.srv.URL+"/pb?tx={conversion_id}&st={status}", "statuses: [pending, approved]"))

	// A pending conversion of 3 h ago, whose approval another member
	// delivered 2 h ago...
	c := newConversion(7)
	c.Status, c.TS = schemas.StatusPending, time.Now().Add(-3*time.Hour).UnixMilli()
	sent := time.Now().Add(-2 * time.Hour)
	w := bus.NewWriter(bus.WriterConfig{Brokers: []string{addr}, Topic: bus.TopicDeliveries})
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	if err := w.WriteMessages(ctx, kafka.Message{Key: []byte(c.ClickID), Time: sent, Value: schemas.EncodeDelivery(schemas.Delivery{
		V: schemas.Version, ConversionID: c.ConversionID, Version: 2, Status: schemas.StatusApproved, AffID: 7,
		Attempt: 1, TS: sent.UnixMilli(), Method: "GET", StatusCode: 200, Outcome: schemas.OutcomeDelivered,
	})}); err != nil {
		t.Fatal(err)
	}
	w.Close()

	// ...and whose pending status waits for a retry in a member that left.
	data := t.TempDir()
	_, stopA := startStoppableDispatcher(t, dispatcher.Config{Brokers: []string{addr}, DataDir: data, Catalog: cat})
	produce(t, addr, c)
	waitFor(t, "the pending status's failed attempt", func() bool {
		return recs.hasOutcome(t, c.ConversionID, schemas.OutcomeRetrying)
	})
	stopA()

	if err := dispatcher.Run(ctx, dispatcher.Config{Brokers: []string{addr}, DataDir: data, Catalog: cat,
		DrainRetries: true, Logger: testLogger(t)}); err != nil || ctx.Err() != nil {
		t.Fatalf("drain: %v (context %v)", err, ctx.Err())
	}
	if sts := p.statusesFor(c.ConversionID); len(sts) != 1 {
		t.Fatalf("the partner got %v: the drain sent the pending status after the approval delivered 2 h before", sts)
	}
}

// A drain's failure to read trackstar.deliveries leaves /readyz once the
// same step works again, even on a quiet topic. (It stayed until the next
// delivery record came, hours later for a drain.)
func TestDrainReadinessRecovers(t *testing.T) {
	var failing atomic.Bool
	var failed atomic.Int32
	addr := testenv.KafkaControlled(t, 1, kmsg.ListOffsets, func(_ *kfake.Cluster, kr kmsg.Request) kmsg.Response {
		if !failing.Load() {
			return nil
		}
		req := kr.(*kmsg.ListOffsetsRequest)
		resp := req.ResponseKind().(*kmsg.ListOffsetsResponse)
		for _, rt := range req.Topics {
			st := kmsg.NewListOffsetsResponseTopic()
			st.Topic = rt.Topic
			for _, rp := range rt.Partitions {
				sp := kmsg.NewListOffsetsResponseTopicPartition()
				sp.Partition = rp.Partition
				sp.ErrorCode = -1 // UNKNOWN_SERVER_ERROR
				st.Partitions = append(st.Partitions, sp)
			}
			resp.Topics = append(resp.Topics, st)
		}
		failed.Add(1)
		return resp
	})

	c := newConversion(7)
	c.TS = time.Now().Add(10 * time.Minute).UnixMilli() // the drain reads from DedupWindow ago
	cfg := leaveOneRetry(t, addr, c)
	time.Sleep(2 * time.Second) // its record is older than the drain's window: the topic is quiet from there

	failing.Store(true)
	cfg.DedupWindow = time.Second
	h := startDrain(t, cfg)
	waitFor(t, "a failed ListOffsets", func() bool { return failed.Load() > 0 })
	failing.Store(false)
	waitFor(t, "/readyz to recover", func() bool { return h.Ready() == nil })
}

// The same once the drain has caught up and follows the topic: a failed
// fetch leaves /readyz once fetching works again, on a quiet topic too.
func TestDrainReadinessRecoversWhileFollowing(t *testing.T) {
	var failing atomic.Bool
	addr := testenv.KafkaControlled(t, 1, kmsg.Fetch, func(_ *kfake.Cluster, kr kmsg.Request) kmsg.Response {
		req := kr.(*kmsg.FetchRequest)
		if !failing.Load() || len(req.Topics) == 0 || req.Topics[0].Topic != bus.TopicDeliveries {
			return nil
		}
		resp := req.ResponseKind().(*kmsg.FetchResponse)
		for _, rt := range req.Topics {
			st := kmsg.NewFetchResponseTopic()
			st.Topic, st.TopicID = rt.Topic, rt.TopicID
			for _, rp := range rt.Partitions {
				sp := kmsg.NewFetchResponseTopicPartition()
				sp.Partition = rp.Partition
				sp.ErrorCode = -1 // UNKNOWN_SERVER_ERROR
				st.Partitions = append(st.Partitions, sp)
			}
			resp.Topics = append(resp.Topics, st)
		}
		return resp
	})
	h := startDrain(t, leaveOneRetry(t, addr, newConversion(7))) // a retry an hour away: the drain keeps following
	time.Sleep(2 * time.Second)                                  // caught up: nothing but that retry's record
	if err := h.Ready(); err != nil {
		t.Fatalf("following, before any failure: %v", err)
	}
	failing.Store(true)
	waitFor(t, "/readyz to report the failed fetches", func() bool { return h.Ready() != nil })
	failing.Store(false)
	waitFor(t, "/readyz to recover", func() bool { return h.Ready() == nil })
}

// leaveOneRetry has a member schedule the retry of c (its partner answers
// 503, the next try an hour away) and stop, as one removed for good does.
// It returns the config of a drain of that member's data directory.
func leaveOneRetry(t *testing.T, addr string, c schemas.Conversion) dispatcher.Config {
	t.Helper()
	p := newPartner(t, func(w http.ResponseWriter, r *http.Request, nth int) { w.WriteHeader(http.StatusServiceUnavailable) })
	recs := collect(t, addr, bus.TopicDeliveries, 1)
	cfg := dispatcher.Config{Brokers: []string{addr}, DataDir: t.TempDir(),
		Catalog: holder(t, true, "2s", "[1h]", affiliate(int(c.AffID), p.srv.URL+"/pb?tx={conversion_id}"))}
	_, stop := startStoppableDispatcher(t, cfg)
	produce(t, addr, c)
	waitFor(t, "the retrying record", func() bool { return recs.hasOutcome(t, c.ConversionID, schemas.OutcomeRetrying) })
	stop()
	cfg.DrainRetries = true
	return cfg
}

// startDrain runs a drain until the test ends and returns its readiness.
func startDrain(t *testing.T, cfg dispatcher.Config) *ops.Health {
	cfg.Health, cfg.Logger = &ops.Health{}, testLogger(t)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- dispatcher.Run(ctx, cfg) }()
	t.Cleanup(func() { cancel(); <-done })
	return cfg.Health
}
