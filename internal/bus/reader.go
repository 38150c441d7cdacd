package bus

import "time"

// Fetch tuning of the kafka-go readers that read clicks in bulk (the
// attributor's clicks reader, the warehouse loader). Readers that a partner
// waits on (postbacks, conversions) keep MinBytes 1. With kafka-go's default MinBytes of 1 a reader of a busy
// partition sends a fetch for every few records: under click load the
// dozens of readers of one deployment then keep the broker and themselves
// busy with tiny fetches, which in `trackstar all` (one process, embedded
// broker) costs the edge more than a third of its throughput. Asking for
// FetchMinBytes lets the broker gather records for up to FetchMaxWait and
// answer with one batch. It changes when records are read, never which or
// in what order; the price is up to FetchMaxWait of extra latency when
// traffic is light, which is why the latency-bound readers do not use it.
const (
	// FetchMinBytes is the least a fetch asks the broker to gather before
	// it answers (unless FetchMaxWait passes first).
	FetchMinBytes = 256 << 10
	// FetchMaxWait is how long the broker may hold a fetch that has fewer
	// than FetchMinBytes to return.
	FetchMaxWait = 250 * time.Millisecond
)
