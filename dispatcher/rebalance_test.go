package dispatcher_test

import (
	"context"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/segmentio/kafka-go"

	"github.com/trackstar/trackstar/dispatcher"
	"github.com/trackstar/trackstar/internal/bus"
	"github.com/trackstar/trackstar/internal/ops"
	"github.com/trackstar/trackstar/internal/testenv"
	"github.com/trackstar/trackstar/schemas"
)

// When a second dispatcher joins the group, the first hands over a
// partition it was working through: what it had queued is left to the new
// owner, what it had in flight is recorded and committed before the
// partition moves. No conversion reaches the partner twice.
func TestRebalanceHandsOverWithoutRepeats(t *testing.T) {
	started := make(chan struct{})
	var once sync.Once
	p := newPartner(t, func(w http.ResponseWriter, r *http.Request, nth int) {
		once.Do(func() { close(started) })
		time.Sleep(200 * time.Millisecond) // a slow partner: the queue stays long
	})
	addr := testenv.KafkaTopics(t, 2)
	recs := collect(t, addr, bus.TopicDeliveries, 2)
	cat := holder(t, true, "5s", "[1s]", affiliate(7, p.srv.URL+"/pb?tx={conversion_id}"))

	const n = 40
	convs := make([]schemas.Conversion, n)
	for i := range convs {
		convs[i] = newConversion(7)
	}
	regA := startDispatcher(t, dispatcher.Config{Brokers: []string{addr}, Catalog: cat, HostConcurrency: 1})
	produce(t, addr, convs...)
	select {
	case <-started:
	case <-time.After(30 * time.Second):
		t.Fatal("the partner never got a postback")
	}
	regB := startDispatcher(t, dispatcher.Config{Brokers: []string{addr}, Catalog: cat, HostConcurrency: 1})

	waitFor(t, "every conversion to be delivered", func() bool { return p.distinct() == n })
	waitFor(t, "every delivered record", func() bool {
		for _, c := range convs {
			if !recs.hasOutcome(t, c.ConversionID, schemas.OutcomeDelivered) {
				return false
			}
		}
		return true
	})
	waitFor(t, "both dispatchers to settle", func() bool { return settled(t, regA) && settled(t, regB) })
	time.Sleep(500 * time.Millisecond) // a repeat would be on its way by now

	repeats := 0
	for _, c := range convs {
		if k := len(p.requestsFor(c.ConversionID)); k != 1 {
			t.Errorf("conversion %s reached the partner %d times", c.ConversionID, k)
			repeats++
		}
	}
	a := metric(t, regA, "trackstar_dispatcher_deliveries_total", "outcome", "delivered")
	b := metric(t, regB, "trackstar_dispatcher_deliveries_total", "outcome", "delivered")
	t.Logf("delivered: %v by the first dispatcher, %v by the one that joined; %d of %d repeated", a, b, repeats, n)
	if b == 0 {
		t.Fatalf("the dispatcher that joined delivered nothing: the test did not hand a partition over")
	}
}

// A request in flight that outlasts the session timeout when a rebalance
// starts: the dispatcher keeps its membership alive while it waits, so
// its commit still counts and the next owner does not send it again.
func TestRebalanceWaitsOutASlowRequest(t *testing.T) {
	started := make(chan struct{})
	var once sync.Once
	p := newPartner(t, func(w http.ResponseWriter, r *http.Request, nth int) {
		first := false
		once.Do(func() { first = true; close(started) })
		if first {
			time.Sleep(8 * time.Second) // longer than the session timeout
		}
	})
	addr := testenv.KafkaTopics(t, 1)
	recs := collect(t, addr, bus.TopicDeliveries, 1)
	cat := holder(t, true, "10s", "[1s]", affiliate(7, p.srv.URL+"/pb?tx={conversion_id}"))

	cfg := dispatcher.Config{Brokers: []string{addr}, Catalog: cat, SessionTimeout: 6 * time.Second} // the broker's least
	regA := startDispatcher(t, cfg)
	c1 := newConversion(7)
	produce(t, addr, c1)
	select {
	case <-started:
	case <-time.After(30 * time.Second):
		t.Fatal("the partner never got the postback")
	}
	regB := startDispatcher(t, cfg)
	waitFor(t, "the slow request's record", func() bool { return recs.hasOutcome(t, c1.ConversionID, schemas.OutcomeDelivered) })

	c2 := newConversion(7)
	produce(t, addr, c2)
	waitFor(t, "a later conversion to be delivered", func() bool { return recs.hasOutcome(t, c2.ConversionID, schemas.OutcomeDelivered) })
	waitFor(t, "both dispatchers to settle", func() bool { return settled(t, regA) && settled(t, regB) })
	time.Sleep(time.Second)
	if n := len(p.requestsFor(c1.ConversionID)); n != 1 {
		t.Fatalf("the conversion in flight during the rebalance reached the partner %d times, want 1", n)
	}
}

// A partition's next owner learns what the last one delivered from
// trackstar.deliveries: a conversion record read again (the attributor
// re-emits the records of postbacks it reads again after a rebuild) is not
// sent a second time by a dispatcher that never saw it.
func TestNextOwnerDoesNotResendWhatTheLastDelivered(t *testing.T) {
	p := newPartner(t, func(w http.ResponseWriter, r *http.Request, nth int) {})
	addr := testenv.KafkaTopics(t, 1)
	recs := collect(t, addr, bus.TopicDeliveries, 1)
	cat := holder(t, true, "5s", "[1s]", affiliate(7, p.srv.URL+"/pb?tx={conversion_id}"))

	_, stopA := startStoppableDispatcher(t, dispatcher.Config{Brokers: []string{addr}, Catalog: cat})
	c := newConversion(7)
	produce(t, addr, c)
	waitFor(t, "the delivered record", func() bool { return recs.hasOutcome(t, c.ConversionID, schemas.OutcomeDelivered) })
	stopA()

	regB := startDispatcher(t, dispatcher.Config{Brokers: []string{addr}, Catalog: cat}) // a data dir of its own
	produce(t, addr, c)                                                                  // the same record again
	waitFor(t, "the replay to be handled", func() bool {
		return metric(t, regB, "trackstar_dispatcher_conversions_total", "result", "duplicate")+
			metric(t, regB, "trackstar_dispatcher_conversions_total", "result", "queued") > 0
	})
	waitFor(t, "the dispatcher to settle", func() bool { return settled(t, regB) })
	if n := len(p.requestsFor(c.ConversionID)); n != 1 {
		t.Fatalf("the partner got %d requests for one conversion delivered once, then read again by the next owner", n)
	}
}

// The next owner also learns the newest status the last one queued: an
// older status read again is not sent after it.
func TestNextOwnerDoesNotSendAnOlderStatusAfterANewer(t *testing.T) {
	p := newPartner(t, func(w http.ResponseWriter, r *http.Request, nth int) {
		if r.URL.Query().Get("st") == schemas.StatusPending {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
	})
	addr := testenv.KafkaTopics(t, 1)
	recs := collect(t, addr, bus.TopicDeliveries, 1)
	cat := holder(t, true, "5s", "[1h]",
		affiliate(7, p.srv.URL+"/pb?tx={conversion_id}&st={status}", "statuses: [pending, approved]"))

	_, stopA := startStoppableDispatcher(t, dispatcher.Config{Brokers: []string{addr}, Catalog: cat})
	pending := newConversion(7)
	pending.Status = schemas.StatusPending
	approved := pending
	approved.Version, approved.Status = 2, schemas.StatusApproved
	produce(t, addr, pending)
	waitFor(t, "the pending status's failed attempt", func() bool {
		return recs.hasOutcome(t, pending.ConversionID, schemas.OutcomeRetrying)
	})
	produce(t, addr, approved)
	waitFor(t, "the approved status delivered", func() bool {
		return recs.hasOutcome(t, pending.ConversionID, schemas.OutcomeDelivered)
	})
	stopA() // its retry of the pending status stays in its schedule

	regB := startDispatcher(t, dispatcher.Config{Brokers: []string{addr}, Catalog: cat})
	produce(t, addr, pending) // the pending status read again
	waitFor(t, "the replay to be recorded", func() bool {
		return metric(t, regB, "trackstar_dispatcher_deliveries_total")+
			metric(t, regB, "trackstar_dispatcher_conversions_total", "result", "duplicate") > 0
	})
	var sts []string
	for _, r := range p.requests() {
		sts = append(sts, r.uri[strings.LastIndex(r.uri, "=")+1:])
	}
	if want := []string{schemas.StatusPending, schemas.StatusApproved}; !slices.Equal(sts, want) {
		t.Fatalf("the partner got statuses %v, want %v", sts, want)
	}
	if got := metric(t, regB, "trackstar_dispatcher_conversions_total", "result", "superseded"); got != 1 {
		t.Errorf("superseded conversions %v, want 1", got)
	}
}

// A member's retry of an older status is superseded by a newer one another
// member sent, whether it was sent while the first was stopped or while
// both ran: the retry is the first member's whichever member owns the
// conversion's partition now, and every member follows the group's
// delivery records. (Before, the restarted member sent its retries at
// once, and without the partition it never learned of the newer status.)
func TestRetryOfAnOlderStatusSeesAnotherMembersNewer(t *testing.T) {
	// Member A schedules the retries of two pending statuses and stops;
	// member B, alone, delivers the approval of one; A comes back (with
	// the partition or without it) while the other's approval is sent.
	sc := newOlderStatusScene(t, "2s")
	p, addr, cat, dataA, during := sc.p, sc.addr, sc.cat, sc.dataA, sc.during
	tried := len(p.requestsFor(during.ConversionID))
	startDispatcher(t, dispatcher.Config{Brokers: []string{addr}, DataDir: dataA, Catalog: cat})
	waitFor(t, "A to try the second pending status again", func() bool { return len(p.requestsFor(during.ConversionID)) > tried })
	produce(t, addr, approval(during))

	// A's retries come every 2 s: each has been tried again well before
	// this deadline, and ended once it learned of the approval.
	for deadline := time.Now().Add(15 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if sc.superseded(t, sc.before) && sc.superseded(t, during) {
			break
		}
	}
	time.Sleep(time.Second) // a pending status sent after all would be seen by now
	sc.check(t)
}

// A restarted dispatcher reads the group's deliveries on from where it
// stopped, not the whole look-back again (which reaches back to its
// oldest scheduled conversion: hours of every partition, at each start).
func TestFollowerReadsOnWhereItStopped(t *testing.T) {
	addr := testenv.KafkaTopics(t, 1)
	write := func(n int) {
		t.Helper()
		w := bus.NewWriter(bus.WriterConfig{Brokers: []string{addr}, Topic: bus.TopicDeliveries})
		defer w.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		for range n {
			c := newConversion(7)
			if err := w.WriteMessages(ctx, kafka.Message{Key: []byte(c.ClickID), Value: schemas.EncodeDelivery(schemas.Delivery{
				V: schemas.Version, ConversionID: c.ConversionID, Version: 2, Status: schemas.StatusApproved, AffID: 7,
				Attempt: 1, TS: time.Now().UnixMilli(), Method: "GET", StatusCode: 200, Outcome: schemas.OutcomeDelivered,
			})}); err != nil {
				t.Fatal(err)
			}
		}
	}
	followed := func(reg *prometheus.Registry) float64 {
		return metric(t, reg, "trackstar_dispatcher_deliveries_followed_total")
	}
	cfg := dispatcher.Config{Brokers: []string{addr}, DataDir: t.TempDir(),
		Catalog: holder(t, true, "5s", "[1s]", affiliate(7, "http://127.0.0.1:1/pb"))}

	write(5)
	reg, stop := startStoppableDispatcher(t, cfg)
	waitFor(t, "the five records read", func() bool { return followed(reg) == 5 })
	stop()

	write(1)
	cfg.Registry = nil
	reg, _ = startStoppableDispatcher(t, cfg)
	waitFor(t, "the new record read", func() bool { return followed(reg) >= 1 })
	time.Sleep(time.Second)
	if n := followed(reg); n != 1 {
		t.Fatalf("the restarted dispatcher read %v records, want only the 1 written while it was stopped", n)
	}
}

// A partition whose deliveries cannot be learned is not read, and
// readiness says so until they can be.
func TestPartitionNotLearnedIsNotReady(t *testing.T) {
	p := newPartner(t, func(w http.ResponseWriter, r *http.Request, nth int) {})
	addr := testenv.Kafka(t)
	client := &kafka.Client{Addr: kafka.TCP(addr), Timeout: 10 * time.Second}
	create := func(topic string) {
		t.Helper()
		resp, err := client.CreateTopics(context.Background(), &kafka.CreateTopicsRequest{
			Topics: []kafka.TopicConfig{{Topic: topic, NumPartitions: 1, ReplicationFactor: 1}},
		})
		if err == nil {
			err = resp.Errors[topic]
		}
		if err != nil {
			t.Fatalf("cannot create %s: %v", topic, err)
		}
	}
	create(bus.TopicConversions) // no trackstar.deliveries yet
	health := &ops.Health{}
	cat := holder(t, true, "5s", "[1s]", affiliate(7, p.srv.URL+"/pb?tx={conversion_id}"))
	startDispatcher(t, dispatcher.Config{Brokers: []string{addr}, Catalog: cat, Health: health})
	c := newConversion(7)
	produce(t, addr, c)
	waitFor(t, "readiness to name the partition not read", func() bool {
		err := health.Ready()
		return err != nil && strings.Contains(err.Error(), "partitions [0] not read")
	})
	if n := len(p.requests()); n != 0 {
		t.Fatalf("the partner got %d requests from a partition not learned", n)
	}
	create(bus.TopicDeliveries)
	create(bus.TopicDLQ)
	waitFor(t, "the conversion delivered", func() bool { return len(p.requestsFor(c.ConversionID)) == 1 })
	waitFor(t, "readiness", func() bool { return health.Ready() == nil })
}
