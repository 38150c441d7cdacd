package loadgen

import (
	"context"
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

// A stand-in edge that redirects with a fresh click ID and accepts
// postbacks: Run must count what it answered and pair postbacks with clicks.
func TestRunAgainstAnEdge(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	clicks := map[string]bool{}
	var postbacks []string
	srv := &fasthttp.Server{Handler: func(ctx *fasthttp.RequestCtx) {
		switch string(ctx.Path()) {
		case "/click":
			id := schemas.NewID(time.Now())
			mu.Lock()
			clicks[id] = true
			mu.Unlock()
			ctx.Response.Header.Set("Location", "https://offer.example/?click_id="+id+"&s1="+string(ctx.QueryArgs().Peek("sub1")))
			ctx.SetStatusCode(fasthttp.StatusFound)
		case "/postback":
			if string(ctx.QueryArgs().Peek("token")) != "tok" {
				ctx.SetStatusCode(fasthttp.StatusForbidden)
				return
			}
			mu.Lock()
			postbacks = append(postbacks, string(ctx.QueryArgs().Peek("click_id"))+"/"+string(ctx.QueryArgs().Peek("status")))
			mu.Unlock()
			ctx.SetBodyString(`{"status":"accepted"}`)
		}
	}}
	go func() { _ = srv.Serve(ln) }()
	defer func() { _ = srv.Shutdown() }()

	res, err := Run(context.Background(), Config{
		Target: "http://" + ln.Addr().String(), Offers: []uint32{1, 2}, Affiliates: []uint32{7}, Token: "tok",
		Rate: 2000, Clicks: 200, PostbackShare: 0.5, DelayMean: 5 * time.Millisecond, PendingShare: 0.5, RepeatShare: 0.5,
	})
	if err != nil {
		t.Fatal(err)
	}
	if res.Clicks != 200 || res.ClickErrors != 0 || len(res.ClickIDs) != 200 {
		t.Fatalf("clicks %d, errors %d, IDs %d; want 200, 0, 200: %v", res.Clicks, res.ClickErrors, len(res.ClickIDs), res.FirstErrors)
	}
	if res.PostbackErrors != 0 || res.Postbacks != int64(len(postbacks)) || res.Approved == 0 {
		t.Fatalf("postbacks %d (server saw %d), errors %d, approved %d", res.Postbacks, len(postbacks), res.PostbackErrors, res.Approved)
	}
	approved := map[string]int{}
	for _, pb := range postbacks {
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
