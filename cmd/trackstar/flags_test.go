package main

import (
	"context"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/segmentio/kafka-go"

	"github.com/trackstar/trackstar/internal/bus"
	"github.com/trackstar/trackstar/internal/testenv"
)

func TestFlagsReadEnvironment(t *testing.T) {
	t.Setenv("TRACKSTAR_EMBEDDED_BROKER", "127.0.0.1:19092")
	t.Setenv("TRACKSTAR_GRACE", "5m")
	t.Setenv("TRACKSTAR_LISTEN", ":1")
	var o options
	fs := newFlagSet("all", &o)
	if err := parseFlags(fs, []string{"--listen", ":2"}); err != nil {
		t.Fatal(err)
	}
	if o.embeddedBroker != "127.0.0.1:19092" || o.grace != 5*time.Minute {
		t.Fatalf("environment not read: %+v", o)
	}
	if o.listen != ":2" {
		t.Fatalf("command line must win over the environment: listen = %q", o.listen)
	}

	t.Setenv("TRACKSTAR_PARTITIONS", "twelve")
	err := parseFlags(newFlagSet("all", &o), nil)
	if err == nil || !strings.Contains(err.Error(), "TRACKSTAR_PARTITIONS") {
		t.Fatalf("bad env value: %v, want an error naming TRACKSTAR_PARTITIONS", err)
	}
}

func TestUnknownCommandAndLoadgen(t *testing.T) {
	var out, errw strings.Builder
	if err := run([]string{"frobnicate"}, &out, &errw); err == nil || !strings.Contains(err.Error(), "unknown command") {
		t.Fatalf("unknown command: %v", err)
	}
	if err := run([]string{"edge", "--config", "/nonexistent.yaml"}, &out, &errw); err == nil || !strings.Contains(err.Error(), "--brokers is required") {
		t.Fatalf("edge without brokers: %v", err)
	}
}

// TestLoadgenExitsNonZeroWhenRequestsFail: loadgen against an address
// nobody listens on prints its result and fails, naming what failed; a
// setting out of range fails before anything is sent.
func TestLoadgenExitsNonZeroWhenRequestsFail(t *testing.T) {
	cfg, err := os.ReadFile("testdata/e2e.yaml")
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "trackstar.yaml")
	if err := os.WriteFile(path, []byte(strings.ReplaceAll(string(cfg), "{SINK}", "127.0.0.1:9")), 0o644); err != nil {
		t.Fatal(err)
	}
	nobody := "http://" + freeAddr(t)
	var out, errw strings.Builder
	err = run([]string{"loadgen", "--config", path, "--target", nobody, "--clicks", "5", "--rate", "1000", "--postback-share", "0"}, &out, &errw)
	if err == nil || !strings.Contains(err.Error(), "5 of 5 clicks and 0 of 0 postbacks failed") {
		t.Fatalf("loadgen against nobody: %v, want 5 of 5 clicks failed", err)
	}
	if !strings.Contains(out.String(), "clicks       0 (0/s), errors 5") {
		t.Fatalf("loadgen did not print its result:\n%s", out.String())
	}
	out.Reset()
	err = run([]string{"loadgen", "--config", path, "--target", nobody, "--clicks", "5", "--rate", "0"}, &out, &errw)
	if err == nil || !strings.Contains(err.Error(), "rate must be a positive number") {
		t.Fatalf("loadgen --rate 0: %v, want an error naming the rate", err)
	}
}

// TestStopWhileWaitingForKafka: SIGTERM while a role still waits for Kafka
// at start-up is a clean stop (exit 0), as it is once the role runs.
func TestStopWhileWaitingForKafka(t *testing.T) {
	cmd := exec.Command(os.Args[0], "attributor", "--config", "../../examples/trackstar.yaml", "--brokers", freeAddr(t),
		"--ops-listen", freeAddr(t), "--data", t.TempDir())
	cmd.Env = append(os.Environ(), "TRACKSTAR_E2E_CHILD=1")
	var logs testenv.Buffer
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 30*time.Second, "the attributor waits for Kafka", func() bool { return strings.Contains(logs.String(), "Kafka not ready; retrying") },
		func() { _ = cmd.Process.Kill() })
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("trackstar attributor stopped during start-up: %v, want exit 0; log:\n%s", err, logs.String())
	}
	if !strings.Contains(logs.String(), "stopped before start-up finished") {
		t.Fatalf("no word of the stop in the log:\n%s", logs.String())
	}
}

// `trackstar all` with ClickHouse away at start: the edge is ready (it
// lands every event in Kafka), and /readyz lists the loader waiting for the
// schema, as it does for a loader that loses ClickHouse later.
func TestAllListsALoaderWaitingForClickHouse(t *testing.T) {
	edge := freeAddr(t)
	startTrackstar(t, "all", "--config", "../../examples/trackstar.yaml", "--listen", edge,
		"--embedded-broker", freeAddr(t), "--data", t.TempDir(), "--clickhouse", freeAddr(t), "--log-level", "warn")
	var body string
	waitUntil(t, 60*time.Second, "/readyz lists the loader", func() bool {
		resp, err := http.Get("http://" + edge + "/readyz")
		if err != nil {
			return false
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		body = string(b)
		return resp.StatusCode == 200 && strings.Contains(body, "loader: waiting for the ClickHouse schema: cannot reach ClickHouse at ")
	}, func() { t.Logf("last /readyz: %q", body) })
	if !strings.HasPrefix(body, "ready\n") {
		t.Fatalf("/readyz body %q", body)
	}
}

// An edge started while Kafka is away answers at once, spooling, and says
// degraded; once a broker answers, it creates the topics and drains.
func TestEdgeStartsWhileKafkaIsAway(t *testing.T) {
	edge, brokerAddr := freeAddr(t), freeAddr(t)
	startTrackstar(t, "edge", "--config", "../../examples/trackstar.yaml", "--brokers", brokerAddr,
		"--listen", edge, "--data", t.TempDir(), "--partitions", "2")
	noRedirect := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	var clickID string
	waitUntil(t, 30*time.Second, "the edge answers a click with Kafka away", func() bool {
		resp, err := noRedirect.Get("http://" + edge + "/click?offer_id=1&aff_id=7")
		if err != nil {
			return false
		}
		resp.Body.Close()
		loc, _ := url.Parse(resp.Header.Get("Location"))
		if resp.StatusCode != http.StatusFound || loc == nil {
			t.Fatalf("click with Kafka away: %d", resp.StatusCode)
		}
		clickID = loc.Query().Get("click_id")
		return true
	})
	if code, body := httpGet(t, "http://"+edge+"/readyz"); code != 503 || !strings.Contains(body, "degraded") {
		t.Fatalf("/readyz with Kafka away: %d %q", code, body)
	}

	b, err := bus.StartEmbeddedBroker(brokerAddr, "")
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	waitUntil(t, 90*time.Second, "the spool drained", func() bool {
		code, _ := httpGet(t, "http://"+edge+"/readyz")
		return code == 200
	})
	waitUntil(t, 30*time.Second, "the spooled click in trackstar.clicks", func() bool {
		for p := range 2 {
			conn, err := kafka.DialLeader(context.Background(), "tcp", brokerAddr, bus.TopicClicks, p)
			if err != nil {
				return false
			}
			conn.SetReadDeadline(time.Now().Add(2 * time.Second))
			batch := conn.ReadBatch(1, 1<<20)
			for {
				m, err := batch.ReadMessage()
				if err != nil {
					break
				}
				if string(m.Key) == clickID {
					batch.Close()
					conn.Close()
					return true
				}
			}
			batch.Close()
			conn.Close()
		}
		return false
	})
}

func httpGet(t *testing.T, u string) (int, string) {
	t.Helper()
	resp, err := http.Get(u)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// startTrackstar runs the test binary as trackstar with args until the test
// ends (SIGTERM, then the wait), showing its log if the test failed.
func startTrackstar(t *testing.T, args ...string) {
	t.Helper()
	cmd := exec.Command(os.Args[0], args...)
	cmd.Env = append(os.Environ(), "TRACKSTAR_E2E_CHILD=1")
	var logs testenv.Buffer
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		_ = cmd.Wait()
		if t.Failed() {
			t.Logf("trackstar log:\n%s", logs.String())
		}
	})
}

// `dispatcher --drain-retries` is a job that ends: with no retry left it
// exits 0, its ops server with it. Other commands do not take the flag.
func TestDrainRetriesExitsWhenDone(t *testing.T) {
	addr := testenv.KafkaTopics(t, 1)
	data := t.TempDir()
	if err := os.Mkdir(filepath.Join(data, "dispatcher"), 0o755); err != nil { // a schedule, empty
		t.Fatal(err)
	}
	var out, errw strings.Builder
	done := make(chan error, 1)
	go func() {
		done <- run([]string{"dispatcher", "--drain-retries", "--config", "../../examples/trackstar.yaml", "--brokers", addr,
			"--data", data, "--ops-listen", "127.0.0.1:0", "--log-level", "warn"}, &out, &errw)
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("dispatcher --drain-retries with nothing scheduled: %v\n%s", err, errw.String())
		}
	case <-time.After(60 * time.Second):
		t.Fatalf("dispatcher --drain-retries with nothing scheduled did not exit\n%s", errw.String())
	}
	if err := run([]string{"edge", "--drain-retries"}, &out, &errw); err == nil || !strings.Contains(err.Error(), "drain-retries") {
		t.Fatalf("edge --drain-retries: %v, want an error naming the flag", err)
	}
}
