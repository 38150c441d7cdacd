package dispatcher

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/segmentio/kafka-go"

	"github.com/trackstar/trackstar/internal/bus"
	"github.com/trackstar/trackstar/schemas"
)

// followDeliveries keeps a dispatcher's version notes up to date with the
// status updates every member of the group sends. It reads every
// partition of trackstar.deliveries from since (see followSince), closes
// caughtUp once each has been read to where its end was, and then follows
// them, and any partition added later, until ctx ends. The schedule's
// retries wait for caughtUp. So a retry of an older status is superseded
// by a newer one another member sent — while this one was stopped, or
// while it runs without the conversion's partition (it moved away in a
// rebalance after the retry was scheduled), or while it drains — as it is
// in the schedule of the member that sent it.
func (d *dispatcher) followDeliveries(ctx context.Context, since time.Time, caughtUp chan<- struct{}) {
	client := &kafka.Client{Addr: kafka.TCP(d.cfg.Brokers...), Timeout: 10 * time.Second}
	partitions := func() int {
		md, err := client.Metadata(ctx, &kafka.MetadataRequest{Topics: []string{bus.TopicDeliveries}})
		if err == nil {
			for _, t := range md.Topics {
				if t.Name == bus.TopicDeliveries && t.Error == nil {
					d.followOK(-1)
					return len(t.Partitions)
				}
			}
			err = errors.New("topic not found")
		}
		d.followFailed(ctx, -1, "cannot read the partitions of "+bus.TopicDeliveries, err)
		return 0
	}
	n := 0
	for n == 0 {
		if n = partitions(); n == 0 && !d.followPause(ctx) {
			return
		}
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	var mu sync.Mutex
	left := n
	follow := func(q int, from time.Time, caughtUp func()) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			d.followPartition(ctx, client, q, from, caughtUp)
		}()
	}
	total := n
	for q := range n {
		follow(q, since, func() {
			mu.Lock()
			defer mu.Unlock()
			if left--; left == 0 {
				d.log.Info("read the group's deliveries; sending the schedule's retries", "partitions", total, "since", since)
				close(caughtUp)
			}
		})
	}
	// Partitions added while the drain runs hold only new records.
	t := time.NewTicker(30 * time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		for m := partitions(); n < m; n++ {
			follow(n, time.Time{}, func() {})
		}
	}
}

// followSince is where followDeliveries starts reading
// trackstar.deliveries: at the time of the oldest conversion in the
// schedule (a newer status of it comes later), or DedupWindow ago if that
// is earlier, and at most versionDays back, as far as version notes reach.
func (d *dispatcher) followSince() (time.Time, error) {
	now := d.cfg.Now()
	since := now.Add(-d.cfg.DedupWindow)
	oldest, err := d.engine.store.oldestScheduledConversion()
	if err != nil {
		return time.Time{}, err
	}
	if !oldest.IsZero() && oldest.Before(since) {
		since = oldest.Add(-time.Minute) // a writer's clock a little behind
	}
	if floor := now.Add(-versionDays * 24 * time.Hour); since.Before(floor) {
		since = floor
	}
	return since, nil
}

// followPartition follows partition q of trackstar.deliveries for
// followDeliveries (see followStart), calling caughtUp once it has read
// up to where the partition ended when it started.
func (d *dispatcher) followPartition(ctx context.Context, client *kafka.Client, q int, from time.Time, caughtUp func()) {
	var start followPos
	var end int64
	for {
		var err error
		end, err = bus.ListOffset(ctx, client, bus.TopicDeliveries, kafka.LastOffsetOf(q))
		if err == nil {
			start, err = d.followStart(ctx, client, q, from, end)
		}
		if se := (storeError{}); errors.As(err, &se) {
			d.fatal(se.err)
			return
		}
		if err == nil {
			d.followOK(q)
			break
		}
		d.followFailed(ctx, q, "cannot find where to read "+bus.TopicDeliveries+" from", err)
		if !d.followPause(ctx) {
			return
		}
	}
	r := kafka.NewReader(kafka.ReaderConfig{
		Brokers: d.cfg.Brokers, Topic: bus.TopicDeliveries, Partition: q,
		MinBytes: 1, MaxBytes: 8 << 20, MaxWait: 250 * time.Millisecond, ReadLagInterval: -1,
	})
	defer r.Close()
	if err := r.SetOffset(start.next); err != nil {
		d.fatal(err)
		return
	}

	// Catching up, notes go in batches synced once at the end, as a
	// partition's learning does; then each is written as it comes. The
	// position read to goes with them (see setFollowed): into each batch,
	// then at most once a second, and once more at the end.
	l := d.engine.store.newLearner(d.cfg.Now(), d.cfg.DedupWindow)
	l.notesOnly = true
	defer l.close()
	next, saved := start.next, start.next
	pos := func() followPos { return followPos{next: next, since: start.since} }
	var savedAt time.Time
	save := func() bool {
		if next == saved {
			return true
		}
		if err := setFollowed(d.engine.store.db, q, pos()); err != nil {
			d.fatal(err)
			return false
		}
		saved, savedAt = next, time.Now()
		return true
	}
	defer func() {
		if l == nil {
			save()
		}
	}()
	caught := func() bool {
		if err := setFollowed(l.b, q, pos()); err != nil {
			d.fatal(err)
			return false
		}
		saved, savedAt = next, time.Now()
		if err := l.finish(); err != nil {
			d.fatal(err)
			return false
		}
		caughtUp()
		l = nil
		return true
	}
	if start.next >= end && !caught() {
		return
	}
	for {
		// A fetch waits a second while catching up, to notice the end; 3 s
		// while following, to notice a failed read working again.
		wait := 3 * time.Second
		if l != nil {
			wait = time.Second
		}
		fctx, cancel := context.WithTimeout(ctx, wait)
		m, err := r.FetchMessage(fctx)
		idle := errors.Is(err, context.DeadlineExceeded) && ctx.Err() == nil
		cancel()
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			if !idle {
				d.followFailed(ctx, q, "cannot read "+bus.TopicDeliveries, err)
				if !d.followPause(ctx) {
					return
				}
				continue
			}
			// Nothing came. Catching up, the records up to the end may
			// have gone (retention) since it was listed; following, a
			// failed read may work again, which only a request shows.
			if l == nil && !d.followFailing(q) {
				continue
			}
			first, err := bus.ListOffset(ctx, client, bus.TopicDeliveries, kafka.FirstOffsetOf(q))
			if err != nil {
				d.followFailed(ctx, q, "cannot read "+bus.TopicDeliveries, err)
				continue
			}
			d.followOK(q)
			if l != nil && first >= end {
				next = max(next, first)
				if !caught() {
					return
				}
			}
			continue
		}
		d.followOK(q)
		d.metrics.followed.Inc()
		next = m.Offset + 1
		rec, err := schemas.DecodeDelivery(m.Value)
		switch {
		case err != nil:
		case l != nil:
			if err := l.add(&rec); err != nil {
				d.fatal(err)
				return
			}
		case rec.Version >= 2:
			// Every record of a version 2 or later, whatever its outcome:
			// that status is on its way to the partner. Not synced: a
			// restart reads these records again, as its position is
			// written after the note.
			if err := d.engine.store.noteVersion(rec.ConversionID, rec.Version, d.cfg.Now(), pebble.NoSync); err != nil {
				d.fatal(err)
				return
			}
		}
		if l != nil {
			if err := setFollowed(l.b, q, pos()); err != nil {
				d.fatal(err)
				return
			}
			if next >= end && !caught() {
				return
			}
		} else if time.Since(savedAt) >= time.Second && !save() {
			return
		}
	}
}

// followStart returns where followPartition starts reading partition q:
// where this dispatcher stopped reading it last time, when it has read
// every record since from (zero: since the first) up to there and the
// partition still reaches it (a topic deleted and created again starts
// over); else the first record of time from, or end when there is none.
// So a restart reads on where it stopped, unless its schedule now holds a
// conversion older than what it has read (see followSince).
func (d *dispatcher) followStart(ctx context.Context, client *kafka.Client, q int, from time.Time, end int64) (followPos, error) {
	pos, ok, err := d.engine.store.followed(q)
	if err != nil {
		return followPos{}, storeError{err}
	}
	covered := pos.since.IsZero() || (!from.IsZero() && !from.Before(pos.since))
	if ok && covered && pos.next <= end {
		first, err := bus.ListOffset(ctx, client, bus.TopicDeliveries, kafka.FirstOffsetOf(q))
		pos.next = max(pos.next, first)
		return pos, err
	}
	req := kafka.FirstOffsetOf(q)
	if !from.IsZero() {
		req = kafka.TimeOffsetOf(q, from)
	}
	start, err := bus.ListOffset(ctx, client, bus.TopicDeliveries, req)
	if err == nil && (start < 0 || start > end) {
		start = end // nothing from then on
	}
	return followPos{next: start, since: from}, err
}

// followFailed records a failure of followDeliveries in reading
// partition q (-1: the partition count) for /readyz, and logs it at most
// once a while.
func (d *dispatcher) followFailed(ctx context.Context, q int, what string, err error) {
	if ctx.Err() != nil {
		return
	}
	err = fmt.Errorf("%s: %w", what, err)
	d.followMu.Lock()
	d.followErrs[q] = err
	d.followMu.Unlock()
	if d.learnLog.Allow() {
		d.log.Warn("cannot follow the group's deliveries; retrying", "partition", q, "err", err)
	}
}

// followOK records that reading partition q (-1: the partition count)
// works again.
func (d *dispatcher) followOK(q int) {
	d.followMu.Lock()
	delete(d.followErrs, q)
	d.followMu.Unlock()
}

// followFailing reports whether reading partition q failed last time.
func (d *dispatcher) followFailing(q int) bool {
	d.followMu.Lock()
	defer d.followMu.Unlock()
	return d.followErrs[q] != nil
}

// followHealth reports what followDeliveries cannot read.
func (d *dispatcher) followHealth() error {
	d.followMu.Lock()
	defer d.followMu.Unlock()
	if _, err := failingPartitions(d.followErrs); err != nil {
		return fmt.Errorf("cannot follow the group's deliveries, so retries may wait or an older status be sent after a newer one: %w", err)
	}
	return nil
}

// followPause waits a second before followDeliveries tries again; it
// reports false when ctx ended instead.
func (d *dispatcher) followPause(ctx context.Context) bool {
	select {
	case <-ctx.Done():
		return false
	case <-time.After(time.Second):
		return true
	}
}
