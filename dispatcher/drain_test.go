package dispatcher_test

import (
	"context"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/trackstar/trackstar/dispatcher"
	"github.com/trackstar/trackstar/internal/bus"
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

	drain(t.TempDir()) // nothing scheduled: it stops at once

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
