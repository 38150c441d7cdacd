package ingest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"slices"
	"sort"
	"time"

	"github.com/segmentio/kafka-go"
	"github.com/segmentio/kafka-go/protocol"
	produceapi "github.com/segmentio/kafka-go/protocol/produce"

	"github.com/trackstar/trackstar/internal/bus"
)

// flight produces the edge's events to Kafka, batching by flight instead
// of by timer. While a produce request is in flight, events queue up; when
// its ack comes, everything queued goes out in the next request, every
// partition of both topics together (one request per partition leader).
// An idle edge therefore sends an event the moment it arrives — no linger —
// and a busy one sends batches as large as the load, as many requests a
// second as the round trip allows rather than one per partition per linger
// period.
//
// This is what kafka-go's Writer cannot do: it closes a batch per partition
// on a timer (BatchTimeout) or when full, and keeps one produce request in
// flight per partition. At a few thousand events a second the timer is
// always what closes the batch, so every event waits for it; with many
// partitions each request carries a handful of events. flight speaks to the
// brokers through kafka-go's Transport, with the same acks (all in-sync
// replicas) and the same partitioner (bus.PartitionFor, key = click ID).
//
// Order: within a partition events are produced in the order they were
// queued; a partition's events that must be retried go out before any that
// came after them.
type flight struct {
	addr      net.Addr
	transport *kafka.Transport
	client    *kafka.Client
	in        <-chan *event
	// timeout bounds one produce request (and the broker's wait for the
	// replicas' acks within it).
	timeout time.Duration
	// ctx ends when the edge gives up on what is still in flight at close.
	ctx context.Context

	meta     [numTopics]topicMeta
	metaAt   time.Time
	metaWant bool // refresh before the next round: a leader moved, say
	// metaStale: a round failed somewhere. kafka-go's Transport answers
	// metadata requests from its own cache, refreshed every few seconds,
	// and routes produce requests by that cache; so the refresh drops the
	// cache first and reads the cluster's current view.
	metaStale bool

	// Scratch, reused by every round.
	parts []*partBatch
	index [numTopics]map[int32]*partBatch
	free  []*partBatch
}

// Limits of one round. Events are at most a few KiB (the edge limits
// request sizes), so no partition's record batch comes near a broker's
// message.max.bytes (1 MiB by default).
const (
	flightMaxEvents  = 2048
	flightMaxBytes   = 1 << 20
	flightAttempts   = 3 // tries of an event whose partition answered a retriable error
	flightMetaMaxAge = 10 * time.Second
)

// topicMeta is what flight knows of a topic's partitions.
type topicMeta struct {
	leaders []int32 // the leader's broker ID by partition; -1 when it has none
	err     error   // the topic is missing or has no partitions
}

// partBatch is one partition's events in a round.
type partBatch struct {
	topic     topicID
	partition int32
	leader    int32
	evs       []*event
	err       error // the partition's outcome
}

func newFlight(ctx context.Context, brokers []string, in <-chan *event, timeout time.Duration) *flight {
	tr := &kafka.Transport{ClientID: "trackstar-edge"}
	addr := kafka.TCP(brokers...)
	f := &flight{
		addr:      addr,
		transport: tr,
		client:    &kafka.Client{Addr: addr, Transport: tr, Timeout: timeout},
		in:        in,
		timeout:   timeout,
		ctx:       ctx,
	}
	for t := range numTopics {
		f.index[t] = map[int32]*partBatch{}
	}
	return f
}

// run produces until the input closes and everything taken from it is
// settled: every event gets exactly one complete call.
func (f *flight) run() {
	defer f.transport.CloseIdleConnections()
	var retry []*event // events to try again, ahead of new ones
	batch := make([]*event, 0, flightMaxEvents)
	open := true
	for open || len(retry) > 0 {
		batch = append(batch[:0], retry...)
		retry = retry[:0]
		if len(batch) == 0 {
			ev, ok := <-f.in
			if !ok {
				return
			}
			batch = append(batch, ev)
		}
		if open {
			open = f.gather(&batch)
		}
		var again bool
		retry, again = f.round(batch, retry)
		clear(batch)
		if again {
			f.backoff(retry)
		}
	}
}

// settle produces batch in rounds of its own, without the input queue,
// retrying what a retry may cure, and completes every event before it
// returns. Every round takes the whole of what is left: it sends each
// partition's events as one record batch, which a broker appends whole or
// not at all, and a failed partition is retried whole. So each partition's
// events end up either all acked or all failed, never a later one without
// an earlier one. That is what the spool's drainer needs; the caller keeps
// batch small enough for one request (well under message.max.bytes).
func (f *flight) settle(batch []*event) {
	batch = slices.Clone(batch)
	var next []*event
	for len(batch) > 0 {
		var again bool
		next, again = f.round(batch, next[:0])
		if !again {
			return
		}
		f.backoff(next)
		batch, next = next, batch[:0]
	}
}

// gather adds whatever is queued, without waiting, up to a round's limits.
// It reports false once the input is closed.
func (f *flight) gather(batch *[]*event) bool {
	size := 0
	for _, ev := range *batch {
		size += ev.size()
	}
	for len(*batch) < flightMaxEvents && size < flightMaxBytes {
		select {
		case ev, ok := <-f.in:
			if !ok {
				return false
			}
			*batch = append(*batch, ev)
			size += ev.size()
		default:
			return true
		}
	}
	return true
}

func (ev *event) size() int { return len(ev.key) + len(ev.value) + 64 }

// backoff waits before retrying events: 20 ms, then 40 ms.
func (f *flight) backoff(retry []*event) {
	attempts := 1
	for _, ev := range retry {
		attempts = max(attempts, int(ev.attempts))
	}
	t := time.NewTimer(time.Duration(10<<attempts) * time.Millisecond)
	defer t.Stop()
	select {
	case <-t.C:
	case <-f.ctx.Done():
	}
}

// round produces batch: one request per partition leader, sent together.
// It completes every event that succeeded or failed for good, and appends
// the ones to try again to retry, in batch order; again reports whether
// there are any.
func (f *flight) round(batch []*event, retry []*event) (_ []*event, again bool) {
	if f.metaWant || time.Since(f.metaAt) > flightMetaMaxAge {
		f.refreshMeta()
	}
	f.group(batch)

	// One request per leader. Partitions without a usable leader fail now.
	// Sorted by leader, then topic and partition: a request's topics are
	// contiguous and its partitions in order.
	sort.Slice(f.parts, func(i, j int) bool {
		a, b := f.parts[i], f.parts[j]
		if a.leader != b.leader {
			return a.leader < b.leader
		}
		if a.topic != b.topic {
			return a.topic < b.topic
		}
		return a.partition < b.partition
	})
	var reqs [][]*partBatch // one per leader
	for i := 0; i < len(f.parts); {
		p := f.parts[i]
		if p.err != nil {
			i++
			continue
		}
		j := i + 1
		for j < len(f.parts) && f.parts[j].leader == p.leader && f.parts[j].err == nil {
			j++
		}
		reqs = append(reqs, f.parts[i:j])
		i = j
	}
	// The phases of trackstar_edge_produce_phase_seconds: each event's
	// last round went out at sent and came back at acked.
	sent := time.Now()
	for _, ev := range batch {
		ev.sentAt = sent
	}
	switch len(reqs) {
	case 0:
	case 1:
		f.produce(reqs[0])
	default:
		done := make(chan struct{}, len(reqs))
		for _, parts := range reqs[1:] {
			go func() {
				f.produce(parts)
				done <- struct{}{}
			}()
		}
		f.produce(reqs[0])
		for range reqs[1:] {
			<-done
		}
	}

	acked := time.Now()
	for _, ev := range batch {
		ev.ackedAt = acked
	}

	// Settle each event in batch order, which keeps a partition's retries
	// in order ahead of later events.
	for _, ev := range batch {
		p := f.index[ev.topic][ev.partition]
		err := p.err
		if err != nil && retriable(err) && int(ev.attempts)+1 < flightAttempts && f.ctx.Err() == nil {
			ev.attempts++
			retry = append(retry, ev)
			again = true
			continue
		}
		ev.complete(err)
	}
	for _, p := range f.parts {
		if p.err != nil {
			// A leader may have moved, or the broker went away and the
			// transport's cached view is an error until it next looks.
			f.metaWant, f.metaStale = true, true
		}
	}
	f.release()
	return retry, again
}

// group sorts batch into partitions, keeping each partition's events in
// order.
func (f *flight) group(batch []*event) {
	for _, ev := range batch {
		m := &f.meta[ev.topic]
		var part int32 = -1
		if m.err == nil {
			part = int32(bus.PartitionFor(ev.key, len(m.leaders)))
		}
		ev.partition = part
		p := f.index[ev.topic][part]
		if p == nil {
			p = f.newPart(ev.topic, part)
			switch {
			case m.err != nil:
				p.err = m.err
			case m.leaders[part] < 0:
				p.err = fmt.Errorf("partition %d of %s has no leader: %w", part, topicNames[ev.topic], kafka.LeaderNotAvailable)
			default:
				p.leader = m.leaders[part]
			}
			f.index[ev.topic][part] = p
			f.parts = append(f.parts, p)
		}
		p.evs = append(p.evs, ev)
	}
}

func (f *flight) newPart(t topicID, part int32) *partBatch {
	var p *partBatch
	if n := len(f.free); n > 0 {
		p, f.free = f.free[n-1], f.free[:n-1]
	} else {
		p = &partBatch{}
	}
	p.topic, p.partition, p.leader, p.err = t, part, -1, nil
	return p
}

func (f *flight) release() {
	for _, p := range f.parts {
		clear(p.evs)
		p.evs = p.evs[:0]
		p.err = nil
		f.free = append(f.free, p)
	}
	clear(f.parts)
	f.parts = f.parts[:0]
	for t := range numTopics {
		clear(f.index[t])
	}
}

// produce sends one request carrying parts (all led by one broker) and
// sets each part's outcome. Requests to several leaders run at once, so it
// writes nothing of f but parts.
func (f *flight) produce(parts []*partBatch) {
	req := &produceapi.Request{
		Acks:    int16(kafka.RequireAll),
		Timeout: int32(f.timeout / time.Millisecond),
	}
	n := 0
	for _, p := range parts {
		n += len(p.evs)
	}
	// Each request needs records of its own: requests to several leaders
	// are in flight at once.
	records := make([]kafka.Record, 0, n)
	now := time.Now()
	for _, p := range parts {
		start := len(records)
		for _, ev := range p.evs {
			// Record timestamps matter: brokers apply time-based retention
			// to them, and the attributor rebuilds a partition from the
			// offset of the window's first timestamp. The produce time is
			// never earlier than the event's own time, so a rebuild by time
			// never skips an event.
			records = append(records, kafka.Record{Time: now, Key: kafka.NewBytes(ev.key), Value: kafka.NewBytes(ev.value)})
		}
		rs := protocol.RecordSet{Records: kafka.NewRecordReader(records[start:]...)}
		name := topicNames[p.topic]
		if k := len(req.Topics); k == 0 || req.Topics[k-1].Topic != name {
			req.Topics = append(req.Topics, produceapi.RequestTopic{Topic: name})
		}
		t := &req.Topics[len(req.Topics)-1]
		t.Partitions = append(t.Partitions, produceapi.RequestPartition{Partition: p.partition, RecordSet: rs})
	}
	ctx, cancel := context.WithTimeout(f.ctx, f.timeout)
	defer cancel()
	msg, err := f.transport.RoundTrip(ctx, f.addr, req)
	if err != nil {
		err = fmt.Errorf("produce request to the leader of %d partitions: %w", len(parts), err)
		for _, p := range parts {
			p.err = err
		}
		return
	}
	res, ok := msg.(*produceapi.Response)
	if !ok {
		err = fmt.Errorf("produce request: unexpected response %T", msg)
		for _, p := range parts {
			p.err = err
		}
		return
	}
	for _, p := range parts {
		p.err = errNoAnswer
	}
	for _, rt := range res.Topics {
		for _, rp := range rt.Partitions {
			for _, p := range parts {
				if p.partition == rp.Partition && topicNames[p.topic] == rt.Topic {
					p.err = nil
					if rp.ErrorCode != 0 {
						p.err = fmt.Errorf("partition %d of %s: %w", p.partition, rt.Topic, kafka.Error(rp.ErrorCode))
					}
				}
			}
		}
	}
}

var errNoAnswer = errors.New("the broker's produce response left out the partition")

// retriable: the partition's error is one a retry after fresh metadata
// cures: a leader moved, replicas caught up, or the transport's cached
// view of the cluster could not route the request (no leader known, or the
// partitions grouped for one leader have different ones in its view). A
// broker that cannot be reached is not retried here: the event goes to the
// spool at once, and the spool's drainer is the retry.
func retriable(err error) bool {
	var ke kafka.Error
	var routing *produceapi.Error
	return errors.As(err, &ke) && ke.Temporary() || errors.As(err, &routing)
}

// refreshMeta reads the topics' partition leaders. On failure the old
// view stays (a round with a stale leader fails with a retriable error and
// asks again), unless there is none yet.
func (f *flight) refreshMeta() {
	ctx, cancel := context.WithTimeout(f.ctx, f.timeout)
	defer cancel()
	if f.metaStale {
		// Between rounds nothing is in flight, so every connection is
		// idle: this drops the transport's connection pool with its cached
		// metadata, and the next request starts a pool that reads the
		// cluster's metadata afresh. Both flight and the transport's
		// routing then go by the new leaders.
		f.transport.CloseIdleConnections()
		f.metaStale = false
	}
	f.metaWant = false
	f.metaAt = time.Now()
	res, err := f.client.Metadata(ctx, &kafka.MetadataRequest{Topics: topicNames[:]})
	if err != nil {
		f.metaWant = true
		for t := range numTopics {
			if f.meta[t].leaders == nil {
				f.meta[t].err = fmt.Errorf("cannot read the partitions of %s: %w", topicNames[t], err)
			}
		}
		return
	}
	for t := range numTopics {
		m := topicMeta{err: fmt.Errorf("topic %s does not exist", topicNames[t])}
		for _, rt := range res.Topics {
			if rt.Name != topicNames[t] {
				continue
			}
			switch {
			case rt.Error != nil:
				m.err = fmt.Errorf("topic %s: %w", rt.Name, rt.Error)
			case len(rt.Partitions) == 0:
				m.err = fmt.Errorf("topic %s has no partitions", rt.Name)
			default:
				m = topicMeta{leaders: make([]int32, len(rt.Partitions))}
				for i := range m.leaders {
					m.leaders[i] = -1
				}
				for _, p := range rt.Partitions {
					if p.ID >= 0 && p.ID < len(m.leaders) && p.Error == nil {
						m.leaders[p.ID] = int32(p.Leader.ID)
					}
				}
			}
		}
		if m.err != nil {
			f.metaWant = true
		}
		f.meta[t] = m
	}
}
