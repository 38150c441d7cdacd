package dispatcher_test

import (
	"io"
	"log/slog"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/trackstar/trackstar/dispatcher"
	"github.com/trackstar/trackstar/internal/bus"
	"github.com/trackstar/trackstar/internal/testenv"
	"github.com/trackstar/trackstar/schemas"
)

// A partner that keeps failing is paused by its circuit breaker: while
// paused it gets one probe per cool-down instead of every retry; once it
// answers again it resumes and everything is delivered. The pause shows
// in metrics and logs.
func TestCircuitBreakerPausesAndProbes(t *testing.T) {
	var healthy atomic.Bool
	p := newPartner(t, func(w http.ResponseWriter, r *http.Request, nth int) {
		if !healthy.Load() {
			w.WriteHeader(http.StatusBadGateway)
		}
	})
	addr := testenv.KafkaTopics(t, 1)
	recs := collect(t, addr, bus.TopicDeliveries, 1)
	logs := &testenv.Buffer{}
	const convs, cooldown = 5, 300 * time.Millisecond
	reg := startDispatcher(t, dispatcher.Config{
		Brokers:         []string{addr},
		Catalog:         holder(t, true, "1s", "["+strings.Repeat("50ms, ", 40)+"50ms]", affiliate(7, p.srv.URL+"/pb?tx={conversion_id}")),
		BreakerFailures: 3,
		BreakerCooldown: cooldown,
		Logger:          slog.New(slog.NewTextHandler(io.MultiWriter(logs, tWriter{t}), nil)),
	})
	host := strings.TrimPrefix(p.srv.URL, "http://")
	var cs []schemas.Conversion
	for range convs {
		cs = append(cs, newConversion(7))
	}
	produce(t, addr, cs...)

	waitFor(t, "three trips of the breaker (a pause, then two failed probes)", func() bool {
		return metric(t, reg, "trackstar_dispatcher_breaker_trips_total", "host", host) >= 3
	})
	trips := metric(t, reg, "trackstar_dispatcher_breaker_trips_total", "host", host)
	n := len(p.requests())
	t.Logf("%v trips, %d requests while failing", trips, n)
	// Without the breaker, 5 conversions retried every 50ms for 2 cool-downs
	// would have made dozens of requests; with it, the first 5 and one probe
	// per later trip (a probe failing as the pause ends can add one).
	if n > convs+int(trips)+1 {
		t.Fatalf("partner got %d requests while paused for %v trips; want at most %d", n, trips, convs+int(trips)+1)
	}
	if s := metric(t, reg, "trackstar_dispatcher_breaker_state", "host", host); s == 0 {
		t.Fatalf("breaker_state = %v while the partner fails; want open or half-open", s)
	}
	if !strings.Contains(logs.String(), "partner host paused by circuit breaker") {
		t.Fatalf("no log line tells the pause")
	}

	healthy.Store(true)
	waitFor(t, "every conversion delivered", func() bool {
		for _, c := range cs {
			if !recs.hasOutcome(t, c.ConversionID, schemas.OutcomeDelivered) {
				return false
			}
		}
		return true
	})
	waitFor(t, "the breaker to close", func() bool {
		return metric(t, reg, "trackstar_dispatcher_breaker_state", "host", host) == 0
	})
	if !strings.Contains(logs.String(), "partner host resumed") {
		t.Fatalf("no log line tells the resume")
	}
	for _, c := range cs {
		ok := 0
		for _, d := range recs.deliveries(t, c.ConversionID) {
			if d.Outcome == schemas.OutcomeDelivered {
				ok++
			}
		}
		if ok != 1 {
			t.Fatalf("conversion %s delivered %d times", c.ConversionID, ok)
		}
	}
}

// A partner that hangs, receiving many conversions, does not hold up a
// fast partner behind it in the same partition: the fast partner gets all
// of its conversions while the slow one is still stuck. The slow one's
// overflow waits in the durable schedule and is delivered once it answers.
func TestSlowPartnerDoesNotDelayOthers(t *testing.T) {
	release := make(chan struct{})
	slow := newPartner(t, func(w http.ResponseWriter, r *http.Request, nth int) {
		select {
		case <-release:
		case <-r.Context().Done():
		}
	})
	var fastMu sync.Mutex
	fastAt := map[string]time.Time{}
	fast := newPartner(t, func(w http.ResponseWriter, r *http.Request, nth int) {
		fastMu.Lock()
		fastAt[r.Header.Get("X-Trackstar-Conversion-Id")] = time.Now()
		fastMu.Unlock()
	})
	addr := testenv.KafkaTopics(t, 1) // one partition: the worst case for head-of-line blocking
	recs := collect(t, addr, bus.TopicDeliveries, 1)
	reg := startDispatcher(t, dispatcher.Config{
		Brokers: []string{addr},
		Catalog: holder(t, true, "30s", "[100ms]",
			affiliate(7, slow.srv.URL+"/pb?tx={conversion_id}"),
			affiliate(8, fast.srv.URL+"/pb?tx={conversion_id}")),
		HostConcurrency: 4,
		HostQueue:       16,
	})
	const nSlow, nFast = 200, 50
	var slowConvs, fastConvs []schemas.Conversion
	for range nSlow {
		slowConvs = append(slowConvs, newConversion(7))
	}
	for range nFast {
		fastConvs = append(fastConvs, newConversion(8))
	}
	// The slow partner's conversions come first in the partition.
	produce(t, addr, slowConvs...)
	sent := time.Now()
	produce(t, addr, fastConvs...)

	waitFor(t, "the fast partner to get all its conversions", func() bool { return fast.distinct() == nFast })
	if n := len(slow.requests()); n > 4 {
		t.Fatalf("the slow partner has %d requests in flight, more than HostConcurrency", n)
	}
	select {
	case <-release:
		t.Fatal("BUG: released too early")
	default:
	}
	var lat []time.Duration
	fastMu.Lock()
	for _, at := range fastAt {
		lat = append(lat, at.Sub(sent))
	}
	fastMu.Unlock()
	slices.Sort(lat)
	t.Logf("fast partner, while the slow one hangs: %d deliveries, latency from produce p50 %v, p99 %v, max %v",
		len(lat), lat[len(lat)/2].Round(time.Millisecond), lat[len(lat)*99/100].Round(time.Millisecond), lat[len(lat)-1].Round(time.Millisecond))
	if d := metric(t, reg, "trackstar_dispatcher_deferred_total", "reason", "queue_full"); d == 0 {
		t.Fatalf("no delivery was deferred to the schedule, yet the slow host's queue holds 16")
	}
	t.Logf("deferred to the schedule: %v; pending: %v", metric(t, reg, "trackstar_dispatcher_deferred_total"), metric(t, reg, "trackstar_dispatcher_retries_pending"))

	close(release)
	waitFor(t, "the slow partner to get all its conversions", func() bool { return slow.distinct() == nSlow })
	waitFor(t, "every conversion delivered", func() bool {
		return metric(t, reg, "trackstar_dispatcher_deliveries_total", "outcome", "delivered") == nSlow+nFast
	})
	waitFor(t, "the dispatcher to settle", func() bool { return settled(t, reg) })
	for _, c := range slowConvs {
		if n := len(slow.requestsFor(c.ConversionID)); n != 1 {
			t.Fatalf("slow partner got conversion %s %d times", c.ConversionID, n)
		}
	}
	waitFor(t, "a delivery record of every conversion", func() bool { return len(recs.deliveries(t, "")) >= nSlow+nFast })
	if n := len(recs.deliveries(t, "")); n != nSlow+nFast {
		t.Fatalf("%d delivery records, want %d", n, nSlow+nFast)
	}
}

// Only the statuses and goals an affiliate asked for are sent; a status
// update of a conversion is sent with the same idempotency key; a replayed
// Kafka record is not sent twice; an affiliate without a postback gets
// nothing.
func TestFiltersUpdatesAndReplays(t *testing.T) {
	p := newPartner(t, func(w http.ResponseWriter, r *http.Request, nth int) {})
	addr := testenv.KafkaTopics(t, 1)
	recs := collect(t, addr, bus.TopicDeliveries, 1)
	cat := holder(t, true, "2s", "[50ms]",
		affiliate(7, p.srv.URL+"/a?tx={conversion_id}&st={status}"), // default: approved only, all goals
		affiliate(8, p.srv.URL+"/b?tx={conversion_id}&st={status}", "statuses: [pending, approved]", "goals: [sale]"),
		"  - id: 9\n")
	reg := startDispatcher(t, dispatcher.Config{Brokers: []string{addr}, Catalog: cat})

	pending7 := newConversion(7)
	pending7.Status = schemas.StatusPending
	rejected7 := newConversion(7)
	rejected7.Status, rejected7.RejectReason = schemas.StatusRejected, schemas.RejectDuplicate
	approved7 := newConversion(7)
	sale8 := newConversion(8)
	sale8.Goal, sale8.Status = "sale", schemas.StatusPending
	sale8approved := sale8
	sale8approved.Version, sale8approved.Status = 2, schemas.StatusApproved
	default8 := newConversion(8)
	none9 := newConversion(9)
	produce(t, addr, pending7, rejected7, approved7, approved7, sale8, default8, none9)
	waitFor(t, "two deliveries", func() bool {
		return metric(t, reg, "trackstar_dispatcher_deliveries_total", "outcome", "delivered") == 2
	})
	// The update once the first status is through (produced together, the
	// older one would be superseded: TestNewerVersionSupersedesOlderRetry).
	produce(t, addr, sale8approved)

	waitFor(t, "three deliveries", func() bool {
		return metric(t, reg, "trackstar_dispatcher_deliveries_total", "outcome", "delivered") == 3
	})
	waitFor(t, "all eight records consumed", func() bool {
		return metric(t, reg, "trackstar_dispatcher_conversions_total") == 8
	})
	waitFor(t, "the dispatcher to settle", func() bool { return settled(t, reg) })
	got := map[string]int{}
	for _, r := range p.requests() {
		got[r.uri]++
	}
	want := map[string]int{
		"/a?tx=" + approved7.ConversionID + "&st=approved": 1,
		"/b?tx=" + sale8.ConversionID + "&st=pending":      1,
		"/b?tx=" + sale8.ConversionID + "&st=approved":     1,
	}
	if len(got) != len(want) {
		t.Fatalf("partner requests %v, want %v", got, want)
	}
	for k, v := range want {
		if got[k] != v {
			t.Fatalf("partner requests %v, want %v", got, want)
		}
	}
	for _, r := range p.requestsFor(sale8.ConversionID) {
		if r.header.Get("X-Trackstar-Conversion-Id") != sale8.ConversionID {
			t.Fatalf("status update sent with another idempotency key")
		}
	}
	waitFor(t, "three delivery records", func() bool { return len(recs.deliveries(t, "")) >= 3 })
	if d := recs.deliveries(t, sale8.ConversionID); len(d) != 2 || d[0].Version+d[1].Version != 3 {
		t.Fatalf("records of the updated conversion = %+v; want versions 1 and 2", d)
	}
	f := func(result string, want float64) {
		t.Helper()
		if got := metric(t, reg, "trackstar_dispatcher_conversions_total", "result", result); got != want {
			t.Fatalf("conversions_total{result=%s} = %v, want %v", result, got, want)
		}
	}
	f("queued", 3)
	f("duplicate", 1)
	f("not_wanted", 4)
}

// A status update overtakes an older status still waiting for a retry: the
// partner gets pending, then approved, and never pending again after
// approved; the older one's retry ends as failed, superseded. Read
// together, the older one is not sent after the newer either.
func TestNewerVersionSupersedesOlderRetry(t *testing.T) {
	p := newPartner(t, func(w http.ResponseWriter, r *http.Request, nth int) {
		if strings.Contains(r.URL.RawQuery, "st=pending") {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
	})
	addr := testenv.KafkaTopics(t, 1)
	recs := collect(t, addr, bus.TopicDeliveries, 1)
	cat := holder(t, true, "2s", "[700ms, 700ms]",
		affiliate(8, p.srv.URL+"/b?tx={conversion_id}&st={status}", "statuses: [pending, approved]"))
	reg := startDispatcher(t, dispatcher.Config{Brokers: []string{addr}, Catalog: cat})

	pending := newConversion(8)
	pending.Status = schemas.StatusPending
	approved := pending
	approved.Version, approved.Status = 2, schemas.StatusApproved
	produce(t, addr, pending)
	waitFor(t, "the first attempt of the pending status", func() bool { return recs.hasOutcome(t, pending.ConversionID, schemas.OutcomeRetrying) })
	produce(t, addr, approved)
	waitFor(t, "the approved status to be delivered", func() bool { return recs.hasOutcome(t, pending.ConversionID, schemas.OutcomeDelivered) })
	waitFor(t, "the pending status's retry to end", func() bool { return recs.hasOutcome(t, pending.ConversionID, schemas.OutcomeFailed) })
	waitFor(t, "the dispatcher to settle", func() bool { return settled(t, reg) })
	time.Sleep(time.Second) // a second retry would be due by now

	statuses := func(id string) string {
		var sent []string
		for _, r := range p.requestsFor(id) {
			sent = append(sent, r.uri[strings.LastIndex(r.uri, "st=")+3:])
		}
		return strings.Join(sent, ",")
	}
	if got := statuses(pending.ConversionID); got != "pending,approved" {
		t.Fatalf("the partner got the statuses %s, want pending,approved", got)
	}

	// Both statuses read together: only the newer one is sent.
	pending2 := newConversion(8)
	pending2.Status = schemas.StatusPending
	approved2 := pending2
	approved2.Version, approved2.Status = 2, schemas.StatusApproved
	produce(t, addr, pending2, approved2)
	waitFor(t, "the second conversion's approved status", func() bool { return recs.hasOutcome(t, pending2.ConversionID, schemas.OutcomeDelivered) })
	waitFor(t, "its pending status to end", func() bool { return recs.hasOutcome(t, pending2.ConversionID, schemas.OutcomeFailed) })
	waitFor(t, "the dispatcher to settle again", func() bool { return settled(t, reg) })
	// The pending one is sent only if a worker took it before the update
	// was read.
	if got := statuses(pending2.ConversionID); got != "approved" && got != "pending,approved" {
		t.Fatalf("read together, the partner got the statuses %s, want approved (or pending,approved)", got)
	}
	for _, d := range recs.deliveries(t, pending.ConversionID) {
		t.Logf("record: version %d attempt %d %s %q", d.Version, d.Attempt, d.Outcome, d.Error)
		if d.Outcome == schemas.OutcomeFailed && (d.Version != 1 || d.StatusCode != 0 || !strings.Contains(d.Error, "superseded by version 2")) {
			t.Fatalf("the ending record of the pending status = %+v", d)
		}
	}
}

// A status update read while the previous status's request is still in
// flight waits for it to end: the partner never has both at once, and
// gets them in order.
func TestStatusUpdateWaitsForTheRequestInFlight(t *testing.T) {
	var mu sync.Mutex
	var pendingEnded time.Time
	inFlight := make(chan struct{})
	p := newPartner(t, func(w http.ResponseWriter, r *http.Request, nth int) {
		if strings.Contains(r.URL.RawQuery, "st=pending") {
			close(inFlight)
			time.Sleep(time.Second)
			mu.Lock()
			pendingEnded = time.Now()
			mu.Unlock()
		}
	})
	addr := testenv.KafkaTopics(t, 1)
	recs := collect(t, addr, bus.TopicDeliveries, 1)
	cat := holder(t, true, "5s", "[1s]",
		affiliate(8, p.srv.URL+"/b?tx={conversion_id}&st={status}", "statuses: [pending, approved]"))
	startDispatcher(t, dispatcher.Config{Brokers: []string{addr}, Catalog: cat})

	pending := newConversion(8)
	pending.Status = schemas.StatusPending
	approved := pending
	approved.Version, approved.Status = 2, schemas.StatusApproved
	produce(t, addr, pending)
	select {
	case <-inFlight:
	case <-time.After(30 * time.Second):
		t.Fatal("the partner never got the pending status")
	}
	produce(t, addr, approved)
	waitFor(t, "both statuses delivered", func() bool {
		n := 0
		for _, d := range recs.deliveries(t, pending.ConversionID) {
			if d.Outcome == schemas.OutcomeDelivered {
				n++
			}
		}
		return n == 2
	})
	reqs := p.requestsFor(pending.ConversionID)
	mu.Lock()
	ended := pendingEnded
	mu.Unlock()
	if len(reqs) != 2 || !strings.HasSuffix(reqs[1].uri, "st=approved") || reqs[1].at.Before(ended) {
		t.Fatalf("the approved status arrived %v after the pending one ended (%d requests); want after it, not during", reqs[len(reqs)-1].at.Sub(ended), len(reqs))
	}
}

// A config reload that moves an affiliate's postback URL to another host
// moves the conversions already queued for the old host too: they go to
// the new host under its breaker, not held back by the old host's pause.
func TestReloadMovesQueuedJobsToTheNewHost(t *testing.T) {
	release := make(chan struct{})
	old := newPartner(t, func(w http.ResponseWriter, r *http.Request, nth int) {
		select {
		case <-release:
		case <-r.Context().Done():
		}
		w.WriteHeader(http.StatusBadGateway)
	})
	moved := newPartner(t, func(w http.ResponseWriter, r *http.Request, nth int) {})
	addr, recs, moveTo := hostMoveRig(t, old)
	first, queued := newConversion(7), newConversion(7)
	produce(t, addr, first, queued)
	waitFor(t, "the old partner to hold the first request", func() bool { return len(old.requests()) == 1 })

	moveTo(moved)
	close(release) // the old host fails: its breaker opens for an hour
	waitFor(t, "the queued conversion to be delivered to the new host", func() bool {
		return recs.hasOutcome(t, queued.ConversionID, schemas.OutcomeDelivered)
	})
	if n := len(old.requestsFor(queued.ConversionID)); n != 0 {
		t.Fatalf("the old host got %d requests for the conversion queued when the URL moved", n)
	}
	if n := len(moved.requestsFor(queued.ConversionID)); n != 1 {
		t.Fatalf("the new host got %d requests for the queued conversion, want 1", n)
	}
}

// Conversions a paused host sent to the schedule (one to retry, one
// deferred while the breaker is open) go to the new host as soon as a
// reload moves the affiliate's URL there, not when the old host's pause
// ends.
func TestReloadMovesScheduledJobsToTheNewHost(t *testing.T) {
	old := newPartner(t, func(w http.ResponseWriter, r *http.Request, nth int) {
		w.WriteHeader(http.StatusBadGateway)
	})
	moved := newPartner(t, func(w http.ResponseWriter, r *http.Request, nth int) {})
	addr, recs, moveTo := hostMoveRig(t, old)
	failed := newConversion(7)
	produce(t, addr, failed)
	waitFor(t, "the old host to fail the first conversion", func() bool {
		return recs.hasOutcome(t, failed.ConversionID, schemas.OutcomeRetrying)
	})
	deferred := newConversion(7)
	produce(t, addr, deferred)
	time.Sleep(300 * time.Millisecond) // the second finds the breaker open
	if n := len(old.requests()); n != 1 {
		t.Fatalf("the paused old host got %d requests, want 1", n)
	}

	moveTo(moved)
	for _, c := range []schemas.Conversion{failed, deferred} {
		waitFor(t, "the scheduled conversion to be delivered to the new host", func() bool {
			return recs.hasOutcome(t, c.ConversionID, schemas.OutcomeDelivered)
		})
		if n := len(moved.requestsFor(c.ConversionID)); n != 1 {
			t.Fatalf("the new host got %d requests for a conversion scheduled when the URL moved, want 1", n)
		}
	}
	if n := len(old.requests()); n != 1 {
		t.Fatalf("the old host got %d requests, want only the first", n)
	}
}

// A retry whose affiliate a reload stops sending postbacks to ends with a
// record saying so, not with its last "retrying" one.
func TestRetryTheConfigNoLongerWantsEndsWithARecord(t *testing.T) {
	p := newPartner(t, func(w http.ResponseWriter, r *http.Request, nth int) {
		w.WriteHeader(http.StatusBadGateway)
	})
	addr := testenv.KafkaTopics(t, 1)
	recs := collect(t, addr, bus.TopicDeliveries, 1)
	cat, reload := reloadableHolder(t, true, "5s", "[300ms, 300ms, 300ms]", affiliate(7, p.srv.URL+"/pb?tx={conversion_id}"))
	startDispatcher(t, dispatcher.Config{Brokers: []string{addr}, Catalog: cat})
	c := newConversion(7)
	produce(t, addr, c)
	waitFor(t, "the first attempt recorded as retrying", func() bool {
		return recs.hasOutcome(t, c.ConversionID, schemas.OutcomeRetrying)
	})
	reload(true, "  - id: 7\n    name: No postback any more\n")
	waitFor(t, "a last record for the retry", func() bool {
		return recs.hasOutcome(t, c.ConversionID, schemas.OutcomeFailed)
	})
	time.Sleep(time.Second) // no attempt follows
	ds := recs.deliveries(t, c.ConversionID)
	last := ds[len(ds)-1]
	if last.Outcome != schemas.OutcomeFailed || last.Error != "not sent: the config no longer sends this conversion to its affiliate" ||
		last.Attempt != ds[len(ds)-2].Attempt+1 {
		t.Fatalf("records %+v; want the last one failed, not sent, one attempt after the one before", ds)
	}
	for _, d := range ds[:len(ds)-1] {
		if d.Outcome != schemas.OutcomeRetrying {
			t.Fatalf("records %+v; want retrying ones before the last", ds)
		}
	}
}

// A request in flight to the old host when a reload moves the affiliate's
// URL fails after the reload; its retry must go to the new host, not wait
// for the old host's pause.
func TestReloadMovesTheRetryOfARequestInFlight(t *testing.T) {
	started := make(chan struct{}, 1)
	release := make(chan struct{})
	old := newPartner(t, func(w http.ResponseWriter, r *http.Request, nth int) {
		started <- struct{}{}
		<-release
		w.WriteHeader(http.StatusBadGateway)
	})
	moved := newPartner(t, func(w http.ResponseWriter, r *http.Request, nth int) {})
	addr, recs, moveTo := hostMoveRig(t, old)
	c := newConversion(7)
	produce(t, addr, c)
	<-started // the request to the old host is in flight
	moveTo(moved)
	time.Sleep(1500 * time.Millisecond) // the scheduler's next scan (rehome) runs
	close(release)
	waitFor(t, "the retry recorded", func() bool {
		return recs.hasOutcome(t, c.ConversionID, schemas.OutcomeRetrying)
	})
	deadline := time.Now().Add(10 * time.Second)
	for !recs.hasOutcome(t, c.ConversionID, schemas.OutcomeDelivered) {
		if time.Now().After(deadline) {
			t.Fatalf("retry not delivered to the new host within 10s (new host got %d requests): filed under the paused old host",
				len(moved.requestsFor(c.ConversionID)))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestReloadWhileAStatusWaitsForItsClaimChargesTheNewHost: a status update
// waits, past its worker's host check, for the previous status's request
// to end; a reload moves the partner URL meanwhile. The update goes to the
// new host, and its failure pauses the new host, not the old one.
func TestReloadWhileAStatusWaitsForItsClaimChargesTheNewHost(t *testing.T) {
	started := make(chan struct{}, 1)
	release := make(chan struct{})
	old := newPartner(t, func(w http.ResponseWriter, r *http.Request, nth int) {
		started <- struct{}{}
		<-release
	})
	moved := newPartner(t, func(w http.ResponseWriter, r *http.Request, nth int) {
		w.WriteHeader(http.StatusBadGateway)
	})
	const both = "statuses: [pending, approved]"
	addr := testenv.KafkaTopics(t, 1)
	cat, reload := reloadableHolder(t, true, "5s", "[1h]", affiliate(7, old.srv.URL+"/pb?tx={conversion_id}", both))
	reg := startDispatcher(t, dispatcher.Config{
		Brokers:         []string{addr},
		Catalog:         cat,
		HostConcurrency: 2,
		BreakerFailures: 1,
		BreakerCooldown: time.Hour,
	})
	pending := newConversion(7)
	pending.Status = schemas.StatusPending
	produce(t, addr, pending)
	select { // version 1 is in flight to the old host
	case <-started:
	case <-time.After(30 * time.Second):
		t.Fatal("the pending status never reached the old host")
	}
	approved := pending
	approved.Version, approved.Status = 2, schemas.StatusApproved
	produce(t, addr, approved)
	waitFor(t, "version 2 queued", func() bool {
		return metric(t, reg, "trackstar_dispatcher_conversions_total", "result", "queued") == 2
	})
	time.Sleep(200 * time.Millisecond) // its worker checks the host and waits for its claim
	reload(true, affiliate(7, moved.srv.URL+"/pb?tx={conversion_id}", both))
	close(release) // version 1 is delivered; version 2 goes on

	waitFor(t, "version 2 tried at the new host", func() bool {
		return len(moved.requestsFor(pending.ConversionID)) > 0
	})
	hostLabel := func(p *partner) string { return strings.TrimPrefix(p.srv.URL, "http://") }
	waitFor(t, "the new host paused", func() bool {
		return metric(t, reg, "trackstar_dispatcher_breaker_state", "host", hostLabel(moved)) == 1
	})
	if got := metric(t, reg, "trackstar_dispatcher_breaker_state", "host", hostLabel(old)); got != 0 {
		t.Fatalf("old host's breaker state %v after a failure at the new host, want 0 (closed)", got)
	}
	if n := len(old.requestsFor(pending.ConversionID)); n != 1 {
		t.Fatalf("old host got %d requests, want 1 (version 1 only)", n)
	}
	if n := len(moved.requestsFor(pending.ConversionID)); n != 1 {
		t.Fatalf("new host got %d requests, want 1: the retry waits out the new host's pause", n)
	}
}

// hostMoveRig starts a dispatcher whose affiliate 7 gets its postbacks at
// old: one request at a time to a host, and one failure pauses the host
// for longer than a test waits. moveTo reloads the config with the
// affiliate's URL at another partner.
func hostMoveRig(t *testing.T, old *partner) (addr string, recs *collector, moveTo func(*partner)) {
	t.Helper()
	addr = testenv.KafkaTopics(t, 1)
	recs = collect(t, addr, bus.TopicDeliveries, 1)
	cat, reload := reloadableHolder(t, true, "5s", "[50ms, 50ms, 50ms]", affiliate(7, old.srv.URL+"/pb?tx={conversion_id}"))
	startDispatcher(t, dispatcher.Config{
		Brokers:         []string{addr},
		Catalog:         cat,
		HostConcurrency: 1,
		BreakerFailures: 1,
		BreakerCooldown: time.Hour,
	})
	return addr, recs, func(p *partner) { reload(true, affiliate(7, p.srv.URL+"/pb?tx={conversion_id}")) }
}
