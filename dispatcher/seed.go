package dispatcher

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/segmentio/kafka-go"

	"github.com/trackstar/trackstar/internal/bus"
	"github.com/trackstar/trackstar/schemas"
)

// learnPartition brings this dispatcher's dedup markers and version notes
// up to date for a partition of trackstar.conversions it has just been
// given, before it reads any of it. Markers and notes are each
// dispatcher's own, so without this the new owner would send again what
// the last one delivered, when the attributor replays a conversion (it
// re-emits the records of the postbacks it reads again after a rebuild)
// or when the last owner was killed before its commit, and would send an
// older status after a newer one the last owner had sent.
//
// It reads trackstar.deliveries, keyed by click ID like the conversions,
// from DedupWindow ago to its end: every delivery record of a final
// outcome (delivered, failed, dead) becomes a marker, and every record's
// version a version note (see learner). A retrying record makes no marker: it is
// written before the schedule entry it stands for is synced, and a crash
// between the two leaves the conversion to be read again from Kafka and
// sent — by whoever owns it then.
func (d *dispatcher) learnPartition(ctx context.Context, client *kafka.Client, partition int) (int, error) {
	md, err := client.Metadata(ctx, &kafka.MetadataRequest{Topics: []string{bus.TopicConversions, bus.TopicDeliveries}})
	if err != nil {
		return 0, fmt.Errorf("cannot read topic metadata: %w", err)
	}
	counts := map[string]int{}
	for _, t := range md.Topics {
		counts[t.Name] = len(t.Partitions)
	}
	nConv, nDel := counts[bus.TopicConversions], counts[bus.TopicDeliveries]
	if nConv == 0 || nDel == 0 {
		return 0, fmt.Errorf("topics %s and %s not found", bus.TopicConversions, bus.TopicDeliveries)
	}
	// With equal counts, partition p of the deliveries holds exactly the
	// records of partition p's conversions; otherwise they are anywhere.
	from, to := partition, partition+1
	if nConv != nDel {
		from, to = 0, nDel
		d.log.Warn("trackstar.deliveries has another partition count than trackstar.conversions: "+
			"a dispatcher given a partition reads every partition of the deliveries",
			"conversions_partitions", nConv, "deliveries_partitions", nDel)
	}
	now := d.cfg.Now()
	l := d.engine.store.newLearner(now, d.cfg.DedupWindow)
	defer l.close()
	for q := from; q < to; q++ {
		err := d.readDeliveries(ctx, client, q, now.Add(-d.cfg.DedupWindow), func(key []byte, rec *schemas.Delivery) error {
			if nConv != nDel && bus.PartitionFor(key, nConv) != partition {
				return nil
			}
			return l.add(rec)
		})
		if se := (storeError{}); errors.As(err, &se) {
			d.fatal(se.err)
		}
		if err != nil {
			return 0, err
		}
	}
	if err := l.finish(); err != nil {
		d.fatal(err)
		return 0, err
	}
	return l.markers, nil
}

// readDeliveries calls fn for every decodable record of partition q of
// trackstar.deliveries from time since up to the partition's end as it
// is now.
func (d *dispatcher) readDeliveries(ctx context.Context, client *kafka.Client, q int, since time.Time,
	fn func(key []byte, rec *schemas.Delivery) error) error {
	end, err := bus.ListOffset(ctx, client, bus.TopicDeliveries, kafka.LastOffsetOf(q))
	if err != nil {
		return err
	}
	start, err := bus.ListOffset(ctx, client, bus.TopicDeliveries, kafka.TimeOffsetOf(q, since))
	if err != nil || start < 0 || start >= end {
		return err // none from since on
	}
	r := kafka.NewReader(kafka.ReaderConfig{
		Brokers: d.cfg.Brokers, Topic: bus.TopicDeliveries, Partition: q,
		MinBytes: 1, MaxBytes: 8 << 20, MaxWait: 250 * time.Millisecond, ReadLagInterval: -1,
	})
	defer r.Close()
	if err := r.SetOffset(start); err != nil {
		return fmt.Errorf("cannot seek %s/%d: %w", bus.TopicDeliveries, q, err)
	}
	for next := start; next < end; {
		m, err := r.FetchMessage(ctx)
		if err != nil {
			return fmt.Errorf("cannot read %s/%d: %w", bus.TopicDeliveries, q, err)
		}
		next = m.Offset + 1
		if rec, err := schemas.DecodeDelivery(m.Value); err == nil {
			if err := fn(m.Key, &rec); err != nil {
				return storeError{err}
			}
		}
	}
	return nil
}

// storeError is a failure of the store, not of Kafka: fatal, not retried.
type storeError struct{ err error }

func (e storeError) Error() string { return e.err.Error() }
func (e storeError) Unwrap() error { return e.err }

// learner writes what learnPartition reads into the store: a batch
// committed whenever it grows past learnBatchBytes, so that an hour of a
// busy partition's deliveries is never held in memory, and synced once at
// the end.
type learner struct {
	s        *scheduleStore
	b        *pebble.Batch
	now      time.Time
	window   time.Duration
	markers  int
	versions map[string]uint32 // newest version 2 or later noted in this pass
	// notesOnly makes no markers: a drain reads no conversions to dedup.
	notesOnly bool
}

const learnBatchBytes = 1 << 20 // under Pebble's large-batch threshold

func (s *scheduleStore) newLearner(now time.Time, window time.Duration) *learner {
	return &learner{s: s, b: s.db.NewBatch(), now: now, window: window, versions: map[string]uint32{}}
}

// add takes one delivery record. A final outcome becomes a marker in the
// bucket of the record's own time (its attempt's start), so that it lasts
// at least DedupWindow after the record, as its writer's does (one to two
// windows), and none when that has passed. A version 2 or later becomes a version note unless the
// store knows a newer one.
func (l *learner) add(rec *schemas.Delivery) error {
	switch rec.Outcome {
	case schemas.OutcomeDelivered, schemas.OutcomeFailed, schemas.OutcomeDead:
		if l.notesOnly {
			break
		}
		// Never later than now's bucket (a writer whose clock runs ahead:
		// seen looks at now's bucket and the one before).
		now := bucketOf(l.now, l.window)
		if bucket := min(bucketOf(time.UnixMilli(max(rec.TS, 0)), l.window), now); bucket+1 >= now {
			if err := l.b.Set(markerKey(bucket, jobKey(rec.ConversionID, rec.Version)), nil, nil); err != nil {
				return err
			}
			l.markers++
		}
	}
	if rec.Version >= 2 && rec.Version > l.versions[rec.ConversionID] {
		latest, err := l.s.latestVersion(rec.ConversionID, l.now)
		if err != nil {
			return err
		}
		l.versions[rec.ConversionID] = max(latest, rec.Version)
		if latest < rec.Version {
			if err := l.b.Set(versionKey(dayOf(l.now), rec.ConversionID, rec.Version), nil, nil); err != nil {
				return err
			}
		}
	}
	if l.b.Len() > learnBatchBytes {
		if err := l.b.Commit(pebble.NoSync); err != nil {
			return fmt.Errorf("cannot write what other dispatchers delivered: %w", err)
		}
		l.b.Close()
		l.b = l.s.db.NewBatch()
	}
	return nil
}

// finish commits what is left, synced: the markers and notes of the
// batches before are synced with it.
func (l *learner) finish() error {
	if err := l.b.Commit(pebble.Sync); err != nil {
		return fmt.Errorf("cannot write what other dispatchers delivered: %w", err)
	}
	return nil
}

func (l *learner) close() { l.b.Close() }
