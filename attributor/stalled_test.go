package attributor

import (
	"bytes"
	"log/slog"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/segmentio/kafka-go"

	"github.com/trackstar/trackstar/internal/bus"
	"github.com/trackstar/trackstar/internal/testenv"
	"github.com/trackstar/trackstar/schemas"
)

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// TestChildStalledAttributor is member A of
// TestStalledMemberDoesNotTakeAnothersConversionsForItsOwn.
func TestChildStalledAttributor(t *testing.T) {
	spec := os.Getenv("TRACKSTAR_STALLED_CHILD")
	if spec == "" {
		t.Skip("runs only as the child process of TestStalledMemberDoesNotTakeAnothersConversionsForItsOwn")
	}
	addr, dir, _ := strings.Cut(spec, ",")
	cfg := testConfig(t, addr, dir)
	cfg.Grace = 3 * time.Second
	cfg.Logger = slog.New(slog.NewTextHandler(os.Stderr, nil))
	if err := Run(t.Context(), cfg); err != nil {
		t.Fatal(err)
	}
}

// Member A is stalled (SIGSTOP: a GC pause, a VM freeze) past its
// session; B takes the partition and decides a postback whose grace ran
// out, without moving the offsets (an earlier postback still waits). When
// A resumes, its generation ends and its shutdown notes where the
// partition's conversions end: it checks that the records since are its
// own, finds B's, and marks its state stale, so that when it gets the
// partition back it rebuilds. (Before, it noted B's record as its own,
// trusted its stale state, and attributed the postback when its click came
// late.)
func TestStalledMemberDoesNotTakeAnothersConversionsForItsOwn(t *testing.T) {
	addr := testenv.KafkaTopics(t, testPartitions)
	log := readConversions(t, addr)
	now := time.Now()
	sameKey := func(at time.Time, partition int) string {
		for {
			id := schemas.NewID(at)
			if bus.PartitionFor([]byte(id), testPartitions) == partition {
				return id
			}
		}
	}
	x1 := sameKey(now.Add(10*time.Minute), 0)
	x2 := schemas.Click{V: schemas.Version, ClickID: sameKey(now.Add(15*time.Second), 0), TS: now.Add(15 * time.Second).UnixMilli(),
		OfferID: 1, AdvertiserID: 1, AffID: 7}
	h1 := schemas.Postback{V: schemas.Version, EventID: schemas.NewID(now), ClickID: x1, TS: now.Add(10 * time.Minute).UnixMilli(), AdvertiserID: 1}
	h2 := schemas.Postback{V: schemas.Version, EventID: schemas.NewID(now), ClickID: x2.ClickID, TS: now.Add(time.Minute).UnixMilli(), AdvertiserID: 1}
	produce(t, addr, bus.TopicPostbacks, []kafka.Message{
		{Key: []byte(x1), Value: h1.AppendJSON(nil), Time: now},
		{Key: []byte(x2.ClickID), Value: h2.AppendJSON(nil), Time: now},
	})

	// A, a process of its own, holds both postbacks.
	dirA := t.TempDir()
	var out lockedBuffer
	cmd := exec.Command(os.Args[0], "-test.run=^TestChildStalledAttributor$", "-test.v")
	cmd.Env = append(os.Environ(), "TRACKSTAR_STALLED_CHILD="+addr+","+dirA)
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGCONT)
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		t.Logf("A's output:\n%s", out.String())
	})
	waitUntil(t, "A's worker of partition 0 to start", 30*time.Second, func() bool {
		return workerStarts(out.String()) >= 1
	})
	time.Sleep(2 * time.Second) // both postbacks read and held, offsets committed
	if err := cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	t.Logf("A stopped (SIGSTOP) at +%v", time.Since(now))

	// B takes over once A misses the rebalance, and decides h2 when its
	// grace is over.
	b := start(func() Config { c := testConfig(t, addr, t.TempDir()); c.Grace = 3 * time.Second; return c }())
	decided := func() []schemas.Conversion {
		var res []schemas.Conversion
		for _, c := range log.snapshot() {
			if c.PostbackEventID == h2.EventID {
				res = append(res, c)
			}
		}
		return res
	}
	waitUntil(t, "B to decide h2", 60*time.Second, func() bool { return len(decided()) > 0 })
	t.Logf("B decided h2 at +%v: %s/%s", time.Since(now), decided()[0].Status, decided()[0].RejectReason)
	b.stop(t)

	// A resumes; h2's click comes late.
	produce(t, addr, bus.TopicClicks, clickMessages([]schemas.Click{x2}))
	if err := cmd.Process.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "A's worker of partition 0 to start again", 60*time.Second, func() bool {
		return workerStarts(out.String()) >= 2
	})
	time.Sleep(3 * time.Second)
	starts := workerStarts(out.String())
	stale := strings.Count(out.String(), "local state is stale")
	t.Logf("A: %d starts of partition 0's worker, %d 'stale' lines", starts, stale)
	for _, line := range strings.Split(out.String(), "\n") {
		if strings.Contains(line, "partition=0") && (strings.Contains(line, "worker started") || strings.Contains(line, "stale") || strings.Contains(line, "rebuilt")) {
			t.Logf("A: %s", line)
		}
	}
	ds := decided()
	for _, c := range ds[1:] {
		if c != ds[0] {
			t.Errorf("postback h2 answered %s/%s v%d by B, then %s/%s v%d (conversion %s): A trusted stale state",
				ds[0].Status, ds[0].RejectReason, ds[0].Version, c.Status, c.RejectReason, c.Version, c.ConversionID)
		}
	}
	if stale == 0 {
		t.Errorf("A returned to partition 0 after B decided h2 there, and did not find its state stale")
	}
}

func workerStarts(out string) int {
	n := 0
	for _, line := range strings.Split(out, "\n") {
		if strings.Contains(line, "partition worker started") && strings.Contains(line, " partition=0 ") {
			n++
		}
	}
	return n
}
