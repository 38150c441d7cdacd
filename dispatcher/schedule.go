package dispatcher

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"time"

	"github.com/cockroachdb/pebble/v2"

	"github.com/trackstar/trackstar/internal/bus"
	"github.com/trackstar/trackstar/schemas"
)

// The schedule lives in Pebble under DataDir/dispatcher. Four key spaces:
//
//	's' host 0x00 due(8 bytes, big-endian Unix nanoseconds) jobID -> scheduledJob (JSON)
//	'm' bucket(4 bytes, big-endian) jobID                         -> empty
//	'v' day(4 bytes, big-endian) conversionID 0x00 version(4 bytes, big-endian) -> empty
//	'f' partition(4 bytes, big-endian)                            -> next offset, since (8 bytes each, big-endian; since in Unix ms)
//
// Schedule entries are grouped by host, then ordered by due time, so the
// scheduler skips a paused or busy host with one seek and takes a host's
// due entries in order. Markers ('m') remember which conversions this
// dispatcher has already handled (scheduled or finished), in time buckets
// of DedupWindow, so a replayed Kafka record is recognised and old markers
// are dropped a bucket at a time with one range deletion. Version notes
// ('v') remember, for versionDays days, the newest status update of a
// conversion that was handed to a partner's queue, so that an older status
// still waiting for its retry is not sent after it. Follow positions
// ('f') say where followDeliveries reads each partition of
// trackstar.deliveries next, and since when it has read every record up
// to there, so that a restart reads on from there.
const (
	prefixSchedule = 's'
	prefixMarker   = 'm'
	prefixVersion  = 'v'
	prefixFollowed = 'f'
)

// versionDays is how many days a version note is kept: an older status
// whose retry comes later than that (a partner paused for a week) is sent.
const versionDays = 8

// scheduledJob is the value of a schedule entry: everything needed to make
// the next attempt, whatever the config says by then.
type scheduledJob struct {
	Attempt    uint32          `json:"attempt"`    // number of the next attempt, 1-based
	LastError  string          `json:"last_error"` // of the previous attempt, "" when deferred before any
	Partition  int             `json:"partition"`  // of the conversion record
	Offset     int64           `json:"offset"`     // of the conversion record
	Conversion json.RawMessage `json:"conversion"` // as consumed from trackstar.conversions
}

// scheduleStore is the Pebble database of the schedule and the markers.
type scheduleStore struct {
	db *pebble.DB
}

func openScheduleStore(dir string, log *slog.Logger) (*scheduleStore, error) {
	db, err := pebble.Open(dir, &pebble.Options{Logger: pebbleLogger{log}})
	if err != nil {
		return nil, fmt.Errorf("cannot open retry schedule %q: %w", dir, err)
	}
	return &scheduleStore{db: db}, nil
}

func (s *scheduleStore) Close() error { return s.db.Close() }

// scheduleKey returns the key of jobID's entry for host, due at due.
func scheduleKey(host string, due time.Time, jobID string) []byte {
	k := make([]byte, 0, 1+len(host)+1+8+len(jobID))
	k = append(k, prefixSchedule)
	k = append(k, host...)
	k = append(k, 0)
	k = binary.BigEndian.AppendUint64(k, uint64(max(due.UnixNano(), 0)))
	return append(k, jobID...)
}

// parseScheduleKey splits a schedule key. ok is false for a key that is not one.
func parseScheduleKey(k []byte) (host string, due time.Time, jobID string, ok bool) {
	if len(k) < 1 || k[0] != prefixSchedule {
		return "", time.Time{}, "", false
	}
	i := bytes.IndexByte(k, 0)
	if i < 0 || len(k) < i+1+8 {
		return "", time.Time{}, "", false
	}
	host = string(k[1:i])
	due = time.Unix(0, int64(binary.BigEndian.Uint64(k[i+1:i+9])))
	return host, due, string(k[i+9:]), true
}

// hostUpperBound returns the first key after every entry of host.
func hostUpperBound(host string) []byte {
	k := make([]byte, 0, len(host)+2)
	k = append(k, prefixSchedule)
	k = append(k, host...)
	return append(k, 1)
}

func markerKey(bucket uint32, jobID string) []byte {
	k := make([]byte, 0, 5+len(jobID))
	k = append(k, prefixMarker)
	k = binary.BigEndian.AppendUint32(k, bucket)
	return append(k, jobID...)
}

// bucketOf returns the marker bucket of t.
func bucketOf(t time.Time, window time.Duration) uint32 {
	return uint32(t.Unix() / max(int64(window/time.Second), 1))
}

// seen reports whether jobID has a marker in the current or the previous
// bucket: whether this dispatcher scheduled or finished it lately.
func (s *scheduleStore) seen(jobID string, now time.Time, window time.Duration) (bool, error) {
	b := bucketOf(now, window)
	for _, bucket := range []uint32{b, b - 1} {
		_, closer, err := s.db.Get(markerKey(bucket, jobID))
		if err == nil {
			closer.Close()
			return true, nil
		}
		if !errors.Is(err, pebble.ErrNotFound) {
			return false, fmt.Errorf("cannot read marker of %s: %w", jobID, err)
		}
	}
	return false, nil
}

// dropOldMarkers deletes every marker bucket older than the previous one.
func (s *scheduleStore) dropOldMarkers(now time.Time, window time.Duration) error {
	b := bucketOf(now, window)
	if b < 2 {
		return nil
	}
	start := []byte{prefixMarker}
	end := binary.BigEndian.AppendUint32([]byte{prefixMarker}, b-1)
	if err := s.db.DeleteRange(start, end, pebble.NoSync); err != nil {
		return fmt.Errorf("cannot drop old markers: %w", err)
	}
	return nil
}

// versionKey is the key of a note that version of conversionID was noted
// on day. Each version has its own: two writers noting versions 2 and 3 at
// once (the engine, and the follower reading another member's records)
// leave both, where one key would keep whichever came last. A store
// written before kept one key per day and conversion, without the 0x00
// and the version, the version in its value; latestVersion reads both.
func versionKey(day uint32, conversionID string, version uint32) []byte {
	k := versionPrefix(day, conversionID)
	k = append(k, 0)
	return binary.BigEndian.AppendUint32(k, version)
}

func versionPrefix(day uint32, conversionID string) []byte {
	k := make([]byte, 0, 5+len(conversionID)+5)
	k = append(k, prefixVersion)
	k = binary.BigEndian.AppendUint32(k, day)
	return append(k, conversionID...)
}

func dayOf(t time.Time) uint32 { return uint32(max(t.Unix(), 0) / 86400) }

// latestVersion returns the newest version noted for conversionID in the
// last versionDays days, 0 when none.
func (s *scheduleStore) latestVersion(conversionID string, now time.Time) (uint32, error) {
	var latest uint32
	today := dayOf(now)
	for d := range uint32(versionDays) {
		if d > today {
			break
		}
		// The day's notes of the conversion: its old-style key (the
		// prefix itself), then prefix 0x00 version; another conversion
		// whose ID begins with this one's sorts after prefix 0x01.
		prefix := versionPrefix(today-d, conversionID)
		it, err := s.db.NewIter(&pebble.IterOptions{LowerBound: prefix, UpperBound: append(slices.Clip(prefix), 1)})
		if err != nil {
			return 0, fmt.Errorf("cannot read version notes of %s: %w", conversionID, err)
		}
		for valid := it.First(); valid; valid = it.Next() {
			k := it.Key()
			if len(k) == len(prefix)+5 {
				latest = max(latest, binary.BigEndian.Uint32(k[len(prefix)+1:]))
			} else if len(k) == len(prefix) {
				if v, err := it.ValueAndErr(); err == nil && len(v) == 4 {
					latest = max(latest, binary.BigEndian.Uint32(v))
				}
			}
		}
		if err := it.Close(); err != nil {
			return 0, fmt.Errorf("cannot read version notes of %s: %w", conversionID, err)
		}
	}
	return latest, nil
}

// noteVersion records that version of conversionID is on its way to the
// partner. Only updates (version 2 and later) are noted: nothing is older
// than a version 1. Synced before the update is queued: were the note
// lost in a crash after the partner got the update, an older status's
// retry in the schedule could go out after it before the replay reads the
// update again. opts is pebble.Sync for that reason; a note of an update
// another member sent, read from trackstar.deliveries, need not be
// synced, since a restart reads it again before any retry goes out.
func (s *scheduleStore) noteVersion(conversionID string, version uint32, now time.Time, opts *pebble.WriteOptions) error {
	if version < 2 {
		return nil
	}
	latest, err := s.latestVersion(conversionID, now)
	if err != nil || latest >= version {
		return err
	}
	if err := s.db.Set(versionKey(dayOf(now), conversionID, version), nil, opts); err != nil {
		return fmt.Errorf("cannot write version note of %s: %w", conversionID, err)
	}
	return nil
}

func followedKey(q int) []byte {
	return binary.BigEndian.AppendUint32([]byte{prefixFollowed}, uint32(q))
}

// followPos is where followDeliveries reads a partition of
// trackstar.deliveries next, and since when it has read every record
// before that.
type followPos struct {
	next  int64
	since time.Time // zero: from the partition's first record
}

// followed returns the position of partition q of trackstar.deliveries;
// ok is false when none is stored.
func (s *scheduleStore) followed(q int) (pos followPos, ok bool, err error) {
	v, closer, err := s.db.Get(followedKey(q))
	if errors.Is(err, pebble.ErrNotFound) {
		return followPos{}, false, nil
	}
	if err != nil {
		return followPos{}, false, fmt.Errorf("cannot read where %s/%d was read to: %w", bus.TopicDeliveries, q, err)
	}
	defer closer.Close()
	if len(v) != 16 {
		return followPos{}, false, nil
	}
	pos.next = int64(binary.BigEndian.Uint64(v))
	if ms := int64(binary.BigEndian.Uint64(v[8:])); ms > 0 {
		pos.since = time.UnixMilli(ms)
	}
	return pos, true, nil
}

// setFollowed writes to w (the store, or a batch of it) the position of
// partition q of trackstar.deliveries, unsynced: written after the notes
// of the records before it, it is never recovered without them.
func setFollowed(w pebble.Writer, q int, pos followPos) error {
	var ms int64
	if !pos.since.IsZero() {
		ms = max(pos.since.UnixMilli(), 1)
	}
	v := binary.BigEndian.AppendUint64(binary.BigEndian.AppendUint64(nil, uint64(pos.next)), uint64(ms))
	if err := w.Set(followedKey(q), v, pebble.NoSync); err != nil {
		return fmt.Errorf("cannot write where %s/%d was read to: %w", bus.TopicDeliveries, q, err)
	}
	return nil
}

// dropOldVersions deletes the version notes older than versionDays days.
func (s *scheduleStore) dropOldVersions(now time.Time) error {
	today := dayOf(now)
	if today < versionDays {
		return nil
	}
	start := []byte{prefixVersion}
	end := binary.BigEndian.AppendUint32([]byte{prefixVersion}, today-(versionDays-1))
	if err := s.db.DeleteRange(start, end, pebble.NoSync); err != nil {
		return fmt.Errorf("cannot drop old version notes: %w", err)
	}
	return nil
}

// countScheduled counts the schedule entries.
func (s *scheduleStore) countScheduled() (int, error) {
	it, err := s.db.NewIter(&pebble.IterOptions{LowerBound: []byte{prefixSchedule}, UpperBound: []byte{prefixSchedule + 1}})
	if err != nil {
		return 0, fmt.Errorf("cannot read retry schedule: %w", err)
	}
	n := 0
	for valid := it.First(); valid; valid = it.Next() {
		n++
	}
	if err := it.Close(); err != nil {
		return 0, fmt.Errorf("cannot read retry schedule: %w", err)
	}
	return n, nil
}

// oldestScheduledConversion returns the time of the oldest conversion in
// the schedule, zero when it is empty.
func (s *scheduleStore) oldestScheduledConversion() (time.Time, error) {
	it, err := s.db.NewIter(&pebble.IterOptions{LowerBound: []byte{prefixSchedule}, UpperBound: []byte{prefixSchedule + 1}})
	if err != nil {
		return time.Time{}, fmt.Errorf("cannot read retry schedule: %w", err)
	}
	var oldest int64
	for valid := it.First(); valid; valid = it.Next() {
		var sj scheduledJob
		if json.Unmarshal(it.Value(), &sj) != nil {
			continue // the scheduler drops it
		}
		if c, err := schemas.DecodeConversion(sj.Conversion); err == nil && c.TS > 0 && (oldest == 0 || c.TS < oldest) {
			oldest = c.TS
		}
	}
	if err := it.Close(); err != nil {
		return time.Time{}, fmt.Errorf("cannot read retry schedule: %w", err)
	}
	if oldest == 0 {
		return time.Time{}, nil
	}
	return time.UnixMilli(oldest), nil
}

// pebbleLogger keeps Pebble's informational chatter out of the role's
// output and passes its errors on.
type pebbleLogger struct{ log *slog.Logger }

func (pebbleLogger) Infof(string, ...any) {}
func (l pebbleLogger) Errorf(format string, args ...any) {
	l.log.Error("retry schedule store: " + fmt.Sprintf(format, args...))
}
func (pebbleLogger) Fatalf(format string, args ...any) {
	panic("pebble: fatal: " + fmt.Sprintf(format, args...))
}
