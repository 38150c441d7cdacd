package dispatcher_test

import (
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/trackstar/trackstar/dispatcher"
	"github.com/trackstar/trackstar/internal/bus"
	"github.com/trackstar/trackstar/internal/ops"
	"github.com/trackstar/trackstar/internal/testenv"
	"github.com/trackstar/trackstar/schemas"
)

// A coordinator that answers heartbeats slowly, but within the session,
// confirms the member all the same: an answer that comes late still shows
// the session ran from when the heartbeat was sent. (With a 1 s limit per
// heartbeat, a coordinator answering in 1.5 s stopped every delivery.)
func TestSlowCoordinatorStillConfirmsTheMember(t *testing.T) {
	addr := testenv.KafkaSlowHeartbeats(t, 1, 1500*time.Millisecond)
	p := newPartner(t, func(w http.ResponseWriter, r *http.Request, nth int) {})
	recs := collect(t, addr, bus.TopicDeliveries, 1)
	cat := holder(t, true, "2s", "[1s]", affiliate(7, p.srv.URL+"/pb?tx={conversion_id}"))
	startDispatcher(t, dispatcher.Config{Brokers: []string{addr}, Catalog: cat})
	c := newConversion(7)
	produce(t, addr, c)
	waitFor(t, "the delivery", func() bool { return recs.hasOutcome(t, c.ConversionID, schemas.OutcomeDelivered) })
}

// A member the coordinator does not confirm within half its session
// timeout takes nothing from Kafka — so it neither sends nor schedules
// what it reads — and says so on /readyz.
func TestUnconfirmedMemberTakesNothing(t *testing.T) {
	addr := testenv.KafkaSlowHeartbeats(t, 1, 3500*time.Millisecond) // kafka-go's own heartbeats keep the 6 s session
	p := newPartner(t, func(w http.ResponseWriter, r *http.Request, nth int) {})
	cat := holder(t, true, "2s", "[1s]", affiliate(7, p.srv.URL+"/pb?tx={conversion_id}"))
	health := &ops.Health{}
	reg := startDispatcher(t, dispatcher.Config{Brokers: []string{addr}, Catalog: cat, SessionTimeout: 6 * time.Second, Health: health})
	produce(t, addr, newConversion(7))
	waitFor(t, "readiness to say conversions are held", func() bool {
		err := health.Ready()
		return err != nil && strings.Contains(err.Error(), "conversions read from Kafka are held")
	})
	if n := len(p.requests()); n != 0 {
		t.Fatalf("the partner got %d requests from a member the coordinator did not confirm", n)
	}
	if q := metric(t, reg, "trackstar_dispatcher_conversions_total"); q != 0 {
		t.Fatalf("the member took %v conversions from Kafka without its lease", q)
	}
	t.Logf("readiness: %v", health.Ready())
}

// A rebalance whose hand-over waits for a slow request (within the
// delivery timeout the rebalance timeout is sized for) is no reason for
// /readyz to say conversions are held: nothing waits for the lease between
// generations. (It said so when readiness followed the lease itself.)
func TestLongHandOverIsNotReportedAsHeld(t *testing.T) {
	addr := testenv.KafkaTopics(t, 2)
	p := newPartner(t, func(w http.ResponseWriter, r *http.Request, nth int) {
		if nth == 1 {
			time.Sleep(16 * time.Second) // slow, but within the 20 s delivery timeout
		}
	})
	cat := holder(t, true, "20s", "[1s]", affiliate(7, p.srv.URL+"/pb?tx={conversion_id}"))
	hA := &ops.Health{}
	startDispatcher(t, dispatcher.Config{Brokers: []string{addr}, Catalog: cat, SessionTimeout: 6 * time.Second, Health: hA})
	waitFor(t, "A ready", func() bool { return hA.Ready() == nil })
	produce(t, addr, newConversion(7), newConversion(7), newConversion(7), newConversion(7))
	waitFor(t, "a request in flight", func() bool { return len(p.requests()) >= 1 })
	startDispatcher(t, dispatcher.Config{Brokers: []string{addr}, Catalog: cat, SessionTimeout: 6 * time.Second})
	deadline := time.Now().Add(18 * time.Second)
	for time.Now().Before(deadline) {
		if err := hA.Ready(); err != nil && strings.Contains(err.Error(), "conversions read from Kafka are held") {
			t.Fatalf("during a normal rebalance hand-over, /readyz: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
