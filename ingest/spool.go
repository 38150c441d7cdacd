package ingest

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cockroachdb/pebble/v2"
)

// spool is the edge's local, synced store of events Kafka could not take in
// time. Keys are a sequence number (8 bytes, big-endian), so iterating the
// store yields events in the order they were spooled.
//
// Once anything is spooled the spool is active, and stays active until the
// drainer has emptied it: while active, the edge sends every new event here
// rather than to Kafka, so no event overtakes one answered before it.
//
// A busy edge always has some append under way, so the drainer, once it
// has caught up, hands over: new events wait (see appendWaiting) while it
// drains the last ones appended, and then go to Kafka directly.
type spool struct {
	db       *pebble.DB
	dir      string
	maxBytes int64

	// mu orders sequence numbers and guards the switch back to inactive:
	// the drainer may only deactivate when nothing is stored and no append
	// is between taking its number and being written.
	mu        sync.Mutex
	next      uint64
	appending map[uint64]struct{} // sequence numbers taken and not yet written
	// floor is a sequence number no stored event is below, nor any to
	// come: reads start there, rather than step over the deletions of
	// every event drained since Pebble last compacted them away.
	floor    uint64
	handover bool          // new appends wait for gate
	gate     chan struct{} // closed when the handover ends

	active   atomic.Bool
	count    atomic.Int64
	bytes    atomic.Int64
	oldestMS atomic.Int64 // spool time of the oldest stored event; 0 when empty

	wake chan struct{} // a drainer nudge, buffered 1
	bufs sync.Pool     // *[]byte encode buffers
}

var (
	errSpoolFull = errors.New("spool is full")
)

// A spooled value is: format byte, topic byte, spool time (Unix ms, 8
// bytes), key length (uvarint), key, value.
const spoolFormat = 1

type spooledEvent struct {
	seq   uint64
	topic topicID
	at    int64
	key   []byte
	value []byte
	size  int64
}

func openSpool(dir string, maxBytes int64, log *slog.Logger) (*spool, error) {
	db, err := pebble.Open(dir, &pebble.Options{Logger: pebbleLogger{log}})
	if err != nil {
		return nil, fmt.Errorf("cannot open edge spool %q: %w", dir, err)
	}
	s := &spool{db: db, dir: dir, maxBytes: maxBytes, wake: make(chan struct{}, 1), appending: map[uint64]struct{}{}}
	s.bufs.New = func() any { b := make([]byte, 0, 1024); return &b }

	// Recount what a previous run left behind.
	it, err := db.NewIter(nil)
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("cannot read edge spool %q: %w", dir, err)
	}
	for valid := it.First(); valid; valid = it.Next() {
		v, err := it.ValueAndErr()
		if err != nil {
			it.Close()
			db.Close()
			return nil, fmt.Errorf("cannot read edge spool %q: %w", dir, err)
		}
		ev, err := decodeSpooled(it.Key(), v)
		if err != nil {
			it.Close()
			db.Close()
			return nil, fmt.Errorf("edge spool %q: %w", dir, err)
		}
		if s.count.Load() == 0 {
			s.oldestMS.Store(ev.at)
			s.floor = ev.seq
		}
		s.count.Add(1)
		s.bytes.Add(ev.size)
		s.next = ev.seq + 1
	}
	if err := it.Close(); err != nil {
		db.Close()
		return nil, fmt.Errorf("cannot read edge spool %q: %w", dir, err)
	}
	s.active.Store(s.count.Load() > 0)
	return s, nil
}

// append stores one event durably (synced to disk before it returns) and
// makes the spool active.
func (s *spool) append(topic topicID, key, value []byte, now time.Time) error {
	return s.appendWaiting(topic, key, value, now, time.Time{})
}

// errHandedOver says that an event waited for a handover that ended with
// the spool inactive: it goes to Kafka directly.
var errHandedOver = errors.New("the spool handed over to Kafka")

// appendWaiting is append for an event sent while the spool is active.
// While the drainer hands over it waits, until deadline at most, and
// returns errHandedOver when the spool is inactive by then (or was
// already); past the deadline (Kafka slow again) it is appended anyway. A
// zero deadline waits for nothing, and appends whatever the state.
func (s *spool) appendWaiting(topic topicID, key, value []byte, now, deadline time.Time) error {
	size := int64(len(key) + len(value) + 20)
	if s.bytes.Load()+size > s.maxBytes {
		return errSpoolFull
	}
	s.mu.Lock()
	if !deadline.IsZero() {
		for s.handover && time.Now().Before(deadline) {
			gate := s.gate
			s.mu.Unlock()
			t := time.NewTimer(time.Until(deadline))
			select {
			case <-gate:
			case <-t.C:
			}
			t.Stop()
			s.mu.Lock()
		}
		if !s.active.Load() {
			s.mu.Unlock()
			return errHandedOver
		}
	}
	s.active.Store(true)
	seq := s.next
	s.next++
	s.appending[seq] = struct{}{}
	s.mu.Unlock()

	bp := s.bufs.Get().(*[]byte)
	var k [8]byte
	binary.BigEndian.PutUint64(k[:], seq)
	b := append((*bp)[:0], spoolFormat, byte(topic))
	b = binary.BigEndian.AppendUint64(b, uint64(now.UnixMilli()))
	b = binary.AppendUvarint(b, uint64(len(key)))
	b = append(b, key...)
	b = append(b, value...)
	// Concurrent synced Sets share one WAL sync (Pebble commits them as a
	// group), so a busy spool costs far less than one fsync per event.
	err := s.db.Set(k[:], b, pebble.Sync)
	*bp = b
	s.bufs.Put(bp)

	s.mu.Lock()
	delete(s.appending, seq)
	if err == nil {
		if s.count.Add(1) == 1 {
			s.oldestMS.Store(now.UnixMilli())
		}
		s.bytes.Add(size)
	}
	s.mu.Unlock()
	s.nudge()
	if err != nil {
		return fmt.Errorf("cannot write edge spool %q: %w", s.dir, err)
	}
	return nil
}

func (s *spool) nudge() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// read returns the oldest spooled events, oldest first: up to limit of
// them, and no more once they hold maxBytes of keys and values.
func (s *spool) read(limit, maxBytes int) ([]spooledEvent, error) {
	// Any event not stored yet below the first one read is between taking
	// its number and being written: its number is at least the smallest
	// of those now, or than the next one.
	s.mu.Lock()
	from, floor := s.floor, s.next
	for seq := range s.appending {
		floor = min(floor, seq)
	}
	s.mu.Unlock()
	it, err := s.db.NewIter(&pebble.IterOptions{LowerBound: seqKey(from)})
	if err != nil {
		return nil, fmt.Errorf("cannot read edge spool %q: %w", s.dir, err)
	}
	var out []spooledEvent
	size := 0
	for valid := it.First(); valid && len(out) < limit && size < maxBytes; valid = it.Next() {
		v, err := it.ValueAndErr()
		if err != nil {
			it.Close()
			return nil, fmt.Errorf("cannot read edge spool %q: %w", s.dir, err)
		}
		// The iterator's buffers are reused as it moves: keep copies.
		ev, err := decodeSpooled(append([]byte(nil), it.Key()...), append([]byte(nil), v...))
		if err != nil {
			it.Close()
			return nil, fmt.Errorf("edge spool %q: %w", s.dir, err)
		}
		out = append(out, ev)
		size += len(ev.key) + len(ev.value)
	}
	if err := it.Close(); err != nil {
		return nil, fmt.Errorf("cannot read edge spool %q: %w", s.dir, err)
	}
	if len(out) > 0 {
		s.oldestMS.Store(out[0].at)
		floor = min(floor, out[0].seq)
	}
	s.mu.Lock()
	s.floor = max(s.floor, floor)
	s.mu.Unlock()
	return out, nil
}

func seqKey(seq uint64) []byte { return binary.BigEndian.AppendUint64(nil, seq) }

// remove deletes events Kafka has acknowledged. The delete is synced (one
// sync per drained batch): Pebble keeps an unsynced write in memory until
// a later sync, so after a kill -9 the restarted edge would produce the
// whole drained spool again, behind events produced directly since.
func (s *spool) remove(evs []spooledEvent) error {
	if len(evs) == 0 {
		return nil
	}
	b := s.db.NewBatch()
	var k [8]byte
	var size int64
	for _, ev := range evs {
		binary.BigEndian.PutUint64(k[:], ev.seq)
		if err := b.Delete(k[:], nil); err != nil {
			b.Close()
			return fmt.Errorf("cannot delete from edge spool %q: %w", s.dir, err)
		}
		size += ev.size
	}
	if err := b.Commit(pebble.Sync); err != nil {
		b.Close()
		return fmt.Errorf("cannot delete from edge spool %q: %w", s.dir, err)
	}
	b.Close()
	s.mu.Lock()
	s.count.Add(-int64(len(evs)))
	s.bytes.Add(-size)
	s.mu.Unlock()
	return nil
}

// deactivateIfEmpty makes the spool inactive when it holds nothing and no
// append is under way, and reports whether it did. When appends are under
// way it begins a handover if handover is set (Kafka took the drainer's
// last round), so that they are the last.
//
// It asks the store, not the counters: with no append under way, the store
// holds all there is, and the counters are set to match. They can be off
// after a write that failed its sync but reached the store anyway (Pebble
// reports the error after applying the batch); trusting them, a spool
// could never deactivate again.
func (s *spool) deactivateIfEmpty(handover bool) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.appending) != 0 {
		if handover {
			s.beginHandoverLocked()
		}
		return false
	}
	it, err := s.db.NewIter(&pebble.IterOptions{LowerBound: seqKey(s.floor)})
	if err != nil {
		return false
	}
	empty := !it.First()
	if err := it.Close(); err != nil || !empty {
		return false
	}
	s.count.Store(0)
	s.bytes.Store(0)
	s.active.Store(false)
	s.oldestMS.Store(0)
	s.endHandoverLocked()
	return true
}

// beginHandover holds new appends back (see appendWaiting) until
// deactivateIfEmpty succeeds or endHandover is called: the drainer has
// caught up, and only the events appended meanwhile stand between the
// edge and producing directly.
func (s *spool) beginHandover() {
	s.mu.Lock()
	s.beginHandoverLocked()
	s.mu.Unlock()
}

func (s *spool) beginHandoverLocked() {
	if !s.handover {
		s.handover, s.gate = true, make(chan struct{})
	}
}

// endHandover lets the appends waiting for a handover go on (Kafka failed
// the drainer again, say).
func (s *spool) endHandover() {
	s.mu.Lock()
	s.endHandoverLocked()
	s.mu.Unlock()
}

func (s *spool) endHandoverLocked() {
	if s.handover {
		s.handover = false
		close(s.gate)
	}
}

// ageSeconds is how long the oldest stored event has waited.
func (s *spool) ageSeconds(now time.Time) float64 {
	at := s.oldestMS.Load()
	if at == 0 || s.count.Load() == 0 {
		return 0
	}
	return float64(now.UnixMilli()-at) / 1000
}

func (s *spool) close() error {
	if err := s.db.Close(); err != nil {
		return fmt.Errorf("cannot close edge spool %q: %w", s.dir, err)
	}
	return nil
}

func decodeSpooled(k, v []byte) (spooledEvent, error) {
	if len(k) != 8 || len(v) < 10 || v[0] != spoolFormat || topicID(v[1]) >= numTopics {
		return spooledEvent{}, fmt.Errorf("malformed spool record %x", k)
	}
	ev := spooledEvent{
		seq:   binary.BigEndian.Uint64(k),
		topic: topicID(v[1]),
		at:    int64(binary.BigEndian.Uint64(v[2:10])),
	}
	kl, n := binary.Uvarint(v[10:])
	if n <= 0 || uint64(len(v)-10-n) < kl {
		return spooledEvent{}, fmt.Errorf("malformed spool record %x", k)
	}
	rest := v[10+n:]
	ev.key, ev.value = rest[:kl], rest[kl:]
	ev.size = int64(len(ev.key) + len(ev.value) + 20)
	return ev, nil
}

// pebbleLogger sends Pebble's chatter to slog: its info lines (compactions,
// WAL recovery) at debug level.
type pebbleLogger struct{ log *slog.Logger }

func (l pebbleLogger) Infof(format string, args ...any) {
	l.log.Debug("edge spool: " + fmt.Sprintf(format, args...))
}

func (l pebbleLogger) Errorf(format string, args ...any) {
	l.log.Error("edge spool: " + fmt.Sprintf(format, args...))
}

func (l pebbleLogger) Fatalf(format string, args ...any) {
	msg := "edge spool: " + fmt.Sprintf(format, args...)
	l.log.Error(msg)
	panic(msg)
}
