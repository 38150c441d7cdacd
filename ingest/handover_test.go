package ingest

import (
	"context"
	"encoding/binary"
	"io"
	"log/slog"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/trackstar/trackstar/internal/testenv"
	"github.com/trackstar/trackstar/schemas"
)

// Under steady load, with Kafka healthy again, the edge leaves spool mode:
// once the drainer has caught up it holds new events back for the moment
// it takes to drain the last ones appended. (Before, it waited for a
// moment with no append under way, which 16 or 64 concurrent senders never
// left it: the edge stayed in spool mode, and /readyz degraded, for as
// long as the load lasted.)
func TestSpoolHandsOverUnderSteadyLoad(t *testing.T) {
	te := edgeInSpoolMode(t, 0)
	l := sendFor(te.edge.prod, 4*time.Second, 64, 0)
	left := l.spoolLeftAfter(te)
	t.Logf("%d events sent, %d failed; spool mode left after %v", l.sent.Load(), l.failed.Load(), left)
	if left < 0 {
		t.Fatalf("Kafka healthy, yet the edge stayed in spool mode for all 4 s of load (%d events sent)", l.sent.Load())
	}
	if l.failed.Load() > 0 {
		t.Errorf("%d events failed", l.failed.Load())
	}
}

// The drainer's reads start at the first event not yet drained, so a read
// costs the same however many events were drained before it. (Before,
// each stepped over the deletions of every event drained since Pebble
// last compacted them away: 26 ms for the last 512 of 150,000 events,
// 0.4 ms after a compaction, and draining ran at a fifth of its speed.)
func TestSpoolReadSkipsDrainedEvents(t *testing.T) {
	sp, err := openSpool(t.TempDir(), 1<<40, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	defer sp.close()
	const n = 60_000
	key := []byte("0123456789abcdefghijklmnop")
	val := make([]byte, 300)
	var wg sync.WaitGroup
	for range 64 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range n / 64 {
				if err := sp.append(topicClicks, key, val, time.Now()); err != nil {
					panic(err)
				}
			}
		}()
	}
	wg.Wait()
	for sp.count.Load() > 512 {
		evs, err := sp.read(min(512, int(sp.count.Load()-512)), 512<<10)
		if err != nil {
			t.Fatal(err)
		}
		if err := sp.remove(evs); err != nil {
			t.Fatal(err)
		}
	}
	timeRead := func() time.Duration {
		best := time.Hour
		for range 5 {
			start := time.Now()
			evs, err := sp.read(512, 512<<10)
			if err != nil {
				t.Fatal(err)
			}
			best = min(best, time.Since(start))
			if len(evs) != 512 {
				t.Fatalf("read %d events, want 512", len(evs))
			}
		}
		return best
	}
	withDeletions := timeRead()
	var lo, hi [8]byte
	binary.BigEndian.PutUint64(hi[:], ^uint64(0))
	if err := sp.db.Compact(context.Background(), lo[:], hi[:], true); err != nil {
		t.Fatal(err)
	}
	compacted := timeRead()
	t.Logf("reading the last 512 of %d events: %v; after a compaction: %v", n, withDeletions, compacted)
	if withDeletions > 5*compacted+time.Millisecond {
		t.Errorf("a read of 512 events costs %v over the drained events' deletions, %v without them (%.0fx)",
			withDeletions, compacted, float64(withDeletions)/float64(compacted))
	}
}

// While the broker hangs (the case the produce timeout is for), a quiet
// edge in spool mode answers from the spool at once: a handover begins
// only once Kafka has taken a drain round. (Before, the drainer began one
// as soon as its read found less than a batch, and then hung in its
// drain: every request waited out the produce timeout at the gate.)
func TestHungBrokerMakesNoRequestWaitForAHandover(t *testing.T) {
	addr, cmd := startBrokerChild(t)
	te := startEdge(t, addr, t.TempDir(), func(c *Config) { c.ProduceTimeout = 300 * time.Millisecond })
	var tr traffic
	tr.send(t, te.url, 3)

	if err := cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	tr.send(t, te.url, 1) // times out, spooled: the spool is active
	// The abandoned original settles after the 10 s request timeout; the
	// drainer then reads the one event and begins a handover.
	time.Sleep(12 * time.Second)
	var slow, n int
	var total time.Duration
	end := time.Now().Add(8 * time.Second)
	for time.Now().Before(end) {
		start := time.Now()
		if r := get(t, te.url+"/click?offer_id=1&aff_id=7&sub1=x"); r.code != 302 {
			t.Fatalf("click: %d %q", r.code, r.body)
		}
		d := time.Since(start)
		n++
		total += d
		if d >= 80*time.Millisecond { // a wait for a handover is 100 ms
			slow++
		}
		time.Sleep(100 * time.Millisecond) // a quiet edge: 10 clicks a second
	}
	// A spool write may take that long on a busy machine now and then; a
	// wait for a handover is every request's.
	if slow > n/4 {
		t.Fatalf("%d of %d clicks over 8 s took 80 ms or more, though the spool was active and the broker hung (mean %v)", slow, n, total/time.Duration(n))
	}
	_ = cmd.Process.Signal(syscall.SIGCONT)
}

// A broker that acks every produce in 150 ms, well inside the 1 s produce
// timeout, lets a loaded edge leave spool mode: events wait for a
// handover about twice the drainer's last round. (Before, they waited
// 100 ms at most, less than one round: every handover ended with them
// spooled, and the edge stayed in spool mode, /readyz degraded.)
func TestSpoolHandsOverWithASlowBroker(t *testing.T) {
	te := edgeInSpoolMode(t, 150*time.Millisecond) // ProduceTimeout 1 s
	l := sendFor(te.edge.prod, 6*time.Second, 16, 5*time.Millisecond)
	left := l.spoolLeftAfter(te)
	t.Logf("%d events sent, %d failed; spool mode left after %v", l.sent.Load(), l.failed.Load(), left)
	if left < 0 {
		t.Fatalf("broker acks in 150 ms (produce timeout 1 s), yet the edge stayed in spool mode for all 6 s of load (%d events sent)", l.sent.Load())
	}
}

// A broker whose acks take a third of the produce timeout or more leaves
// the edge in spool mode, answering from the spool in a spool write: a
// handover and the produce after it would not fit in the timeout. (Before,
// the edge went in and out of spool mode, and the events handed over were
// spooled at the produce timeout, a second after they were sent.)
func TestVerySlowBrokerMakesNoRequestWaitOutTheTimeout(t *testing.T) {
	te := edgeInSpoolMode(t, 350*time.Millisecond) // ProduceTimeout 1 s
	l := sendFor(te.edge.prod, 8*time.Second, 16, 5*time.Millisecond)
	l.wait()
	t.Logf("%d sends (%d failed), %d took the produce timeout or more", l.sent.Load(), l.failed.Load(), l.slow.Load())
	if l.slow.Load() > 0 || l.failed.Load() > 0 {
		t.Fatalf("%d of %d sends took the %v produce timeout or more (%d failed), with a broker acking in 350 ms",
			l.slow.Load(), l.sent.Load(), te.edge.prod.timeout, l.failed.Load())
	}
}

// No handover begins after a drain round that took over a third of the
// produce timeout, not even through deactivateIfEmpty, when the read after
// such a round finds nothing stored but an append under way. (Before, that
// path began one.)
func TestNoHandoverAfterASlowRound(t *testing.T) {
	broker := testenv.KafkaControlled(t, testPartitions, kmsg.Produce, func(c *kfake.Cluster, _ kmsg.Request) kmsg.Response {
		c.SleepControl(func() { time.Sleep(450 * time.Millisecond) })
		return nil
	})
	te := startEdge(t, broker, t.TempDir(), nil) // ProduceTimeout 1 s
	p, sp := te.edge.prod, te.edge.sp
	const fakeSeq = 1 << 62
	inserted := make(chan struct{})
	hook := func() {
		select {
		case <-inserted:
			return
		default:
		}
		if p.drainRound.Load() > 0 && sp.count.Load() == 0 {
			// An append between taking its number and being written
			// (a handler's spool write, mid-fsync).
			sp.mu.Lock()
			sp.appending[fakeSeq] = struct{}{}
			sp.mu.Unlock()
			close(inserted)
		}
	}
	p.afterSettled.Store(&hook)
	if err := sp.append(topicClicks, schemas.AppendNewID(nil, time.Now()), []byte(`{"v":1}`), time.Now()); err != nil {
		t.Fatal(err)
	}
	select {
	case <-inserted:
	case <-time.After(10 * time.Second):
		t.Fatal("the drainer never finished its round")
	}
	round := time.Duration(p.drainRound.Load())
	deadline := time.Now().Add(time.Second)
	handover := false
	for time.Now().Before(deadline) && !handover {
		sp.mu.Lock()
		handover = sp.handover
		sp.mu.Unlock()
		time.Sleep(5 * time.Millisecond)
	}
	sp.mu.Lock()
	delete(sp.appending, fakeSeq)
	sp.mu.Unlock()
	sp.nudge()
	t.Logf("last drain round %v, produce timeout %v, handover began: %v", round, p.timeout, handover)
	if 3*round > p.timeout && handover {
		t.Fatalf("a handover began after a drain round of %v (> a third of the %v produce timeout)", round, p.timeout)
	}
}

// edgeInSpoolMode starts an edge whose spool holds one event, over a
// broker that acks every produce request after delay (0: at once).
func edgeInSpoolMode(t *testing.T, delay time.Duration) *testEdge {
	t.Helper()
	broker := testenv.KafkaControlled(t, testPartitions, kmsg.Produce, func(c *kfake.Cluster, _ kmsg.Request) kmsg.Response {
		if delay > 0 {
			c.SleepControl(func() { time.Sleep(delay) })
		}
		return nil
	})
	dir := t.TempDir()
	sp, err := openSpool(filepath.Join(dir, spoolDirName), 1<<30, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	if err := sp.append(topicClicks, schemas.AppendNewID(nil, time.Now()), []byte(`{"v":1}`), time.Now()); err != nil {
		t.Fatal(err)
	}
	sp.close()
	return startEdge(t, broker, dir, nil)
}

// load is what sendFor's senders did.
type load struct {
	ctx                context.Context
	wg                 sync.WaitGroup
	sent, failed, slow atomic.Int64 // slow: took the produce timeout or more
	left               time.Duration
}

// sendFor has senders goroutines hand clicks to p for d, each pausing
// between its sends; the returned load counts them.
func sendFor(p *producer, d time.Duration, senders int, pause time.Duration) *load {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	l := &load{ctx: ctx, left: -1}
	for range senders {
		l.wg.Go(func() {
			for ctx.Err() == nil {
				ev := p.get(topicClicks)
				ev.key = schemas.AppendNewID(ev.key[:0], time.Now())
				ev.value = append(ev.value[:0], `{"v":1}`...)
				start := time.Now()
				if err := p.send(ev); err == nil {
					l.sent.Add(1)
				} else {
					l.failed.Add(1)
				}
				if time.Since(start) >= p.timeout {
					l.slow.Add(1)
				}
				p.put(ev)
				time.Sleep(pause)
			}
		})
	}
	go func() { l.wg.Wait(); cancel() }()
	return l
}

// wait waits for the senders to stop.
func (l *load) wait() { <-l.ctx.Done(); l.wg.Wait() }

// spoolLeftAfter watches te's spool while the load runs and returns how
// long after its start the edge left spool mode (-1: never; also kept in
// l.left), once the senders have stopped.
func (l *load) spoolLeftAfter(te *testEdge) time.Duration {
	start := time.Now()
	for l.ctx.Err() == nil && l.left < 0 {
		if !te.edge.sp.active.Load() {
			l.left = time.Since(start)
		}
		time.Sleep(time.Millisecond)
	}
	l.wait()
	return l.left
}
