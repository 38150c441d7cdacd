// Package dispatcher is Trackstar's partner postback role: it consumes
// conversions, renders each affiliate's postback URL and delivers it over
// HTTP, signed when the affiliate has a secret, retried on a schedule,
// dead-lettered when the schedule runs out, and recorded attempt by attempt
// on trackstar.deliveries.
//
// The life of a conversion:
//
//   - A reader per assigned partition of trackstar.conversions decides
//     whether the conversion's affiliate wants it (status and goal filters)
//     and hands it to the host queue of the partner URL's host. Nothing on
//     that path waits for a partner: when the host's queue is full, or its
//     circuit breaker has paused it, the conversion goes to the durable
//     schedule instead, so a partner that hangs never holds up another.
//   - Workers, bounded per host and overall, send the request with
//     fasthttp, dialling only addresses the SSRF guard has checked.
//   - A finalizer writes the attempt's delivery record (and the dead letter,
//     after the last retry), then updates the schedule in Pebble under
//     DataDir/dispatcher: a retry is an entry keyed by host and due time.
//   - A conversion's Kafka offset counts as done once its delivery is final
//     or durably scheduled; offsets are committed per partition up to the
//     first one that is not done, so a crash replays, never skips.
//
// A scheduler goroutine feeds due entries of the schedule back to the host
// queues; a restart resumes the schedule where it was.
//
// When a rebalance takes partitions away, the dispatcher hands them over
// before it rejoins: it drops what it read from them and only queued,
// waits for their requests in flight to be recorded, and commits. One
// conversion has at most one request in flight, and a status update
// supersedes an older status still waiting, so a partner gets a
// conversion's statuses in order.
package dispatcher
