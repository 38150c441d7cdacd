package dispatcher

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/segmentio/kafka-go"
	"github.com/valyala/fasthttp"

	"github.com/trackstar/trackstar/internal/bus"
	"github.com/trackstar/trackstar/internal/catalog"
	"github.com/trackstar/trackstar/schemas"
)

// job is one conversion on its way to one partner, in memory: queued,
// being attempted, or waiting for the finalizer.
type job struct {
	id        string // conversion_id "/" version: one delivery per status update
	conv      schemas.Conversion
	raw       []byte // the conversion as consumed, kept for the schedule
	partition int    // where raw was read from, for the dead letter
	offset    int64
	attempt   uint32   // number of the next attempt, 1-based
	lastErr   string   // of the previous attempt
	host      string   // the partner URL's host[:port], lower case
	schedKey  []byte   // its schedule entry when it came from the schedule; nil when from Kafka
	acks      []func() // offsets to mark done once the job is final or durably scheduled
}

func jobID(c *schemas.Conversion) string { return jobKey(c.ConversionID, c.Version) }

// jobKey is the job ID of a version of a conversion.
func jobKey(conversionID string, version uint32) string {
	return conversionID + "/" + strconv.FormatUint(uint64(version), 10)
}

// hostQueue is the in-memory queue, workers and circuit breaker of one
// partner host. Guarded by engine.mu.
type hostQueue struct {
	name    string
	queue   []*job
	active  int  // workers running for this host
	waiting bool // the schedule holds due jobs for this host that did not fit
	br      breaker
}

type resultKind int

const (
	resAttempt resultKind = iota // an attempt, or a record of why none is made (superseded, not wanted); rec says which
	resDefer                     // no attempt: wait in the schedule until due
	resDrop                      // no attempt, no record: a job not yet attempted that the config no longer wants, or a broken schedule entry
)

// result is what the finalizer makes durable for one job.
type result struct {
	kind   resultKind
	job    *job
	rec    schemas.Delivery // resAttempt
	due    time.Time        // resAttempt when retrying; resDefer
	reason string           // resDefer: queue_full or breaker_open
}

// engine moves jobs from the readers and the schedule through the host
// queues, the workers and the finalizer.
type engine struct {
	cfg     *Config
	log     *slog.Logger
	metrics *metrics
	store   *scheduleStore
	// clients[1] may dial private addresses, clients[0] may not; each
	// attempt takes the one the config allows now. Two pools, so that a
	// connection kept alive to a private address is never reused once a
	// reload has turned allow_private_partner_urls off.
	clients [2]*fasthttp.Client

	deliveries *kafka.Writer
	dlq        *kafka.Writer

	results   chan result
	finalized chan struct{} // closed when the finalizer has written out everything
	wake      chan struct{} // nudges the scheduler
	tokens    chan struct{} // one per request in flight, all hosts
	stopCh    chan struct{} // closed when the engine stops taking work

	mu       sync.Mutex
	jobs     map[string]*job          // every job in memory, by id
	consumed int                      // of those, jobs read from Kafka (schedKey nil)
	idle     []chan struct{}          // closed when consumed falls to 0
	revoked  chan struct{}            // closed by revoke, then replaced
	sending  map[string]chan struct{} // conversion IDs with a request in flight; closed when it ends
	hosts    map[string]*hostQueue
	queued   int  // jobs in host queues
	waiting  bool // the schedule holds due jobs that did not fit under MaxQueued
	stopping bool
	workers  sync.WaitGroup // workers and every other sender on results

	// homed is the config the schedule's hosts were last checked against
	// (see rehome); nil until the first scan. The scheduler's alone.
	homed *catalog.Catalog
	// rehomeAgain asks the scheduler for another rehome pass under the
	// same config (the finalizer filed jobs under a config it replaced).
	rehomeAgain atomic.Bool

	// lease holds while the group confirms this member: see awaitLease.
	lease *lease

	pending   atomic.Int64          // schedule entries
	writeErr  atomic.Pointer[error] // the last failed Kafka write, nil once one succeeds
	fatalFunc func(error)
}

func newEngine(cfg *Config, m *metrics, store *scheduleStore, fatal func(error)) (*engine, error) {
	e := &engine{
		cfg:       cfg,
		log:       cfg.Logger,
		metrics:   m,
		store:     store,
		results:   make(chan result, 4096),
		finalized: make(chan struct{}),
		wake:      make(chan struct{}, 1),
		tokens:    make(chan struct{}, cfg.Concurrency),
		stopCh:    make(chan struct{}),
		jobs:      map[string]*job{},
		revoked:   make(chan struct{}),
		sending:   map[string]chan struct{}{},
		hosts:     map[string]*hostQueue{},
		fatalFunc: fatal,
		lease:     newLease(),
	}
	for i, allowPrivate := range []bool{false, true} {
		e.clients[i] = &fasthttp.Client{
			Name:        "trackstar-dispatcher",
			DialTimeout: func(addr string, timeout time.Duration) (net.Conn, error) { return e.dial(addr, timeout, allowPrivate) },
			TLSConfig:   cfg.TLSConfig,
			// Workers already cap requests per host at HostConcurrency; the
			// slack covers connections still closing.
			MaxConnsPerHost:        cfg.HostConcurrency + 8,
			MaxConnWaitTimeout:     time.Second,
			ReadBufferSize:         16 << 10,
			DisablePathNormalizing: true, // the request URI is what was signed
			StreamResponseBody:     true, // read at most bodyCap of any response
			RetryIfErr:             retryStaleConn,
		}
	}
	n, err := store.countScheduled()
	if err != nil {
		return nil, err
	}
	e.pending.Store(int64(n))
	m.retriesPending.Set(float64(n))
	e.deliveries = bus.NewWriter(bus.WriterConfig{Brokers: cfg.Brokers, Topic: bus.TopicDeliveries})
	e.dlq = bus.NewWriter(bus.WriterConfig{Brokers: cfg.Brokers, Topic: bus.TopicDLQ})
	return e, nil
}

func (e *engine) now() time.Time { return e.cfg.Now() }

// postbackFor returns the affiliate's postback when it wants this
// conversion, or nil.
func postbackFor(cat *catalog.Catalog, c *schemas.Conversion) *catalog.PartnerPostback {
	aff := cat.Affiliate(c.AffID)
	if aff == nil || aff.Postback == nil {
		return nil
	}
	pb := aff.Postback
	if !pb.WantsStatus(c.Status) || !pb.WantsGoal(c.Goal) {
		return nil
	}
	return pb
}

// submit takes one consumed conversion record. ack marks its offset done;
// it is called at once when there is nothing to deliver, else once the
// delivery is final or durably scheduled. A record that cannot be decoded
// is written to trackstar.dlq first; when that cannot be done before ctx
// (the reader's) ends, the record is left unacknowledged, to be read again.
func (e *engine) submit(ctx context.Context, m kafka.Message, ack func()) {
	raw, partition, offset := m.Value, m.Partition, m.Offset
	conv, err := schemas.DecodeConversion(raw)
	if err != nil {
		e.metrics.conversions.WithLabelValues("invalid").Inc()
		e.log.Error("dead-lettering a conversion record that cannot be decoded", "partition", partition, "offset", offset, "err", err)
		if e.write(ctx, e.dlq, bus.TopicDLQ, []kafka.Message{bus.DeadLetter(m, err, e.now())}) == nil {
			ack()
		}
		return
	}
	pb := postbackFor(e.cfg.Catalog.Current(), &conv)
	if pb == nil {
		e.metrics.conversions.WithLabelValues("not_wanted").Inc()
		ack()
		return
	}
	id := jobID(&conv)
	e.mu.Lock()
	if j := e.jobs[id]; j != nil {
		// A replay (the partition came back after a rebalance) of a
		// conversion still in flight: it is done when that one is.
		j.acks = append(j.acks, ack)
		e.mu.Unlock()
		e.metrics.conversions.WithLabelValues("duplicate").Inc()
		return
	}
	e.mu.Unlock()
	seen, err := e.store.seen(id, e.now(), e.cfg.DedupWindow)
	if err != nil {
		e.fatal(err)
		return
	}
	if seen {
		// Scheduled or finished before a restart whose commit it missed.
		e.metrics.conversions.WithLabelValues("duplicate").Inc()
		ack()
		return
	}
	// Before it is queued: an older status of the conversion still
	// waiting for a retry must not be sent after this one.
	if err := e.store.noteVersion(conv.ConversionID, conv.Version, e.now(), pebble.Sync); err != nil {
		e.fatal(err)
		return
	}
	e.metrics.conversions.WithLabelValues("queued").Inc()
	e.enqueue(&job{
		id:        id,
		conv:      conv,
		raw:       raw,
		partition: partition,
		offset:    offset,
		attempt:   1,
		host:      hostOf(pb.URL.Append(nil, valuesOf(&conv))),
		acks:      []func(){ack},
	})
}

// enqueue puts j in its host's queue, starting a worker when the host has
// fewer than HostConcurrency, or defers it to the schedule when the host is
// paused or its queue is full. It never blocks on a partner. It reports
// whether j was queued.
func (e *engine) enqueue(j *job) bool {
	now := e.now()
	e.mu.Lock()
	if e.stopping {
		e.mu.Unlock()
		return false // from Kafka: replayed after the restart; from the schedule: still there
	}
	if other := e.jobs[j.id]; other != nil && other != j {
		other.acks = append(other.acks, j.acks...)
		e.mu.Unlock()
		return false
	}
	e.putLocked(j)
	h := e.hostLocked(j.host)
	if blocked, until := h.br.blocked(now); blocked {
		e.mu.Unlock()
		e.deferJob(j, until, "breaker_open")
		return false
	}
	if len(h.queue) >= e.cfg.HostQueue || e.queued >= e.cfg.MaxQueued {
		e.mu.Unlock()
		e.deferJob(j, now, "queue_full")
		return false
	}
	h.queue = append(h.queue, j)
	e.queued++
	e.metrics.queueDepth.Set(float64(e.queued))
	if h.active < e.cfg.HostConcurrency {
		h.active++
		e.workers.Add(1)
		go e.work(h)
	}
	e.mu.Unlock()
	return true
}

// currentHost is the host conv's partner postback goes to under cat, or ""
// when the affiliate no longer gets it (attempt then drops the job).
func currentHost(cat *catalog.Catalog, conv *schemas.Conversion) string {
	pb := postbackFor(cat, conv)
	if pb == nil {
		return ""
	}
	return hostOf(pb.URL.Append(nil, valuesOf(conv)))
}

func (e *engine) hostLocked(name string) *hostQueue {
	h := e.hosts[name]
	if h == nil {
		h = &hostQueue{name: name}
		e.hosts[name] = h
		e.metrics.breakerState.WithLabelValues(name).Set(breakerClosed)
	}
	return h
}

// deferJob sends j to the schedule without an attempt.
func (e *engine) deferJob(j *job, due time.Time, reason string) {
	if j.schedKey != nil {
		// Already durable, and the scheduler skips a paused or full host by
		// itself; only an entry filed under another host (the partner URL
		// changed) must move, or the scheduler would pick it again at once.
		if host, _, _, _ := parseScheduleKey(j.schedKey); host == j.host {
			e.release(j)
			return
		}
	}
	e.metrics.deferred.WithLabelValues(reason).Inc()
	e.send(result{kind: resDefer, job: j, due: due, reason: reason})
}

// send hands a result to the finalizer, unless the engine has stopped: then
// the job is abandoned (a Kafka job is replayed after the restart, a
// scheduled one is still in the schedule).
func (e *engine) send(r result) {
	e.mu.Lock()
	if e.stopping {
		e.mu.Unlock()
		return
	}
	e.workers.Add(1)
	e.mu.Unlock()
	e.results <- r
	e.workers.Done()
}

// putLocked makes j the job in memory for its id.
func (e *engine) putLocked(j *job) {
	if e.jobs[j.id] == j {
		return
	}
	e.jobs[j.id] = j
	if j.schedKey == nil {
		e.consumed++
	}
}

// forgetLocked removes j from memory, if it is there.
func (e *engine) forgetLocked(j *job) {
	if e.jobs[j.id] != j {
		return
	}
	delete(e.jobs, j.id)
	if j.schedKey != nil {
		return
	}
	e.consumed--
	if e.consumed == 0 {
		for _, ch := range e.idle {
			close(ch)
		}
		e.idle = nil
	}
}

// revoke is called when the consumer group takes this dispatcher's
// partitions away (its readers have stopped): their next owner reads
// again from the last commit. The jobs read from Kafka that wait in a host
// queue, or for a request slot, are forgotten without their offsets, so
// the new owner sends them and this dispatcher does not. Jobs from the
// schedule stay: the schedule is this dispatcher's own. It returns a
// channel closed once no job read from Kafka is in memory any more — the
// requests in flight have been recorded, or abandoned — so that the
// offsets committed before the partitions move cover them.
func (e *engine) revoke() <-chan struct{} {
	e.mu.Lock()
	defer e.mu.Unlock()
	close(e.revoked)
	e.revoked = make(chan struct{})
	dropped := 0
	for _, h := range e.hosts {
		kept := h.queue[:0]
		for _, j := range h.queue {
			if j.schedKey != nil {
				kept = append(kept, j)
				continue
			}
			e.forgetLocked(j)
			dropped++
		}
		clear(h.queue[len(kept):])
		h.queue = kept
	}
	e.queued -= dropped
	e.metrics.queueDepth.Set(float64(e.queued))
	if dropped > 0 {
		e.log.Info("partitions revoked; leaving queued conversions to their next owner", "conversions", dropped)
		if e.waiting {
			e.waiting = false
			e.wakeScheduler()
		}
	}
	ch := make(chan struct{})
	if e.consumed == 0 {
		close(ch)
	} else {
		e.idle = append(e.idle, ch)
	}
	return ch
}

// release forgets j and marks its offsets done: it is durable elsewhere.
// The offsets are marked before j is forgotten: a hand-over waiting for
// the engine to hold no job read from Kafka commits as soon as it is told
// (see revoke), and must see them done.
func (e *engine) release(j *job) {
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, ack := range j.acks {
		ack() // offsetTracker.markDone: takes only its own lock
	}
	j.acks = nil
	e.forgetLocked(j)
}

// abandon forgets j without marking its offsets: it will be read again.
func (e *engine) abandon(j *job) {
	e.mu.Lock()
	e.forgetLocked(j)
	e.mu.Unlock()
}

func (e *engine) wakeScheduler() {
	select {
	case e.wake <- struct{}{}:
	default:
	}
}

// work is one worker of host h: it takes jobs from h's queue until the
// queue is empty, attempting each.
func (e *engine) work(h *hostQueue) {
	defer e.workers.Done()
	for {
		e.mu.Lock()
		if e.stopping || len(h.queue) == 0 {
			h.active--
			e.mu.Unlock()
			return
		}
		j := h.queue[0]
		h.queue[0] = nil
		h.queue = h.queue[1:]
		revoked := e.revoked
		e.queued--
		e.metrics.queueDepth.Set(float64(e.queued))
		// A config reload may have moved the affiliate's postback URL to
		// another host while j waited here: it belongs in that host's
		// queue, under that host's breaker, not this one's.
		cat := e.cfg.Catalog.Current()
		if host := currentHost(cat, &j.conv); host != "" && host != h.name {
			wake := h.waiting && len(h.queue) <= e.cfg.HostQueue/2
			if wake {
				h.waiting = false
			}
			e.mu.Unlock()
			if wake {
				e.wakeScheduler()
			}
			j.host = host
			e.enqueue(j)
			continue
		}
		now := e.now()
		ok, probe, until := h.br.allow(now, now.Add(cat.Delivery.Timeout+time.Second))
		if probe {
			e.metrics.breakerState.WithLabelValues(h.name).Set(breakerHalfOpen)
		}
		wake := false
		if h.waiting && len(h.queue) <= e.cfg.HostQueue/2 {
			h.waiting, wake = false, true
		}
		if e.waiting && e.queued <= e.cfg.MaxQueued/2 {
			e.waiting, wake = false, true
		}
		e.mu.Unlock()
		if wake {
			e.wakeScheduler()
		}
		if probe {
			e.log.Info("probing paused partner host", "host", h.name, "conversion_id", j.conv.ConversionID)
		}
		if !ok {
			e.deferJob(j, until, "breaker_open")
			continue
		}

		if j.schedKey != nil {
			revoked = nil // the schedule's jobs stay when partitions move
		}
		select {
		case e.tokens <- struct{}{}:
		case <-e.stopCh:
			e.abandon(j)
			continue
		case <-revoked:
			e.abandon(j)
			continue
		}
		if !e.claim(j, revoked) {
			<-e.tokens
			e.abandon(j)
			continue
		}
		// A reload may also have come while j waited for its token or its
		// claim. The attempt uses this snapshot of the config, so that the
		// request goes to the host whose breaker takes its verdict.
		cat = e.cfg.Catalog.Current()
		if host := currentHost(cat, &j.conv); host != "" && host != h.name {
			e.giveBack(j, h, probe)
			j.host = host
			e.enqueue(j)
			continue
		}
		if j.schedKey == nil && !e.awaitLease(revoked) {
			// Its partition has moved on: the next owner sends it.
			e.log.Info("not sending a conversion read before the group stopped counting this member; its partition's next owner sends it",
				"conversion_id", j.conv.ConversionID, "version", j.conv.Version, "partition", j.partition)
			e.giveBack(j, h, probe)
			e.abandon(j)
			continue
		}
		e.metrics.inflight.Inc()
		r, verdict := e.attempt(j, cat)
		e.metrics.inflight.Dec()
		e.unclaim(j)
		<-e.tokens

		if verdict != verdictNone {
			e.mu.Lock()
			from, to := h.br.record(verdict == verdictRetryable, probe, e.now(), e.cfg.BreakerFailures, e.cfg.BreakerCooldown)
			e.mu.Unlock()
			if from != to {
				e.breakerChanged(h.name, from, to)
			}
		}
		e.results <- r
	}
}

// claim makes j the conversion's one request in flight. Two statuses of
// one conversion are never sent at once: a status update waits for the
// previous status's request to end, so the partner gets them in order (an
// older status that comes after is superseded, see attempt). It reports
// false, without waiting longer, when the engine stops or, for a job read
// from Kafka, when its partition is revoked.
func (e *engine) claim(j *job, revoked <-chan struct{}) bool {
	for {
		e.mu.Lock()
		busy := e.sending[j.conv.ConversionID]
		if busy == nil {
			e.sending[j.conv.ConversionID] = make(chan struct{})
			e.mu.Unlock()
			return true
		}
		e.mu.Unlock()
		select {
		case <-busy:
		case <-e.stopCh:
			return false
		case <-revoked:
			return false
		}
	}
}

// giveBack undoes j's claim and request slot when it is not attempted
// after all; the host's probe, if j was it, goes to the next request.
func (e *engine) giveBack(j *job, h *hostQueue, probe bool) {
	e.unclaim(j)
	<-e.tokens
	if probe {
		e.mu.Lock()
		h.br.dropProbe()
		e.mu.Unlock()
		e.metrics.breakerState.WithLabelValues(h.name).Set(breakerOpen)
	}
}

// awaitLease reports whether a conversion read from Kafka may be sent: the
// group has confirmed this member within its session timeout (see lease).
// Readers take nothing from Kafka while it does not hold; this catches a
// process stopped between taking a conversion and sending it. It waits for
// the next confirmation, and reports false if the partitions are revoked
// (the expelled member's generation ends) or the engine stops first.
func (e *engine) awaitLease(revoked <-chan struct{}) bool {
	return e.lease.wait(revoked, e.stopCh)
}

// unclaim ends j's request: the next status of its conversion may go.
func (e *engine) unclaim(j *job) {
	e.mu.Lock()
	close(e.sending[j.conv.ConversionID])
	delete(e.sending, j.conv.ConversionID)
	e.mu.Unlock()
}

func (e *engine) breakerChanged(host string, from, to int) {
	e.metrics.breakerState.WithLabelValues(host).Set(float64(to))
	switch to {
	case breakerOpen:
		e.metrics.breakerTrips.WithLabelValues(host).Inc()
		if from == breakerHalfOpen {
			e.log.Warn("partner host still failing after probe; paused again", "host", host, "cooldown", e.cfg.BreakerCooldown)
		} else {
			e.log.Warn("partner host paused by circuit breaker", "host", host,
				"consecutive_failures", e.cfg.BreakerFailures, "cooldown", e.cfg.BreakerCooldown)
		}
	case breakerClosed:
		e.log.Info("partner host resumed", "host", host)
		e.wakeScheduler()
	}
}

// finalize makes results durable, in batches: first the delivery records
// and dead letters on Kafka, then the schedule in Pebble, then the offsets
// are marked done. It returns when results is closed and drained.
func (e *engine) finalize(hardStop context.Context) {
	defer close(e.finalized)
	batch := make([]result, 0, 512)
	for r := range e.results {
		batch = append(batch[:0], r)
	fill:
		for len(batch) < cap(batch) {
			select {
			case r, ok := <-e.results:
				if !ok {
					break fill
				}
				batch = append(batch, r)
			default:
				break fill
			}
		}
		e.finalizeBatch(hardStop, batch)
	}
}

func (e *engine) finalizeBatch(ctx context.Context, batch []result) {
	var recs, dead []kafka.Message
	now := e.now()
	for i := range batch {
		r := &batch[i]
		if r.kind != resAttempt {
			continue
		}
		// Keyed by the click ID, like every topic (DESIGN.md): all attempts
		// of one conversion still land in one partition, in order.
		recs = append(recs, kafka.Message{Key: []byte(r.job.conv.ClickID), Value: schemas.EncodeDelivery(r.rec), Time: time.Now()})
		if r.rec.Outcome == schemas.OutcomeDead {
			j := r.job
			dl := DeadLetter{
				V: schemas.Version, Topic: bus.TopicConversions, Partition: j.partition, Offset: j.offset, Key: j.conv.ClickID,
				Error:        r.rec.Error,
				ConversionID: r.rec.ConversionID, AffID: r.rec.AffID, Attempts: r.rec.Attempt,
				Method: r.rec.Method, URL: r.rec.URL, StatusCode: r.rec.StatusCode, TS: now.UnixMilli(),
			}
			dl.SetValue(j.raw)
			v, err := json.Marshal(&dl)
			if err != nil {
				panic("BUG: cannot encode dead letter: " + err.Error())
			}
			dead = append(dead, kafka.Message{Key: []byte(j.conv.ClickID), Value: v, Time: time.Now()})
		}
	}
	attemptsWritten := e.write(ctx, e.deliveries, bus.TopicDeliveries, recs) == nil &&
		e.write(ctx, e.dlq, bus.TopicDLQ, dead) == nil

	b := e.store.db.NewBatch()
	defer b.Close()
	var delta int64
	scheduleChanged := false
	bucket := bucketOf(now, e.cfg.DedupWindow)
	cat := e.cfg.Catalog.Current()
	schedule := func(j *job, due time.Time, attempt uint32, lastErr string) {
		// File it under the host its postback goes to now: a reload may
		// have moved the URL while j was queued or attempted, and the
		// scheduler's rehome pass for that config skipped j as busy. The
		// old host's pause and backoff are not the new one's: due now.
		if host := currentHost(cat, &j.conv); host != "" && host != j.host {
			j.host, due = host, now
		}
		v, err := json.Marshal(scheduledJob{Attempt: attempt, LastError: lastErr, Partition: j.partition, Offset: j.offset, Conversion: j.raw})
		if err != nil {
			panic("BUG: cannot encode schedule entry: " + err.Error())
		}
		_ = b.Set(scheduleKey(j.host, due, j.id), v, nil)
		if j.schedKey != nil {
			_ = b.Delete(j.schedKey, nil)
		} else {
			_ = b.Set(markerKey(bucket, j.id), nil, nil)
			delta++
		}
		scheduleChanged = true
	}
	finish := func(j *job) {
		if j.schedKey != nil {
			_ = b.Delete(j.schedKey, nil)
			delta--
			scheduleChanged = true
		} else {
			_ = b.Set(markerKey(bucket, j.id), nil, nil)
		}
	}
	for i := range batch {
		r := &batch[i]
		switch {
		case r.kind == resAttempt && !attemptsWritten:
			// Not recorded, so not attempted as far as anyone knows: the
			// attempt is made again after the restart.
		case r.kind == resAttempt && r.rec.Outcome == schemas.OutcomeRetrying:
			schedule(r.job, r.due, r.job.attempt+1, r.rec.Error)
		case r.kind == resAttempt, r.kind == resDrop:
			finish(r.job)
		case r.kind == resDefer:
			schedule(r.job, r.due, r.job.attempt, r.job.lastErr)
		}
	}
	// Synced, every batch: a lost marker or schedule delete sends the
	// postback once more, a lost schedule entry loses it once its offset is
	// committed. Pebble keeps an unsynced write in memory until a later
	// sync, so a process that is killed, not only a machine that loses
	// power, loses it. One sync covers the whole batch.
	if !b.Empty() {
		if err := b.Commit(pebble.Sync); err != nil {
			e.fatal(err)
			for _, r := range batch {
				e.abandon(r.job)
			}
			return
		}
	}
	e.metrics.retriesPending.Set(float64(e.pending.Add(delta)))

	for _, r := range batch {
		if r.kind == resAttempt && !attemptsWritten {
			e.abandon(r.job)
			continue
		}
		e.release(r.job)
		switch r.kind {
		case resAttempt:
			e.metrics.deliveries.WithLabelValues(r.rec.Outcome).Inc()
			switch r.rec.Outcome {
			case schemas.OutcomeFailed:
				e.log.Info("partner postback failed for good", "conversion_id", r.rec.ConversionID, "aff_id", r.rec.AffID,
					"host", r.job.host, "attempt", r.rec.Attempt, "status_code", r.rec.StatusCode, "error", r.rec.Error)
			case schemas.OutcomeDead:
				e.log.Warn("partner postback dead-lettered after the last retry", "conversion_id", r.rec.ConversionID,
					"aff_id", r.rec.AffID, "host", r.job.host, "attempts", r.rec.Attempt, "error", r.rec.Error)
			}
		}
	}
	if e.cfg.Catalog.Current() != cat {
		// A reload during the batch: its rehome pass may have skipped
		// these jobs as busy, and they were filed under the old config.
		e.rehomeAgain.Store(true)
		scheduleChanged = true
	}
	if scheduleChanged {
		e.wakeScheduler()
	}
}

// write writes msgs to Kafka, retrying until it succeeds or ctx (the hard
// stop of a shutdown) ends.
func (e *engine) write(ctx context.Context, w *kafka.Writer, topic string, msgs []kafka.Message) error {
	if len(msgs) == 0 {
		return nil
	}
	backoff := 100 * time.Millisecond
	for {
		err := w.WriteMessages(ctx, msgs...)
		if err == nil {
			e.writeErr.Store(nil)
			return nil
		}
		if ctx.Err() != nil {
			// Cut off (a shutdown, a rebalance), not refused by Kafka:
			// readiness and the error count are left alone.
			e.log.Warn("giving up writing to Kafka as the work stops; the records are made again by the next run or the partition's next owner",
				"topic", topic, "messages", len(msgs), "err", err)
			return err
		}
		e.metrics.writeErrors.WithLabelValues(topic).Inc()
		e.writeErr.Store(&err)
		e.log.Warn("cannot write to Kafka; retrying", "topic", topic, "messages", len(msgs), "err", err)
		select {
		case <-ctx.Done():
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 5*time.Second)
	}
}

func (e *engine) fatal(err error) {
	e.fatalFunc(err)
}

// stop makes the engine take no new work; workers finish their request
// and the finalizer writes out every result. It reports whether all that
// happened within timeout (if not, some worker may still run).
func (e *engine) stop(timeout time.Duration) bool {
	e.mu.Lock()
	e.stopping = true
	e.mu.Unlock()
	close(e.stopCh)
	done := make(chan struct{})
	go func() {
		e.workers.Wait()
		close(done)
	}()
	select {
	case <-done:
		close(e.results)
		<-e.finalized
		return true
	case <-time.After(timeout):
		e.log.Error("delivery workers did not stop in time; their attempts will be made again after the restart", "timeout", timeout)
		return false
	}
}

// health returns why the engine is not ready, or nil.
func (e *engine) health() error {
	if p := e.writeErr.Load(); p != nil {
		return errors.New("cannot write delivery records to Kafka: " + (*p).Error())
	}
	return nil
}

// DeadLetter is the value written to trackstar.dlq when a partner postback
// still fails after the last retry: the conversion record and how the last
// attempt went. Its Kafka key is the conversion record's key (the click ID).
type DeadLetter = schemas.DeadLetter
