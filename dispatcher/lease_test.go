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
