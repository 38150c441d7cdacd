package bus

import (
	"github.com/cespare/xxhash/v2"
	"github.com/segmentio/kafka-go"
)

// Topic names of the external contract.
const (
	TopicClicks      = "trackstar.clicks"
	TopicPostbacks   = "trackstar.postbacks"
	TopicConversions = "trackstar.conversions"
	TopicDeliveries  = "trackstar.deliveries"
	TopicDLQ         = "trackstar.dlq"
)

// AllTopics lists every topic Trackstar uses.
var AllTopics = []string{TopicClicks, TopicPostbacks, TopicConversions, TopicDeliveries, TopicDLQ}

// PartitionFor returns the partition of a click ID among n partitions:
// xxhash64(click_id) % n. Clicks and postbacks both use it, so a click and
// its postbacks land in the same partition number of their topics.
func PartitionFor(clickID []byte, n int) int {
	return int(xxhash.Sum64(clickID) % uint64(n))
}

// ClickIDBalancer is the kafka-go Balancer for keyed-by-click-ID topics. It
// ignores which partitions are currently available: a click must go to its
// partition or nowhere, since the attributor relies on co-location.
type ClickIDBalancer struct{}

// Balance implements kafka.Balancer. kafka-go passes all partitions of the
// topic, 0..n-1 in order.
func (ClickIDBalancer) Balance(msg kafka.Message, partitions ...int) int {
	return partitions[PartitionFor(msg.Key, len(partitions))]
}
