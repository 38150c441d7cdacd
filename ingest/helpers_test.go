package ingest

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/segmentio/kafka-go"

	"github.com/trackstar/trackstar/internal/catalog"
	"github.com/trackstar/trackstar/internal/ops"
)

const testPartitions = 4

// testConfig has an offer whose URL uses every click macro and alias, and
// an advertiser that only accepts postbacks from 203.0.113.0/24.
const testConfig = `
advertisers:
  - id: 1
    name: Shop
    token: "shop-token"
  - id: 2
    name: Locked
    token: "locked-token"
    allowed_ips: ["203.0.113.0/24"]
offers:
  - id: 1
    advertiser_id: 1
    name: Every macro
    url: "https://shop.example/land?c={click_id}&t={transaction_id}&o={offer_id}&a={aff_id}&af={affiliate_id}&s1={sub1}&s2={sub2}&s3={sub3}&s4={sub4}&s5={sub5}&as1={aff_sub}&as2={aff_sub2}&as3={aff_sub3}&as4={aff_sub4}&as5={aff_sub5}&src={source}"
    goals:
      - id: default
        revenue: {fixed: 2.50}
        payout: {fixed: 1.75}
  - id: 2
    advertiser_id: 2
    name: Plain
    url: "https://locked.example/p/{click_id}?aff={aff_id}"
    goals:
      - id: default
        revenue: {fixed: 1}
        payout: {fixed: 0.5}
affiliates:
  - id: 7
    name: Partner A
  - id: 8
    name: Partner B
`

func testCatalog(t testing.TB) *catalog.Holder {
	t.Helper()
	path := filepath.Join(t.TempDir(), "trackstar.yaml")
	if err := os.WriteFile(path, []byte(testConfig), 0o644); err != nil {
		t.Fatal(err)
	}
	h, err := catalog.NewHolder(path)
	if err != nil {
		t.Fatalf("test config: %v", err)
	}
	return h
}

// testEdge is an edge serving on a loopback port until the test ends.
type testEdge struct {
	url    string // http://127.0.0.1:port
	edge   *Edge
	reg    *prometheus.Registry
	health *ops.Health
}

func startEdge(t testing.TB, broker, dataDir string, adjust func(*Config)) *testEdge {
	t.Helper()
	cfg := Config{
		Listen:   "127.0.0.1:0",
		Brokers:  []string{broker},
		DataDir:  dataDir,
		Catalog:  testCatalog(t),
		Registry: ops.NewRegistry(),
		Health:   &ops.Health{},
		Logger:   slog.New(slog.NewTextHandler(io.Discard, nil)),
	}
	if testing.Verbose() {
		cfg.Logger = slog.Default()
	}
	if adjust != nil {
		adjust(&cfg)
	}
	e, err := New(cfg)
	if err != nil {
		t.Fatalf("cannot start edge: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- e.Serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("edge Serve: %v", err)
		}
	})
	return &testEdge{url: "http://" + e.Addr().String(), edge: e, reg: cfg.Registry, health: cfg.Health}
}

// client never follows redirects: the tests look at the 302 itself.
var client = &http.Client{
	Timeout:       15 * time.Second,
	CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
}

type response struct {
	code     int
	body     string
	location string
	header   http.Header
}

func do(t testing.TB, method, u, contentType, body string, header map[string]string) response {
	t.Helper()
	req, err := http.NewRequest(method, u, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	for k, v := range header {
		req.Header.Set(k, v)
	}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, u, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: reading body: %v", method, u, err)
	}
	return response{code: resp.StatusCode, body: string(b), location: resp.Header.Get("Location"), header: resp.Header}
}

func get(t testing.TB, u string) response { t.Helper(); return do(t, "GET", u, "", "", nil) }

// rawRequest writes req as is and reads one response: for requests the
// Go client would refuse or rewrite.
func rawRequest(t testing.TB, addr, req string) response {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	// The server may answer before reading everything (a body too large);
	// the answer is what counts.
	_, _ = io.WriteString(c, req)
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("reading the answer to a raw request: %v", err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return response{code: resp.StatusCode, body: string(b), header: resp.Header}
}

// clickIDOf takes the click ID out of a redirect to an offer of testConfig.
func clickIDOf(t testing.TB, location string) string {
	t.Helper()
	u, err := url.Parse(location)
	if err != nil {
		t.Fatalf("Location %q: %v", location, err)
	}
	if id := u.Query().Get("c"); id != "" {
		return id
	}
	if id, ok := strings.CutPrefix(u.Path, "/p/"); ok {
		return id
	}
	t.Fatalf("no click ID in Location %q", location)
	return ""
}

// readTopic returns every record of topic, all partitions, up to the high
// watermark at the time of the call.
func readTopic(t testing.TB, broker, topic string) []kafka.Message {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var out []kafka.Message
	for p := range testPartitions {
		conn, err := kafka.DialLeader(ctx, "tcp", broker, topic, p)
		if err != nil {
			t.Fatalf("dial %s/%d: %v", topic, p, err)
		}
		last, err := conn.ReadLastOffset()
		conn.Close()
		if err != nil {
			t.Fatalf("last offset of %s/%d: %v", topic, p, err)
		}
		if last == 0 {
			continue
		}
		r := kafka.NewReader(kafka.ReaderConfig{Brokers: []string{broker}, Topic: topic, Partition: p, MaxWait: 50 * time.Millisecond})
		for {
			m, err := r.ReadMessage(ctx)
			if err != nil {
				r.Close()
				t.Fatalf("read %s/%d: %v", topic, p, err)
			}
			out = append(out, m)
			if m.Offset >= last-1 {
				break
			}
		}
		r.Close()
	}
	return out
}

// waitRecords polls topic until every key in want has a record, and
// returns the records by key (the last one of each key).
func waitRecords(t testing.TB, broker, topic string, want []string) map[string]kafka.Message {
	t.Helper()
	deadline := time.Now().Add(90 * time.Second)
	for {
		got := map[string]kafka.Message{}
		for _, m := range readTopic(t, broker, topic) {
			got[string(m.Key)] = m
		}
		var missing []string
		for _, k := range want {
			if _, ok := got[k]; !ok {
				missing = append(missing, k)
			}
		}
		if len(missing) == 0 {
			return got
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %d of %d records missing, e.g. %s", topic, len(missing), len(want), missing[0])
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func waitFor(t testing.TB, what string, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(90 * time.Second)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s: %v", what, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// metricValue reads one series from the edge's /metrics, summed over the
// series whose labels contain every one of labels.
func metricValue(t testing.TB, te *testEdge, name string, labels ...string) float64 {
	t.Helper()
	r := get(t, te.url+"/metrics")
	if r.code != 200 {
		t.Fatalf("/metrics: %d %s", r.code, r.body)
	}
	var sum float64
	found := false
	for _, line := range strings.Split(r.body, "\n") {
		if !strings.HasPrefix(line, name+" ") && !strings.HasPrefix(line, name+"{") {
			continue
		}
		ok := true
		for _, l := range labels {
			ok = ok && strings.Contains(line, l)
		}
		if !ok {
			continue
		}
		var v float64
		if _, err := fmt.Sscanf(line[strings.LastIndexByte(line, ' ')+1:], "%g", &v); err != nil {
			t.Fatalf("metric line %q: %v", line, err)
		}
		sum += v
		found = true
	}
	if !found {
		t.Fatalf("metric %s%v not found in /metrics", name, labels)
	}
	return sum
}

func freeAddr(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}
