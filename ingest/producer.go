package ingest

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/trackstar/trackstar/internal/bus"
	"github.com/trackstar/trackstar/internal/ops"
	"github.com/trackstar/trackstar/schemas"
)

type topicID uint8

const (
	topicClicks topicID = iota
	topicPostbacks
	numTopics
)

var topicNames = [numTopics]string{bus.TopicClicks, bus.TopicPostbacks}

// event is one click or postback on its way to Kafka. Events are pooled and
// own every byte they carry, so nothing of a request's RequestCtx is kept
// once the handler returns, even when Kafka still holds the event.
type event struct {
	topic topicID
	key   []byte // the click ID, lower case
	value []byte // the JSON record
	id    []byte // the postback's event ID
	text  []byte // scratch: the client IP, then the Location or the response body

	// refs counts the owners: the handler, plus Kafka while the event is
	// queued. The last one to let go returns it to the pool.
	refs atomic.Int32
	// state moves queued → done (the ack came while the handler waited)
	// or queued → abandoned (the handler gave up and spooled it).
	state  atomic.Int32
	result chan error // the ack, buffered 1; sent only in state done
	timer  *time.Timer
	owner  *producer

	// Kept by flight while the event is queued.
	partition int32
	attempts  uint8
	// sentAt and ackedAt: when the last round carrying the event went
	// out and when its answer came back. Written by flight before it
	// completes the event, read by the handler after.
	sentAt, ackedAt time.Time
}

const (
	stateIdle int32 = iota
	stateQueued
	stateDone
	stateAbandoned
)

// producer delivers events durably: to Kafka with every in-sync replica's
// ack, or to the spool when Kafka does not ack within the produce timeout.
type producer struct {
	log     *slog.Logger
	m       *metrics
	timeout time.Duration
	spool   *spool
	queue   chan *event // to flight, both topics
	flight  *flight
	// drainFlight produces the spooled events, driven by the drainer
	// itself (flight.settle), with connections of its own.
	drainFlight *flight
	pool        sync.Pool

	// abandoned counts events the handler spooled while Kafka still held
	// them. The drainer waits for them to settle so that a late ack of the
	// original cannot land after the spooled copy's successors.
	abandoned atomic.Int64
	// drainRound is how long the drainer's last acked round took (ns): a
	// handover lasts about one round, so events wait for it about that.
	drainRound atomic.Int64
	// afterSettled, when set (tests only), runs in the drainer between
	// its wait for abandoned events and its read of the spool.
	afterSettled atomic.Pointer[func()]

	ctx     context.Context // ends when the producer closes
	cancel  context.CancelFunc
	drainer sync.WaitGroup
	// flight's own context ends a few seconds after close begins, if it
	// still has requests in flight then.
	flightCancel context.CancelFunc
	flightDone   chan struct{}

	kafkaErrorLog, spoolErrorLog ops.LogLimiter
}

var (
	errSpoolUnavailable = errors.New("the event could be neither produced nor spooled")
)

func newProducer(cfg *Config, sp *spool, m *metrics) *producer {
	p := &producer{log: cfg.Logger, m: m, timeout: cfg.ProduceTimeout, spool: sp}
	p.ctx, p.cancel = context.WithCancel(context.Background())
	p.pool.New = func() any {
		t := time.NewTimer(time.Hour)
		t.Stop()
		return &event{
			owner:  p,
			key:    make([]byte, 0, schemas.IDLen),
			value:  make([]byte, 0, 512),
			id:     make([]byte, 0, schemas.IDLen),
			text:   make([]byte, 0, 512),
			result: make(chan error, 1),
			timer:  t,
		}
	}
	p.queue = make(chan *event, 8192)
	var fctx context.Context
	fctx, p.flightCancel = context.WithCancel(context.Background())
	p.flight = newFlight(fctx, cfg.Brokers, p.queue, produceRequestTimeout)
	p.drainFlight = newFlight(p.ctx, cfg.Brokers, nil, produceRequestTimeout)
	p.flightDone = make(chan struct{})
	return p
}

// produceRequestTimeout bounds one produce request. A request that is
// slower than the produce timeout has its events spooled by their
// handlers already; this only ends the wait for a broker that hangs.
const produceRequestTimeout = 10 * time.Second

func (p *producer) start() {
	go func() {
		defer close(p.flightDone)
		p.flight.run()
	}()
	p.drainer.Add(1)
	go func() {
		defer p.drainer.Done()
		p.drain()
	}()
}

// close stops the drainer, then gives Kafka a few seconds to settle what
// is in flight. Nothing in flight is lost if it cannot: every event whose
// request was answered is acked or spooled already.
// No handler may call send once close has begun.
func (p *producer) close() {
	p.cancel()
	p.drainer.Wait()
	p.drainFlight.transport.CloseIdleConnections()
	close(p.queue)
	select {
	case <-p.flightDone:
	case <-time.After(5 * time.Second):
		p.log.Warn("Kafka did not settle the edge's last produce requests within 5s; their events are spooled or will be produced again")
		p.flightCancel()
		<-p.flightDone
	}
	p.flightCancel()
}

func (p *producer) get(t topicID) *event {
	ev := p.pool.Get().(*event)
	ev.topic = t
	ev.refs.Store(1)
	ev.state.Store(stateIdle)
	ev.attempts = 0
	return ev
}

// put drops the handler's hold on ev.
func (p *producer) put(ev *event) {
	if ev.refs.Add(-1) == 0 {
		p.pool.Put(ev)
	}
}

func (ev *event) complete(err error) {
	if ev.state.CompareAndSwap(stateQueued, stateDone) {
		// The waiting handler still holds ev, so this cannot be the last
		// hold; after the send, ev is the handler's business.
		ev.refs.Add(-1)
		ev.result <- err
		return
	}
	// The handler gave up waiting and spooled a copy; Kafka's hold is the
	// last one.
	ev.owner.abandoned.Add(-1)
	ev.owner.put(ev)
}

// produceResult is how send made an event durable, for the latency metric.
type produceResult uint8

const (
	resultAcked produceResult = iota
	resultSpooled
	resultFailed
	numResults
)

// send makes ev durable and reports how. It blocks until Kafka acks, or
// until the produce timeout passes and the event is synced to the spool.
// An error means neither Kafka nor the spool took it: answer 503.
func (p *producer) send(ev *event) error {
	start := time.Now()
	res, err := p.sendAt(ev, start)
	now := time.Now()
	p.m.produceSeconds[ev.topic][res].Observe(now.Sub(start).Seconds())
	if res == resultAcked {
		p.m.producePhase[phaseQueue].Observe(ev.sentAt.Sub(start).Seconds())
		p.m.producePhase[phaseKafka].Observe(ev.ackedAt.Sub(ev.sentAt).Seconds())
		p.m.producePhase[phaseWakeup].Observe(now.Sub(ev.ackedAt).Seconds())
	}
	return err
}

func (p *producer) sendAt(ev *event, start time.Time) (produceResult, error) {
	if p.spool.active.Load() {
		// While the drainer hands over, wait for it: then produce
		// directly, as it left the spool empty. A handover takes about
		// one drain round: past twice the last one (at least
		// handoverWait), the event is spooled, as it would have been;
		// and the wait leaves the produce itself a round of the timeout.
		round := time.Duration(p.drainRound.Load())
		wait := min(p.timeout-round, max(handoverWait, 2*round))
		res, err := p.spoolAt(ev, start, start.Add(max(wait, 0)))
		if !errors.Is(err, errHandedOver) {
			return res, err
		}
	}
	ev.state.Store(stateQueued)
	ev.refs.Add(1) // Kafka's hold
	// The produce timeout counts from the request's start, a wait for a
	// handover included.
	ev.timer.Reset(p.timeout - time.Since(start))
	select {
	case p.queue <- ev:
	case <-ev.timer.C:
		// flight is stuck: the event never reached Kafka.
		ev.state.Store(stateIdle)
		ev.refs.Add(-1)
		p.m.kafkaErrors[ev.topic][reasonTimeout].Inc()
		return p.toSpool(ev, start)
	}
	select {
	case err := <-ev.result:
		ev.timer.Stop()
		if err == nil {
			return resultAcked, nil
		}
		p.m.kafkaErrors[ev.topic][reasonError].Inc()
		p.logKafkaError(err)
		return p.toSpool(ev, start)
	case <-ev.timer.C:
		p.abandoned.Add(1)
		if !ev.state.CompareAndSwap(stateQueued, stateAbandoned) {
			// The ack raced the timer and won.
			p.abandoned.Add(-1)
			if err := <-ev.result; err == nil {
				return resultAcked, nil
			}
			p.m.kafkaErrors[ev.topic][reasonError].Inc()
			return p.toSpool(ev, start)
		}
		p.m.kafkaErrors[ev.topic][reasonTimeout].Inc()
		// flight keeps its hold until it settles the event; the copy we spool
		// may be produced twice, which is at-least-once by design.
		return p.toSpool(ev, start)
	}
}

func (p *producer) logKafkaError(err error) {
	if p.kafkaErrorLog.Allow() {
		p.log.Warn("Kafka did not take an event; spooling", "err", err)
	}
}

// handoverWait is the least an event sent while the spool is active
// waits for a handover (see spool.appendWaiting) before it is spooled:
// twice the drainer's last round, when that is longer (a broker slow to
// ack, but within the produce timeout), so that the handover can finish.
const handoverWait = 100 * time.Millisecond

func (p *producer) toSpool(ev *event, now time.Time) (produceResult, error) {
	return p.spoolAt(ev, now, time.Time{})
}

// spoolAt is toSpool, waiting for a handover until deadline (see
// spool.appendWaiting); errHandedOver when the event is to go to Kafka.
func (p *producer) spoolAt(ev *event, now, deadline time.Time) (produceResult, error) {
	wasActive := p.spool.active.Load()
	value := ev.value
	if ev.topic == topicPostbacks {
		// Answered before Kafka has it, it may reach Kafka after a newer
		// postback another edge took: the mark lets the attributor tell
		// (see attributor.Decide). Kafka may still get the unmarked copy
		// of an abandoned produce; the first to arrive decides.
		value = schemas.MarkSpooled(make([]byte, 0, len(value)+16), value)
	}
	if err := p.spool.appendWaiting(ev.topic, ev.key, value, now, deadline); err != nil {
		if errors.Is(err, errHandedOver) {
			return resultFailed, err
		}
		p.m.spoolErrors.Inc()
		if p.spoolErrorLog.Allow() {
			p.log.Error("cannot spool an event; answering 503", "topic", topicNames[ev.topic], "err", err)
		}
		return resultFailed, errSpoolUnavailable
	}
	if !wasActive {
		p.log.Warn("Kafka is unreachable or slower than the produce timeout; spooling events until it is back",
			"produce_timeout", p.timeout)
	}
	p.m.spooled[ev.topic].Inc()
	return resultSpooled, nil
}

// drain produces spooled events, oldest first, whenever the spool is
// active, deleting each only after Kafka acked it; when the spool is empty
// it switches the edge back to producing directly.
func (p *producer) drain() {
	// A batch goes out as one request, each partition's events in it as
	// one record batch (see flight.settle): keep it well under a broker's
	// default message.max.bytes (1 MiB).
	const batch, batchBytes = 512, 512 << 10
	backoff := 100 * time.Millisecond
	drained := 0
	// tookLast says Kafka took the drainer's last round since the spool
	// became active: only then may a handover begin, or while Kafka
	// hangs every request would wait for nothing.
	tookLast := false
	var waitingSince time.Time // for abandoned events to settle; zero when not waiting
	for {
		if !p.spool.active.Load() {
			select {
			case <-p.ctx.Done():
				return
			case <-p.spool.wake:
				continue
			}
		}
		if !p.waitAbandoned(&waitingSince) {
			return
		}
		if f := p.afterSettled.Load(); f != nil {
			(*f)()
		}
		evs, err := p.spool.read(batch, batchBytes)
		if err != nil {
			p.spool.endHandover()
			p.log.Error("cannot read the spool", "err", err)
			if !p.sleep(time.Second, nil) {
				return
			}
			continue
		}
		// A handler may have abandoned an event and spooled it between
		// the wait and the read; then its original is still in flight.
		if p.abandoned.Load() > 0 && !p.waitedOut(waitingSince) {
			continue
		}
		if len(evs) == 0 {
			if p.spool.deactivateIfEmpty(tookLast) {
				p.log.Info("spool drained; producing directly to Kafka again", "events", drained)
				drained, tookLast = 0, false
				continue
			}
			// Appends are under way (and no new one starts: a handover
			// began): wait for one to finish (it nudges) rather than read
			// the spool again and again meanwhile.
			if !p.sleep(10*time.Millisecond, p.spool.wake) {
				return
			}
			continue
		}
		size := 0
		for _, ev := range evs {
			size += len(ev.key) + len(ev.value)
		}
		caughtUp := len(evs) < batch && size < batchBytes
		roundStart := time.Now()
		acked, err := p.produceSpooled(evs)
		if err == nil {
			p.drainRound.Store(int64(time.Since(roundStart)))
		}
		// A handover may begin (here, or in deactivateIfEmpty on the next
		// pass) only after a round that Kafka took within a third of the
		// produce timeout.
		mayHandOver := err == nil && 3*time.Duration(p.drainRound.Load()) <= p.timeout
		if mayHandOver && caughtUp {
			// Caught up, and Kafka took the batch: the events appended
			// from now on wait until those under way are drained, then go
			// to Kafka directly. (Under load some append is always under
			// way, so waiting for a moment without one could last as long
			// as the load.) Not before the batch is acked: while Kafka
			// hangs, every request would wait for nothing. Nor when a
			// round takes over a third of the produce timeout: a handover
			// and the produce after it would not fit in it, and the edge
			// would go in and out of spool mode.
			p.spool.beginHandover()
		} else if !mayHandOver {
			// Kafka failed the round, or took too long for a handover
			// begun before to finish in time: the waiting events are
			// spooled after all.
			p.spool.endHandover()
		}
		if rerr := p.spool.remove(acked); rerr != nil {
			p.log.Error("cannot delete drained events from the spool; they will be produced again", "err", rerr)
		} else {
			// Counted once they leave the spool: one left behind is
			// produced, and counted, again.
			for _, ev := range acked {
				p.m.drained[ev.topic].Inc()
			}
		}
		drained += len(acked)
		tookLast = mayHandOver
		if err != nil {
			if p.ctx.Err() != nil {
				return
			}
			p.log.Debug("cannot drain the spool yet", "err", err, "retry_in", backoff)
			if !p.sleep(backoff, nil) {
				return
			}
			backoff = min(2*backoff, 2*time.Second)
			continue
		}
		backoff = 100 * time.Millisecond
	}
}

// abandonedMaxWait bounds how long the drainer waits for abandoned events
// to settle (their produce requests time out well before).
const abandonedMaxWait = time.Minute

// waitAbandoned waits until flight has settled every event whose handler
// spooled it, or until the drainer has waited abandonedMaxWait since
// *since, when it began waiting (set here; zeroed once none is left).
// False once the producer closes.
func (p *producer) waitAbandoned(since *time.Time) bool {
	for p.abandoned.Load() > 0 {
		if since.IsZero() {
			*since = time.Now()
		}
		if p.waitedOut(*since) {
			return true
		}
		if !p.sleep(10*time.Millisecond, nil) {
			return false
		}
	}
	*since = time.Time{}
	return true
}

func (p *producer) waitedOut(since time.Time) bool {
	return !since.IsZero() && time.Since(since) >= abandonedMaxWait
}

// sleep waits for d, or until wake (when not nil) fires; false once the
// producer closes.
func (p *producer) sleep(d time.Duration, wake <-chan struct{}) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-p.ctx.Done():
		return false
	case <-wake:
		return true
	case <-t.C:
		return true
	}
}

// produceSpooled produces spooled events, oldest first, and returns the
// acked ones and the first error. A partition's events are all acked or
// none (flight.settle): the ones left in the spool are the oldest of their
// partition, and go out again before anything that came after them. Had
// they gone through the edge's queue, a partition's events could span
// rounds, and a later round could succeed after an earlier one failed,
// putting Kafka's copy of the spool out of order.
func (p *producer) produceSpooled(spooled []spooledEvent) ([]spooledEvent, error) {
	evs := make([]*event, len(spooled))
	for i, s := range spooled {
		ev := p.get(s.topic)
		ev.key = append(ev.key[:0], s.key...)
		ev.value = append(ev.value[:0], s.value...)
		ev.state.Store(stateQueued)
		ev.refs.Add(1)
		evs[i] = ev
	}
	p.drainFlight.settle(evs)
	var acked []spooledEvent
	var firstErr error
	for i, ev := range evs {
		if err := <-ev.result; err == nil { // settle completed every event
			acked = append(acked, spooled[i])
		} else if firstErr == nil {
			firstErr = err
		}
		p.put(ev)
	}
	if firstErr == nil && p.ctx.Err() != nil {
		firstErr = p.ctx.Err()
	}
	return acked, firstErr
}
