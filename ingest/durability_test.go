package ingest

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/trackstar/trackstar/internal/bus"
	"github.com/trackstar/trackstar/internal/catalog"
	"github.com/trackstar/trackstar/internal/ops"
	"github.com/trackstar/trackstar/internal/testenv"
	"github.com/trackstar/trackstar/schemas"
)

// TestMain doubles as the edge process of TestKillDashNineLosesNothing:
// with TRACKSTAR_TEST_EDGE_CHILD set, the test binary runs an edge.
func TestMain(m *testing.M) {
	if os.Getenv("TRACKSTAR_TEST_EDGE_CHILD") != "" {
		os.Exit(runChildEdge())
	}
	if addr := os.Getenv("TRACKSTAR_TEST_BROKER_CHILD"); addr != "" {
		os.Exit(runChildBroker(addr))
	}
	os.Exit(m.Run())
}

// runChildBroker runs an in-memory embedded broker until SIGTERM: a broker
// in a process of its own can be frozen with SIGSTOP, which is what a hung
// Kafka looks like from the edge (connections open, no answers).
func runChildBroker(addr string) int {
	b, err := bus.StartEmbeddedBroker(addr, "")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	<-ctx.Done()
	b.Close()
	return 0
}

func runChildEdge() int {
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	holder, err := catalog.NewHolder(os.Getenv("TRACKSTAR_TEST_EDGE_CONFIG"))
	if err != nil {
		log.Error("cannot load config", "err", err)
		return 1
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	err = Run(ctx, Config{
		Listen:         os.Getenv("TRACKSTAR_TEST_EDGE_LISTEN"),
		Brokers:        []string{os.Getenv("TRACKSTAR_TEST_EDGE_BROKER")},
		DataDir:        os.Getenv("TRACKSTAR_TEST_EDGE_DATA"),
		Catalog:        holder,
		ProduceTimeout: 500 * time.Millisecond,
		Logger:         log,
	})
	if err != nil {
		log.Error("edge failed", "err", err)
		return 1
	}
	return 0
}

func startBroker(t *testing.T, addr, dir string) *bus.EmbeddedBroker {
	t.Helper()
	b, err := bus.StartEmbeddedBroker(addr, dir)
	if err != nil {
		t.Fatalf("cannot start embedded broker on %s: %v", addr, err)
	}
	return b
}

// traffic sends clicks and postbacks to an edge and remembers the keys of
// what it accepted: click IDs of clicks, click IDs and event IDs of
// postbacks.
type traffic struct {
	clicks    []string
	postbacks []string // keys (click IDs)
	eventIDs  []string
}

func (tr *traffic) send(t *testing.T, baseURL string, n int) {
	t.Helper()
	for i := range n {
		r := get(t, fmt.Sprintf("%s/click?offer_id=1&aff_id=7&sub1=n%d", baseURL, i))
		if r.code != 302 {
			t.Fatalf("click %d: %d %q, want 302", i, r.code, r.body)
		}
		id := clickIDOf(t, r.location)
		tr.clicks = append(tr.clicks, id)
		r = get(t, baseURL+"/postback?token=shop-token&amount=1.5&click_id="+id)
		if r.code != 200 {
			t.Fatalf("postback %d: %d %q, want 200", i, r.code, r.body)
		}
		var body struct {
			EventID string `json:"event_id"`
		}
		if err := json.Unmarshal([]byte(r.body), &body); err != nil {
			t.Fatalf("postback answer %q: %v", r.body, err)
		}
		tr.postbacks = append(tr.postbacks, id)
		tr.eventIDs = append(tr.eventIDs, body.EventID)
	}
}

// check waits until every accepted event is in Kafka, at least once.
func (tr *traffic) check(t *testing.T, broker string) {
	t.Helper()
	waitRecords(t, broker, bus.TopicClicks, tr.clicks)
	waitRecords(t, broker, bus.TopicPostbacks, tr.postbacks)
	seen := map[string]bool{}
	for _, m := range readTopic(t, broker, bus.TopicPostbacks) {
		p, err := schemas.DecodePostback(m.Value)
		if err != nil {
			t.Fatal(err)
		}
		seen[p.EventID] = true
	}
	for _, e := range tr.eventIDs {
		if !seen[e] {
			t.Fatalf("postback event %s was answered 200 but never reached Kafka", e)
		}
	}
}

func TestBrokerOutageSpoolsAndDrains(t *testing.T) {
	dir := t.TempDir()
	addr := freeAddr(t)
	b := startBroker(t, addr, filepath.Join(dir, "kafka"))
	testenv.CreateTopics(t, addr, testPartitions)
	te := startEdge(t, addr, filepath.Join(dir, "edge"), nil)

	// Postbacks of one click, numbered by txn_id, are sent one after the
	// other across the outage; Kafka must hold them in that order.
	orderedClick := schemas.NewID(time.Now())
	sent := 0
	sendOrdered := func(n int) {
		t.Helper()
		for range n {
			sent++
			if r := get(t, fmt.Sprintf("%s/postback?token=shop-token&amount=0&click_id=%s&txn_id=%d", te.url, orderedClick, sent)); r.code != 200 {
				t.Fatalf("postback %d: %d %q", sent, r.code, r.body)
			}
		}
	}

	var tr traffic
	tr.send(t, te.url, 5)
	sendOrdered(3)
	if got := metricValue(t, te, "trackstar_edge_spooled_total"); got != 0 {
		t.Fatalf("spooled %v events while Kafka was up", got)
	}

	b.Close()
	tr.send(t, te.url, 25)
	sendOrdered(3)
	if got := metricValue(t, te, "trackstar_edge_spool_events"); got == 0 {
		t.Fatalf("nothing spooled while Kafka was down")
	}
	if r := get(t, te.url+"/readyz"); r.code != 503 || !strings.Contains(r.body, "edge: degraded") {
		t.Fatalf("/readyz while spooling: %d %q, want 503 degraded", r.code, r.body)
	}
	if err := te.health.Ready(); err == nil {
		t.Fatalf("the Health given in Config reports ready while spooling")
	}
	if age := metricValue(t, te, "trackstar_edge_spool_oldest_age_seconds"); age < 0 {
		t.Fatalf("spool age %v", age)
	}

	b = startBroker(t, addr, filepath.Join(dir, "kafka"))
	defer b.Close()
	// Sent while the spool still holds the ones before: they queue behind.
	sendOrdered(3)
	tr.check(t, addr)
	waitRecords(t, addr, bus.TopicPostbacks, []string{orderedClick})
	waitFor(t, "the spool is drained and /readyz is ready", func() error {
		if r := get(t, te.url+"/readyz"); r.code != 200 {
			return fmt.Errorf("/readyz %d %s", r.code, r.body)
		}
		if n := metricValue(t, te, "trackstar_edge_spool_events"); n != 0 {
			return fmt.Errorf("%v events spooled", n)
		}
		return nil
	})
	spooled := metricValue(t, te, "trackstar_edge_spooled_total")
	drained := metricValue(t, te, "trackstar_edge_spool_drained_total")
	if spooled == 0 || drained != spooled {
		t.Fatalf("spooled %v, drained %v", spooled, drained)
	}
	t.Logf("spooled and drained %v events", spooled)

	// At least once, in order: the first arrival of each numbered
	// postback comes after the first arrival of the one before. Those
	// answered from the spool say so (the attributor orders updates by
	// it); those acked by Kafka do not. 7 to 9 may have found the spool
	// handed over already.
	var order []string
	seen := map[string]bool{}
	for _, m := range readTopic(t, addr, bus.TopicPostbacks) {
		if string(m.Key) != orderedClick {
			continue
		}
		p, err := schemas.DecodePostback(m.Value)
		if err != nil {
			t.Fatal(err)
		}
		if seen[p.EventID] {
			continue
		}
		seen[p.EventID] = true
		order = append(order, p.TxnID)
		if want := p.TxnID >= "4"; p.TxnID <= "6" && p.Spooled != want {
			t.Errorf("postback %s: spooled %v, want %v", p.TxnID, p.Spooled, want)
		}
	}
	if want := "1 2 3 4 5 6 7 8 9"; strings.Join(order, " ") != want {
		t.Fatalf("postbacks of one click reached Kafka in the order %v, want %s", order, want)
	}

	// Kafka is used directly again.
	tr.send(t, te.url, 3)
	tr.check(t, addr)
	if got := metricValue(t, te, "trackstar_edge_spooled_total"); got != spooled {
		t.Fatalf("spooled %v events after the drain, want %v", got, spooled)
	}
}

// childEdge is the edge as a process of its own, so that it can be killed.
type childEdge struct {
	cmd    *exec.Cmd
	url    string
	stderr *bytes.Buffer
	exited chan struct{} // closed once cmd.Wait returned
}

func startChildEdge(t *testing.T, broker, dataDir, listen, configPath string) *childEdge {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(),
		"TRACKSTAR_TEST_EDGE_CHILD=1",
		"TRACKSTAR_TEST_EDGE_BROKER="+broker,
		"TRACKSTAR_TEST_EDGE_DATA="+dataDir,
		"TRACKSTAR_TEST_EDGE_LISTEN="+listen,
		"TRACKSTAR_TEST_EDGE_CONFIG="+configPath,
	)
	exited := make(chan struct{})
	c := &childEdge{cmd: cmd, url: "http://" + listen, stderr: &bytes.Buffer{}, exited: exited}
	cmd.Stderr = c.stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("cannot start edge process: %v", err)
	}
	go func() { _ = cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-exited
		if t.Failed() {
			t.Logf("edge process log:\n%s", c.stderr)
		}
	})
	waitFor(t, "the edge process answers /healthz", func() error {
		select {
		case <-exited:
			t.Fatalf("edge process exited: %s", c.stderr)
		default:
		}
		resp, err := client.Get(c.url + "/healthz")
		if err != nil {
			return err
		}
		resp.Body.Close()
		return nil
	})
	return c
}

// crashRig is the state an edge process and its broker keep across the
// kills and restarts of a test: the broker's and the edge's data dirs, the
// config file and their addresses.
type crashRig struct{ kafkaDir, edgeDir, config, broker, listen string }

func newCrashRig(t *testing.T) crashRig {
	dir := t.TempDir()
	r := crashRig{kafkaDir: filepath.Join(dir, "kafka"), edgeDir: filepath.Join(dir, "edge"),
		config: filepath.Join(dir, "trackstar.yaml"), broker: freeAddr(t), listen: freeAddr(t)}
	if err := os.WriteFile(r.config, []byte(testConfig), 0o644); err != nil {
		t.Fatal(err)
	}
	return r
}

func (r crashRig) startBroker(t *testing.T) *bus.EmbeddedBroker {
	return startBroker(t, r.broker, r.kafkaDir)
}

func (r crashRig) startEdge(t *testing.T) *childEdge {
	return startChildEdge(t, r.broker, r.edgeDir, r.listen, r.config)
}

func TestKillDashNineLosesNothing(t *testing.T) {
	rig := newCrashRig(t)
	addr := rig.broker
	b := rig.startBroker(t)
	testenv.CreateTopics(t, addr, testPartitions)

	edge := rig.startEdge(t)
	var tr traffic
	tr.send(t, edge.url, 3)

	b.Close()
	tr.send(t, edge.url, 20)
	if r := get(t, edge.url+"/readyz"); r.code != 503 {
		t.Fatalf("/readyz of the spooling edge: %d %q", r.code, r.body)
	}
	// Every answer above is durable: kill -9 and nothing may be lost.
	if err := edge.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}

	b = rig.startBroker(t)
	defer b.Close()
	edge = rig.startEdge(t)
	tr.check(t, addr)
	waitFor(t, "the restarted edge drained its spool", func() error {
		if r := get(t, edge.url+"/readyz"); r.code != 200 {
			return fmt.Errorf("/readyz %d %s", r.code, r.body)
		}
		return nil
	})

	// A clean stop (SIGTERM) returns 0.
	_ = edge.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-edge.exited:
	case <-time.After(30 * time.Second):
		t.Fatalf("the edge process did not exit within 30s of SIGTERM")
	}
	if code := edge.cmd.ProcessState.ExitCode(); code != 0 {
		t.Fatalf("edge process exited %d after SIGTERM:\n%s", code, edge.stderr)
	}
}

// A drained spool stays drained through a kill -9: the deletes of what
// Kafka acked are synced (Pebble keeps an unsynced write in memory, and a
// killed process loses it), so the restarted edge does not produce those
// events again.
func TestKillAfterDrainDoesNotDrainAgain(t *testing.T) {
	rig := newCrashRig(t)
	addr := rig.broker
	b := rig.startBroker(t)
	testenv.CreateTopics(t, addr, testPartitions)
	edge := rig.startEdge(t)
	b.Close()
	var tr traffic
	tr.send(t, edge.url, 10)
	b = rig.startBroker(t)
	defer b.Close()
	ready := func() error {
		if r := get(t, edge.url+"/readyz"); r.code != 200 {
			return fmt.Errorf("/readyz %d %s", r.code, r.body)
		}
		return nil
	}
	waitFor(t, "the edge drained its spool", ready)
	tr.check(t, addr)
	records := func() int {
		return len(readTopic(t, addr, bus.TopicClicks)) + len(readTopic(t, addr, bus.TopicPostbacks))
	}
	before := records()

	if err := edge.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-edge.exited
	edge = rig.startEdge(t)
	waitFor(t, "the restarted edge is ready", ready)
	time.Sleep(500 * time.Millisecond)
	if after := records(); after != before {
		t.Fatalf("the topics held %d records before the kill and %d after the restart: the drained spool was drained again", before, after)
	}
}

func TestSpoolFullAnswers503(t *testing.T) {
	addr := freeAddr(t)
	b := startBroker(t, addr, "")
	testenv.CreateTopics(t, addr, testPartitions)
	b.Close()
	te := startEdge(t, addr, t.TempDir(), func(c *Config) { c.SpoolMaxBytes = 10 })
	r := get(t, te.url+"/click?offer_id=1&aff_id=7")
	if r.code != 503 || r.location != "" || !strings.Contains(r.body, "the click could not be recorded; try again") {
		t.Fatalf("click with Kafka down and the spool full: %d %q", r.code, r.body)
	}
	r = get(t, te.url+"/postback?token=shop-token&amount=0&click_id="+schemas.NewID(time.Now()))
	if r.code != 503 || r.body != `{"status":"error","error":"the postback could not be recorded; try again"}`+"\n" {
		t.Fatalf("postback with Kafka down and the spool full: %d %q", r.code, r.body)
	}
	if got := metricValue(t, te, "trackstar_edge_spool_errors_total"); got != 2 {
		t.Fatalf("spool_errors_total = %v, want 2", got)
	}
}

// The spool deactivates when its store is empty, whatever its counters
// say (a write that failed its sync may still have reached the store), and
// not while it holds an event.
func TestSpoolDeactivatesWhenEmptyWhateverItsCount(t *testing.T) {
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	sp, err := openSpool(t.TempDir(), 1<<20, log)
	if err != nil {
		t.Fatal(err)
	}
	defer sp.close()
	for _, drift := range []int64{-1, +1} {
		if err := sp.append(topicClicks, []byte("key"), []byte("{}"), time.Now()); err != nil {
			t.Fatal(err)
		}
		if sp.deactivateIfEmpty(true) {
			t.Fatalf("deactivated while holding an event")
		}
		evs, err := sp.read(10, 1<<20)
		if err != nil || len(evs) != 1 {
			t.Fatalf("read: %d events, %v", len(evs), err)
		}
		if err := sp.remove(evs); err != nil {
			t.Fatal(err)
		}
		sp.count.Add(drift)
		if !sp.deactivateIfEmpty(true) {
			t.Fatalf("an empty spool with its count off by %d stays active", drift)
		}
		if sp.active.Load() || sp.count.Load() != 0 || sp.bytes.Load() != 0 {
			t.Fatalf("after deactivating: active %v, count %d, bytes %d", sp.active.Load(), sp.count.Load(), sp.bytes.Load())
		}
	}
}

func TestSpoolKeepsOrderAcrossReopen(t *testing.T) {
	dir := t.TempDir()
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	sp, err := openSpool(dir, 1<<20, log)
	if err != nil {
		t.Fatal(err)
	}
	if sp.active.Load() {
		t.Fatalf("a new spool is active")
	}
	now := time.UnixMilli(1_700_000_000_000)
	for i := range 10 {
		topic := topicID(i % 2)
		if err := sp.append(topic, []byte(fmt.Sprintf("key-%d", i)), []byte(fmt.Sprintf(`{"n":%d}`, i)), now.Add(time.Duration(i)*time.Second)); err != nil {
			t.Fatal(err)
		}
	}
	// Each event holds 12 bytes of key and value: a read stops at the
	// first event that reaches 25 bytes, the third.
	first, err := sp.read(100, 25)
	if err != nil {
		t.Fatal(err)
	}
	if len(first) != 3 {
		t.Fatalf("read(100, 25) returned %d events, want 3", len(first))
	}
	if err := sp.remove(first); err != nil {
		t.Fatal(err)
	}
	if err := sp.close(); err != nil {
		t.Fatal(err)
	}

	sp, err = openSpool(dir, 1<<20, log)
	if err != nil {
		t.Fatal(err)
	}
	defer sp.close()
	if !sp.active.Load() || sp.count.Load() != 7 {
		t.Fatalf("reopened spool: active %v, %d events; want active, 7", sp.active.Load(), sp.count.Load())
	}
	if age := sp.ageSeconds(now.Add(time.Minute)); age != 57 {
		t.Fatalf("oldest age %v, want 57 (the fourth event, 3s after the first)", age)
	}
	rest, err := sp.read(100, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	for i, ev := range rest {
		n := i + 3
		if string(ev.key) != fmt.Sprintf("key-%d", n) || string(ev.value) != fmt.Sprintf(`{"n":%d}`, n) || ev.topic != topicID(n%2) {
			t.Fatalf("event %d after reopen: %s %s topic %d", i, ev.key, ev.value, ev.topic)
		}
	}
	// New events go after the old ones.
	if err := sp.append(topicClicks, []byte("key-10"), []byte("{}"), now); err != nil {
		t.Fatal(err)
	}
	all, _ := sp.read(100, 1<<20)
	if len(all) != 8 || string(all[7].key) != "key-10" {
		t.Fatalf("after reopen and append: %d events, last %q", len(all), all[len(all)-1].key)
	}
	if sp.deactivateIfEmpty(true) {
		t.Fatalf("a spool holding events deactivated")
	}
	if err := sp.remove(all); err != nil {
		t.Fatal(err)
	}
	if !sp.deactivateIfEmpty(true) || sp.active.Load() || sp.bytes.Load() != 0 {
		t.Fatalf("empty spool: active %v, %d bytes", sp.active.Load(), sp.bytes.Load())
	}

	// Past SpoolMaxBytes the spool refuses.
	small, err := openSpool(t.TempDir(), 100, log)
	if err != nil {
		t.Fatal(err)
	}
	defer small.close()
	if err := small.append(topicClicks, []byte("k"), bytes.Repeat([]byte("v"), 60), now); err != nil {
		t.Fatal(err)
	}
	if err := small.append(topicClicks, []byte("k"), bytes.Repeat([]byte("v"), 60), now); err != errSpoolFull {
		t.Fatalf("append beyond SpoolMaxBytes: %v, want errSpoolFull", err)
	}
}

func TestSlowKafkaSpoolsAfterTheProduceTimeout(t *testing.T) {
	addr, cmd := startBrokerChild(t)
	te := startEdge(t, addr, t.TempDir(), func(c *Config) { c.ProduceTimeout = 300 * time.Millisecond })

	orderedClick := schemas.NewID(time.Now())
	sent := 0
	sendOrdered := func(n int) {
		t.Helper()
		for range n {
			sent++
			if r := get(t, fmt.Sprintf("%s/postback?token=shop-token&amount=0&click_id=%s&txn_id=%d", te.url, orderedClick, sent)); r.code != 200 {
				t.Fatalf("postback %d: %d %q", sent, r.code, r.body)
			}
		}
	}
	var tr traffic
	tr.send(t, te.url, 3)
	sendOrdered(2)

	// Freeze the broker: produce requests go out and nothing comes back.
	if err := cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	sendOrdered(2)
	tr.send(t, te.url, 10)
	sendOrdered(2)
	took := time.Since(start)
	if got := metricValue(t, te, "trackstar_edge_kafka_errors_total", `reason="timeout"`); got < 1 {
		t.Fatalf("kafka_errors_total{reason=timeout} = %v while the broker was frozen", got)
	}
	// Only the first event waits out the timeout; the rest follow it into
	// the spool at once.
	if took > 5*time.Second {
		t.Fatalf("24 requests took %v with a frozen broker and a 300ms produce timeout", took)
	}
	if r := get(t, te.url+"/readyz"); r.code != 503 {
		t.Fatalf("/readyz with a frozen broker: %d %q", r.code, r.body)
	}

	// Thawed, the broker also answers the produce requests that timed out:
	// those events arrive twice, which at-least-once allows.
	if err := cmd.Process.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	tr.check(t, addr)
	waitRecords(t, addr, bus.TopicPostbacks, []string{orderedClick})
	waitFor(t, "the spool is drained", func() error {
		if r := get(t, te.url+"/readyz"); r.code != 200 {
			return fmt.Errorf("/readyz %d %s", r.code, r.body)
		}
		return nil
	})
	var order []string
	seen := map[string]bool{}
	dups := 0
	for _, m := range readTopic(t, addr, bus.TopicPostbacks) {
		p, err := schemas.DecodePostback(m.Value)
		if err != nil {
			t.Fatal(err)
		}
		if seen[p.EventID] {
			dups++
			continue
		}
		seen[p.EventID] = true
		if p.ClickID == orderedClick {
			order = append(order, p.TxnID)
		}
	}
	if want := "1 2 3 4 5 6"; strings.Join(order, " ") != want {
		t.Fatalf("postbacks of one click reached Kafka in the order %v, want %s", order, want)
	}
	t.Logf("took %v while frozen; %d postbacks arrived twice", took, dups)
}

// A request that arrives after shutdown gave up waiting for its connection
// (a client slow to send it) finds the producer closed. It must get a
// plain 503 that closes the connection, not a panic and a 500.
func TestRequestAfterShutdownTimeoutAnswers503(t *testing.T) {
	broker := testenv.KafkaTopics(t, testPartitions)
	reg := ops.NewRegistry()
	e, err := New(Config{
		Listen:       "127.0.0.1:0",
		Brokers:      []string{broker},
		DataDir:      t.TempDir(),
		Catalog:      testCatalog(t),
		Registry:     reg,
		Health:       &ops.Health{},
		Logger:       slog.New(slog.NewTextHandler(io.Discard, nil)),
		WriteTimeout: 200 * time.Millisecond, // how long shutdown waits for connections
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	served := make(chan error, 1)
	go func() { served <- e.Serve(ctx) }()

	conn, err := net.Dial("tcp", e.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	// Half a request: shutdown cannot close this connection as idle.
	if _, err := io.WriteString(conn, "GET /click?offer_id=1&aff_id=7 HTTP/1.1\r\nHost: edge\r\n"); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)
	cancel()
	select {
	case err := <-served:
		if err != nil {
			t.Fatalf("Serve: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Serve did not return")
	}
	// The rest of the request, after the producer and the spool closed.
	if _, err := io.WriteString(conn, "\r\n"); err != nil {
		t.Fatal(err)
	}
	conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatalf("reading the answer: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 503 || !resp.Close {
		t.Fatalf("request after shutdown: %d %q (close %v), want 503 closing the connection", resp.StatusCode, body, resp.Close)
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == "trackstar_edge_panics_total" && mf.GetMetric()[0].GetCounter().GetValue() != 0 {
			t.Fatalf("panics_total = %v after a request at shutdown", mf.GetMetric()[0].GetCounter().GetValue())
		}
	}
}

// The drainer produces the spool only once the originals of abandoned
// events have settled (else a late ack of one could land after its copy's
// successors). That holds for a handler that abandons its event just
// after the drainer's wait, before its read of the spool.
func TestDrainerWaitsForAnEventAbandonedDuringItsRead(t *testing.T) {
	broker := testenv.KafkaTopics(t, testPartitions)
	te := startEdge(t, broker, t.TempDir(), nil)
	p := te.edge.prod
	first, late := schemas.NewID(time.Now()), schemas.NewID(time.Now())
	var once sync.Once
	hook := func() {
		once.Do(func() {
			// A handler gives up waiting for Kafka's ack of its event,
			// which flight still holds, and spools a copy.
			p.abandoned.Add(1)
			if err := p.spool.append(topicClicks, []byte(late), []byte(`{"late":true}`), time.Now()); err != nil {
				t.Error(err)
			}
		})
	}
	p.afterSettled.Store(&hook)
	// An event spooled while nothing is abandoned sets the drainer going.
	if err := p.spool.append(topicClicks, []byte(first), []byte(`{"first":true}`), time.Now()); err != nil {
		t.Fatal(err)
	}
	time.Sleep(500 * time.Millisecond)
	if got := readTopic(t, broker, bus.TopicClicks); len(got) != 0 {
		t.Fatalf("the drainer produced %d spooled events while an abandoned event's original was in flight", len(got))
	}
	p.abandoned.Add(-1) // the original settles
	waitRecords(t, broker, bus.TopicClicks, []string{first, late})
}

// startBrokerChild runs an embedded broker with the Trackstar topics in a
// process of its own (this test binary, see TestMain), which a test can
// stop with SIGSTOP as a hung broker, and returns its address.
func startBrokerChild(t *testing.T) (string, *exec.Cmd) {
	t.Helper()
	addr := freeAddr(t)
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "TRACKSTAR_TEST_BROKER_CHILD="+addr)
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	waitFor(t, "the broker process listens", func() error {
		c, err := net.Dial("tcp", addr)
		if err == nil {
			c.Close()
		}
		return err
	})
	testenv.CreateTopics(t, addr, testPartitions)
	return addr, cmd
}
