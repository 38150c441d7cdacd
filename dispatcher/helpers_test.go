package dispatcher_test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/segmentio/kafka-go"

	"github.com/trackstar/trackstar/dispatcher"
	"github.com/trackstar/trackstar/internal/bus"
	"github.com/trackstar/trackstar/internal/catalog"
	"github.com/trackstar/trackstar/internal/testenv"
	"github.com/trackstar/trackstar/schemas"
)

// waitFor polls cond until it holds, failing the test after a deadline.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// partnerRequest is one request a test partner received.
type partnerRequest struct {
	at     time.Time
	method string
	uri    string // as on the request line
	header http.Header
	body   []byte
}

// partner is a real HTTP server on loopback standing in for an affiliate.
// handle answers the nth request (1-based) carrying a conversion ID.
type partner struct {
	srv    *httptest.Server
	mu     sync.Mutex
	reqs   []partnerRequest
	counts map[string]int
}

func newPartner(t testing.TB, handle func(w http.ResponseWriter, r *http.Request, nth int)) *partner {
	p := &partner{counts: map[string]int{}}
	p.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		id := r.Header.Get("X-Trackstar-Conversion-Id")
		p.mu.Lock()
		p.counts[id]++
		nth := p.counts[id]
		p.reqs = append(p.reqs, partnerRequest{at: time.Now(), method: r.Method, uri: r.RequestURI, header: r.Header.Clone(), body: body})
		p.mu.Unlock()
		handle(w, r, nth)
	}))
	t.Cleanup(p.srv.Close)
	return p
}

func (p *partner) requests() []partnerRequest {
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Clone(p.reqs)
}

// requestsFor returns the requests whose idempotency key is id.
func (p *partner) requestsFor(id string) []partnerRequest {
	var out []partnerRequest
	for _, r := range p.requests() {
		if r.header.Get("X-Trackstar-Conversion-Id") == id {
			out = append(out, r)
		}
	}
	return out
}

// statusesFor returns, in order, the value of the last query parameter
// of each request for conversion id — its status, in tests whose URL
// template ends with st={status}.
func (p *partner) statusesFor(id string) []string {
	var sts []string
	for _, r := range p.requestsFor(id) {
		sts = append(sts, r.uri[strings.LastIndex(r.uri, "=")+1:])
	}
	return sts
}

// distinct returns how many conversion IDs the partner has seen.
func (p *partner) distinct() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.counts)
}

// affiliate returns the YAML of one affiliate entry.
func affiliate(id int, url string, extra ...string) string {
	s := fmt.Sprintf("  - id: %d\n    postback:\n      url: %q\n", id, url)
	for _, e := range extra {
		s += "      " + e + "\n"
	}
	return s
}

// holder writes a config file with the delivery settings and affiliates
// given, and loads it.
func holder(t testing.TB, allowPrivate bool, timeout string, retries string, affiliates ...string) *catalog.Holder {
	t.Helper()
	h, _ := reloadableHolder(t, allowPrivate, timeout, retries, affiliates...)
	return h
}

// reloadableHolder is holder, with a function that rewrites the config file
// with other settings and reloads it, as a SIGHUP would.
func reloadableHolder(t testing.TB, allowPrivate bool, timeout string, retries string, affiliates ...string) (*catalog.Holder, func(allowPrivate bool, affiliates ...string)) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "trackstar.yaml")
	write := func(allowPrivate bool, affiliates ...string) string {
		return writeConfig(t, path, allowPrivate, timeout, retries, affiliates...)
	}
	cfg := write(allowPrivate, affiliates...)
	h, err := catalog.NewHolder(path)
	if err != nil {
		t.Fatalf("config does not load: %v\n%s", err, cfg)
	}
	return h, func(allowPrivate bool, affiliates ...string) {
		t.Helper()
		cfg := write(allowPrivate, affiliates...)
		if err := h.Reload(); err != nil {
			t.Fatalf("config does not reload: %v\n%s", err, cfg)
		}
	}
}

// configFile writes a config file with the delivery settings and
// affiliates given, and returns its path.
func configFile(t testing.TB, allowPrivate bool, timeout string, retries string, affiliates ...string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "trackstar.yaml")
	writeConfig(t, path, allowPrivate, timeout, retries, affiliates...)
	return path
}

func writeConfig(t testing.TB, path string, allowPrivate bool, timeout string, retries string, affiliates ...string) string {
	t.Helper()
	cfg := fmt.Sprintf("allow_private_partner_urls: %v\ndelivery:\n  timeout: %s\n  retries: %s\naffiliates:\n%s",
		allowPrivate, timeout, retries, strings.Join(affiliates, ""))
	if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	return cfg
}

// testLogger logs through t, so a failing test shows what the dispatcher said.
func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

type tWriter struct{ t testing.TB }

func (w tWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(b)))
	return len(b), nil
}

// startDispatcher runs the dispatcher until the test ends, then checks
// that it stopped cleanly. It fills in what cfg leaves empty.
func startDispatcher(t testing.TB, cfg dispatcher.Config) *prometheus.Registry {
	t.Helper()
	reg, _ := startStoppableDispatcher(t, cfg)
	return reg
}

// startStoppableDispatcher is startDispatcher, with a function that stops
// the dispatcher and waits for it.
func startStoppableDispatcher(t testing.TB, cfg dispatcher.Config) (*prometheus.Registry, func()) {
	t.Helper()
	if cfg.DataDir == "" {
		cfg.DataDir = t.TempDir()
	}
	if cfg.Registry == nil {
		cfg.Registry = prometheus.NewRegistry()
	}
	if cfg.Logger == nil {
		cfg.Logger = testLogger(t)
	}
	if cfg.CommitInterval == 0 {
		cfg.CommitInterval = 100 * time.Millisecond
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- dispatcher.Run(ctx, cfg) }()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("dispatcher.Run returned %v", err)
				}
			case <-time.After(60 * time.Second):
				t.Errorf("dispatcher.Run did not return after its context ended")
			}
		})
	}
	t.Cleanup(stop)
	return cfg.Registry, stop
}

var convSeq struct {
	sync.Mutex
	n int
}

// newConversion returns an approved conversion of the default goal for
// affiliate aff, with a sub1 that needs escaping.
func newConversion(aff uint32) schemas.Conversion {
	convSeq.Lock()
	convSeq.n++
	n := convSeq.n
	convSeq.Unlock()
	now := time.Now()
	return schemas.Conversion{
		V: schemas.Version, ConversionID: schemas.NewID(now), Version: 1, PostbackEventID: schemas.NewID(now),
		ClickID: schemas.NewID(now.Add(-time.Minute)), TS: now.UnixMilli(), TSNanos: now.UnixNano(), ClickTS: now.Add(-time.Minute).UnixMilli(),
		OfferID: 1, AdvertiserID: 1, AffID: aff, Goal: "default", Status: schemas.StatusApproved,
		SaleAmount: 19_9900, Revenue: 2_5000, Payout: 1_7500, Currency: "USD", CTITSeconds: 60,
		Source: "test", Sub1: fmt.Sprintf("s%d &x", n),
	}
}

// produce writes conversions to trackstar.conversions, keyed by click ID.
func produce(t testing.TB, addr string, convs ...schemas.Conversion) {
	t.Helper()
	w := bus.NewWriter(bus.WriterConfig{Brokers: []string{addr}, Topic: bus.TopicConversions})
	defer w.Close()
	msgs := make([]kafka.Message, len(convs))
	for i, c := range convs {
		msgs[i] = kafka.Message{Key: []byte(c.ClickID), Value: schemas.EncodeConversion(c)}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := w.WriteMessages(ctx, msgs...); err != nil {
		t.Fatalf("cannot produce conversions: %v", err)
	}
}

// collector reads every partition of a topic from the start until the
// test ends.
type collector struct {
	mu   sync.Mutex
	msgs []kafka.Message
}

func collect(t testing.TB, addr, topic string, partitions int) *collector {
	c := &collector{}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for p := 0; p < partitions; p++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := kafka.NewReader(kafka.ReaderConfig{Brokers: []string{addr}, Topic: topic, Partition: p, MaxWait: 50 * time.Millisecond})
			defer r.Close()
			for {
				m, err := r.ReadMessage(ctx)
				if err != nil {
					if ctx.Err() != nil {
						return
					}
					time.Sleep(50 * time.Millisecond)
					continue
				}
				c.mu.Lock()
				c.msgs = append(c.msgs, m)
				c.mu.Unlock()
			}
		}()
	}
	t.Cleanup(func() {
		cancel()
		wg.Wait()
	})
	return c
}

func (c *collector) messages() []kafka.Message {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.msgs)
}

// deliveries returns the delivery records of conversion id (all when
// id is ""), ordered by attempt.
func (c *collector) deliveries(t testing.TB, id string) []schemas.Delivery {
	t.Helper()
	var out []schemas.Delivery
	for _, m := range c.messages() {
		d, err := schemas.DecodeDelivery(m.Value)
		if err != nil {
			t.Fatalf("undecodable delivery record %s: %v", m.Value, err)
		}
		if !schemas.ValidID(m.Key) {
			t.Fatalf("delivery record of %s keyed %q, not an ID", d.ConversionID, m.Key)
		}
		if id == "" || d.ConversionID == id {
			out = append(out, d)
		}
	}
	slices.SortStableFunc(out, func(a, b schemas.Delivery) int { return int(a.Attempt) - int(b.Attempt) })
	return out
}

// hasOutcome reports whether conversion id has a record with outcome.
func (c *collector) hasOutcome(t testing.TB, id, outcome string) bool {
	for _, d := range c.deliveries(t, id) {
		if d.Outcome == outcome {
			return true
		}
	}
	return false
}

// metric returns the value of a counter or gauge on reg whose labels
// include the given name=value pairs (summed over the others).
func metric(t testing.TB, reg *prometheus.Registry, name string, labels ...string) float64 {
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
	next:
		for _, m := range mf.GetMetric() {
			for i := 0; i+1 < len(labels); i += 2 {
				found := false
				for _, lp := range m.GetLabel() {
					if lp.GetName() == labels[i] && lp.GetValue() == labels[i+1] {
						found = true
					}
				}
				if !found {
					continue next
				}
			}
			switch {
			case m.Counter != nil:
				sum += m.Counter.GetValue()
			case m.Gauge != nil:
				sum += m.Gauge.GetValue()
			}
		}
	}
	return sum
}

// settled reports whether the dispatcher has nothing queued, in flight or
// scheduled.
func settled(t testing.TB, reg *prometheus.Registry) bool {
	return metric(t, reg, "trackstar_dispatcher_queue_depth") == 0 &&
		metric(t, reg, "trackstar_dispatcher_inflight_requests") == 0 &&
		metric(t, reg, "trackstar_dispatcher_retries_pending") == 0
}

// olderStatusScene is where a retry of an older status meets a newer one
// another member sent: member A (data directory dataA) scheduled the
// retries of two pending statuses, before and during, its partner
// refusing pending ones, and stopped; member B, alone, then delivered the
// approval of before.
type olderStatusScene struct {
	p              *partner
	addr           string
	recs           *collector
	cat            *catalog.Holder
	dataA          string
	before, during schemas.Conversion
}

// newOlderStatusScene sets the scene up, A's retries every backoff.
func newOlderStatusScene(t *testing.T, backoff string) *olderStatusScene {
	t.Helper()
	sc := &olderStatusScene{dataA: t.TempDir()}
	sc.p = newPartner(t, func(w http.ResponseWriter, r *http.Request, nth int) {
		if r.URL.Query().Get("st") == schemas.StatusPending {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
	})
	sc.addr = testenv.KafkaTopics(t, 1)
	sc.recs = collect(t, sc.addr, bus.TopicDeliveries, 1)
	sc.cat = holder(t, true, "5s", "["+strings.TrimSuffix(strings.Repeat(backoff+", ", 10), ", ")+"]",
		affiliate(7, sc.p.srv.URL+"/pb?tx={conversion_id}&st={status}", "statuses: [pending, approved]"))

	_, stopA := startStoppableDispatcher(t, dispatcher.Config{Brokers: []string{sc.addr}, DataDir: sc.dataA, Catalog: sc.cat})
	sc.before, sc.during = newConversion(7), newConversion(7)
	sc.before.Status, sc.during.Status = schemas.StatusPending, schemas.StatusPending
	produce(t, sc.addr, sc.before, sc.during)
	waitFor(t, "both pending statuses' failed attempts", func() bool {
		return sc.recs.hasOutcome(t, sc.before.ConversionID, schemas.OutcomeRetrying) &&
			sc.recs.hasOutcome(t, sc.during.ConversionID, schemas.OutcomeRetrying)
	})
	stopA()

	startDispatcher(t, dispatcher.Config{Brokers: []string{sc.addr}, Catalog: sc.cat})
	produce(t, sc.addr, approval(sc.before))
	waitFor(t, "the first approval delivered", func() bool {
		return sc.recs.hasOutcome(t, sc.before.ConversionID, schemas.OutcomeDelivered)
	})
	return sc
}

// approval is version 2 of c, approved.
func approval(c schemas.Conversion) schemas.Conversion {
	c.Version, c.Status = 2, schemas.StatusApproved
	return c
}

// superseded reports whether c's pending status ended as not sent,
// superseded by its approval.
func (sc *olderStatusScene) superseded(t *testing.T, c schemas.Conversion) bool {
	var last schemas.Delivery
	for _, d := range sc.recs.deliveries(t, c.ConversionID) {
		if d.Version == 1 {
			last = d
		}
	}
	return last.Outcome == schemas.OutcomeFailed && last.Error == "not sent: superseded by version 2 of the conversion"
}

// check fails t unless the partner got both conversions' approvals after
// every pending status, and each pending status ended superseded.
func (sc *olderStatusScene) check(t *testing.T) {
	t.Helper()
	for _, c := range []schemas.Conversion{sc.before, sc.during} {
		if sts := sc.p.statusesFor(c.ConversionID); len(sts) < 2 || slices.Index(sts, schemas.StatusApproved) != len(sts)-1 {
			t.Errorf("conversion %s: the partner got statuses %v, want the pending ones, then approved last", c.ConversionID, sts)
		}
		if !sc.superseded(t, c) {
			t.Errorf("conversion %s: its pending status did not end superseded by version 2", c.ConversionID)
		}
	}
}
