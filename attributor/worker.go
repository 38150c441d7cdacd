package attributor

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/segmentio/kafka-go"

	"github.com/trackstar/trackstar/internal/bus"
	"github.com/trackstar/trackstar/internal/catalog"
	"github.com/trackstar/trackstar/schemas"
)

// errStore marks errors of the state store: the member cannot go on
// without it, unlike Kafka trouble, which a rejoin may cure.
var errStore = errors.New("state store failed")

func storeErr(err error) error {
	if err == nil {
		return nil
	}
	return fmt.Errorf("%w: %w", errStore, err)
}

// worker runs one partition pair for the length of a group generation.
type worker struct {
	a         *attributor
	id        int
	committer *groupCommitter
	// Offsets the group had committed when the generation began (-1: none).
	groupClicks, groupPostbacks int64

	p          *partition
	lastCommit time.Time
	lastExpire time.Time

	// The note of the conversions' end (startNote): when one last began,
	// whether one is under way, and where it reports.
	lastNoted time.Time
	noting    bool
	noteCtx   context.Context
	noteDone  chan noteResult
}

// feed reads one topic partition into a channel.
type feed struct {
	topic string
	r     *kafka.Reader
	ch    chan kafka.Message
	errc  chan error
	hw    int64 // high watermark as last seen on a record

	// The high watermark as last asked of the broker, and when: a feed
	// is caught up only while the broker confirms it, so that a partition
	// whose leader cannot be reached does not pass for one with nothing
	// left to read.
	polled   atomic.Int64
	polledAt atomic.Int64 // Unix ns
}

func (w *worker) startFeed(ctx context.Context, topic string, offset, hw int64) (*feed, error) {
	// Clicks are the bulk and nobody waits on them: read them in large
	// fetches. Postbacks are what a partner waits on: read them as they come.
	minBytes, maxWait := 1, 500*time.Millisecond
	if topic == bus.TopicClicks {
		minBytes, maxWait = bus.FetchMinBytes, bus.FetchMaxWait
	}
	r := kafka.NewReader(kafka.ReaderConfig{
		Brokers:         w.a.cfg.Brokers,
		Topic:           topic,
		Partition:       w.id,
		MinBytes:        minBytes,
		MaxBytes:        8 << 20,
		MaxWait:         maxWait,
		QueueCapacity:   1000,
		ReadLagInterval: -1,
		ErrorLogger: kafka.LoggerFunc(func(msg string, args ...any) {
			w.a.log.Warn("kafka reader: "+fmt.Sprintf(msg, args...), "topic", topic, "partition", w.id)
		}),
	})
	if err := r.SetOffset(offset); err != nil {
		r.Close()
		return nil, fmt.Errorf("cannot seek %s/%d to offset %d: %w", topic, w.id, offset, err)
	}
	f := &feed{topic: topic, r: r, ch: make(chan kafka.Message, 1000), errc: make(chan error, 1), hw: hw}
	f.polled.Store(hw)
	f.polledAt.Store(time.Now().UnixNano())
	go func() {
		t := time.NewTicker(time.Second)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			if hw, err := w.lastOffset(ctx, topic); err == nil {
				f.polled.Store(hw)
				f.polledAt.Store(time.Now().UnixNano())
			}
		}
	}()
	go func() {
		for {
			m, err := r.FetchMessage(ctx)
			if err != nil {
				if ctx.Err() == nil {
					f.errc <- fmt.Errorf("cannot read %s/%d: %w", topic, w.id, err)
				}
				return
			}
			select {
			case f.ch <- m:
			case <-ctx.Done():
				return
			}
		}
	}()
	return f, nil
}

// end returns the high watermark as last known.
func (f *feed) end() int64 { return max(f.hw, f.polled.Load()) }

// caughtUp reports whether everything up to the high watermark has been
// applied, the broker having confirmed the watermark in the last seconds.
func (f *feed) caughtUp(next int64) bool {
	fresh := time.Since(time.Unix(0, f.polledAt.Load())) < 5*time.Second
	return fresh && len(f.ch) == 0 && next >= f.end()
}

// run prepares the partition's state (loading it, or rebuilding it when
// there is none or it is stale), then applies what the two topics bring
// until ctx ends.
func (w *worker) run(ctx context.Context) error {
	a := w.a
	log := a.log.With("partition", w.id)
	w.p = newPartition(a.db, w.id, a.cfg.Grace, a.m)
	defer w.p.close()
	nctx, stopNote := context.WithCancel(ctx)
	w.noteCtx, w.noteDone = nctx, make(chan noteResult, 1)
	defer func() {
		// A note under way reads the store: it ends before the worker.
		stopNote()
		if w.noting {
			<-w.noteDone
			w.noting = false
		}
	}()
	hasState, err := w.p.load()
	if err != nil {
		return storeErr(err)
	}
	valid := hasState && w.offsetsMatch()
	if valid {
		// The offsets are this store's, yet another member may have had
		// the partition meanwhile and decided postbacks without moving
		// them (a waiting postback whose grace ran out, while an earlier
		// one still waits): then its conversions topic says so.
		own, err := w.outputIsOwn(ctx)
		if err != nil {
			return err
		}
		if !own {
			log.Info("local state is stale (another member decided postbacks of the partition since)")
			valid = false
		}
	}
	if !valid {
		if hasState {
			log.Info("local state is stale (another member processed the partition since); rebuilding",
				"group_clicks", w.groupClicks, "group_postbacks", w.groupPostbacks)
		}
		a.setRebuilding(w.id, true)
		err := w.rebuild(ctx)
		a.setRebuilding(w.id, false)
		if err != nil {
			return err
		}
	} else if err := w.flushOutbox(ctx); err != nil {
		return err
	}

	clicksHW, err := w.lastOffset(ctx, bus.TopicClicks)
	if err != nil {
		return err
	}
	postbacksHW, err := w.lastOffset(ctx, bus.TopicPostbacks)
	if err != nil {
		return err
	}
	fctx, stopFeeds := context.WithCancel(ctx)
	var readers []*kafka.Reader
	defer func() {
		stopFeeds()
		for _, r := range readers {
			r.Close()
		}
	}()
	clicks, err := w.startFeed(fctx, bus.TopicClicks, w.p.meta.ClicksNext, clicksHW)
	if err != nil {
		return err
	}
	readers = append(readers, clicks.r)
	// Postbacks wait until the clicks there were at the start are in the
	// store: after a rebuild or a long stop, that is most of them, and
	// their postbacks need not be held.
	var postbacks *feed
	var postbackCh <-chan kafka.Message
	var postbackErr <-chan error
	log.Info("partition worker started", "clicks_offset", w.p.meta.ClicksNext, "clicks_end", clicksHW,
		"postbacks_offset", w.p.meta.PostbacksNext, "postbacks_end", postbacksHW, "held", w.p.heldCount, "rebuilt", !valid)

	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	w.lastCommit, w.lastExpire = time.Now(), time.Now()
	var cm, pm []kafka.Message
	for {
		if postbacks == nil && w.p.meta.ClicksNext >= clicksHW {
			if postbacks, err = w.startFeed(fctx, bus.TopicPostbacks, w.p.meta.PostbacksNext, postbacksHW); err != nil {
				return err
			}
			readers = append(readers, postbacks.r)
			postbackCh, postbackErr = postbacks.ch, postbacks.errc
		}
		cm, pm = cm[:0], pm[:0]
		select {
		case <-ctx.Done():
			return w.shutdown()
		case err := <-clicks.errc:
			return err
		case err := <-postbackErr:
			return err
		case m := <-clicks.ch:
			cm = append(cm, m)
		case m := <-postbackCh:
			pm = append(pm, m)
		case res := <-w.noteDone:
			w.noting = false
			w.applyNote(res)
		case <-tick.C:
		}
	drain:
		for len(cm)+len(pm) < a.cfg.MaxBatch {
			select {
			case m := <-clicks.ch:
				cm = append(cm, m)
			case m := <-postbackCh:
				pm = append(pm, m)
			default:
				break drain
			}
		}
		if n := len(cm); n > 0 {
			clicks.hw = max(clicks.hw, cm[n-1].HighWaterMark)
		}
		if n := len(pm); n > 0 {
			postbacks.hw = max(postbacks.hw, pm[n-1].HighWaterMark)
		}
		if err := w.apply(ctx, clicks, postbacks, cm, pm); err != nil {
			return err
		}
		a.m.setLag("clicks", w.id, clicks.end()-w.p.meta.ClicksNext)
		if postbacks != nil {
			a.m.setLag("postbacks", w.id, postbacks.end()-w.p.meta.PostbacksNext)
		}

		now := time.Now()
		if now.Sub(w.lastCommit) >= a.cfg.CommitInterval {
			if err := w.commitGroup(); err != nil {
				return err
			}
		}
		if now.Sub(w.lastExpire) >= a.cfg.ExpireInterval {
			w.lastExpire = now
			if err := w.p.expire(a.cfg.Catalog.Current(), now); err != nil {
				return storeErr(err)
			}
		}
	}
}

// apply applies one batch: clicks first (a postback in the same batch
// then finds its click), then the held postbacks that are due, then the
// postbacks. It stores the result with its offsets, sends the decided
// conversions and, once Kafka has them, clears them from the outbox.
func (w *worker) apply(ctx context.Context, clicks, postbacks *feed, cm, pm []kafka.Message) error {
	p, a := w.p, w.a
	start := time.Now()
	cat := a.cfg.Catalog.Current()
	wk := p.begin()
	for i := range cm {
		if err := p.addClick(wk, cat, cm[i].Offset, cm[i].Value); err != nil {
			wk.b.Close()
			return storeErr(err)
		}
	}
	p.clicksCaughtUp = clicks.caughtUp(p.meta.ClicksNext)
	if err := p.resolveDue(wk, cat, start); err != nil {
		wk.b.Close()
		return storeErr(err)
	}
	for i := range pm {
		if err := p.addPostback(wk, cat, pm[i].Offset, pm[i].Key, pm[i].Value, start); err != nil {
			wk.b.Close()
			return storeErr(err)
		}
	}
	if postbacks != nil {
		p.postbacksCaughtUp = postbacks.caughtUp(p.meta.PostbacksNext)
	}
	w.logInvalid(wk.invalid)
	if len(cm)+len(pm) == 0 && wk.b.Empty() {
		wk.b.Close()
		return nil
	}
	out := wk.out
	if err := p.commit(wk); err != nil {
		return storeErr(err)
	}
	a.m.batchSeconds.Observe(time.Since(start).Seconds())
	if a.crash("stored", len(out)) {
		return errCrashed
	}
	if err := w.send(ctx, out); err != nil {
		return err
	}
	if a.crash("sent", len(out)) {
		return errCrashed
	}
	return storeErr(p.acked(out))
}

func (a *attributor) crash(step string, records int) bool {
	if a.crashed.Load() {
		return true
	}
	if a.cfg.hooks != nil && a.cfg.hooks.crash != nil && a.cfg.hooks.crash(step, records) {
		a.crashed.Store(true)
		return true
	}
	return false
}

// logInvalid logs the records of a batch that could not be decoded, at
// most one a second: a producer writing garbage must not flood the log.
// The metric counts them all.
func (w *worker) logInvalid(invalid []invalidRecord) {
	if len(invalid) == 0 || !w.a.invalidLog.Allow() {
		return
	}
	r := invalid[0]
	if r.topic == bus.TopicPostbacks {
		w.a.log.Warn("dead-lettering a postback record that cannot be decoded", "partition", w.id, "offset", r.offset,
			"err", r.err, "invalid_in_batch", len(invalid))
	} else {
		w.a.log.Warn("skipping a click record that cannot be decoded (the loader dead-letters it)", "partition", w.id,
			"offset", r.offset, "err", r.err, "invalid_in_batch", len(invalid))
	}
}

// send produces conversions and dead letters and waits until Kafka has
// acknowledged them all, retrying what failed. It gives up only when ctx
// ends, leaving the rest in the outbox for the next run.
func (w *worker) send(ctx context.Context, out []outRecord) error {
	if len(out) == 0 {
		return nil
	}
	// The record time is what a rebuild looks conversions up by.
	now := time.Now()
	var convs, dead []kafka.Message
	for _, r := range out {
		m := kafka.Message{Key: r.key, Value: r.value, Time: now}
		if r.dlq {
			dead = append(dead, m)
		} else {
			convs = append(convs, m)
		}
	}
	// Conversions first, with a bounded time after ctx ends (see
	// produce). Dead letters get none: the hand-over of the partition
	// must not wait for them too. One not sent stays in the outbox, and
	// the offsets past it uncommitted, so the partition's next owner
	// reads the record again and dead-letters it itself.
	if err := w.produce(ctx, w.a.writer, bus.TopicConversions, convs, w.a.cfg.RebalanceTimeout/2); err != nil {
		return err
	}
	return w.produce(ctx, w.a.dlq, bus.TopicDLQ, dead, 0)
}

// produce writes msgs to topic with wr, retrying what failed until Kafka
// has them all or ctx ends; a write under way when ctx ends may go on for
// grace.
func (w *worker) produce(ctx context.Context, wr *kafka.Writer, topic string, msgs []kafka.Message, grace time.Duration) error {
	if len(msgs) == 0 {
		return nil
	}
	if grace == 0 && ctx.Err() != nil {
		return ctx.Err()
	}
	backoff := 100 * time.Millisecond
	for {
		// Not ctx itself: a write cancelled halfway may still land, and
		// the generation should end with its conversions sent if it can.
		// But only for half the time the group waits for this member to
		// rejoin: past RebalanceTimeout the partition's next owner
		// rebuilds it from the conversions topic, and a write landing
		// after that rebuild would have its postbacks decided twice.
		wctx, cancel := outlive(ctx, grace, 30*time.Second)
		err := wr.WriteMessages(wctx, msgs...)
		cancel()
		if err == nil {
			return nil
		}
		var werrs kafka.WriteErrors
		if errors.As(err, &werrs) && len(werrs) == len(msgs) {
			failed := msgs[:0]
			for i, e := range werrs {
				if e != nil {
					failed = append(failed, msgs[i])
				}
			}
			msgs = failed
		}
		w.a.log.Warn("cannot produce records; retrying", "topic", topic, "partition", w.id, "records", len(msgs), "err", err)
		select {
		case <-ctx.Done():
			return fmt.Errorf("cannot produce to %s for partition %d before stopping: %w", topic, w.id, err)
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 5*time.Second)
	}
}

// outlive returns a context that ends at most limit from now, or grace
// after ctx ends, whichever is first.
func outlive(ctx context.Context, grace, limit time.Duration) (context.Context, context.CancelFunc) {
	out, cancel := context.WithTimeout(context.WithoutCancel(ctx), limit)
	stop := context.AfterFunc(ctx, func() {
		select {
		case <-time.After(grace):
			cancel()
		case <-out.Done():
		}
	})
	return out, func() {
		stop()
		cancel()
	}
}

// flushOutbox sends what a previous run decided but did not see
// acknowledged.
func (w *worker) flushOutbox(ctx context.Context) error {
	out, err := w.p.pendingOutbox()
	if err != nil {
		return storeErr(err)
	}
	if len(out) == 0 {
		return nil
	}
	w.a.log.Info("sending records left in the outbox", "partition", w.id, "records", len(out))
	if err := w.send(ctx, out); err != nil {
		return err
	}
	return storeErr(w.p.acked(out))
}

// offsetsMatch reports whether the group's committed offsets are ones this
// store committed (or tried to): then no other member has processed the
// partition since, and the local state is current.
func (w *worker) offsetsMatch() bool {
	m := &w.p.meta
	return w.groupClicks == m.ConfirmedClicks && w.groupPostbacks == m.ConfirmedPostbacks ||
		w.groupClicks == m.AttemptClicks && w.groupPostbacks == m.AttemptPostbacks
}

// commitGroup commits the partition's offsets to the consumer group. The
// store first records what it is about to commit, synced (which also makes
// every batch before it durable): the group never names offsets beyond
// state this member could lose.
func (w *worker) commitGroup() error {
	w.lastCommit = time.Now()
	p := w.p
	clicks, postbacks := p.commitOffsets()
	if clicks == p.meta.ConfirmedClicks && postbacks == p.meta.ConfirmedPostbacks {
		return nil
	}
	p.meta.AttemptClicks, p.meta.AttemptPostbacks = clicks, postbacks
	w.startNote()
	if err := w.a.db.Set(metaKey(w.id), p.meta.append(nil), pebble.Sync); err != nil {
		return storeErr(fmt.Errorf("cannot store offsets of partition %d: %w", w.id, err))
	}
	if err := w.committer.commit(w.id, clicks, postbacks); err != nil {
		// Not fatal: the next commit covers these offsets too.
		w.a.log.Warn("cannot commit offsets", "partition", w.id, "err", err)
		return nil
	}
	p.meta.ConfirmedClicks, p.meta.ConfirmedPostbacks = clicks, postbacks
	return nil
}

// shutdown ends the worker at the end of its generation: the outbox is
// already empty (apply sends before it returns), so only offsets remain.
func (w *worker) shutdown() error {
	if w.a.crashed.Load() {
		return nil
	}
	if err := w.commitGroup(); err != nil {
		return err
	}
	// What a note under way got to (its context has ended with the
	// generation's), then as far as a last one gets.
	if w.noting {
		w.noting = false
		w.applyNote(<-w.noteDone)
	}
	// Record the confirmation too, so a restart finds its own offsets.
	w.noteConversionsEnd()
	return storeErr(w.a.db.Set(metaKey(w.id), w.p.meta.append(nil), pebble.Sync))
}

// noteInterval is how often a commit moves meta.ConversionsEnd on: a
// restart after a crash reads back about that much of its own output
// (outputIsOwn), and a running member reads it back once per interval.
var noteInterval = 10 * time.Second // a variable for tests

// staleMark, as meta.ConversionsEnd, says that another member's
// conversions were found in the partition while this one still had it
// (it stalled past its session, say): the state is stale, and the next
// start rebuilds it.
const staleMark = -2

// A note moves meta.ConversionsEnd on to the end of the partition's
// conversions, for a later write of the meta record, across records it
// checks are this store's own (ownUpTo): those it sent since, whose
// replay records were written before them, so before that write. One
// that is not (another member took the partition over while this one
// stalled) marks the state stale instead. Where the broker is slow or
// does not answer it moves as far as it got, and outputIsOwn reads the
// rest at the next start.
//
// A running worker notes in the background (startNote), since reading
// back seconds of its own output takes a while, and its postbacks must
// not wait for that (a synchronous note every 10 s held conversions up
// to half a second: p99 postback→partner 140 → 490–630 ms in
// scripts/bench.sh e2e); shutdown notes in place (noteConversionsEnd).
type noteResult struct {
	from, reached int64
	foreign       bool
}

// startNote starts a note in the background once noteInterval has passed
// since the last began, unless one is under way or the mark is unknown
// or stale. run applies its result (applyNote).
// Retried at the next interval, not at every commit, when the broker is
// slow; and no bound on how many records: every record since the last
// note is this worker's own (a start, where a rebuild is cheaper than a
// long check, has one: ownBetween).
func (w *worker) startNote() {
	from := w.p.meta.ConversionsEnd
	if w.noting || from < 0 || time.Since(w.lastNoted) < noteInterval {
		return
	}
	w.noting, w.lastNoted = true, time.Now()
	ctx := w.noteCtx
	go func() {
		ctx, cancel := context.WithTimeout(ctx, noteTimeout)
		defer cancel()
		w.noteDone <- w.checkOwn(ctx, from)
	}()
}

// noteTimeout bounds one note.
const noteTimeout = 5 * time.Second

// checkOwn checks the partition's conversions from from to their current
// end (see noteResult). It reads only the broker, the store and the
// partition's current cut, so it may run beside the worker.
func (w *worker) checkOwn(ctx context.Context, from int64) noteResult {
	res := noteResult{from: from, reached: from}
	end, err := w.lastOffset(ctx, bus.TopicConversions)
	if err != nil || end <= from {
		return res
	}
	res.reached, res.foreign, _ = w.ownUpTo(ctx, from, end)
	return res
}

// applyNote sets meta.ConversionsEnd from a note's result, unless the
// mark changed since it began.
func (w *worker) applyNote(res noteResult) {
	if w.p.meta.ConversionsEnd != res.from {
		return
	}
	if res.foreign {
		w.a.log.Warn("another member wrote conversions of this partition while this one had it; its state will be rebuilt at the next start",
			"partition", w.id)
		w.p.meta.ConversionsEnd = staleMark
		return
	}
	// As far as it got in time: the next note goes on from there.
	w.p.meta.ConversionsEnd = max(res.from, res.reached)
}

// noteConversionsEnd notes in place, for shutdown (and tests).
func (w *worker) noteConversionsEnd() {
	from := w.p.meta.ConversionsEnd
	if from < 0 {
		return // unknown (see restoreConversions), or already stale
	}
	ctx, cancel := context.WithTimeout(context.Background(), noteTimeout)
	defer cancel()
	w.lastNoted = time.Now() // a broker that does not answer is asked again at the next interval
	w.applyNote(w.checkOwn(ctx, from))
}

// conversionsLikeClicks reports whether the conversions topic has as many
// partitions as the clicks: then partition p of the conversions holds
// exactly the conversions of partition p's clicks. It logs when not.
func (w *worker) conversionsLikeClicks(ctx context.Context) (bool, error) {
	md, err := w.a.client.Metadata(ctx, &kafka.MetadataRequest{Topics: []string{bus.TopicClicks, bus.TopicConversions}})
	if err != nil {
		return false, fmt.Errorf("cannot read topic metadata: %w", err)
	}
	counts := map[string]int{}
	for _, t := range md.Topics {
		counts[t.Name] = len(t.Partitions)
	}
	if counts[bus.TopicConversions] != counts[bus.TopicClicks] {
		w.a.log.Error("the conversions topic has another partition count than clicks: "+
			"deduplication and status updates will not see conversions decided before a partition moved, "+
			"nor can a member tell that another decided postbacks of a partition it returns to",
			"partition", w.id, "clicks_partitions", counts[bus.TopicClicks], "conversions_partitions", counts[bus.TopicConversions])
		return false, nil
	}
	return true, nil
}

// maxOwnCheck bounds the conversions outputIsOwn reads: more than that
// since this member last looked, and a rebuild is cheaper than the check.
var maxOwnCheck int64 = 200_000 // a variable for tests

// outputIsOwn reports whether every conversion written to the partition
// since meta.ConversionsEnd is one this store emitted, byte for byte (its
// replay record, under the postback's event ID): records this member sent
// before a crash took its next meta write are; one another member decided
// while it had the partition is not. A store that does not know where it
// last looked (-1: written before it kept that) is trusted, as it was
// then, and notes it from now on.
func (w *worker) outputIsOwn(ctx context.Context) (bool, error) {
	from := w.p.meta.ConversionsEnd
	if from == staleMark {
		return false, nil
	}
	if from < 0 {
		if alike, err := w.conversionsLikeClicks(ctx); err == nil && alike {
			if end, err := w.lastOffset(ctx, bus.TopicConversions); err == nil {
				w.p.meta.ConversionsEnd = end
			}
		}
		return true, nil
	}
	end, err := w.lastOffset(ctx, bus.TopicConversions)
	if err != nil {
		return false, err
	}
	return w.ownBetween(ctx, from, end)
}

// ownBetween reports whether every conversion in [from, end) of the
// partition is one this store emitted, byte for byte; false, too, when
// that is more than maxOwnCheck records (a rebuild is cheaper) or some
// are gone from the topic.
func (w *worker) ownBetween(ctx context.Context, from, end int64) (bool, error) {
	if end == from {
		return true, nil
	}
	if end < from || end-from > maxOwnCheck {
		return false, nil // the topic was created again; or too much to check
	}
	reached, foreign, err := w.ownUpTo(ctx, from, end)
	return !foreign && reached >= end, err
}

// ownUpTo reads the partition's conversions from from towards end and
// returns how far every record is this store's own, and whether it
// stopped at one that is not (or that it cannot tell: gone from the
// topic, undecodable).
func (w *worker) ownUpTo(ctx context.Context, from, end int64) (reached int64, foreign bool, err error) {
	first, err := w.listOffset(ctx, bus.TopicConversions, kafka.FirstOffsetOf(w.id))
	if err != nil {
		return from, false, err
	}
	if first > from {
		return from, true, nil
	}
	r := kafka.NewReader(kafka.ReaderConfig{
		Brokers: w.a.cfg.Brokers, Topic: bus.TopicConversions, Partition: w.id,
		MinBytes: 1, MaxBytes: 8 << 20, MaxWait: 500 * time.Millisecond, ReadLagInterval: -1,
	})
	defer r.Close()
	if err := r.SetOffset(from); err != nil {
		return from, false, fmt.Errorf("cannot seek %s/%d: %w", bus.TopicConversions, w.id, err)
	}
	var key []byte
	for reached = from; reached < end; {
		m, err := r.FetchMessage(ctx)
		if err != nil {
			return reached, false, fmt.Errorf("cannot read %s/%d: %w", bus.TopicConversions, w.id, err)
		}
		c, err := schemas.DecodeConversion(m.Value)
		if err != nil {
			return reached, true, nil
		}
		key = eventKey(key[:0], w.id, c.PostbackEventID)
		v, closer, err := w.a.db.Get(key)
		if errors.Is(err, pebble.ErrNotFound) {
			if c.PostbackEventID < w.p.currentCut() {
				// Below the expiry cut: expire drops the record of such
				// a postback (minted before the window; an edge's spool
				// kept for days), this member's own as well. Cannot tell.
				reached = m.Offset + 1
				continue
			}
			return reached, true, nil
		}
		if err != nil {
			return reached, false, storeErr(err)
		}
		k, value, err := splitRecord(v)
		same := err == nil && bytes.Equal(k, m.Key) && bytes.Equal(value, m.Value)
		closer.Close()
		if !same {
			return reached, true, nil
		}
		reached = m.Offset + 1
	}
	return reached, false, nil
}

// rebuild builds the state of a partition gained without (current) local
// state: it drops what there was, restores the decisions of the
// attribution window from the conversions topic, and sets the offsets so
// that clicks are read again from the window's beginning and postbacks
// from the group's committed offset.
func (w *worker) rebuild(ctx context.Context) error {
	a, p := w.a, w.p
	a.m.rebuilds.Inc()
	if err := dropPartition(a.db, w.id); err != nil {
		return storeErr(err)
	}
	p.close() // the held postbacks of the stale state are dropped with it
	*p = *newPartition(a.db, w.id, a.cfg.Grace, a.m)
	// The state to restore is what expire would have kept by now: counted
	// back from the postbacks' position, not from the clock, so that a
	// partition that moves while its postbacks are behind keeps the clicks
	// and slots those postbacks still need, as it would have live.
	now := time.Now()
	clock := now
	postbacksStart := w.groupPostbacks
	if postbacksStart >= 0 {
		var err error
		if clock, err = w.postbacksClock(ctx, postbacksStart, now); err != nil {
			return err
		}
	}
	since := restoreSince(a.cfg.Catalog.Current(), a.cfg.Grace, clock)

	clicksStart, err := w.offsetAt(ctx, bus.TopicClicks, since)
	if err != nil {
		return err
	}
	if postbacksStart < 0 {
		if postbacksStart, err = w.offsetAt(ctx, bus.TopicPostbacks, since); err != nil {
			return err
		}
	}
	n, convEnd, err := w.restoreConversions(ctx, since)
	if err != nil {
		return err
	}
	p.meta = meta{
		ClicksNext: clicksStart, PostbacksNext: postbacksStart,
		AttemptClicks: w.groupClicks, AttemptPostbacks: w.groupPostbacks,
		ConfirmedClicks: w.groupClicks, ConfirmedPostbacks: w.groupPostbacks,
		ConversionsEnd: convEnd,
	}
	p.setCut(minIDAt(since))
	if err := a.db.Set(metaKey(w.id), p.meta.append(nil), pebble.Sync); err != nil {
		return storeErr(fmt.Errorf("cannot store offsets of partition %d: %w", w.id, err))
	}
	a.log.Info("partition state rebuilt", "partition", w.id, "window_start", since.UTC().Format(time.RFC3339),
		"clicks_from", clicksStart, "postbacks_from", postbacksStart, "conversions_restored", n)
	return nil
}

// restoreSince is where a rebuild's state begins: keepFor before clock,
// the postbacks' time at the partition's position (postbacksClock). With
// no offers (a config being edited?) that is unknown, and expire keeps
// everything then: so does a rebuild, from the start of the topics.
func restoreSince(cat *catalog.Catalog, grace time.Duration, clock time.Time) time.Time {
	if cat.MaxAttributionWindow() <= 0 {
		return time.UnixMilli(0)
	}
	return clock.Add(-keepFor(cat, grace))
}

// postbacksClock returns the postbacks' time at offset next, the first
// postback the partition has not processed, as expire reckons it live:
// now when there is no postback left to read, else the time of the last
// one processed (of the first to process, when none was), and never later
// than now.
func (w *worker) postbacksClock(ctx context.Context, next int64, now time.Time) (time.Time, error) {
	end, err := w.lastOffset(ctx, bus.TopicPostbacks)
	if err != nil || next >= end {
		return now, err
	}
	first, err := w.listOffset(ctx, bus.TopicPostbacks, kafka.FirstOffsetOf(w.id))
	if err != nil {
		return now, err
	}
	at := max(next-1, first)
	r := kafka.NewReader(kafka.ReaderConfig{
		Brokers: w.a.cfg.Brokers, Topic: bus.TopicPostbacks, Partition: w.id,
		MinBytes: 1, MaxBytes: 1 << 20, MaxWait: 500 * time.Millisecond, ReadLagInterval: -1,
	})
	defer r.Close()
	if err := r.SetOffset(at); err != nil {
		return now, fmt.Errorf("cannot seek %s/%d: %w", bus.TopicPostbacks, w.id, err)
	}
	rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	m, err := r.FetchMessage(rctx)
	if err != nil {
		return now, fmt.Errorf("cannot read %s/%d at %d: %w", bus.TopicPostbacks, w.id, at, err)
	}
	t := m.Time
	if pb, err := schemas.DecodePostback(m.Value); err == nil && pb.TS > 0 {
		t = time.UnixMilli(pb.TS)
	}
	if t.IsZero() || t.After(now) {
		return now, nil
	}
	return t, nil
}

// restoreConversions reads the conversions of the partition since the
// window's beginning back into the store. Conversions are keyed by click
// ID like clicks and postbacks, so partition p of the conversions topic
// holds exactly those of partition p's clicks, when the counts are equal.
// end is where the partition ended, every record before it restored (or
// older than the window); -1 when the counts differ.
func (w *worker) restoreConversions(ctx context.Context, since time.Time) (n int, end int64, err error) {
	a, p := w.a, w.p
	if alike, err := w.conversionsLikeClicks(ctx); err != nil || !alike {
		return 0, -1, err
	}
	end, err = w.lastOffset(ctx, bus.TopicConversions)
	if err != nil {
		return 0, 0, err
	}
	start, err := w.offsetAt(ctx, bus.TopicConversions, since)
	if err != nil || start >= end {
		return 0, end, err
	}
	r := kafka.NewReader(kafka.ReaderConfig{
		Brokers: a.cfg.Brokers, Topic: bus.TopicConversions, Partition: w.id,
		MinBytes: 1, MaxBytes: 8 << 20, MaxWait: 500 * time.Millisecond, ReadLagInterval: -1,
	})
	defer r.Close()
	if err := r.SetOffset(start); err != nil {
		return 0, 0, fmt.Errorf("cannot seek %s/%d: %w", bus.TopicConversions, w.id, err)
	}
	cat := a.cfg.Catalog.Current()
	wk := p.begin()
	defer func() { wk.b.Close() }()
	for next := start; next < end; {
		m, err := r.FetchMessage(ctx)
		if err != nil {
			return n, 0, fmt.Errorf("cannot read %s/%d: %w", bus.TopicConversions, w.id, err)
		}
		next = m.Offset + 1
		if err := p.restore(wk, cat, m.Value, since); err != nil {
			return n, 0, storeErr(err)
		}
		n++
		a.m.restored.Inc()
		if wk.b.Len() > 4<<20 {
			if err := wk.b.Commit(pebble.NoSync); err != nil {
				return n, 0, storeErr(err)
			}
			wk.b.Close()
			wk = p.begin()
		}
	}
	return n, end, storeErr(wk.b.Commit(pebble.NoSync))
}

// lastOffset returns the high watermark of the topic's partition.
func (w *worker) lastOffset(ctx context.Context, topic string) (int64, error) {
	return w.listOffset(ctx, topic, kafka.LastOffsetOf(w.id))
}

// listOffset answers one ListOffsets question about the worker's
// partition (see bus.ListOffset).
func (w *worker) listOffset(ctx context.Context, topic string, req kafka.OffsetRequest) (int64, error) {
	return bus.ListOffset(ctx, w.a.client, topic, req)
}

// offsetAt returns where to start reading the topic's partition to see
// every record from time t on: the first offset of a record from t or
// later, by the records' timestamps. When no record has such a timestamp
// it returns the first offset, not the last: producers that leave
// kafka-go's Message.Time unset write timestamp 0, and reading the
// retained log whole is slower but never wrong.
func (w *worker) offsetAt(ctx context.Context, topic string, t time.Time) (int64, error) {
	first, err := w.listOffset(ctx, topic, kafka.FirstOffsetOf(w.id))
	if err != nil {
		return 0, err
	}
	at, err := w.listOffset(ctx, topic, kafka.TimeOffsetOf(w.id, t))
	if err != nil {
		return 0, err
	}
	if at < first {
		return first, nil
	}
	return at, nil
}
