package attributor

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"strings"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/bloom"
	"github.com/cockroachdb/pebble/v2/vfs"

	"github.com/trackstar/trackstar/schemas"
)

// The state store is one Pebble database. Every key starts with its
// partition number (2 bytes, big endian) and a kind byte, so one
// DeleteRange drops a partition and every kind of a partition is a
// contiguous range:
//
//	p c <click_id>                        click (the fields a conversion copies)
//	p g <click_id> <goal>                 per-click slot
//	p x <offer> <goal len> <goal> <txn>   per-transaction slot or claim
//	p y <click_id> <offer> <goal len> <goal> <txn>   expiry index of x keys
//	p e <event_id>                        processed postback: the record emitted for it
//	p h <click_id> <event_id>             held postback (its click not seen yet)
//	p q <seq>                             outbox: event IDs whose records Kafka has not acknowledged yet,
//	                                      or 0x00 and a dead letter (key, value) for trackstar.dlq
//	p o                                   offsets and commit bookkeeping
//
// Click IDs and event IDs are time-ordered (schemas.NewID), so c, g, y and
// e keys sort by time and expire with a range deletion up to the ID of the
// cutoff time; nothing is scanned but the y keys being expired.
const (
	kindClick    = 'c'
	kindSlot     = 'g'
	kindTxn      = 'x'
	kindTxnIndex = 'y'
	kindEvent    = 'e'
	kindHeld     = 'h'
	kindOutbox   = 'q'
	kindMeta     = 'o'
)

// maxPartition is the largest partition number the key layout holds.
const maxPartition = math.MaxUint16 - 1

func keyPrefix(dst []byte, partition int, kind byte) []byte {
	dst = binary.BigEndian.AppendUint16(dst, uint16(partition))
	return append(dst, kind)
}

func clickKey(dst []byte, p int, clickID string) []byte {
	return append(keyPrefix(dst, p, kindClick), clickID...)
}

func eventKey(dst []byte, p int, eventID string) []byte {
	return append(keyPrefix(dst, p, kindEvent), eventID...)
}

func heldKey(dst []byte, p int, clickID, eventID string) []byte {
	dst = append(keyPrefix(dst, p, kindHeld), clickID...)
	return append(dst, eventID...)
}

func outboxKey(dst []byte, p int, seq uint64) []byte {
	return binary.BigEndian.AppendUint64(keyPrefix(dst, p, kindOutbox), seq)
}

func metaKey(p int) []byte { return keyPrefix(nil, p, kindMeta) }

// appendTxnRest appends the part of an x key after the kind.
func appendTxnRest(dst []byte, k SlotKey) []byte {
	dst = binary.BigEndian.AppendUint32(dst, k.OfferID)
	dst = binary.AppendUvarint(dst, uint64(len(k.Goal)))
	dst = append(dst, k.Goal...)
	return append(dst, k.TxnID...)
}

func slotKey(dst []byte, p int, k SlotKey) []byte {
	if k.TxnID != "" {
		return appendTxnRest(keyPrefix(dst, p, kindTxn), k)
	}
	dst = append(keyPrefix(dst, p, kindSlot), k.ClickID...)
	return append(dst, k.Goal...)
}

// txnIndexKey is the y key that expires the x key of k with clickID.
func txnIndexKey(dst []byte, p int, clickID string, k SlotKey) []byte {
	dst = append(keyPrefix(dst, p, kindTxnIndex), clickID...)
	return appendTxnRest(dst, k)
}

// partitionBounds returns the key range of everything of partition p.
func partitionBounds(p int) (lo, hi []byte) {
	return binary.BigEndian.AppendUint16(nil, uint16(p)), binary.BigEndian.AppendUint16(nil, uint16(p+1))
}

// kindBounds returns the key range of one kind of partition p.
func kindBounds(p int, kind byte) (lo, hi []byte) {
	return keyPrefix(nil, p, kind), keyPrefix(nil, p, kind+1)
}

// minIDAt returns the smallest ID minted at time t: IDs below it are older.
func minIDAt(t time.Time) string {
	// The first 10 characters of an ID carry its milliseconds; the rest
	// is randomness, whose smallest value is all zeros.
	id := schemas.AppendNewID(make([]byte, 0, schemas.IDLen), t)
	return string(id[:10]) + strings.Repeat("0", schemas.IDLen-10)
}

// normalizeID lower-cases an ID: IDs are case-insensitive, keys are not.
func normalizeID(id string) string {
	for i := 0; i < len(id); i++ {
		if c := id[i]; c >= 'A' && c <= 'Z' {
			return strings.ToLower(id)
		}
	}
	return id
}

// appendClickValue appends what the store keeps of a click: the fields a
// conversion copies from it.
func appendClickValue(dst []byte, c *schemas.Click) []byte {
	dst = binary.AppendVarint(dst, c.TS)
	dst = binary.AppendUvarint(dst, uint64(c.OfferID))
	dst = binary.AppendUvarint(dst, uint64(c.AdvertiserID))
	dst = binary.AppendUvarint(dst, uint64(c.AffID))
	for _, s := range [...]string{c.Source, c.Sub1, c.Sub2, c.Sub3, c.Sub4, c.Sub5} {
		dst = appendString(dst, s)
	}
	return dst
}

var errCorrupt = errors.New("corrupt value in state store")

func decodeClickValue(clickID string, b []byte) (schemas.Click, error) {
	c := schemas.Click{V: schemas.Version, ClickID: clickID}
	d := decoder{b: b}
	c.TS = d.varint()
	c.OfferID = uint32(d.uvarint())
	c.AdvertiserID = uint32(d.uvarint())
	c.AffID = uint32(d.uvarint())
	c.Source, c.Sub1, c.Sub2, c.Sub3, c.Sub4, c.Sub5 = d.str(), d.str(), d.str(), d.str(), d.str(), d.str()
	return c, d.err
}

var statusCodes = [...]string{schemas.StatusApproved, schemas.StatusPending, schemas.StatusRejected}

func appendSlotValue(dst []byte, s *Slot) []byte {
	code := byte(0)
	for i, st := range statusCodes {
		if st == s.Status {
			code = byte(i)
		}
	}
	dst = appendString(dst, s.ConversionID)
	dst = binary.AppendUvarint(dst, uint64(s.Version))
	dst = append(dst, code)
	dst = appendString(dst, s.ClickID)
	dst = binary.AppendVarint(dst, int64(s.SaleAmount))
	dst = appendString(dst, s.Currency)
	return binary.AppendVarint(dst, s.TS)
}

func decodeSlotValue(b []byte) (Slot, error) {
	var s Slot
	d := decoder{b: b}
	s.ConversionID = d.str()
	s.Version = uint32(d.uvarint())
	if code := d.byte(); int(code) < len(statusCodes) {
		s.Status = statusCodes[code]
	} else {
		d.fail()
	}
	s.ClickID = d.str()
	s.SaleAmount = schemas.Amount(d.varint())
	s.Currency = d.str()
	if len(d.b) > 0 { // stores written before the time was kept end here
		s.TS = d.varint()
	}
	return s, d.err
}

// meta is the offsets and commit bookkeeping of one partition, written in
// the same batch as the state they produced.
type meta struct {
	ClicksNext    int64 // next clicks offset to read
	PostbacksNext int64 // next postbacks offset to read
	OutboxSeq     uint64
	// What this member last asked the group coordinator to commit, and
	// what it last saw committed. Group offsets equal to either mean no
	// other member has processed the partition since; anything else means
	// the local state is stale and must be rebuilt.
	AttemptClicks, AttemptPostbacks     int64
	ConfirmedClicks, ConfirmedPostbacks int64
	// Cut is the partition's cut (see partition.cut), kept so that a
	// restart does not store again a click whose slots were dropped. Empty
	// in a store written before it was kept.
	Cut string
	// ConversionsEnd is the end of the partition's conversions when this
	// member last looked, every record before it one this store holds the
	// replay record of (see worker.outputIsOwn); -1 when unknown (a store
	// written before it was kept).
	ConversionsEnd int64
}

func (m *meta) append(dst []byte) []byte {
	for _, v := range [...]int64{m.ClicksNext, m.PostbacksNext, int64(m.OutboxSeq),
		m.AttemptClicks, m.AttemptPostbacks, m.ConfirmedClicks, m.ConfirmedPostbacks} {
		dst = binary.AppendVarint(dst, v)
	}
	dst = appendString(dst, m.Cut)
	return binary.AppendVarint(dst, m.ConversionsEnd)
}

func decodeMeta(b []byte) (meta, error) {
	d := decoder{b: b}
	m := meta{ClicksNext: d.varint(), PostbacksNext: d.varint(), OutboxSeq: uint64(d.varint()),
		AttemptClicks: d.varint(), AttemptPostbacks: d.varint(), ConfirmedClicks: d.varint(), ConfirmedPostbacks: d.varint()}
	m.ConversionsEnd = -1
	if len(d.b) > 0 {
		m.Cut = d.str()
	}
	if len(d.b) > 0 {
		m.ConversionsEnd = d.varint()
	}
	return m, d.err
}

func appendString(dst []byte, s string) []byte {
	dst = binary.AppendUvarint(dst, uint64(len(s)))
	return append(dst, s...)
}

type decoder struct {
	b   []byte
	err error
}

func (d *decoder) fail() {
	if d.err == nil {
		d.err = errCorrupt
	}
	d.b = nil
}

func (d *decoder) varint() int64 {
	v, n := binary.Varint(d.b)
	if n <= 0 {
		d.fail()
		return 0
	}
	d.b = d.b[n:]
	return v
}

func (d *decoder) uvarint() uint64 {
	v, n := binary.Uvarint(d.b)
	if n <= 0 {
		d.fail()
		return 0
	}
	d.b = d.b[n:]
	return v
}

func (d *decoder) byte() byte {
	if len(d.b) == 0 {
		d.fail()
		return 0
	}
	c := d.b[0]
	d.b = d.b[1:]
	return c
}

func (d *decoder) str() string {
	n := d.uvarint()
	if n > uint64(len(d.b)) {
		d.fail()
		return ""
	}
	s := string(d.b[:n])
	d.b = d.b[n:]
	return s
}

// StoreOptions tunes the Pebble state store.
type StoreOptions struct {
	// CacheSize is Pebble's block cache. Default 64 MiB.
	CacheSize int64
	// MemTableSize is the size of one memtable; up to four may be in
	// memory while flushes catch up. Default 32 MiB.
	MemTableSize uint64
	// FS is the file system; nil means the OS. Tests pass vfs.NewMem().
	FS vfs.FS
	// Logger receives Pebble's own messages. Default slog.Default().
	Logger *slog.Logger
}

// openStore opens (creating it if needed) the state store in dir.
func openStore(dir string, o StoreOptions) (*pebble.DB, error) {
	if o.CacheSize <= 0 {
		o.CacheSize = 64 << 20
	}
	if o.MemTableSize == 0 {
		o.MemTableSize = 32 << 20
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	opts := &pebble.Options{
		FS:                          o.FS,
		CacheSize:                   o.CacheSize,
		MemTableSize:                o.MemTableSize,
		MemTableStopWritesThreshold: 4,
		Logger:                      pebbleLogger{o.Logger},
	}
	// Most lookups are of clicks that exist, but a postback for an unknown
	// or expired click should not read every level to learn so.
	for i := range opts.Levels {
		opts.Levels[i].FilterPolicy = bloom.FilterPolicy(10)
	}
	db, err := pebble.Open(dir, opts)
	if err != nil {
		return nil, fmt.Errorf("cannot open state store %q: %w", dir, err)
	}
	return db, nil
}

// pebbleLogger sends Pebble's log lines to slog.
type pebbleLogger struct{ log *slog.Logger }

func (l pebbleLogger) Infof(format string, args ...any) {
	l.log.Debug("pebble: " + fmt.Sprintf(format, args...))
}

func (l pebbleLogger) Errorf(format string, args ...any) {
	l.log.Error("pebble: " + fmt.Sprintf(format, args...))
}

func (l pebbleLogger) Fatalf(format string, args ...any) {
	l.log.Error("pebble: fatal: " + fmt.Sprintf(format, args...))
	panic(fmt.Sprintf("pebble: "+format, args...))
}

// statePartitions returns the partitions that have state in db, in order.
func statePartitions(db *pebble.DB) ([]int, error) {
	it, err := db.NewIter(nil)
	if err != nil {
		return nil, fmt.Errorf("cannot list partitions of the state store: %w", err)
	}
	defer it.Close()
	var out []int
	for valid := it.First(); valid; {
		k := it.Key()
		if len(k) < 3 {
			return nil, fmt.Errorf("cannot list partitions of the state store: %w: short key %x", errCorrupt, k)
		}
		p := int(binary.BigEndian.Uint16(k))
		out = append(out, p)
		_, next := partitionBounds(p)
		valid = it.SeekGE(next)
	}
	return out, it.Error()
}

// dropPartition deletes everything of partition p.
func dropPartition(db *pebble.DB, p int) error {
	lo, hi := partitionBounds(p)
	if err := db.DeleteRange(lo, hi, pebble.Sync); err != nil {
		return fmt.Errorf("cannot drop state of partition %d: %w", p, err)
	}
	return nil
}
