package dispatcher

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/segmentio/kafka-go"

	"github.com/trackstar/trackstar/internal/bus"
)

// offsetTracker follows the offsets read from one partition in one
// generation and says up to where they may be committed: the first offset
// whose conversion is neither finally delivered nor durably scheduled.
// kafka-go's CommitMessages would commit the highest offset handed to it,
// which skips the conversions still in flight below it after a crash.
type offsetTracker struct {
	mu   sync.Mutex
	offs []int64 // read and not yet committable, in read order (ascending)
	done []bool
	next int64 // the offset after the last one read; -1 before any
}

func newOffsetTracker(start int64) *offsetTracker {
	if start < 0 {
		start = -1 // kafka.FirstOffset or LastOffset: nothing to commit yet
	}
	return &offsetTracker{next: start}
}

// add records that off was read. Offsets arrive in ascending order.
func (t *offsetTracker) add(off int64) {
	t.mu.Lock()
	t.offs = append(t.offs, off)
	t.done = append(t.done, false)
	t.next = off + 1
	t.mu.Unlock()
}

// markDone records that off's conversion is final or durably scheduled.
// Marking an offset not added, or twice, does nothing.
func (t *offsetTracker) markDone(off int64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	i := sort.Search(len(t.offs), func(i int) bool { return t.offs[i] >= off })
	if i == len(t.offs) || t.offs[i] != off {
		return
	}
	t.done[i] = true
	// Drop the done prefix; the backing arrays are reused once half is dead.
	n := 0
	for n < len(t.done) && t.done[n] {
		n++
	}
	if n == 0 {
		return
	}
	t.offs, t.done = t.offs[n:], t.done[n:]
	if cap(t.offs) > 1024 && len(t.offs) < cap(t.offs)/4 {
		t.offs = append([]int64(nil), t.offs...)
		t.done = append([]bool(nil), t.done...)
	}
}

// position returns the offset to commit (the next one to read after a
// restart), or -1 when there is nothing to commit.
func (t *offsetTracker) position() int64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	if len(t.offs) > 0 {
		return t.offs[0]
	}
	return t.next
}

// pending returns how many offsets read are not yet committable.
func (t *offsetTracker) pending() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.offs)
}

// consume runs the consumer group until ctx ends. On the way out the
// generation's committer waits for drained (the engine has written out
// what was in flight), commits, and only then is the group left.
func (d *dispatcher) consume(ctx context.Context, drained <-chan struct{}) {
	// A member that is losing its partitions finishes its requests in
	// flight before it rejoins (see handOver); the coordinator waits up to
	// the rebalance timeout for it.
	rebalance := max(d.cfg.SessionTimeout, 2*d.cfg.Catalog.Current().Delivery.Timeout+10*time.Second)
	heartbeat := max(d.cfg.SessionTimeout/10, 100*time.Millisecond)
	cg, err := kafka.NewConsumerGroup(kafka.ConsumerGroupConfig{
		ID:                d.cfg.Group,
		Brokers:           d.cfg.Brokers,
		Topics:            []string{bus.TopicConversions},
		StartOffset:       kafka.FirstOffset, // a new group must not skip conversions produced before it
		HeartbeatInterval: heartbeat,
		SessionTimeout:    d.cfg.SessionTimeout,
		RebalanceTimeout:  rebalance,
		JoinGroupBackoff:  time.Second,
		Timeout:           10 * time.Second,
	})
	if err != nil {
		d.fatal(err)
		return
	}
	defer cg.Close()
	// handedOver is closed when the last generation's commit loop has
	// returned: its hand-over done and its last commit made.
	var handedOver chan struct{}
	lastGen := int32(-1)
	for {
		gen, err := cg.Next(ctx)
		if err == nil && gen.ID != lastGen+1 || err != nil && ctx.Err() == nil {
			// Not the generation after our last one: the group went on
			// without this member for a while (its session expired, say),
			// and another member may have owned any partition meanwhile.
			d.forgetLearned(nil)
		}
		if err == nil {
			lastGen = gen.ID
		}
		if err != nil {
			if ctx.Err() != nil {
				// Closing the group ends the generation at once, and with
				// it the committer's wait: stay until the engine has
				// drained, so that what it finished is committed first.
				// Otherwise the partition's next owner, which has no dedup
				// marker of ours, sends those postbacks again.
				<-drained
				return
			}
			d.log.Warn("consumer group error; rejoining", "group", d.cfg.Group, "err", err)
			continue
		}
		// kafka-go waits for a generation's functions before it rejoins
		// only when they were started before the generation ended; one
		// that ended while we set it up (a rebalance right after the
		// join) runs them anyway, unwaited. Its hand-over would then run
		// beside this generation, and its revoke drop what this one's
		// readers queued. So a generation reads nothing before the last
		// one has handed over.
		if handedOver != nil {
			<-handedOver
		}
		done := make(chan struct{})
		handedOver = done
		d.joined.Store(true)
		var parts []int
		trackers := map[int]*offsetTracker{}
		var readers sync.WaitGroup
		assigned := map[int]bool{}
		for _, a := range gen.Assignments[bus.TopicConversions] {
			assigned[a.ID] = true
		}
		d.forgetLearned(assigned) // another member may own the others meanwhile
		for _, a := range gen.Assignments[bus.TopicConversions] {
			parts = append(parts, a.ID)
			tr := newOffsetTracker(a.Offset)
			trackers[a.ID] = tr
			readers.Add(1)
			gen.Start(func(gctx context.Context) {
				d.readPartition(ctx, gctx, a.ID, a.Offset, tr)
				readers.Done()
				// Only the committer ends a generation on shutdown, after
				// the drain: a reader that returned now would end it
				// before the final commit.
				<-gctx.Done()
			})
		}
		gen.Start(func(gctx context.Context) {
			d.confirmMembership(gctx, gen, heartbeat)
		})
		sort.Ints(parts)
		d.log.Info("joined consumer group", "group", d.cfg.Group, "generation", gen.ID, "partitions", parts)
		gen.Start(func(gctx context.Context) {
			defer close(done)
			d.commitLoop(ctx, gctx, gen, trackers, &readers, rebalance*3/4, heartbeat, drained)
		})
	}
}

// readPartition hands every conversion of one partition to the engine
// until the generation or the dispatcher ends. It never waits for a
// partner: the engine queues, or defers to the schedule. Once it returns
// it submits nothing more.
func (d *dispatcher) readPartition(runCtx, gctx context.Context, partition int, offset int64, tr *offsetTracker) {
	ctx, cancel := context.WithCancel(gctx)
	defer cancel()
	stop := context.AfterFunc(runCtx, cancel)
	defer stop()
	if !d.learn(ctx, partition) {
		return
	}

	r := kafka.NewReader(kafka.ReaderConfig{
		Brokers:   d.cfg.Brokers,
		Topic:     bus.TopicConversions,
		Partition: partition,
		// Conversions are few and a partner waits on each: read them as
		// they come, not in the large fetches of the click readers.
		MinBytes: 1,
		MaxBytes: 16 << 20,
		MaxWait:  250 * time.Millisecond,
	})
	defer r.Close()
	if err := r.SetOffset(offset); err != nil {
		d.fatal(err)
		return
	}
	for {
		m, err := r.FetchMessage(ctx)
		if err != nil {
			if ctx.Err() != nil {
				break
			}
			d.log.Warn("cannot read conversions; retrying", "partition", partition, "err", err)
			select {
			case <-ctx.Done():
			case <-time.After(time.Second):
			}
			continue
		}
		// Nothing is taken while the group has not confirmed this member
		// lately (see lease): after a stop past the session timeout, what
		// this fetch brought is the next owner's.
		if !d.engine.lease.wait(ctx.Done(), nil) {
			break
		}
		off := m.Offset
		tr.add(off)
		d.engine.submit(ctx, m, func() { tr.markDone(off) })
	}
}

// forgetLearned forgets the partitions not in keep (all when keep is nil):
// they must be learned again before they are read. (A learn failure is
// dropped by learn itself whenever it returns.)
func (d *dispatcher) forgetLearned(keep map[int]bool) {
	d.learnedMu.Lock()
	defer d.learnedMu.Unlock()
	for p := range d.learned {
		if !keep[p] {
			delete(d.learned, p)
		}
	}
}

// dropLearnFailure forgets that learning partition failed.
func (d *dispatcher) dropLearnFailure(partition int) {
	d.learnedMu.Lock()
	delete(d.learnFailing, partition)
	d.learnedMu.Unlock()
}

// learnHealth reports the partitions not read because their learning
// fails.
func (d *dispatcher) learnHealth() error {
	d.learnedMu.Lock()
	defer d.learnedMu.Unlock()
	if parts, err := failingPartitions(d.learnFailing); err != nil {
		return fmt.Errorf("partitions %v not read: cannot read their recent deliveries first: %w", parts, err)
	}
	return nil
}

// failingPartitions returns the partitions of errs in order, and the
// error of the first; nil when errs is empty.
func failingPartitions(errs map[int]error) ([]int, error) {
	if len(errs) == 0 {
		return nil, nil
	}
	parts := slices.Sorted(maps.Keys(errs))
	return parts, errs[parts[0]]
}

// learn runs learnPartition for a partition new to this member, retrying
// until it succeeds; it reports false when ctx ends first. A partition the
// member kept from the generation before is known already: no other member
// owned it in between. (consume forgets every partition when the member
// missed a generation.)
func (d *dispatcher) learn(ctx context.Context, partition int) bool {
	d.learnedMu.Lock()
	known := d.learned[partition]
	d.learnedMu.Unlock()
	if known {
		return true
	}
	client := &kafka.Client{Addr: kafka.TCP(d.cfg.Brokers...), Timeout: 10 * time.Second}
	for {
		start := time.Now()
		n, err := d.learnPartition(ctx, client, partition)
		if err == nil {
			if n > 0 {
				d.log.Info("learned the recent deliveries of a partition new to this dispatcher", "partition", partition,
					"deliveries", n, "took", time.Since(start).Round(time.Millisecond))
			}
			d.learnedMu.Lock()
			d.learned[partition] = true
			delete(d.learnFailing, partition)
			d.learnedMu.Unlock()
			return true
		}
		if ctx.Err() != nil {
			d.dropLearnFailure(partition) // no longer ours, or stopping
			return false
		}
		d.learnedMu.Lock()
		d.learnFailing[partition] = err
		d.learnedMu.Unlock()
		if d.learnLog.Allow() {
			d.log.Warn("cannot read the recent deliveries of a partition new to this dispatcher; retrying before reading its conversions",
				"partition", partition, "err", err)
		}
		select {
		case <-ctx.Done():
			d.dropLearnFailure(partition)
			return false
		case <-time.After(time.Second):
		}
	}
}

// commitLoop commits the trackers' positions every CommitInterval, and a
// last time when the generation ends — after the hand-over of its
// partitions — or, on shutdown, once the engine has drained.
func (d *dispatcher) commitLoop(runCtx, gctx context.Context, gen *kafka.Generation, trackers map[int]*offsetTracker,
	readers *sync.WaitGroup, handOverTimeout, heartbeat time.Duration, drained <-chan struct{}) {
	committed := map[int]int64{}
	for p, tr := range trackers {
		committed[p] = tr.position()
	}
	commit := func() {
		offs := map[int]int64{}
		for p, tr := range trackers {
			if pos := tr.position(); pos >= 0 && pos != committed[p] {
				offs[p] = pos
			}
		}
		if len(offs) == 0 {
			return
		}
		if err := gen.CommitOffsets(map[string]map[int]int64{bus.TopicConversions: offs}); err != nil {
			d.metrics.commitErrors.Inc()
			d.log.Warn("cannot commit offsets", "generation", gen.ID, "err", err)
			return
		}
		for p, pos := range offs {
			committed[p] = pos
		}
	}
	tick := time.NewTicker(d.cfg.CommitInterval)
	defer tick.Stop()
	for {
		select {
		case <-tick.C:
			commit()
		case <-gctx.Done():
			d.handOver(runCtx, gen, readers, handOverTimeout, heartbeat, drained)
			commit()
			return
		case <-runCtx.Done():
			select {
			case <-drained:
			case <-gctx.Done():
			}
			commit()
			return
		}
	}
}

// handOver runs when a generation ends while the dispatcher keeps running:
// a rebalance, which may give this generation's partitions to another
// dispatcher. That one reads from the last commit and has none of our
// dedup markers, so whatever we still send from those partitions after the
// commit it sends too. Once the readers have stopped, the engine drops the
// conversions read from Kafka that are only queued (the next owner sends
// them), and the requests in flight are waited for until they are recorded
// and their offsets done, within timeout — the coordinator's rebalance
// timeout, less a margin for the commit. Jobs from the schedule carry on.
//
// kafka-go stops heartbeating when the generation ends, and a request in
// flight may outlast the session timeout, after which the coordinator
// would drop this member and refuse its commit; so handOver heartbeats
// for the generation itself while it waits.
func (d *dispatcher) handOver(runCtx context.Context, gen *kafka.Generation, readers *sync.WaitGroup,
	timeout, heartbeat time.Duration, drained <-chan struct{}) {
	stop := make(chan struct{})
	alive := make(chan struct{})
	go func() {
		defer close(alive)
		d.keepAlive(gen, heartbeat, stop)
	}()
	defer func() {
		close(stop)
		<-alive
	}()

	readers.Wait()
	idle := d.engine.revoke()
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-idle:
	case <-runCtx.Done():
		// Shutting down during the hand-over: the drain finishes what is
		// in flight.
		<-drained
	case <-t.C:
		d.log.Warn("requests in flight did not finish before the partitions moved; their postbacks may be sent again by the next owner",
			"timeout", timeout)
	}
}

// keepAlive sends gen's heartbeats every interval until stop is closed or
// the coordinator no longer knows the member. During a rebalance the
// coordinator answers REBALANCE_IN_PROGRESS and counts the heartbeat.
func (d *dispatcher) keepAlive(gen *kafka.Generation, interval time.Duration, stop <-chan struct{}) {
	h := d.heartbeater()
	defer h.Close()
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		switch err := h.Beat(context.Background(), gen.ID, gen.MemberID); {
		case err == nil, errors.Is(err, kafka.RebalanceInProgress):
		case errors.Is(err, kafka.UnknownMemberId), errors.Is(err, kafka.IllegalGeneration), errors.Is(err, kafka.FencedInstanceID):
			d.log.Warn("the group dropped this member during the hand-over; the commit may be refused", "generation", gen.ID, "err", err)
			return
		default:
			d.log.Warn("cannot send a heartbeat during the hand-over; retrying", "generation", gen.ID, "err", err)
		}
		select {
		case <-stop:
			return
		case <-t.C:
		}
	}
}
