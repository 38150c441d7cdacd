package dispatcher

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/segmentio/kafka-go"

	"github.com/trackstar/trackstar/internal/bus"
)

// lease says whether the consumer group has confirmed this member lately.
// A member whose process was stopped past its session timeout (SIGSTOP, a
// long stall) has been expelled and its partitions given to another, which
// reads them from the last commit and delivers. On waking it still
// believes it owns them until kafka-go's next heartbeat is refused, and a
// fetch answered while it slept hands it conversions the new owner is
// sending too — or has sent a newer status of. So a conversion read from
// Kafka is taken, and sent, only while the lease holds: until
// SessionTimeout after the last heartbeat the coordinator accepted was
// sent (it reached the coordinator after that, so the session runs at
// least that long). The clock is Go's monotonic one, which runs while a
// process is stopped; a virtual machine paused by its hypervisor may not
// advance it, and is not covered.
type lease struct {
	mu      sync.Mutex
	until   time.Time     // monotonic; zero until a heartbeat is accepted
	renewed chan struct{} // closed at the next renewal
	lastErr error         // of the last heartbeat, nil when accepted
	waiting int           // readers and requests waiting for the lease
	since   time.Time     // when waiting last rose from zero
}

func newLease() *lease { return &lease{renewed: make(chan struct{})} }

// renew extends the lease to until, if that is later.
func (l *lease) renew(until time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if until.After(l.until) {
		l.until = until
	}
	l.lastErr = nil
	close(l.renewed)
	l.renewed = make(chan struct{})
}

// refused records why a heartbeat did not renew the lease.
func (l *lease) refused(err error) {
	l.mu.Lock()
	l.lastErr = err
	l.mu.Unlock()
}

// wait blocks until the lease holds, and reports false when a or b (nil:
// never) is closed first.
func (l *lease) wait(a, b <-chan struct{}) bool {
	l.mu.Lock()
	if time.Now().Before(l.until) {
		l.mu.Unlock()
		return true
	}
	if l.waiting == 0 {
		l.since = time.Now()
	}
	l.waiting++
	defer func() {
		l.mu.Lock()
		l.waiting--
		l.mu.Unlock()
	}()
	for {
		renewed := l.renewed
		l.mu.Unlock()
		select {
		case <-renewed:
		case <-a:
			return false
		case <-b:
			return false
		}
		l.mu.Lock()
		if time.Now().Before(l.until) {
			l.mu.Unlock()
			return true
		}
	}
}

// health reports conversions waiting for the lease for longer than grace.
// (Between generations nothing waits: a rebalance that takes long is not
// reported.)
func (l *lease) health(grace time.Duration) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.waiting == 0 || time.Since(l.since) < grace {
		return nil
	}
	return fmt.Errorf("conversions read from Kafka are held: the group coordinator has not confirmed this member for %s (last heartbeat: %v)",
		time.Since(l.since).Round(time.Second), l.lastErr)
}

// confirmMembership heartbeats for gen every interval until the generation
// ends, renewing the lease with every heartbeat the coordinator accepts.
// (kafka-go heartbeats too, but does not say when one succeeds.) A refused
// one — the member expelled, or a rebalance under way — renews nothing;
// kafka-go's own heartbeat then ends the generation.
func (d *dispatcher) confirmMembership(gctx context.Context, gen *kafka.Generation, interval time.Duration) {
	h := d.heartbeater()
	defer h.Close()
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		sent := time.Now()
		if err := h.Beat(gctx, gen.ID, gen.MemberID); err == nil {
			d.engine.lease.renew(sent.Add(d.cfg.SessionTimeout))
		} else if gctx.Err() == nil {
			d.engine.lease.refused(err)
			if !errors.Is(err, kafka.RebalanceInProgress) && d.leaseLog.Allow() { // a rebalance ends the generation anyway
				d.log.Warn("the group coordinator did not confirm this member; conversions read from Kafka wait for it",
					"generation", gen.ID, "err", err)
			}
		}
		select {
		case <-gctx.Done():
			return
		case <-t.C:
		}
	}
}

// heartbeater returns a Heartbeater for this member's group. Each
// heartbeat may take up to half the session timeout: one answered late
// still reached the coordinator, and counts.
func (d *dispatcher) heartbeater() *bus.Heartbeater {
	return bus.NewHeartbeater(d.cfg.Brokers, d.cfg.Group, max(d.cfg.SessionTimeout/2, time.Second))
}
