// Package loadgen sends realistic synthetic traffic to a running edge:
// clicks at a target rate (Zipf-distributed offers and affiliates, random
// sub IDs, real-world user agents), then advertiser postbacks for a share of
// them after a random delay, with repeats, pending→approved updates and
// unknown click IDs mixed in. It can run a partner sink of its own to
// measure the delay from an advertiser's postback to the partner's request.
package loadgen

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net"
	"net/url"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/valyala/fasthttp"

	"github.com/trackstar/trackstar/schemas"
)

// Config configures Run. Zero values take the defaults in the comments
// where zero would mean nothing else; a value out of its range is an error,
// never silently replaced.
type Config struct {
	// Target is the edge's base URL. Default http://127.0.0.1:8080.
	Target string
	// Offers and Affiliates to click on; required. Low indexes are drawn
	// more often (Zipf), as real traffic concentrates on a few.
	Offers     []uint32
	Affiliates []uint32
	// Token is the advertiser token sent with postbacks; required when
	// PostbackShare > 0. Goals are drawn from Goals (default: "" = default goal).
	Token string
	Goals []string

	Rate        float64       // clicks per second, > 0; required
	Clicks      int           // stop after this many clicks; 0: run for Duration
	Duration    time.Duration // default 10s when Clicks is 0
	Concurrency int           // requests in flight at most; default 64

	// The shares are in [0, 1]; 0 means none.
	PostbackShare float64       // share of clicks that convert
	DelayMean     time.Duration // mean delay click→postback (exponential); 0: at once
	DelayMax      time.Duration // cap on that delay; default 10×DelayMean
	RepeatShare   float64       // share of postbacks the advertiser sends twice
	PendingShare  float64       // share sent as pending first, approved later
	UnknownShare  float64       // extra postbacks for click IDs that never existed

	// Sink, when set, is an address ("127.0.0.1:9999") where loadgen runs a
	// partner postback receiver and measures postback→partner latency. The
	// affiliate's URL template must carry {sub1}: loadgen gives every click
	// a unique sub1 label ("lg...") and matches the partner request by it.
	Sink string

	// Progress, when set, receives a one-line status every second.
	Progress io.Writer
}

// Result is what a run measured.
type Result struct {
	Elapsed         time.Duration
	Clicks          int64
	ClickErrors     int64
	Postbacks       int64 // requests sent, repeats and updates included
	PostbackErrors  int64
	Approved        int64 // distinct click IDs with an approved postback accepted
	Unknown         int64
	ClickLatency    Latencies
	PostbackLatency Latencies
	Delivered       int64 // approved clicks whose partner request the sink received
	DeliveryLatency Latencies
	// DeliveriesByLabel counts every partner request the sink received, by
	// the sub1 label of its click (SentPostback.Label).
	DeliveriesByLabel map[string]int
	FirstErrors       []string
	SentPostbacks     []SentPostback // every accepted postback, in send order
	ClickIDs          []string       // every click ID answered with a redirect
}

// SentPostback records one accepted postback, for exact checks in tests.
type SentPostback struct {
	ClickID, Label, Goal, Status, TxnID, Amount string
	OfferID, AffID                              uint32
}

// Latencies summarises a latency sample.
type Latencies struct {
	N                  int
	P50, P90, P99, Max time.Duration
}

func summarise(d []time.Duration) Latencies {
	if len(d) == 0 {
		return Latencies{}
	}
	sort.Slice(d, func(i, j int) bool { return d[i] < d[j] })
	q := func(p float64) time.Duration { return d[min(len(d)-1, int(math.Ceil(p*float64(len(d))))-1)] }
	return Latencies{N: len(d), P50: q(0.50), P90: q(0.90), P99: q(0.99), Max: d[len(d)-1]}
}

func (l Latencies) String() string {
	if l.N == 0 {
		return "n=0"
	}
	return fmt.Sprintf("n=%d p50=%s p90=%s p99=%s max=%s", l.N, round(l.P50), round(l.P90), round(l.P99), round(l.Max))
}

func round(d time.Duration) time.Duration {
	switch {
	case d > time.Second:
		return d.Round(time.Millisecond)
	case d > time.Millisecond:
		return d.Round(10 * time.Microsecond)
	}
	return d.Round(time.Microsecond)
}

var userAgents = []string{
	"Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Mobile/15E148 Safari/604.1",
	"Mozilla/5.0 (Linux; Android 15; Pixel 9) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Mobile Safari/537.36",
	"Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
	"Mozilla/5.0 (Macintosh; Intel Mac OS X 14_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Safari/605.1.15",
	"Mozilla/5.0 (Linux; Android 14; SM-S918B) AppleWebKit/537.36 (KHTML, like Gecko) SamsungBrowser/26.0 Chrome/122.0.0.0 Mobile Safari/537.36",
	"Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
}

var sources = []string{"facebook", "tiktok", "google", "native", "email", "push"}

type run struct {
	cfg    Config
	client *fasthttp.Client
	res    Result
	start  time.Time

	mu          sync.Mutex
	clickLat    []time.Duration
	postLat     []time.Duration
	delivLat    []time.Duration
	firstErrors []string
	approvedAt  map[string]time.Time // sub1 label → when its approved postback was accepted
	delivered   map[string]bool
	byLabel     map[string]int
	pending     sync.WaitGroup
	sem         chan struct{}
}

// Run sends the traffic and waits for every scheduled postback (and, with a
// sink, for deliveries to settle for a few seconds) before it returns.
func Run(ctx context.Context, cfg Config) (*Result, error) {
	if cfg.Target == "" {
		cfg.Target = "http://127.0.0.1:8080"
	}
	cfg.Target = strings.TrimRight(cfg.Target, "/")
	if len(cfg.Offers) == 0 || len(cfg.Affiliates) == 0 {
		return nil, errors.New("loadgen: no offers or affiliates to click on")
	}
	if err := cfg.check(); err != nil {
		return nil, err
	}
	if cfg.Clicks == 0 && cfg.Duration == 0 {
		cfg.Duration = 10 * time.Second
	}
	if cfg.Concurrency == 0 {
		cfg.Concurrency = 64
	}
	if cfg.DelayMax == 0 {
		cfg.DelayMax = 10 * cfg.DelayMean
	}
	if len(cfg.Goals) == 0 {
		cfg.Goals = []string{""}
	}
	r := &run{
		cfg: cfg,
		client: &fasthttp.Client{
			MaxConnsPerHost:          cfg.Concurrency,
			ReadTimeout:              30 * time.Second,
			WriteTimeout:             30 * time.Second,
			NoDefaultUserAgentHeader: true,
		},
		approvedAt: map[string]time.Time{},
		delivered:  map[string]bool{},
		byLabel:    map[string]int{},
		sem:        make(chan struct{}, cfg.Concurrency),
	}
	if cfg.Sink != "" {
		stop, err := r.startSink(cfg.Sink)
		if err != nil {
			return nil, err
		}
		defer stop()
	}

	r.start = time.Now()
	progressDone := make(chan struct{})
	if cfg.Progress != nil {
		go r.progress(ctx, progressDone)
	}
	r.sendClicks(ctx)
	r.pending.Wait()
	if cfg.Sink != "" {
		r.waitDeliveries(ctx)
	}
	close(progressDone)

	r.res.Elapsed = time.Since(r.start)
	r.mu.Lock()
	defer r.mu.Unlock()
	r.res.ClickLatency = summarise(r.clickLat)
	r.res.PostbackLatency = summarise(r.postLat)
	r.res.DeliveryLatency = summarise(r.delivLat)
	r.res.FirstErrors = r.firstErrors
	r.res.Delivered = int64(len(r.delivLat))
	r.res.DeliveriesByLabel = r.byLabel
	return &r.res, ctx.Err()
}

// check reports the first setting out of its range, by its CLI flag name.
func (c *Config) check() error {
	switch {
	case !(c.Rate > 0) || math.IsInf(c.Rate, 1):
		return fmt.Errorf("loadgen: rate must be a positive number of clicks per second, got %v", c.Rate)
	case c.Clicks < 0:
		return fmt.Errorf("loadgen: clicks must not be negative, got %d", c.Clicks)
	case c.Duration < 0:
		return fmt.Errorf("loadgen: duration must not be negative, got %s", c.Duration)
	case c.Concurrency < 0:
		return fmt.Errorf("loadgen: concurrency must be positive, got %d", c.Concurrency)
	case c.DelayMean < 0:
		return fmt.Errorf("loadgen: delay-mean must not be negative, got %s", c.DelayMean)
	case c.DelayMax < 0:
		return fmt.Errorf("loadgen: delay-max must not be negative, got %s", c.DelayMax)
	}
	for _, sh := range []struct {
		name string
		v    float64
	}{{"postback-share", c.PostbackShare}, {"repeat-share", c.RepeatShare}, {"pending-share", c.PendingShare}, {"unknown-share", c.UnknownShare}} {
		if !(sh.v >= 0 && sh.v <= 1) {
			return fmt.Errorf("loadgen: %s must be between 0 and 1, got %v", sh.name, sh.v)
		}
	}
	if c.PostbackShare > 0 && c.Token == "" {
		return errors.New("loadgen: postbacks need an advertiser token")
	}
	return nil
}

// Failed says how many requests failed, as an error naming them, or nil.
func (res *Result) Failed() error {
	if res.ClickErrors == 0 && res.PostbackErrors == 0 {
		return nil
	}
	return fmt.Errorf("loadgen: %d of %d clicks and %d of %d postbacks failed",
		res.ClickErrors, res.Clicks+res.ClickErrors, res.PostbackErrors, res.Postbacks)
}

// zipf draws an index in [0, n) with P(k) ∝ 1/(k+1).
func zipf(rng *rand.Rand, n int) int {
	if n == 1 {
		return 0
	}
	// Inverse of the harmonic CDF, approximated by a log: good enough for load.
	u := rng.Float64()
	k := int(math.Exp(u*math.Log(float64(n)+1))) - 1
	return min(max(k, 0), n-1)
}

func (r *run) sendClicks(ctx context.Context) {
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 1))
	interval := time.Duration(float64(time.Second) / r.cfg.Rate)
	deadline := time.Time{}
	if r.cfg.Clicks == 0 {
		deadline = r.start.Add(r.cfg.Duration)
	}
	next := time.Now()
	for i := 0; r.cfg.Clicks == 0 || i < r.cfg.Clicks; i++ {
		if ctx.Err() != nil || (!deadline.IsZero() && time.Now().After(deadline)) {
			return
		}
		if d := time.Until(next); d > 0 {
			select {
			case <-ctx.Done():
				return
			case <-time.After(d):
			}
		}
		next = next.Add(interval)
		offer := r.cfg.Offers[zipf(rng, len(r.cfg.Offers))]
		aff := r.cfg.Affiliates[zipf(rng, len(r.cfg.Affiliates))]
		label := fmt.Sprintf("lg%d-%d", r.start.UnixNano()%1e9, i)
		q := url.Values{}
		q.Set("offer_id", strconv.Itoa(int(offer)))
		q.Set("aff_id", strconv.Itoa(int(aff)))
		q.Set("sub1", label)
		q.Set("sub2", strconv.Itoa(rng.IntN(1000)))
		q.Set("source", sources[rng.IntN(len(sources))])
		ua := userAgents[rng.IntN(len(userAgents))]
		convert := rng.Float64() < r.cfg.PostbackShare
		var pb postbackPlan
		if convert {
			pb = postbackPlan{
				goal:    r.cfg.Goals[rng.IntN(len(r.cfg.Goals))],
				delay:   min(time.Duration(rng.ExpFloat64()*float64(r.cfg.DelayMean)), r.cfg.DelayMax),
				repeat:  rng.Float64() < r.cfg.RepeatShare,
				pending: rng.Float64() < r.cfg.PendingShare,
				amount:  fmt.Sprintf("%d.%02d", 5+rng.IntN(200), rng.IntN(100)),
				txn:     "o-" + label,
				offer:   offer,
				aff:     aff,
				label:   label,
			}
		}
		unknown := convert && rng.Float64() < r.cfg.UnknownShare
		r.sem <- struct{}{}
		r.pending.Add(1)
		go func() {
			defer r.pending.Done()
			clickID := r.click(q.Encode(), ua)
			<-r.sem
			if clickID == "" || !convert {
				return
			}
			r.schedulePostbacks(ctx, clickID, pb)
			if unknown {
				r.schedulePostbacks(ctx, schemas.NewID(time.Now()), postbackPlan{delay: pb.delay, amount: "1", unknownID: true})
			}
		}()
	}
}

type postbackPlan struct {
	goal, amount, txn, label string
	offer, aff               uint32
	delay                    time.Duration
	repeat, pending          bool
	unknownID                bool
}

func (r *run) click(query, ua string) string {
	req := fasthttp.AcquireRequest()
	resp := fasthttp.AcquireResponse()
	defer fasthttp.ReleaseRequest(req)
	defer fasthttp.ReleaseResponse(resp)
	req.SetRequestURI(r.cfg.Target + "/click?" + query)
	req.Header.SetUserAgent(ua)
	t0 := time.Now()
	err := r.client.Do(req, resp)
	lat := time.Since(t0)
	if err == nil && resp.StatusCode() != fasthttp.StatusFound {
		err = fmt.Errorf("click answered %d: %.200s", resp.StatusCode(), resp.Body())
	}
	if err != nil {
		atomic.AddInt64(&r.res.ClickErrors, 1)
		r.noteError(err)
		return ""
	}
	loc, perr := url.Parse(string(resp.Header.Peek("Location")))
	id := ""
	if perr == nil {
		for _, v := range loc.Query() {
			if len(v) > 0 && schemas.ValidID(v[0]) {
				id = v[0]
			}
		}
	}
	if id == "" {
		atomic.AddInt64(&r.res.ClickErrors, 1)
		r.noteError(fmt.Errorf("no click ID in Location %q (the offer URL needs {click_id})", resp.Header.Peek("Location")))
		return ""
	}
	atomic.AddInt64(&r.res.Clicks, 1)
	r.mu.Lock()
	r.clickLat = append(r.clickLat, lat)
	r.res.ClickIDs = append(r.res.ClickIDs, id)
	r.mu.Unlock()
	return id
}

func (r *run) schedulePostbacks(ctx context.Context, clickID string, pb postbackPlan) {
	r.pending.Add(1)
	go func() {
		defer r.pending.Done()
		select {
		case <-ctx.Done():
			return
		case <-time.After(pb.delay):
		}
		if pb.unknownID {
			if r.postback(clickID, pb, "approved") {
				atomic.AddInt64(&r.res.Unknown, 1)
			}
			return
		}
		if pb.pending {
			r.postback(clickID, pb, "pending")
			select {
			case <-ctx.Done():
				return
			case <-time.After(pb.delay / 2):
			}
		}
		// The clock starts when the advertiser sends the postback, and is
		// set before sending: the partner's request can reach the sink
		// before the edge's answer reaches us.
		r.mu.Lock()
		r.approvedAt[pb.label] = time.Now()
		r.mu.Unlock()
		if r.postback(clickID, pb, "approved") {
			atomic.AddInt64(&r.res.Approved, 1)
		} else {
			r.mu.Lock()
			delete(r.approvedAt, pb.label)
			r.mu.Unlock()
		}
		if pb.repeat {
			r.postback(clickID, pb, "approved")
		}
	}()
}

func (r *run) postback(clickID string, pb postbackPlan, status string) bool {
	r.sem <- struct{}{}
	defer func() { <-r.sem }()
	q := url.Values{}
	q.Set("click_id", clickID)
	q.Set("token", r.cfg.Token)
	q.Set("status", status)
	q.Set("amount", pb.amount)
	if pb.goal != "" {
		q.Set("goal", pb.goal)
	}
	if pb.txn != "" {
		q.Set("txn_id", pb.txn)
	}
	req := fasthttp.AcquireRequest()
	resp := fasthttp.AcquireResponse()
	defer fasthttp.ReleaseRequest(req)
	defer fasthttp.ReleaseResponse(resp)
	req.SetRequestURI(r.cfg.Target + "/postback?" + q.Encode())
	t0 := time.Now()
	err := r.client.Do(req, resp)
	lat := time.Since(t0)
	if err == nil && resp.StatusCode() != fasthttp.StatusOK {
		err = fmt.Errorf("postback answered %d: %.200s", resp.StatusCode(), resp.Body())
	}
	atomic.AddInt64(&r.res.Postbacks, 1)
	if err != nil {
		atomic.AddInt64(&r.res.PostbackErrors, 1)
		r.noteError(err)
		return false
	}
	r.mu.Lock()
	r.postLat = append(r.postLat, lat)
	r.res.SentPostbacks = append(r.res.SentPostbacks, SentPostback{
		ClickID: clickID, Label: pb.label, Goal: pb.goal, Status: status, TxnID: pb.txn, Amount: pb.amount, OfferID: pb.offer, AffID: pb.aff,
	})
	r.mu.Unlock()
	return true
}

func (r *run) noteError(err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.firstErrors) < 10 {
		r.firstErrors = append(r.firstErrors, err.Error())
	}
}

// startSink runs the partner receiver. A request is matched to its click by
// the sub1 label loadgen put on the click (the partner URL must carry
// {sub1}), and its latency is measured from when the approved postback was sent.
func (r *run) startSink(addr string) (func(), error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("cannot listen for the partner sink on %s: %w", addr, err)
	}
	srv := &fasthttp.Server{Handler: func(ctx *fasthttp.RequestCtx) {
		now := time.Now()
		label := ""
		for _, v := range ctx.QueryArgs().All() {
			if strings.HasPrefix(string(v), "lg") {
				label = string(v)
			}
		}
		r.mu.Lock()
		r.byLabel[label]++
		if at, ok := r.approvedAt[label]; ok && !r.delivered[label] {
			r.delivered[label] = true
			r.delivLat = append(r.delivLat, now.Sub(at))
		}
		r.mu.Unlock()
		ctx.SetStatusCode(fasthttp.StatusOK)
	}}
	go func() { _ = srv.Serve(ln) }()
	return func() { _ = srv.Shutdown() }, nil
}

// waitDeliveries gives partner deliveries up to 10s after the last postback
// to arrive, returning early once every approved click was delivered.
func (r *run) waitDeliveries(ctx context.Context) {
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		r.mu.Lock()
		done := len(r.delivered) >= len(r.approvedAt)
		r.mu.Unlock()
		if done {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (r *run) progress(ctx context.Context, done <-chan struct{}) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-done:
			return
		case <-t.C:
			el := time.Since(r.start).Seconds()
			c := atomic.LoadInt64(&r.res.Clicks)
			p := atomic.LoadInt64(&r.res.Postbacks)
			r.mu.Lock()
			d := len(r.delivLat)
			r.mu.Unlock()
			fmt.Fprintf(r.cfg.Progress, "\r%5.0fs  clicks %d (%.0f/s)  postbacks %d  delivered %d  errors %d   ",
				el, c, float64(c)/el, p, d, atomic.LoadInt64(&r.res.ClickErrors)+atomic.LoadInt64(&r.res.PostbackErrors))
		}
	}
}

// Print writes a human summary of the result.
func (res *Result) Print(w io.Writer) {
	sec := res.Elapsed.Seconds()
	fmt.Fprintf(w, "\nelapsed      %s\n", res.Elapsed.Round(time.Millisecond))
	fmt.Fprintf(w, "clicks       %d (%.0f/s), errors %d, latency %s\n", res.Clicks, float64(res.Clicks)/sec, res.ClickErrors, res.ClickLatency)
	fmt.Fprintf(w, "postbacks    %d (%.0f/s), errors %d, latency %s\n", res.Postbacks, float64(res.Postbacks)/sec, res.PostbackErrors, res.PostbackLatency)
	fmt.Fprintf(w, "approved     %d clicks, unknown IDs sent %d\n", res.Approved, res.Unknown)
	if res.DeliveryLatency.N > 0 || res.Delivered > 0 {
		fmt.Fprintf(w, "delivered    %d, postback→partner %s\n", res.Delivered, res.DeliveryLatency)
	}
	for _, e := range res.FirstErrors {
		fmt.Fprintf(w, "error        %s\n", e)
	}
}
