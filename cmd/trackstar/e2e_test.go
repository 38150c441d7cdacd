package main

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"

	"github.com/trackstar/trackstar/internal/loadgen"
	"github.com/trackstar/trackstar/internal/testenv"
	"github.com/trackstar/trackstar/internal/warehouse"
	"github.com/trackstar/trackstar/schemas"
)

// TestMain lets the test binary play trackstar: with TRACKSTAR_E2E_CHILD=1
// it runs the command line it was given, as the real binary would, so the
// end-to-end test can run `trackstar all` as a subprocess without a build.
func TestMain(m *testing.M) {
	if os.Getenv("TRACKSTAR_E2E_CHILD") == "1" {
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// TestEndToEnd runs `trackstar all` with the embedded broker and the real
// ClickHouse, sends loadgen traffic with a local partner sink, and checks
// exact results: every click once, every conversion with its outcome, every
// approved conversion delivered once, and report totals equal to what was sent.
func TestEndToEnd(t *testing.T) {
	sink := freeAddr(t)
	edge, _, chAddr, db := startAll(t, "testdata/e2e.yaml", sink)

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	res, err := loadgen.Run(ctx, loadgen.Config{
		Target: "http://" + edge, Offers: []uint32{1, 2}, Affiliates: []uint32{7, 8}, Token: "e2e-token",
		Rate: 300, Clicks: 600, Concurrency: 32,
		PostbackShare: 0.5, DelayMean: 300 * time.Millisecond, DelayMax: 2 * time.Second,
		RepeatShare: 0.1, PendingShare: 0.2, UnknownShare: 0.1, Sink: sink,
	})
	if err != nil {
		t.Fatalf("loadgen: %v", err)
	}
	if res.ClickErrors+res.PostbackErrors > 0 {
		t.Fatalf("loadgen saw %d click and %d postback errors: %v", res.ClickErrors, res.PostbackErrors, res.FirstErrors)
	}
	t.Logf("loadgen: %d clicks, %d postbacks, %d approved, %d unknown IDs", res.Clicks, res.Postbacks, res.Approved, res.Unknown)

	// What must come out, from what was sent. One conversion per converted
	// click ends approved (pending first for some); an advertiser's repeat
	// of the same status is a duplicate rejection; a postback for an ID that
	// never was a click is unknown_click once the grace period passes.
	type clickOutcome struct {
		label    string
		offer    uint32
		statuses []string
	}
	byClick := map[string]*clickOutcome{}
	var unknown, duplicates int
	for _, pb := range res.SentPostbacks {
		if pb.Label == "" {
			unknown++
			continue
		}
		c := byClick[pb.ClickID]
		if c == nil {
			c = &clickOutcome{label: pb.Label, offer: pb.OfferID}
			byClick[pb.ClickID] = c
		}
		if n := len(c.statuses); n > 0 && c.statuses[n-1] == pb.Status {
			duplicates++
		}
		c.statuses = append(c.statuses, pb.Status)
	}
	revenue := map[uint32]string{1: "2.5", 2: "1.2"}
	payout := map[uint32]string{1: "1.75", 2: "0.8"}
	var wantRevenue, wantPayout schemas.Amount
	for _, c := range byClick {
		r, _ := schemas.ParseAmount(revenue[c.offer])
		p, _ := schemas.ParseAmount(payout[c.offer])
		wantRevenue += r
		wantPayout += p
	}

	conn, err := warehouse.Open(ctx, chAddr, db)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()

	q := func(query string) uint64 {
		var n uint64
		if err := conn.QueryRow(ctx, query).Scan(&n); err != nil {
			t.Fatalf("%s: %v", query, err)
		}
		return n
	}
	want := map[string]uint64{
		"SELECT count() FROM clicks FINAL":                                                       uint64(res.Clicks),
		"SELECT uniqExact(click_id) FROM clicks":                                                 uint64(res.Clicks),
		"SELECT count() FROM conversions FINAL WHERE status = 'approved'":                        uint64(len(byClick)),
		"SELECT count() FROM conversions FINAL WHERE status = 'pending'":                         0,
		"SELECT count() FROM conversions FINAL WHERE reject_reason = 'duplicate'":                uint64(duplicates),
		"SELECT count() FROM conversions FINAL WHERE reject_reason = 'unknown_click'":            uint64(unknown),
		"SELECT count() FROM conversions FINAL":                                                  uint64(len(byClick) + duplicates + unknown),
		"SELECT count() FROM postback_deliveries FINAL WHERE outcome = 'delivered'":              uint64(len(byClick)),
		"SELECT toUInt64(sum(clicks)) FROM report_daily":                                         uint64(res.Clicks),
		"SELECT toUInt64(sum(conversions)) FROM report_daily":                                    uint64(len(byClick)),
		"SELECT toUInt64(sum(revenue) * 10000) FROM report_daily":                                uint64(wantRevenue.Units()),
		"SELECT toUInt64(sum(payout) * 10000) FROM report_daily":                                 uint64(wantPayout.Units()),
		"SELECT toUInt64(sum(revenue) * 10000) FROM conversions FINAL WHERE status = 'approved'": uint64(wantRevenue.Units()),
	}
	var mismatch []string
	waitUntil(t, 90*time.Second, "ClickHouse holds every expected row", func() bool {
		mismatch = mismatch[:0]
		for query, n := range want {
			if got := q(query); got != n {
				mismatch = append(mismatch, fmt.Sprintf("%s = %d, want %d", query, got, n))
			}
		}
		return len(mismatch) == 0
	}, func() { t.Logf("still different:\n%s", strings.Join(mismatch, "\n")) })

	// Every click the edge answered is in ClickHouse by its ID.
	seen := clickIDs(ctx, t, conn)
	for _, id := range res.ClickIDs {
		if !seen[id] {
			t.Fatalf("click %s was answered but is not in ClickHouse", id)
		}
	}
	// Every approved conversion reached its partner exactly once, and
	// nothing else did (the affiliates take approved conversions only).
	for _, c := range byClick {
		if n := res.DeliveriesByLabel[c.label]; n != 1 {
			t.Fatalf("click %s (statuses %v) delivered %d times, want once", c.label, c.statuses, n)
		}
	}
	total := 0
	for _, n := range res.DeliveriesByLabel {
		total += n
	}
	if total != len(byClick) {
		t.Fatalf("partner sink received %d requests, want %d", total, len(byClick))
	}
}

// startAll runs `trackstar all` as a subprocess with the config at cfgFile
// ({SINK} replaced by sink), the embedded broker, a fresh data dir and a
// fresh ClickHouse database, and waits until its edge answers. It returns
// the edge's address and the ClickHouse address and database. The process
// is stopped (and its log shown if the test failed) when the test ends.
func startAll(t *testing.T, cfgFile, sink string) (edge, broker, chAddr, db string) {
	t.Helper()
	all, _ := startAllProcess(t, cfgFile, sink)
	return all.edge, all.broker, all.chAddr, all.db
}

// allProcess is `trackstar all` with the embedded broker, run as a child.
type allProcess struct {
	edge, broker, chAddr, db string
	cmd                      *exec.Cmd
}

// startAllProcess starts `trackstar all` with the embedded broker and a
// database of its own, on cfgFile with {SINK} replaced by sink; it returns
// once the edge answers, with the config file it wrote.
func startAllProcess(t *testing.T, cfgFile, sink string) (*allProcess, string) {
	t.Helper()
	a := &allProcess{edge: freeAddr(t), broker: freeAddr(t)}
	a.chAddr, a.db = testenv.ClickHouseDB(t)
	dir := t.TempDir()

	cfg, err := os.ReadFile(cfgFile)
	if err != nil {
		t.Fatal(err)
	}
	cfgPath := filepath.Join(dir, "trackstar.yaml")
	if err := os.WriteFile(cfgPath, []byte(strings.ReplaceAll(string(cfg), "{SINK}", sink)), 0o644); err != nil {
		t.Fatal(err)
	}
	a.cmd = startChild(t, filepath.Join(dir, "trackstar.log"), a.edge, "all", "--config", cfgPath, "--listen", a.edge,
		"--embedded-broker", a.broker, "--data", filepath.Join(dir, "data"), "--clickhouse", a.chAddr,
		"--clickhouse-database", a.db, "--partitions", "4", "--grace", "2s", "--log-level", "warn")
	return a, cfgPath
}

// startChild runs this binary as `trackstar args...`, its output in
// logPath (shown when the test fails), until the test ends; it returns
// once the edge at edge answers /healthz.
func startChild(t *testing.T, logPath, edge string, args ...string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(os.Args[0], args...)
	cmd.Env = append(os.Environ(), "TRACKSTAR_E2E_CHILD=1")
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGCONT) // in case a test left it stopped
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(20 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
		}
		if t.Failed() {
			log, _ := os.ReadFile(logf.Name())
			t.Logf("trackstar %s log:\n%s", args[0], log)
		}
	})

	waitUntil(t, 60*time.Second, "the edge answers /healthz", func() bool {
		select {
		case err := <-exited:
			t.Fatalf("trackstar %s exited early: %v", args[0], err)
		default:
		}
		resp, err := http.Get("http://" + edge + "/healthz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == 200
	})
	return cmd
}

func clickIDs(ctx context.Context, t *testing.T, conn driver.Conn) map[string]bool {
	rows, err := conn.Query(ctx, "SELECT click_id FROM clicks")
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	out := map[string]bool{}
	for rows.Next() {
		var id string
		if err := rows.Scan(&id); err != nil {
			t.Fatal(err)
		}
		out[id] = true
	}
	return out
}

func waitUntil(t *testing.T, limit time.Duration, what string, cond func() bool, onTimeout ...func()) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for !cond() {
		if time.Now().After(deadline) {
			for _, f := range onTimeout {
				f()
			}
			t.Fatalf("timed out after %s waiting until %s", limit, what)
		}
		time.Sleep(200 * time.Millisecond)
	}
}
