package dispatcher

import (
	"context"
	"sync"
	"time"

	"github.com/segmentio/kafka-go"

	"github.com/trackstar/trackstar/internal/bus"
)

// lease says whether the consumer group has confirmed this member lately.
// A member whose process was paused past its session timeout (stopped, a
// frozen VM) has been expelled and its partitions given to another, which
// reads them from the last commit and delivers. On waking it still
// believes it owns them until kafka-go's next heartbeat is refused, and a
// fetch answered while it slept hands it conversions the new owner is
// sending too — or has sent a newer status of. So a conversion read from
// Kafka is sent only while the lease holds: until SessionTimeout after the
// last heartbeat the coordinator accepted was sent (it reached the
// coordinator after that, so the session runs at least that long).
type lease struct {
	mu      sync.Mutex
	until   time.Time     // monotonic; zero until a heartbeat is accepted
	renewed chan struct{} // closed at the next renewal
}

func newLease() *lease { return &lease{renewed: make(chan struct{})} }

// renew extends the lease to until, if that is later.
func (l *lease) renew(until time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if until.After(l.until) {
		l.until = until
	}
	close(l.renewed)
	l.renewed = make(chan struct{})
}

// check reports whether the lease holds now, and a channel closed at its
// next renewal.
func (l *lease) check() (bool, <-chan struct{}) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return time.Now().Before(l.until), l.renewed
}

// confirmMembership heartbeats for gen every interval until the generation
// ends, renewing the lease with every heartbeat the coordinator accepts.
// (kafka-go heartbeats too, but does not say when one succeeds.) A refused
// one — the member expelled, or a rebalance under way — renews nothing;
// kafka-go's own heartbeat then ends the generation.
func (d *dispatcher) confirmMembership(gctx context.Context, gen *kafka.Generation, interval time.Duration) {
	h := bus.NewHeartbeater(d.cfg.Brokers, d.cfg.Group, max(interval, time.Second))
	defer h.Close()
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		sent := time.Now()
		if h.Beat(gctx, gen.ID, gen.MemberID) == nil {
			d.engine.lease.renew(sent.Add(d.cfg.SessionTimeout))
		}
		select {
		case <-gctx.Done():
			return
		case <-t.C:
		}
	}
}
