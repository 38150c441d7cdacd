package attributor

import (
	"cmp"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"slices"
	"sync/atomic"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/segmentio/kafka-go"

	"github.com/trackstar/trackstar/internal/bus"
	"github.com/trackstar/trackstar/internal/catalog"
	"github.com/trackstar/trackstar/schemas"
)

// partition is the join of one partition pair on the state store's side,
// without Kafka: the worker feeds it the records it reads, in batches, and
// sends what it emits. Tests and benchmarks drive it directly.
//
// Within a batch every change goes to one Pebble batch, committed with the
// offsets it reached and with the conversions it decided (the outbox), so
// the store never holds a decision without its offset or the other way
// round. Conversions leave the outbox only after Kafka acknowledged them.
type partition struct {
	id    int
	db    *pebble.DB
	grace time.Duration
	m     *metrics

	meta meta
	// held are the postbacks waiting for their click, by click ID, in
	// offset order; also in the store (h keys).
	held        map[string][]heldPostback
	heldCount   int
	heldShown   int   // heldCount as last added to the held_postbacks gauge
	minDeadline int64 // earliest deadline of a held postback (Unix ms); MaxInt64 when none

	// Progress of the two topics, set by whoever feeds the partition.
	clicksWatermark   int64 // highest click time read (Unix ms)
	clicksCaughtUp    bool  // nothing left to read in the clicks partition
	lastPostbackTS    int64 // time of the last postback read (Unix ms)
	postbacksCaughtUp bool

	// cut is the smallest click ID the partition keeps, as of the last
	// expiry pass or rebuild ("" before either): an older click read late
	// is not stored, since its slots are gone (or were never restored)
	// and the next pass would drop it anyway. Stored, it would come back
	// without them, and a status update would count as a new conversion.
	// Set it with setCut.
	cut string
	// sharedCut is cut for the worker's note of the conversions' end,
	// which runs beside the partition (see worker.startNote).
	sharedCut atomic.Pointer[string]
}

type heldPostback struct {
	offset   int64
	deadline int64 // Unix ms after which, the click still unseen, it is unknown_click
	pb       schemas.Postback
}

// outRecord is a record to produce: Kafka key and value of a conversion,
// or of a dead letter for trackstar.dlq.
type outRecord struct {
	seq   uint64
	key   []byte
	value []byte
	dlq   bool
}

// invalidRecord is a record that could not be decoded, for the log.
type invalidRecord struct {
	topic  string
	offset int64
	err    error
}

// work is one batch being built.
type work struct {
	b       *pebble.Batch
	out     []outRecord
	invalid []invalidRecord
	key     []byte // scratch
	val     []byte // scratch
	lookup  batchSlots
}

func newPartition(db *pebble.DB, id int, grace time.Duration, m *metrics) *partition {
	if id < 0 || id > maxPartition {
		panic(fmt.Sprintf("BUG: partition %d out of range", id))
	}
	return &partition{id: id, db: db, grace: grace, m: m, held: map[string][]heldPostback{}, minDeadline: math.MaxInt64}
}

// load reads the partition's offsets and held postbacks from the store. It
// reports false when the store has no state for the partition.
func (p *partition) load() (bool, error) {
	v, closer, err := p.db.Get(metaKey(p.id))
	if errors.Is(err, pebble.ErrNotFound) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("cannot read offsets of partition %d: %w", p.id, err)
	}
	p.meta, err = decodeMeta(v)
	closer.Close()
	if err != nil {
		return false, fmt.Errorf("cannot read offsets of partition %d: %w", p.id, err)
	}
	p.setCut(p.meta.Cut)
	lo, hi := kindBounds(p.id, kindHeld)
	it, err := p.db.NewIter(&pebble.IterOptions{LowerBound: lo, UpperBound: hi})
	if err != nil {
		return false, fmt.Errorf("cannot read held postbacks of partition %d: %w", p.id, err)
	}
	defer it.Close()
	for it.First(); it.Valid(); it.Next() {
		v := it.Value()
		if len(v) < 8 {
			return false, fmt.Errorf("held postback %x: %w", it.Key(), errCorrupt)
		}
		pb, err := schemas.DecodePostback(v[8:])
		if err != nil {
			return false, fmt.Errorf("held postback %x: %w", it.Key(), err)
		}
		// The stored value is the record as read; it was held (and keyed)
		// under the click ID in lower case.
		pb.ClickID = normalizeID(pb.ClickID)
		p.addHeld(heldPostback{offset: int64(binary.BigEndian.Uint64(v)), deadline: p.deadline(&pb), pb: pb})
	}
	// The store keeps them by event ID; they are decided in offset order.
	for _, hs := range p.held {
		slices.SortFunc(hs, func(a, b heldPostback) int { return cmp.Compare(a.offset, b.offset) })
	}
	if err := it.Error(); err != nil {
		return false, err
	}
	// They are waiting from now on, whether or not a batch comes soon.
	p.showHeld()
	return true, nil
}

// pendingOutbox returns the conversions decided but not acknowledged yet.
func (p *partition) pendingOutbox() ([]outRecord, error) {
	lo, hi := kindBounds(p.id, kindOutbox)
	it, err := p.db.NewIter(&pebble.IterOptions{LowerBound: lo, UpperBound: hi})
	if err != nil {
		return nil, fmt.Errorf("cannot read outbox of partition %d: %w", p.id, err)
	}
	defer it.Close()
	var out []outRecord
	var key []byte
	for it.First(); it.Valid(); it.Next() {
		k := it.Key()
		if v := it.Value(); len(v) > 0 && v[0] == outboxDeadLetter {
			dkey, value, err := splitRecord(slices.Clone(v[1:]))
			if err != nil {
				return nil, fmt.Errorf("outbox entry %x: %w", k, err)
			}
			out = append(out, outRecord{seq: binary.BigEndian.Uint64(k[3:]), key: dkey, value: value, dlq: true})
			continue
		}
		key = eventKey(key[:0], p.id, string(it.Value()))
		rec, closer, err := p.db.Get(key)
		if errors.Is(err, pebble.ErrNotFound) {
			continue // expired since; far too old to matter
		}
		if err != nil {
			return nil, fmt.Errorf("outbox entry %x: %w", k, err)
		}
		ckey, value, err := splitRecord(slices.Clone(rec))
		closer.Close()
		if err != nil {
			return nil, fmt.Errorf("outbox entry %x: %w", k, err)
		}
		out = append(out, outRecord{seq: binary.BigEndian.Uint64(k[3:]), key: ckey, value: value})
	}
	return out, it.Error()
}

// begin starts a batch.
func (p *partition) begin() *work {
	w := &work{b: p.db.NewIndexedBatch()}
	w.lookup = batchSlots{b: w.b, p: p.id}
	return w
}

// commit writes the batch with the offsets it reached. A batch that
// decided conversions is synced: they will be sent as soon as it returns.
func (p *partition) commit(w *work) error {
	defer w.b.Close()
	if err := w.b.Set(metaKey(p.id), p.meta.append(nil), nil); err != nil {
		return err
	}
	opts := pebble.NoSync
	if len(w.out) > 0 {
		opts = pebble.Sync
	}
	if err := w.b.Commit(opts); err != nil {
		return fmt.Errorf("cannot commit state of partition %d: %w", p.id, err)
	}
	p.showHeld()
	return nil
}

// showHeld brings the held_postbacks gauge, shared by all partitions, up
// to date with this one.
func (p *partition) showHeld() {
	p.m.heldPostbacks.Add(float64(p.heldCount - p.heldShown))
	p.heldShown = p.heldCount
}

// close takes the partition's share out of the shared gauges.
func (p *partition) close() {
	p.m.heldPostbacks.Sub(float64(p.heldShown))
	p.heldShown = 0
}

// acked removes conversions Kafka has acknowledged from the outbox.
func (p *partition) acked(out []outRecord) error {
	if len(out) == 0 {
		return nil
	}
	b := p.db.NewBatch()
	defer b.Close()
	var key []byte
	for _, r := range out {
		key = outboxKey(key[:0], p.id, r.seq)
		if err := b.Delete(key, nil); err != nil {
			return err
		}
	}
	// Not synced: a crash that forgets the deletion sends them once more,
	// which is harmless.
	if err := b.Commit(pebble.NoSync); err != nil {
		return fmt.Errorf("cannot clear outbox of partition %d: %w", p.id, err)
	}
	return nil
}

// addClick stores a click read at offset and attributes the postbacks
// that were waiting for it.
func (p *partition) addClick(w *work, cat *catalog.Catalog, offset int64, value []byte) error {
	p.meta.ClicksNext = offset + 1
	c, err := schemas.DecodeClick(value)
	if err == nil && !schemas.ValidID(c.ClickID) {
		err = fmt.Errorf("cannot decode click event: invalid click_id %q", c.ClickID)
	}
	if err != nil {
		// The warehouse loader, which reads the clicks topic too,
		// dead-letters it; here it cannot join anything.
		p.m.invalidClicks.Inc()
		w.invalid = append(w.invalid, invalidRecord{topic: bus.TopicClicks, offset: offset, err: err})
		return nil
	}
	p.m.clicks.Inc()
	c.ClickID = normalizeID(c.ClickID)
	p.clicksWatermark = max(p.clicksWatermark, c.TS)
	if c.ClickID < p.cut {
		return nil
	}
	w.key = clickKey(w.key[:0], p.id, c.ClickID)
	w.val = appendClickValue(w.val[:0], &c)
	if err := w.b.Set(w.key, w.val, nil); err != nil {
		return err
	}
	if waiting := p.held[c.ClickID]; len(waiting) > 0 {
		delete(p.held, c.ClickID)
		p.heldCount -= len(waiting)
		for i := range waiting {
			if err := p.release(w, &waiting[i]); err != nil {
				return err
			}
			if err := p.decide(w, cat, &c, &waiting[i].pb); err != nil {
				return err
			}
		}
	}
	return nil
}

// addPostback joins a postback read at offset with its click: it re-emits
// the earlier record of a postback seen before, holds one whose click may
// still come, and decides the others. One it cannot decode it
// dead-letters.
func (p *partition) addPostback(w *work, cat *catalog.Catalog, offset int64, key, value []byte, now time.Time) error {
	p.meta.PostbacksNext = offset + 1
	pb, err := schemas.DecodePostback(value)
	if err == nil && !schemas.ValidID(pb.EventID) {
		// The edge mints every event ID; the outbox also tells a
		// conversion's entry (its event ID) from a dead letter's (a 0x00
		// byte first) by it.
		err = fmt.Errorf("cannot decode postback event: event_id %q is not a Trackstar ID", pb.EventID)
	}
	if err != nil {
		p.m.invalidPostbacks.Inc()
		w.invalid = append(w.invalid, invalidRecord{topic: bus.TopicPostbacks, offset: offset, err: err})
		return p.deadLetter(w, offset, key, value, err, now)
	}
	p.m.postbacks.Inc()
	p.lastPostbackTS = pb.TS

	// The same Kafka record again (a producer retry, or a partition read
	// again after it moved): send the very record decided the first time.
	w.key = eventKey(w.key[:0], p.id, pb.EventID)
	if v, closer, err := w.b.Get(w.key); err == nil {
		rec := slices.Clone(v)
		closer.Close()
		p.m.replays.Inc()
		return p.emitRaw(w, pb.EventID, rec)
	} else if !errors.Is(err, pebble.ErrNotFound) {
		return fmt.Errorf("cannot look up postback %s: %w", pb.EventID, err)
	}
	if p.isHeld(&pb) {
		return nil // a second copy of a postback already waiting
	}

	valid := schemas.ValidID(pb.ClickID)
	if valid {
		pb.ClickID = normalizeID(pb.ClickID)
		click, found, err := p.click(w, pb.ClickID)
		if err != nil {
			return err
		}
		if found {
			return p.decide(w, cat, &click, &pb)
		}
	}
	if valid && p.shouldHold(cat, &pb, now) {
		return p.hold(w, offset, &pb, value)
	}
	return p.decide(w, cat, nil, &pb)
}

// resolveDue decides the held postbacks whose click did not come in time:
// unknown_click.
func (p *partition) resolveDue(w *work, cat *catalog.Catalog, now time.Time) error {
	if p.heldCount == 0 || !p.clicksPast(p.minDeadline, now) {
		return nil
	}
	var due []heldPostback
	p.minDeadline = math.MaxInt64
	for id, hs := range p.held {
		// Postbacks of one click share a deadline but for clock skew;
		// resolve them together, in order, once the first is due.
		if !p.clicksPast(hs[0].deadline, now) {
			p.minDeadline = min(p.minDeadline, hs[0].deadline)
			continue
		}
		due = append(due, hs...)
		delete(p.held, id)
		p.heldCount -= len(hs)
	}
	slices.SortFunc(due, func(a, b heldPostback) int { return cmp.Compare(a.offset, b.offset) })
	for i := range due {
		if err := p.release(w, &due[i]); err != nil {
			return err
		}
		if err := p.decide(w, cat, nil, &due[i].pb); err != nil {
			return err
		}
	}
	return nil
}

// deadline is when a postback stops waiting for its click: grace after
// the click's own time (its ID carries it), or after the postback's time
// if that is earlier, so that a click ID from the future cannot hold a
// postback for ever.
func (p *partition) deadline(pb *schemas.Postback) int64 {
	t := pb.TS
	if ms, err := schemas.IDTime(pb.ClickID); err == nil {
		t = min(t, ms)
	}
	return t + p.grace.Milliseconds()
}

// clicksPast reports whether the clicks partition has moved past time t:
// a click of a later time was read, or there is nothing left to read and
// the clock has passed t.
func (p *partition) clicksPast(t int64, now time.Time) bool {
	// A click time ahead of the clock (from an edge whose clock runs
	// ahead) shows only that the partition has reached now.
	return min(p.clicksWatermark, now.UnixMilli()) >= t || p.clicksCaughtUp && now.UnixMilli() >= t
}

func (p *partition) shouldHold(cat *catalog.Catalog, pb *schemas.Postback, now time.Time) bool {
	if len(p.held[pb.ClickID]) > 0 {
		return true // keep the order of postbacks of one click
	}
	if ms, _ := schemas.IDTime(pb.ClickID); pb.TS-ms > cat.MaxAttributionWindow().Milliseconds() {
		return false // expired whether or not the click comes
	}
	return !p.clicksPast(p.deadline(pb), now)
}

func (p *partition) isHeld(pb *schemas.Postback) bool {
	for _, h := range p.held[normalizeID(pb.ClickID)] {
		if h.pb.EventID == pb.EventID {
			return true
		}
	}
	return false
}

func (p *partition) addHeld(h heldPostback) {
	p.held[h.pb.ClickID] = append(p.held[h.pb.ClickID], h)
	p.heldCount++
	p.minDeadline = min(p.minDeadline, h.deadline)
}

func (p *partition) hold(w *work, offset int64, pb *schemas.Postback, value []byte) error {
	w.key = heldKey(w.key[:0], p.id, pb.ClickID, pb.EventID)
	w.val = binary.BigEndian.AppendUint64(w.val[:0], uint64(offset))
	w.val = append(w.val, value...)
	if err := w.b.Set(w.key, w.val, nil); err != nil {
		return err
	}
	p.addHeld(heldPostback{offset: offset, deadline: p.deadline(pb), pb: *pb})
	p.m.holds.Inc()
	return nil
}

func (p *partition) release(w *work, h *heldPostback) error {
	w.key = heldKey(w.key[:0], p.id, h.pb.ClickID, h.pb.EventID)
	return w.b.Delete(w.key, nil)
}

// commitOffsets returns the offsets the consumer group may commit: all
// clicks read, and the postbacks up to the first one still held (a member
// that takes the partition over must read that one again).
func (p *partition) commitOffsets() (clicks, postbacks int64) {
	postbacks = p.meta.PostbacksNext
	for _, hs := range p.held {
		for _, h := range hs {
			postbacks = min(postbacks, h.offset)
		}
	}
	return p.meta.ClicksNext, postbacks
}

func (p *partition) click(w *work, clickID string) (schemas.Click, bool, error) {
	w.key = clickKey(w.key[:0], p.id, clickID)
	v, closer, err := w.b.Get(w.key)
	if errors.Is(err, pebble.ErrNotFound) {
		return schemas.Click{}, false, nil
	}
	if err != nil {
		return schemas.Click{}, false, fmt.Errorf("cannot look up click %s: %w", clickID, err)
	}
	defer closer.Close()
	c, err := decodeClickValue(clickID, v)
	if err != nil {
		return c, false, fmt.Errorf("click %s: %w", clickID, err)
	}
	return c, true, nil
}

// decide runs the rules and records the decision: the slots it saves, the
// record under the postback's event ID (for replays), and the outbox.
func (p *partition) decide(w *work, cat *catalog.Catalog, click *schemas.Click, pb *schemas.Postback) error {
	w.lookup.err = nil
	d := Decide(cat, &w.lookup, click, pb)
	if w.lookup.err != nil {
		return w.lookup.err
	}
	c := &d.Conversion
	for _, s := range d.Saves {
		if err := p.saveSlot(w, s); err != nil {
			return err
		}
	}
	rec := appendString(nil, c.ClickID)
	rec = append(rec, schemas.EncodeConversion(*c)...)
	w.key = eventKey(w.key[:0], p.id, pb.EventID)
	if err := w.b.Set(w.key, rec, nil); err != nil {
		return err
	}
	p.m.conversion(c.Status, c.RejectReason)
	return p.emitRaw(w, pb.EventID, rec)
}

func (p *partition) saveSlot(w *work, s SlotSave) error {
	w.key = slotKey(w.key[:0], p.id, s.Key)
	w.val = appendSlotValue(w.val[:0], &s.Slot)
	if err := w.b.Set(w.key, w.val, nil); err != nil {
		return err
	}
	if s.Key.TxnID != "" {
		// x keys are not time-ordered; the y key expires this one with its click.
		w.key = txnIndexKey(w.key[:0], p.id, s.Slot.ClickID, s.Key)
		return w.b.Set(w.key, nil, nil)
	}
	return nil
}

// emitRaw puts the record stored for a postback (click ID, then
// conversion JSON) in the outbox. The outbox names the postback; the
// record itself stays under its e key.
func (p *partition) emitRaw(w *work, eventID string, rec []byte) error {
	key, value, err := splitRecord(rec)
	if err != nil {
		return err
	}
	seq := p.meta.OutboxSeq
	p.meta.OutboxSeq++
	w.key = outboxKey(w.key[:0], p.id, seq)
	if err := w.b.Set(w.key, []byte(eventID), nil); err != nil {
		return err
	}
	w.out = append(w.out, outRecord{seq: seq, key: key, value: value})
	return nil
}

// outboxDeadLetter starts an outbox entry that holds a dead letter itself
// (its Kafka key, then its value) rather than the event ID of a conversion
// record: event IDs never start with it.
const outboxDeadLetter = 0

// deadLetter puts a dead letter for the postback record at offset in the
// outbox. Nothing else reads the postbacks topic, and the edge answered
// 200 for the record (one of a newer schema version, say, during a rolling
// upgrade): it must not vanish. Through the outbox it is sent, and
// acknowledged, before the offsets past it are committed to the group,
// like a conversion.
func (p *partition) deadLetter(w *work, offset int64, key, value []byte, reason error, now time.Time) error {
	m := bus.DeadLetter(kafka.Message{Topic: bus.TopicPostbacks, Partition: p.id, Offset: offset, Key: key, Value: value}, reason, now)
	rec := appendString([]byte{outboxDeadLetter}, string(m.Key))
	rec = append(rec, m.Value...)
	seq := p.meta.OutboxSeq
	p.meta.OutboxSeq++
	w.key = outboxKey(w.key[:0], p.id, seq)
	if err := w.b.Set(w.key, rec, nil); err != nil {
		return err
	}
	w.out = append(w.out, outRecord{seq: seq, key: m.Key, value: m.Value, dlq: true})
	return nil
}

func splitRecord(rec []byte) (key, value []byte, err error) {
	n, k := binary.Uvarint(rec)
	if k <= 0 || uint64(len(rec)-k) < n {
		return nil, nil, errCorrupt
	}
	return rec[k : k+int(n)], rec[k+int(n):], nil
}

// restore takes over the decision recorded in one conversion record read
// back from the conversions topic: a partition rebuilt on another member
// knows what was decided before, so replays re-emit it and later postbacks
// see its slot. since is where the rebuilt window begins (the expiry cut).
func (p *partition) restore(w *work, cat *catalog.Catalog, value []byte, since time.Time) error {
	c, err := schemas.DecodeConversion(value)
	if err != nil || c.PostbackEventID == "" {
		return nil
	}
	c.ClickID = normalizeID(c.ClickID)
	rec := appendString(nil, c.ClickID)
	rec = append(rec, value...)
	w.key = eventKey(w.key[:0], p.id, c.PostbackEventID)
	replayed := false
	if c.RejectReason == schemas.RejectDuplicate {
		// A record read again (a replay the topic holds twice) changed no
		// slot when it was re-emitted: only its first copy refreshes one.
		_, closer, err := w.b.Get(w.key)
		if replayed = err == nil; replayed {
			closer.Close()
		} else if !errors.Is(err, pebble.ErrNotFound) {
			return err
		}
	}
	if err := w.b.Set(w.key, rec, nil); err != nil {
		return err
	}
	if c.ClickID < minIDAt(since) {
		// The click is older than the window: where the partition stayed,
		// expiry dropped its slots with it, and a later click may have
		// claimed its transaction since. The record stays, for replays of
		// its postback; its slots must not come back.
		return nil
	}
	if c.RejectReason == schemas.RejectDuplicate {
		s, ok := RefreshOf(cat, &w.lookup, &c)
		if w.lookup.err != nil || !ok || replayed {
			return w.lookup.err
		}
		return p.saveSlot(w, s)
	}
	for _, s := range Restore(cat, &c) {
		// A replayed older version may follow a newer one in the topic.
		prev, ok := w.lookup.Slot(s.Key)
		if w.lookup.err != nil {
			return w.lookup.err
		}
		if ok && prev.Version >= s.Slot.Version {
			continue
		}
		if err := p.saveSlot(w, s); err != nil {
			return err
		}
	}
	return nil
}

// expire drops clicks, slots and processed-postback records older than the
// longest attribution window plus grace plus LateMargin (keepFor), measured
// back from the postbacks' time: the clock while the postbacks partition is
// caught up, the time of the last postback read while it is behind (so
// that a backlog does not expire clicks its postbacks still need).
func (p *partition) expire(cat *catalog.Catalog, now time.Time) error {
	window := cat.MaxAttributionWindow()
	if window <= 0 {
		return nil // no offers (a config being edited?): keep everything
	}
	// Never later than the clock, as a rebuild reckons it
	// (postbacksClock): one postback from an edge whose clock runs days
	// ahead must not expire the window.
	clock := min(p.lastPostbackTS, now.UnixMilli())
	if p.postbacksCaughtUp {
		clock = now.UnixMilli()
	}
	if clock <= 0 {
		return nil
	}
	// A cut never moves back (the postbacks falling behind again, say):
	// the slots of the clicks below it are gone.
	cut := max(minIDAt(time.UnixMilli(clock).Add(-keepFor(cat, p.grace))), p.cut)
	p.setCut(cut)
	b := p.db.NewBatch()
	defer b.Close()

	lo, _ := kindBounds(p.id, kindTxnIndex)
	hi := append(slices.Clip(lo), cut...)
	it, err := p.db.NewIter(&pebble.IterOptions{LowerBound: lo, UpperBound: hi})
	if err != nil {
		return fmt.Errorf("cannot expire partition %d: %w", p.id, err)
	}
	var key []byte
	for it.First(); it.Valid(); it.Next() {
		k := it.Key()
		if len(k) < 3+schemas.IDLen {
			continue
		}
		key = append(keyPrefix(key[:0], p.id, kindTxn), k[3+schemas.IDLen:]...)
		if err := b.Delete(key, nil); err != nil {
			it.Close()
			return err
		}
	}
	if err := errors.Join(it.Error(), it.Close()); err != nil {
		return fmt.Errorf("cannot expire partition %d: %w", p.id, err)
	}
	for _, kind := range []byte{kindTxnIndex, kindClick, kindSlot, kindEvent} {
		lo, _ := kindBounds(p.id, kind)
		if err := b.DeleteRange(lo, append(slices.Clip(lo), cut...), nil); err != nil {
			return err
		}
	}
	// With the cut, in the same batch: a restart must not store again a
	// click whose slots this pass drops.
	if err := b.Set(metaKey(p.id), p.meta.append(nil), nil); err != nil {
		return err
	}
	if err := b.Commit(pebble.NoSync); err != nil {
		return fmt.Errorf("cannot expire partition %d: %w", p.id, err)
	}
	return nil
}

// setCut sets the partition's cut, and the copy in its offsets record
// that the next write of that record stores. An expiry pass sets it
// before it deletes what is below it.
func (p *partition) setCut(cut string) {
	p.cut, p.meta.Cut = cut, cut
	p.sharedCut.Store(&cut)
}

// currentCut is the cut as of now, safe to call beside the partition's
// own goroutine: a replay record it cannot find below it may be one that
// expiry dropped.
func (p *partition) currentCut() string {
	if c := p.sharedCut.Load(); c != nil {
		return *c
	}
	return ""
}

// batchSlots reads slots through a batch, so a decision sees the ones
// saved earlier in the same batch. Decide cannot return an error; the
// first one is kept here for the caller.
type batchSlots struct {
	b   *pebble.Batch
	p   int
	key []byte
	err error
}

func (s *batchSlots) Slot(k SlotKey) (Slot, bool) {
	s.key = slotKey(s.key[:0], s.p, k)
	v, closer, err := s.b.Get(s.key)
	if err != nil {
		if !errors.Is(err, pebble.ErrNotFound) && s.err == nil {
			s.err = fmt.Errorf("cannot read conversion state: %w", err)
		}
		return Slot{}, false
	}
	defer closer.Close()
	slot, err := decodeSlotValue(v)
	if err != nil {
		if s.err == nil {
			s.err = fmt.Errorf("conversion state %x: %w", s.key, err)
		}
		return Slot{}, false
	}
	return slot, true
}
