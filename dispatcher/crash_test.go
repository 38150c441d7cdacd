package dispatcher_test

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
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

const childEnv = "TRACKSTAR_DISPATCHER_CHILD"

// TestDispatcherChildProcess is not a test: it is the dispatcher process
// TestKilledMidScheduleResumes starts (re-executing the test binary) and
// kills with SIGKILL.
func TestDispatcherChildProcess(t *testing.T) {
	if os.Getenv(childEnv) == "" {
		t.Skip("the dispatcher process of TestKilledMidScheduleResumes")
	}
	h, err := catalog.NewHolder(os.Getenv("TRACKSTAR_TEST_CONFIG"))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	commitInterval := 100 * time.Millisecond
	if v := os.Getenv("TRACKSTAR_TEST_COMMIT_INTERVAL"); v != "" {
		if commitInterval, err = time.ParseDuration(v); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
	}
	err = dispatcher.Run(context.Background(), dispatcher.Config{
		Brokers:        []string{os.Getenv("TRACKSTAR_TEST_BROKER")},
		DataDir:        os.Getenv("TRACKSTAR_TEST_DATA"),
		Catalog:        h,
		CommitInterval: commitInterval,
		SessionTimeout: 6 * time.Second,
		// Every first attempt fails on purpose: the breaker is not under test.
		BreakerFailures: 1 << 20,
		Logger:          slog.New(slog.NewTextHandler(os.Stderr, nil)),
	})
	fmt.Fprintln(os.Stderr, "dispatcher.Run returned:", err)
	os.Exit(3)
}

// childProcess is one dispatcher process on a shared data dir.
type childProcess struct {
	cmd    *exec.Cmd
	stderr *testenv.Buffer
	done   chan struct{}
}

func startChild(t *testing.T, broker, dataDir, configPath string, env ...string) *childProcess {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestDispatcherChildProcess$", "-test.count=1")
	cmd.Env = append(os.Environ(), childEnv+"=1",
		"TRACKSTAR_TEST_BROKER="+broker, "TRACKSTAR_TEST_DATA="+dataDir, "TRACKSTAR_TEST_CONFIG="+configPath)
	cmd.Env = append(cmd.Env, env...)
	c := &childProcess{cmd: cmd, stderr: &testenv.Buffer{}, done: make(chan struct{})}
	cmd.Stderr = c.stderr
	cmd.Stdout = c.stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("cannot start the dispatcher process: %v", err)
	}
	go func() {
		_ = cmd.Wait()
		close(c.done)
	}()
	t.Cleanup(func() {
		c.kill()
		if t.Failed() {
			t.Logf("dispatcher process output:\n%s", c.stderr.String())
		}
	})
	return c
}

// kill sends SIGKILL: no shutdown, no final commit, no flush.
func (c *childProcess) kill() {
	_ = c.cmd.Process.Kill()
	<-c.done
}

// committed returns the group's committed offsets of trackstar.conversions, summed.
func committed(t *testing.T, addr string, partitions int) int64 {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var ps []int
	for p := range partitions {
		ps = append(ps, p)
	}
	resp, err := (&kafka.Client{Addr: kafka.TCP(addr)}).OffsetFetch(ctx, &kafka.OffsetFetchRequest{
		GroupID: dispatcher.DefaultGroup, Topics: map[string][]int{bus.TopicConversions: ps},
	})
	if err != nil {
		return -1
	}
	var sum int64
	for _, p := range resp.Topics[bus.TopicConversions] {
		if p.CommittedOffset > 0 {
			sum += p.CommittedOffset
		}
	}
	return sum
}

// A dispatcher killed with SIGKILL in the middle of retry schedules, and
// restarted on the same data dir, resumes them: the next attempt is the
// second, not the first again, and no conversion is skipped — neither the
// scheduled ones, nor those produced while it was down, nor those it was
// busy with at a second kill.
func TestKilledMidScheduleResumes(t *testing.T) {
	if testing.Short() {
		t.Skip("restarts a dispatcher process three times")
	}
	var mu sync.Mutex
	successes := map[string]int{}
	p := newPartner(t, func(w http.ResponseWriter, r *http.Request, nth int) {
		if nth == 1 {
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
		mu.Lock()
		successes[r.Header.Get("X-Trackstar-Conversion-Id")]++
		mu.Unlock()
	})
	succeeded := func(cs []schemas.Conversion) int {
		mu.Lock()
		defer mu.Unlock()
		n := 0
		for _, c := range cs {
			if successes[c.ConversionID] > 0 {
				n++
			}
		}
		return n
	}
	const parts = 2
	addr := testenv.KafkaTopics(t, parts)
	recs := collect(t, addr, bus.TopicDeliveries, parts)
	dataDir := t.TempDir()
	configPath := configFile(t, true, "2s", "[3s, 3s]", affiliate(7, p.srv.URL+"/pb?tx={conversion_id}"))
	batch := func(n int) []schemas.Conversion {
		var cs []schemas.Conversion
		for range n {
			cs = append(cs, newConversion(7))
		}
		return cs
	}

	// 1. Every conversion's first attempt fails and its retry is durably
	// scheduled (the offsets are committed only then); SIGKILL before the
	// retries are due.
	first := batch(20)
	produce(t, addr, first...)
	child := startChild(t, addr, dataDir, configPath)
	waitFor(t, "every first attempt recorded as retrying and every offset committed", func() bool {
		n := 0
		for _, c := range first {
			if recs.hasOutcome(t, c.ConversionID, schemas.OutcomeRetrying) {
				n++
			}
		}
		return n == len(first) && committed(t, addr, parts) == int64(len(first))
	})
	child.kill()
	killedAt := time.Now()
	if n := succeeded(first); n != 0 {
		t.Fatalf("%d conversions succeeded before their retries were due", n)
	}

	// 2. Conversions produced while the dispatcher is down. The restarted
	// dispatcher sends the scheduled retries, as attempt 2.
	second := batch(20)
	produce(t, addr, second...)
	child = startChild(t, addr, dataDir, configPath)
	waitFor(t, "every scheduled retry delivered after the restart", func() bool {
		for _, c := range first {
			if !recs.hasOutcome(t, c.ConversionID, schemas.OutcomeDelivered) {
				return false
			}
		}
		return true
	})
	for _, c := range first {
		reqs := p.requestsFor(c.ConversionID)
		if len(reqs) != 2 {
			t.Fatalf("conversion %s: partner got %d requests, want 2 (one before the kill, one after)", c.ConversionID, len(reqs))
		}
		if reqs[1].at.Before(killedAt) {
			t.Fatalf("conversion %s retried before the kill", c.ConversionID)
		}
		ds := recs.deliveries(t, c.ConversionID)
		if len(ds) != 2 || ds[0].Attempt != 1 || ds[0].Outcome != schemas.OutcomeRetrying || ds[1].Attempt != 2 || ds[1].Outcome != schemas.OutcomeDelivered {
			t.Fatalf("conversion %s: records %+v; want attempt 1 retrying, attempt 2 delivered", c.ConversionID, ds)
		}
	}

	// 3. SIGKILL again while the second batch is on its way, restart, and
	// every conversion is delivered in the end.
	waitFor(t, "the second batch under way", func() bool {
		for _, c := range second {
			if len(p.requestsFor(c.ConversionID)) > 0 {
				return true
			}
		}
		return false
	})
	child.kill()
	startChild(t, addr, dataDir, configPath)
	waitFor(t, "every conversion of the second batch delivered", func() bool { return succeeded(second) == len(second) })

	var dup []string
	mu.Lock()
	for id, n := range successes {
		if n > 1 {
			dup = append(dup, fmt.Sprintf("%s×%d", id, n))
		}
	}
	mu.Unlock()
	// At-least-once: a kill between a partner's answer and its record may
	// repeat a request, with the same idempotency key.
	t.Logf("%d conversions delivered across two SIGKILLs; repeated: %s", len(first)+len(second), strings.Join(dup, " "))
}

// A dispatcher killed with SIGKILL after delivering conversions whose
// offsets it has not committed yet reads them again after the restart; its
// dedup markers must have survived the kill, or every one is sent again.
// (Pebble keeps an unsynced write in memory until a later sync: a process
// kill loses it, not only a power cut.)
func TestKilledBeforeItsCommitDoesNotSendAgain(t *testing.T) {
	if testing.Short() {
		t.Skip("restarts a dispatcher process")
	}
	p := newPartner(t, func(w http.ResponseWriter, r *http.Request, nth int) {})
	addr := testenv.KafkaTopics(t, 1)
	recs := collect(t, addr, bus.TopicDeliveries, 1)
	dataDir := t.TempDir()
	configPath := configFile(t, true, "5s", "[10s]", affiliate(7, p.srv.URL+"/pb?tx={conversion_id}"))
	delivered := func(cs ...schemas.Conversion) func() bool {
		return func() bool {
			for _, c := range cs {
				if !recs.hasOutcome(t, c.ConversionID, schemas.OutcomeDelivered) {
					return false
				}
			}
			return true
		}
	}
	var convs []schemas.Conversion
	for range 20 {
		convs = append(convs, newConversion(7))
	}
	produce(t, addr, convs...)
	// No commit before the kill: the restart reads every conversion again.
	child := startChild(t, addr, dataDir, configPath, "TRACKSTAR_TEST_COMMIT_INTERVAL=1h")
	waitFor(t, "every conversion delivered", delivered(convs...))
	// The markers follow the records, in the same finalizer batch, and
	// the finalizer syncs a batch's markers before it writes the next
	// batch's records: once a conversion produced now has its record,
	// theirs are durable. (The later one's own marker is not checked.)
	later := newConversion(7)
	produce(t, addr, later)
	waitFor(t, "a later conversion delivered", delivered(later))
	child.kill()
	if got := committed(t, addr, 1); got > 0 {
		t.Fatalf("offsets committed before the kill (%d): the test needs them read again", got)
	}

	startChild(t, addr, dataDir, configPath, "TRACKSTAR_TEST_COMMIT_INTERVAL=1h")
	// One more conversion behind them in the partition: once it is
	// delivered, the restarted dispatcher has read the 20 again.
	last := newConversion(7)
	produce(t, addr, last)
	waitFor(t, "the conversion after them delivered", delivered(last))
	time.Sleep(200 * time.Millisecond)
	for _, c := range convs {
		if n := len(p.requestsFor(c.ConversionID)); n != 1 {
			t.Fatalf("conversion %s: partner got %d requests across the kill, want 1", c.ConversionID, n)
		}
	}
}

// TestShutdownCommitsWhatTheDrainFinished: a postback in flight when the
// dispatcher is told to stop is finished and recorded during the drain, so
// its offset must be committed before Run returns. Otherwise the next owner
// of the partition (another dispatcher after a rolling deploy, with a data
// dir of its own and so no dedup marker) sends the partner the postback
// again.
func TestShutdownCommitsWhatTheDrainFinished(t *testing.T) {
	inFlight := make(chan struct{})
	var once sync.Once
	p := newPartner(t, func(w http.ResponseWriter, r *http.Request, nth int) {
		if nth == 1 {
			once.Do(func() { close(inFlight) })
			time.Sleep(1500 * time.Millisecond) // well within the 5s timeout
		}
	})
	addr := testenv.KafkaTopics(t, 1)
	recs := collect(t, addr, bus.TopicDeliveries, 1)
	cat := holder(t, true, "5s", "[1s]", affiliate(7, p.srv.URL+"/pb?tx={conversion_id}"))

	// Dispatcher A: the conversion is in flight when it is told to stop.
	ctxA, cancelA := context.WithCancel(context.Background())
	doneA := make(chan error, 1)
	go func() {
		doneA <- dispatcher.Run(ctxA, dispatcher.Config{
			Brokers: []string{addr}, Catalog: cat, DataDir: t.TempDir(),
			Registry: prometheus.NewRegistry(), Logger: testLogger(t), CommitInterval: 100 * time.Millisecond,
		})
	}()
	c := newConversion(7)
	produce(t, addr, c)
	select {
	case <-inFlight:
	case <-time.After(30 * time.Second):
		t.Fatal("the partner never got the postback")
	}
	cancelA()
	select {
	case err := <-doneA:
		if err != nil {
			t.Fatalf("dispatcher A: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("dispatcher A did not stop")
	}
	if !recs.hasOutcome(t, c.ConversionID, schemas.OutcomeDelivered) {
		// The record may still be on its way to the collector.
		waitFor(t, "the delivered record", func() bool { return recs.hasOutcome(t, c.ConversionID, schemas.OutcomeDelivered) })
	}
	got := committed(t, addr, 1)

	// Dispatcher B takes over the partition with a data dir of its own.
	startDispatcher(t, dispatcher.Config{Brokers: []string{addr}, Catalog: cat})
	c2 := newConversion(7)
	produce(t, addr, c2)
	waitFor(t, "dispatcher B to deliver a later conversion", func() bool {
		return recs.hasOutcome(t, c2.ConversionID, schemas.OutcomeDelivered)
	})
	n := len(p.requestsFor(c.ConversionID))

	if got != 1 || n != 1 {
		t.Fatalf("after a clean shutdown that finished the delivery during the drain: committed offset %d (want 1); "+
			"the partner got the postback %d times (want 1)", got, n)
	}
}

// A dispatcher the group expels (its session expired: a long pause) and
// that then rejoins must learn again what happened to its partitions
// meanwhile: another member owned them and delivered. It is not the
// member's next generation, so it forgets what it had learned.
func TestExpelledMemberLearnsAgain(t *testing.T) {
	if testing.Short() {
		t.Skip("pauses a dispatcher process past its session timeout")
	}
	p := newPartner(t, func(w http.ResponseWriter, r *http.Request, nth int) {})
	addr := testenv.KafkaTopics(t, 1)
	recs := collect(t, addr, bus.TopicDeliveries, 1)
	configPath := configFile(t, true, "2s", "[1s]", affiliate(7, p.srv.URL+"/pb?tx={conversion_id}"))
	joins := func(c *childProcess) int { return strings.Count(c.stderr.String(), `msg="joined consumer group"`) }

	child := startChild(t, addr, t.TempDir(), configPath)
	first := newConversion(7)
	produce(t, addr, first)
	waitFor(t, "the dispatcher process to deliver", func() bool {
		return recs.hasOutcome(t, first.ConversionID, schemas.OutcomeDelivered)
	})
	if err := child.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	cont := func() { _ = child.cmd.Process.Signal(syscall.SIGCONT) }
	defer cont()

	// While it is paused, and once its session has expired, another
	// dispatcher owns the partition and delivers a conversion.
	cat := holder(t, true, "2s", "[1s]", affiliate(7, p.srv.URL+"/pb?tx={conversion_id}"))
	_, stopOther := startStoppableDispatcher(t, dispatcher.Config{Brokers: []string{addr}, Catalog: cat, SessionTimeout: 6 * time.Second})
	c := newConversion(7)
	produce(t, addr, c)
	waitFor(t, "the other dispatcher to deliver", func() bool { return recs.hasOutcome(t, c.ConversionID, schemas.OutcomeDelivered) })
	stopOther()

	cont()
	waitFor(t, "the paused dispatcher to rejoin", func() bool { return joins(child) >= 2 })
	produce(t, addr, c) // read again, as after an attributor's rebuild
	waitFor(t, "the replay to be read", func() bool {
		return strings.Contains(child.stderr.String(), "learned the recent deliveries") ||
			len(p.requestsFor(c.ConversionID)) > 1
	})
	time.Sleep(500 * time.Millisecond) // a repeat would be on its way by now
	if n := len(p.requestsFor(c.ConversionID)); n != 1 {
		t.Fatalf("the partner got %d requests for a conversion delivered once, then read again by a member that had been expelled", n)
	}
}

// A member paused past its session timeout is expelled, and another takes
// its partitions and delivers what was produced meanwhile. On waking, the
// expelled member still believes it owns them until kafka-go's next
// heartbeat is refused, and a fetch the broker answered while it slept
// hands it conversions at once. It must send none of them: without its
// lease (see lease.go) the partner got them twice, pending statuses after
// approved ones among them.
func TestResumedExpelledMemberSendsNothingItRead(t *testing.T) {
	if testing.Short() {
		t.Skip("pauses a dispatcher process past its session timeout")
	}
	p := newPartner(t, func(w http.ResponseWriter, r *http.Request, nth int) {})
	addr := testenv.KafkaTopics(t, 6)
	recs := collect(t, addr, bus.TopicDeliveries, 6)
	aff := affiliate(7, p.srv.URL+"/pb?tx={conversion_id}&st={status}", "statuses: [pending, approved]")
	child := startChild(t, addr, t.TempDir(), configFile(t, true, "2s", "[1s]", aff))
	first := newConversion(7)
	produce(t, addr, first)
	waitFor(t, "the dispatcher process to deliver", func() bool {
		return recs.hasOutcome(t, first.ConversionID, schemas.OutcomeDelivered)
	})
	var pendings, approvals []schemas.Conversion
	for range 300 {
		c := newConversion(7)
		c.Status = schemas.StatusPending
		a := c
		a.Version, a.Status = 2, schemas.StatusApproved
		pendings, approvals = append(pendings, c), append(approvals, a)
	}
	time.Sleep(time.Second) // its readers wait in long-poll fetches
	if err := child.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	cont := func() { _ = child.cmd.Process.Signal(syscall.SIGCONT) }
	defer cont()
	produce(t, addr, pendings...) // the broker answers the sleeping member's fetches with them
	time.Sleep(time.Second)
	produce(t, addr, approvals...)

	// Once its session has expired, another member owns the partitions.
	cat := holder(t, true, "2s", "[1s]", aff)
	startDispatcher(t, dispatcher.Config{Brokers: []string{addr}, Catalog: cat, SessionTimeout: 6 * time.Second})
	waitFor(t, "the other member to deliver every approval", func() bool {
		for _, c := range pendings {
			if !recs.hasOutcome(t, c.ConversionID, schemas.OutcomeDelivered) {
				return false
			}
		}
		return true
	})
	time.Sleep(500 * time.Millisecond)
	cont()
	waitFor(t, "the woken member to rejoin", func() bool {
		return strings.Count(child.stderr.String(), `msg="joined consumer group"`) >= 2
	})
	time.Sleep(time.Second) // a repeat would be on its way by now

	bad, example := 0, ""
	for _, c := range pendings {
		s := strings.Join(p.statusesFor(c.ConversionID), ",")
		if s != "pending,approved" && s != "approved" {
			bad++
			example = c.ConversionID + ": " + s
		}
	}
	if bad > 0 {
		t.Fatalf("%d of %d conversions reached the partner otherwise than pending then approved, once each (e.g. %s)", bad, len(pendings), example)
	}
}
