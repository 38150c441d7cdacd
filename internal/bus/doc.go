// Package bus is Trackstar's Kafka wiring, shared by every role: the topic
// names, the click-ID partitioner that co-locates a click with its postbacks,
// writers with safe settings, topic creation at startup, the co-partitioning
// group balancer of the attributor, and the embedded Kafka-protocol broker
// that `trackstar all` runs when no --brokers are given.
//
// Every role talks to Kafka through segmentio/kafka-go over TCP, whether the
// broker is a real cluster or the embedded one.
package bus
