package bus

import (
	"fmt"
	"net"
	"os"
	"strconv"

	"github.com/twmb/franz-go/pkg/kfake"
)

// EmbeddedBroker is a single-node Kafka-protocol broker (franz-go's kfake)
// running inside this process and persisting to a data directory. Clients
// reach it over TCP like any broker, so the rest of Trackstar cannot tell it
// from a real cluster.
type EmbeddedBroker struct {
	cluster *kfake.Cluster
	addr    string
}

// StartEmbeddedBroker starts the broker listening on addr ("127.0.0.1:9092";
// port 0 picks a free one) and persisting under dataDir ("" keeps everything
// in memory, for tests). The address it advertises to clients is the one it
// listens on, so bind a host clients can reach, not 0.0.0.0.
func StartEmbeddedBroker(addr, dataDir string) (*EmbeddedBroker, error) {
	host, portStr, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, fmt.Errorf("cannot parse embedded broker address %q: %w", addr, err)
	}
	if host == "" || host == "0.0.0.0" || host == "::" {
		return nil, fmt.Errorf("embedded broker address %q: give a host clients can reach (it is advertised as is), e.g. 127.0.0.1:%s", addr, portStr)
	}
	port, err := strconv.Atoi(portStr)
	if err != nil || port < 0 || port > 65535 {
		return nil, fmt.Errorf("embedded broker address %q: bad port", addr)
	}
	opts := []kfake.Opt{
		kfake.NumBrokers(1),
		kfake.Ports(port),
		kfake.ClusterID("trackstar-embedded"),
		// kfake always asks for 127.0.0.1:<port>; honour the host we were given.
		kfake.ListenFn(func(network, _ string) (net.Listener, error) {
			return net.Listen(network, net.JoinHostPort(host, strconv.Itoa(port)))
		}),
		kfake.BrokerConfigs(map[string]string{
			"default.replication.factor": "1",
			"min.insync.replicas":        "1",
		}),
	}
	if dataDir != "" {
		if err := os.MkdirAll(dataDir, 0o755); err != nil {
			return nil, fmt.Errorf("cannot create embedded broker data dir %q: %w", dataDir, err)
		}
		opts = append(opts, kfake.DataDir(dataDir))
	}
	c, err := kfake.NewCluster(opts...)
	if err != nil {
		return nil, fmt.Errorf("cannot start embedded broker on %s: %w", addr, err)
	}
	return &EmbeddedBroker{cluster: c, addr: c.ListenAddrs()[0]}, nil
}

// Addr returns the host:port clients connect to.
func (b *EmbeddedBroker) Addr() string { return b.addr }

// Close stops the broker and flushes its persisted state.
func (b *EmbeddedBroker) Close() { b.cluster.Close() }
