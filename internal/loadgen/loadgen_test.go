package loadgen

import (
	"context"
	"math"
	"math/rand/v2"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/valyala/fasthttp"

	"github.com/trackstar/trackstar/schemas"
)

func TestSummarise(t *testing.T) {
	var d []time.Duration
	for i := 100; i >= 1; i-- {
		d = append(d, time.Duration(i)*time.Millisecond)
	}
	got := summarise(d)
	want := Latencies{N: 100, P50: 50 * time.Millisecond, P90: 90 * time.Millisecond, P99: 99 * time.Millisecond, Max: 100 * time.Millisecond}
	if got != want {
		t.Fatalf("summarise = %+v, want %+v", got, want)
	}
	if (summarise(nil) != Latencies{}) {
		t.Fatal("empty sample")
	}
}

func TestZipfSkewsToLowIndexes(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	counts := make([]int, 10)
	for i := 0; i < 100000; i++ {
		k := zipf(rng, 10)
		if k < 0 || k >= 10 {
			t.Fatalf("zipf out of range: %d", k)
		}
		counts[k]++
	}
	if counts[0] <= counts[4] || counts[4] <= counts[9] || counts[9] == 0 {
		t.Fatalf("not skewed toward low indexes: %v", counts)
	}
}

// standIn is an edge stand-in that redirects with a fresh click ID and
// accepts postbacks, and remembers both.
type standIn struct {
	url       string
	mu        sync.Mutex
	clicks    map[string]bool
	postbacks []string // "click ID/status"
}

// startStandIn serves the stand-in; with clickCode other than 302, every
// click is answered with that code instead.
func startStandIn(t *testing.T, clickCode int) *standIn {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	e := &standIn{url: "http://" + ln.Addr().String(), clicks: map[string]bool{}}
	srv := &fasthttp.Server{Handler: func(ctx *fasthttp.RequestCtx) {
		switch string(ctx.Path()) {
		case "/click":
			if clickCode != fasthttp.StatusFound {
				ctx.Error("no", clickCode)
				return
			}
			id := schemas.NewID(time.Now())
			e.mu.Lock()
			e.clicks[id] = true
			e.mu.Unlock()
			ctx.Response.Header.Set("Location", "https://offer.example/?click_id="+id+"&s1="+string(ctx.QueryArgs().Peek("sub1")))
			ctx.SetStatusCode(fasthttp.StatusFound)
		case "/postback":
			if string(ctx.QueryArgs().Peek("token")) != "tok" {
				ctx.SetStatusCode(fasthttp.StatusForbidden)
				return
			}
			e.mu.Lock()
			e.postbacks = append(e.postbacks, string(ctx.QueryArgs().Peek("click_id"))+"/"+string(ctx.QueryArgs().Peek("status")))
			e.mu.Unlock()
			ctx.SetBodyString(`{"status":"accepted"}`)
		}
	}}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { _ = srv.Shutdown() })
	return e
}

// Run must count what the edge answered and pair postbacks with clicks.
func TestRunAgainstAnEdge(t *testing.T) {
	e := startStandIn(t, fasthttp.StatusFound)
	clicks, postbacks := e.clicks, &e.postbacks
	res, err := Run(context.Background(), Config{
		Target: e.url, Offers: []uint32{1, 2}, Affiliates: []uint32{7}, Token: "tok",
		Rate: 2000, Clicks: 200, PostbackShare: 0.5, DelayMean: 5 * time.Millisecond, PendingShare: 0.5, RepeatShare: 0.5,
	})
	if err != nil {
		t.Fatal(err)
	}
	if res.Clicks != 200 || res.ClickErrors != 0 || len(res.ClickIDs) != 200 {
		t.Fatalf("clicks %d, errors %d, IDs %d; want 200, 0, 200: %v", res.Clicks, res.ClickErrors, len(res.ClickIDs), res.FirstErrors)
	}
	if res.PostbackErrors != 0 || res.Postbacks != int64(len(*postbacks)) || res.Approved == 0 {
		t.Fatalf("postbacks %d (server saw %d), errors %d, approved %d", res.Postbacks, len(*postbacks), res.PostbackErrors, res.Approved)
	}
	if err := res.Failed(); err != nil {
		t.Fatalf("Failed() = %v with no errors", err)
	}
	approved := map[string]int{}
	for _, pb := range *postbacks {
		id, status, _ := strings.Cut(pb, "/")
		if !clicks[id] {
			t.Fatalf("postback for %s, which the edge never minted", id)
		}
		if status == schemas.StatusApproved {
			approved[id]++
		}
	}
	if int64(len(approved)) != res.Approved {
		t.Fatalf("%d clicks got an approved postback, loadgen says %d", len(approved), res.Approved)
	}
	for _, sp := range res.SentPostbacks {
		if sp.Label == "" || !strings.HasPrefix(sp.Label, "lg") {
			t.Fatalf("sent postback without its click's label: %+v", sp)
		}
	}
}

// TestSettingsAreTakenAsGiven: a zero share means none and a zero delay
// means at once, never a default in their place; a setting out of range is
// an error naming it; a run whose requests failed says so.
func TestSettingsAreTakenAsGiven(t *testing.T) {
	base := Config{Target: "http://127.0.0.1:1", Offers: []uint32{1}, Affiliates: []uint32{7}, Token: "tok", Rate: 1000, Clicks: 1}
	for _, c := range []struct {
		adjust func(*Config)
		want   string
	}{
		{func(c *Config) { c.Rate = 0 }, "rate must be a positive number"},
		{func(c *Config) { c.Rate = -5 }, "rate must be a positive number"},
		{func(c *Config) { c.Rate = math.NaN() }, "rate must be a positive number"},
		{func(c *Config) { c.Clicks = -1 }, "clicks must not be negative"},
		{func(c *Config) { c.Duration = -time.Second }, "duration must not be negative"},
		{func(c *Config) { c.Concurrency = -1 }, "concurrency must be positive"},
		{func(c *Config) { c.DelayMean = -time.Second }, "delay-mean must not be negative"},
		{func(c *Config) { c.PostbackShare = 1.5 }, "postback-share must be between 0 and 1, got 1.5"},
		{func(c *Config) { c.RepeatShare = -0.1 }, "repeat-share must be between 0 and 1"},
		{func(c *Config) { c.PendingShare = math.NaN() }, "pending-share must be between 0 and 1"},
		{func(c *Config) { c.UnknownShare = 2 }, "unknown-share must be between 0 and 1"},
		{func(c *Config) { c.PostbackShare, c.Token = 0.5, "" }, "postbacks need an advertiser token"},
	} {
		cfg := base
		c.adjust(&cfg)
		if _, err := Run(context.Background(), cfg); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("Run(%+v) = %v, want an error containing %q", cfg, err, c.want)
		}
	}

	// No postbacks at all with a zero share, and no token needed.
	e := startStandIn(t, fasthttp.StatusFound)
	res, err := Run(context.Background(), Config{Target: e.url, Offers: []uint32{1}, Affiliates: []uint32{7}, Rate: 2000, Clicks: 100})
	if err != nil {
		t.Fatal(err)
	}
	if res.Clicks != 100 || res.Postbacks != 0 || len(e.postbacks) != 0 {
		t.Fatalf("share 0: %d clicks, %d postbacks sent, %d received; want 100, 0, 0", res.Clicks, res.Postbacks, len(e.postbacks))
	}

	// A zero mean delay sends every postback as soon as its click is
	// answered. (Were it taken for a 2 s mean, the last of 50 would come
	// within 3 s with a chance of about 3 in a million.)
	start := time.Now()
	res, err = Run(context.Background(), Config{Target: e.url, Offers: []uint32{1}, Affiliates: []uint32{7}, Token: "tok",
		Rate: 2000, Clicks: 50, PostbackShare: 1})
	if err != nil {
		t.Fatal(err)
	}
	if res.Approved != 50 || time.Since(start) > 3*time.Second {
		t.Fatalf("delay 0: %d approved in %s, want 50 at once", res.Approved, time.Since(start))
	}

	// Every click refused: the result says how many failed.
	res, err = Run(context.Background(), Config{Target: startStandIn(t, fasthttp.StatusNotFound).url,
		Offers: []uint32{1}, Affiliates: []uint32{7}, Rate: 2000, Clicks: 20})
	if err != nil {
		t.Fatal(err)
	}
	if err := res.Failed(); err == nil || !strings.Contains(err.Error(), "20 of 20 clicks and 0 of 0 postbacks failed") {
		t.Fatalf("Failed() = %v, want 20 of 20 clicks", err)
	}
}
