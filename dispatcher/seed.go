package dispatcher

import (
	"context"
	"encoding/binary"
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
// version a version note. A retrying record makes no marker: it is
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
	}
	now := d.cfg.Now()
	var markers []string
	versions := map[string]uint32{}
	for q := from; q < to; q++ {
		err := d.readDeliveries(ctx, client, q, now.Add(-d.cfg.DedupWindow), func(key []byte, rec *schemas.Delivery) {
			if nConv != nDel && bus.PartitionFor(key, nConv) != partition {
				return
			}
			switch rec.Outcome {
			case schemas.OutcomeDelivered, schemas.OutcomeFailed, schemas.OutcomeDead:
				markers = append(markers, jobKey(rec.ConversionID, rec.Version))
			}
			versions[rec.ConversionID] = max(versions[rec.ConversionID], rec.Version)
		})
		if err != nil {
			return 0, err
		}
	}
	if err := d.engine.store.learn(markers, versions, now, d.cfg.DedupWindow); err != nil {
		d.fatal(err)
		return 0, err
	}
	return len(markers), nil
}

// readDeliveries calls fn for every decodable record of partition q of
// trackstar.deliveries from time since up to the partition's end as it
// is now.
func (d *dispatcher) readDeliveries(ctx context.Context, client *kafka.Client, q int, since time.Time,
	fn func(key []byte, rec *schemas.Delivery)) error {
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
			fn(m.Key, &rec)
		}
	}
	return nil
}

// learn writes markers for jobIDs and version notes for versions (newest
// version by conversion ID) that the store lacks, in one synced batch.
func (s *scheduleStore) learn(jobIDs []string, versions map[string]uint32, now time.Time, window time.Duration) error {
	b := s.db.NewBatch()
	defer b.Close()
	bucket := bucketOf(now, window)
	for _, id := range jobIDs {
		if err := b.Set(markerKey(bucket, id), nil, nil); err != nil {
			return err
		}
	}
	for id, v := range versions {
		if v < 2 {
			continue
		}
		latest, err := s.latestVersion(id, now)
		if err != nil {
			return err
		}
		if latest < v {
			if err := b.Set(versionKey(dayOf(now), id), binary.BigEndian.AppendUint32(nil, v), nil); err != nil {
				return err
			}
		}
	}
	if b.Empty() {
		return nil
	}
	if err := b.Commit(pebble.Sync); err != nil {
		return fmt.Errorf("cannot write what other dispatchers delivered: %w", err)
	}
	return nil
}
