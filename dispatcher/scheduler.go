package dispatcher

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/cockroachdb/pebble/v2"

	"github.com/trackstar/trackstar/internal/catalog"
	"github.com/trackstar/trackstar/schemas"
)

// maxSchedulerSleep bounds how long the scheduler sleeps without a nudge:
// it also notices a clock (Config.Now) that jumps.
const maxSchedulerSleep = time.Second

// runScheduler feeds due schedule entries to the host queues until ctx ends.
func (e *engine) runScheduler(ctx context.Context) {
	timer := time.NewTimer(0)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-timer.C:
		case <-e.wake:
		}
		next := e.scan()
		sleep := maxSchedulerSleep
		if !next.IsZero() {
			sleep = min(max(next.Sub(e.now()), time.Millisecond), maxSchedulerSleep)
		}
		timer.Reset(sleep)
	}
}

// scan walks the schedule host by host. A host that is paused or whose
// queue is full is skipped with one seek; of the others, due entries are
// queued oldest first, as many as fit. It returns the earliest time
// something will be due (zero: nothing is waiting on time).
func (e *engine) scan() (next time.Time) {
	earliest := func(t time.Time) {
		if next.IsZero() || t.Before(next) {
			next = t
		}
	}
	// Swapped first: a request for the reload this pass handles anyway
	// must not run a second one.
	again := e.rehomeAgain.Swap(false)
	if cat := e.cfg.Catalog.Current(); cat != e.homed || again {
		e.rehome(cat)
		e.homed = cat
	}
	now := e.now()
	it, err := e.store.db.NewIter(&pebble.IterOptions{LowerBound: []byte{prefixSchedule}, UpperBound: []byte{prefixSchedule + 1}})
	if err != nil {
		e.fatal(err)
		return next
	}
	defer it.Close()

	valid := it.First()
	for valid {
		host, _, _, ok := parseScheduleKey(it.Key())
		if !ok {
			e.log.Error("dropping a malformed schedule entry", "key", it.Key())
			if err := e.store.db.Delete(it.Key(), pebble.Sync); err == nil {
				e.metrics.retriesPending.Set(float64(e.pending.Add(-1)))
			}
			valid = it.Next()
			continue
		}
		e.mu.Lock()
		h := e.hostLocked(host)
		blocked, until := h.br.blocked(now)
		room := min(e.cfg.HostQueue-len(h.queue), e.cfg.MaxQueued-e.queued)
		e.mu.Unlock()
		if blocked {
			earliest(until)
			valid = it.SeekGE(hostUpperBound(host))
			continue
		}

		for ; valid; valid = it.Next() {
			h2, due, id, ok := parseScheduleKey(it.Key())
			if !ok || h2 != host {
				break
			}
			if due.After(now) {
				earliest(due)
				break
			}
			if room <= 0 {
				// Woken again by a worker once the queue has room.
				e.mu.Lock()
				h.waiting = true
				if e.queued >= e.cfg.MaxQueued {
					e.waiting = true
				}
				e.mu.Unlock()
				break
			}
			if e.load(id, it.Key()) {
				room--
			}
		}
		if valid {
			if h2, _, _, ok := parseScheduleKey(it.Key()); ok && h2 == host {
				valid = it.SeekGE(hostUpperBound(host))
			}
		}
	}
	return next
}

// rehome queues, due or not, every schedule entry filed under a host its
// conversion's postback no longer goes to under cat: a reload moved the
// affiliate's URL, or the dispatcher restarted with another config. The
// entry's place and due time are the old host's (its pause, its backoff),
// which the new host owes nothing. Queued, the job goes to the new host,
// or back to the schedule under the new host if that one is paused or full
// (deferJob). An entry whose affiliate gets no postback any more is
// dropped, as it would be when due. Runs once per config, on the
// scheduler's next scan.
func (e *engine) rehome(cat *catalog.Catalog) {
	it, err := e.store.db.NewIter(&pebble.IterOptions{LowerBound: []byte{prefixSchedule}, UpperBound: []byte{prefixSchedule + 1}})
	if err != nil {
		e.fatal(err)
		return
	}
	defer it.Close()
	moved := 0
	for valid := it.First(); valid; valid = it.Next() {
		host, _, id, ok := parseScheduleKey(it.Key())
		if !ok {
			continue // scan drops it
		}
		value, err := it.ValueAndErr()
		if err != nil {
			e.fatal(fmt.Errorf("cannot read schedule entry: %w", err))
			return
		}
		var sj scheduledJob
		if json.Unmarshal(value, &sj) != nil {
			continue // load drops it when due
		}
		conv, err := schemas.DecodeConversion(sj.Conversion)
		if err != nil || currentHost(cat, &conv) == host {
			continue
		}
		e.load(id, it.Key())
		moved++
	}
	if moved > 0 {
		e.log.Info("scheduled postbacks filed under a host the config no longer sends them to; moving them", "postbacks", moved)
	}
}

// load turns a due schedule entry into a job and queues it, unless the
// job is in memory already. It reports whether the job went into a queue.
func (e *engine) load(id string, key []byte) bool {
	e.mu.Lock()
	_, busy := e.jobs[id]
	e.mu.Unlock()
	if busy {
		return false
	}
	// The iterator is a snapshot: the finalizer may have deleted the entry
	// since (it deletes before it forgets the job), so read it afresh.
	value, closer, err := e.store.db.Get(key)
	if errors.Is(err, pebble.ErrNotFound) {
		return false
	}
	if err != nil {
		e.fatal(fmt.Errorf("cannot read schedule entry: %w", err))
		return false
	}
	key = append([]byte(nil), key...)
	var sj scheduledJob
	var conv schemas.Conversion
	err = json.Unmarshal(value, &sj)
	if err == nil {
		conv, err = schemas.DecodeConversion(sj.Conversion)
	}
	raw := append([]byte(nil), sj.Conversion...)
	closer.Close()
	if err != nil {
		e.log.Error("dropping a schedule entry that cannot be decoded", "key", key, "err", err)
		e.drop(result{kind: resDrop, job: &job{id: id, schedKey: key}})
		return false
	}
	j := &job{
		id: id, conv: conv, raw: raw, partition: sj.Partition, offset: sj.Offset,
		attempt: sj.Attempt, lastErr: sj.LastError, schedKey: key,
	}
	pb := postbackFor(e.cfg.Catalog.Current(), &conv)
	if pb == nil {
		e.drop(e.notWanted(j))
		return false
	}
	j.host = hostOf(pb.URL.Append(nil, valuesOf(&conv)))
	return e.enqueue(j)
}

// drop hands the finalizer r, which ends a schedule entry without an
// attempt (resDrop, or notWanted's record).
func (e *engine) drop(r result) {
	e.mu.Lock()
	if _, busy := e.jobs[r.job.id]; busy {
		e.mu.Unlock()
		return
	}
	e.putLocked(r.job)
	e.mu.Unlock()
	e.send(r)
}

// notWanted ends j, whose affiliate the config no longer sends it to. A
// retry (attempt 2 or later) gets a last record, failed, saying so: its
// earlier attempts are recorded as retrying, and postback_deliveries
// would otherwise end there.
func (e *engine) notWanted(j *job) result {
	c := &j.conv
	e.metrics.conversions.WithLabelValues("dropped").Inc()
	e.log.Info("dropping a scheduled delivery the config no longer wants", "conversion_id", c.ConversionID, "aff_id", c.AffID)
	if j.attempt < 2 {
		return result{kind: resDrop, job: j}
	}
	return result{kind: resAttempt, job: j, rec: schemas.Delivery{
		V: schemas.Version, ConversionID: c.ConversionID, Version: c.Version, Status: c.Status,
		AffID: c.AffID, Attempt: j.attempt, TS: e.now().UnixMilli(),
		Outcome: schemas.OutcomeFailed, Error: "not sent: the config no longer sends this conversion to its affiliate",
	}}
}
