// Package attributor is the attributor role: a co-partitioned, disk-backed
// join of advertiser postbacks to clicks that emits one conversion record
// per postback (approved, pending, or rejected with a reason).
//
// Members of one consumer group own whole partition pairs of the clicks and
// postbacks topics (bus.CoPartitionBalancer). For each pair a worker reads
// both partitions with readers of its own, from offsets kept in a Pebble
// store together with the state they produced: the clicks of the
// attribution window, the conversions' slots for deduplication and status
// updates, the record emitted for every postback (so a postback seen again
// re-emits the same record), postbacks waiting for their click, and an
// outbox of records decided (and dead letters of postbacks that cannot be
// decoded) but not yet acknowledged by Kafka. Group
// offsets are committed only after the outbox is empty. A partition gained
// without current local state is rebuilt from Kafka: clicks from the
// window's beginning, earlier decisions from the conversions topic.
//
// The attribution rules are the pure function Decide.
package attributor
