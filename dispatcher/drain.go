package dispatcher

import (
	"context"
	"sync"
	"time"

	"github.com/segmentio/kafka-go"

	"github.com/trackstar/trackstar/internal/bus"
	"github.com/trackstar/trackstar/schemas"
)

// A dispatcher run with DrainRetries sends the retries of its schedule and
// nothing else (see Config.DrainRetries). The functions here are its own.

// stopWhenDrained ends a DrainRetries run once the schedule is empty: an
// entry leaves it only once its delivery is final and recorded (or moved
// to a later due time, which keeps it there), so nothing is left behind.
func (d *dispatcher) stopWhenDrained(ctx context.Context) {
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	lastLog := time.Now()
	for {
		n := d.engine.pending.Load()
		if n == 0 {
			d.log.Info("retry schedule drained; stopping")
			d.cancel()
			return
		}
		if time.Since(lastLog) >= time.Minute {
			d.log.Info("draining the retry schedule", "retries_pending", n)
			lastLog = time.Now()
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// followDeliveries keeps a draining dispatcher's version notes up to date
// with the status updates the group's members send. It reads every
// partition of trackstar.deliveries from DedupWindow ago, closes caughtUp
// once each has been read to where its end was, and then follows them
// until ctx ends. So a retry of an older status is superseded by a newer
// one another member sent, before the drain or during it, as it is in the
// schedule of the member that sent it.
func (d *dispatcher) followDeliveries(ctx context.Context, caughtUp chan<- struct{}) {
	client := &kafka.Client{Addr: kafka.TCP(d.cfg.Brokers...), Timeout: 10 * time.Second}
	n := 0
	for n == 0 {
		md, err := client.Metadata(ctx, &kafka.MetadataRequest{Topics: []string{bus.TopicDeliveries}})
		if err == nil {
			for _, t := range md.Topics {
				if t.Name == bus.TopicDeliveries && t.Error == nil {
					n = len(t.Partitions)
				}
			}
		}
		if n == 0 && !d.followRetry(ctx, "cannot read the partitions of "+bus.TopicDeliveries, err) {
			return
		}
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	left := n
	for q := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			d.followPartition(ctx, client, q, func() {
				mu.Lock()
				defer mu.Unlock()
				if left--; left == 0 {
					d.log.Info("read the group's recent deliveries; sending the schedule's retries", "partitions", n)
					close(caughtUp)
				}
			})
		}()
	}
	wg.Wait()
}

// followPartition follows partition q of trackstar.deliveries for
// followDeliveries, calling caughtUp once it has read up to where the
// partition ended when it started.
func (d *dispatcher) followPartition(ctx context.Context, client *kafka.Client, q int, caughtUp func()) {
	var start, end int64
	for {
		var err error
		end, err = bus.ListOffset(ctx, client, bus.TopicDeliveries, kafka.LastOffsetOf(q))
		if err == nil {
			start, err = bus.ListOffset(ctx, client, bus.TopicDeliveries, kafka.TimeOffsetOf(q, d.cfg.Now().Add(-d.cfg.DedupWindow)))
		}
		if err == nil {
			break
		}
		if !d.followRetry(ctx, "cannot find where to read "+bus.TopicDeliveries+" from", err) {
			return
		}
	}
	if start < 0 || start > end {
		start = end // nothing from DedupWindow ago on
	}
	if start == end {
		caughtUp()
		caughtUp = nil
	}
	r := kafka.NewReader(kafka.ReaderConfig{
		Brokers: d.cfg.Brokers, Topic: bus.TopicDeliveries, Partition: q,
		MinBytes: 1, MaxBytes: 8 << 20, MaxWait: 250 * time.Millisecond, ReadLagInterval: -1,
	})
	defer r.Close()
	if err := r.SetOffset(start); err != nil {
		d.fatal(err)
		return
	}
	for {
		m, err := r.FetchMessage(ctx)
		if err != nil {
			if !d.followRetry(ctx, "cannot read "+bus.TopicDeliveries, err) {
				return
			}
			continue
		}
		// Every record of a version 2 or later, whatever its outcome:
		// that status is on its way to the partner.
		if rec, err := schemas.DecodeDelivery(m.Value); err == nil && rec.Version >= 2 {
			if err := d.engine.store.noteVersion(rec.ConversionID, rec.Version, d.cfg.Now()); err != nil {
				d.fatal(err)
				return
			}
		}
		if caughtUp != nil && m.Offset+1 >= end {
			caughtUp()
			caughtUp = nil
		}
	}
}

// followRetry logs a failure of followDeliveries (at most once a while)
// and waits a second; it reports false when ctx ended instead.
func (d *dispatcher) followRetry(ctx context.Context, what string, err error) bool {
	if ctx.Err() != nil {
		return false
	}
	if d.learnLog.Allow() {
		d.log.Warn(what+"; retrying", "err", err)
	}
	select {
	case <-ctx.Done():
		return false
	case <-time.After(time.Second):
		return true
	}
}
