package testenv

import (
	"context"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/trackstar/trackstar/internal/bus"
)

// Kafka starts an embedded Kafka-protocol broker on a free loopback port,
// in memory, and stops it when the test ends. It returns the broker address.
func Kafka(t testing.TB) string {
	t.Helper()
	return KafkaAt(t, "127.0.0.1:0", "")
}

// KafkaAt starts an embedded broker on addr persisting under dataDir
// ("" for memory); restarting one on the same addr and dataDir brings back
// what it held, which lets tests stop and restart "the cluster".
func KafkaAt(t testing.TB, addr, dataDir string) string {
	t.Helper()
	b, err := bus.StartEmbeddedBroker(addr, dataDir)
	if err != nil {
		t.Fatalf("cannot start embedded broker: %v", err)
	}
	t.Cleanup(b.Close)
	return b.Addr()
}

// KafkaTopics starts an embedded broker and creates the Trackstar topics
// with the given partition count. It returns the broker address.
func KafkaTopics(t testing.TB, partitions int) string {
	t.Helper()
	addr := Kafka(t)
	CreateTopics(t, addr, partitions)
	return addr
}

// CreateTopics creates the Trackstar topics on the broker at addr.
func CreateTopics(t testing.TB, addr string, partitions int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := bus.EnsureTopics(ctx, bus.TopicsConfig{Brokers: []string{addr}, Partitions: partitions}); err != nil {
		t.Fatalf("cannot create topics: %v", err)
	}
}

// KafkaControlled is KafkaTopics with a broker that hands every request
// of kind key to control first (kfake's ControlKey): control returns the
// answer to send, or nil to let the broker answer as usual.
func KafkaControlled(t testing.TB, partitions int, key kmsg.Key, control func(c *kfake.Cluster, req kmsg.Request) kmsg.Response) string {
	t.Helper()
	c, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(-1))
	if err != nil {
		t.Fatalf("cannot start a broker: %v", err)
	}
	t.Cleanup(c.Close)
	addr := c.ListenAddrs()[0]
	CreateTopics(t, addr, partitions)
	c.ControlKey(int16(key), func(req kmsg.Request) (kmsg.Response, error, bool) {
		c.KeepControl()
		resp := control(c, req)
		return resp, nil, resp != nil
	})
	return addr
}

// KafkaSlowHeartbeats is KafkaTopics with a broker that answers every
// consumer group heartbeat only after delay, as a coordinator under load
// does; every other request is answered at once.
func KafkaSlowHeartbeats(t testing.TB, partitions int, delay time.Duration) string {
	t.Helper()
	return KafkaControlled(t, partitions, kmsg.Heartbeat, func(c *kfake.Cluster, _ kmsg.Request) kmsg.Response {
		c.SleepControl(func() { time.Sleep(delay) })
		return nil
	})
}
