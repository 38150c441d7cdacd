package bus_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/segmentio/kafka-go"

	"github.com/trackstar/trackstar/internal/bus"
	"github.com/trackstar/trackstar/internal/testenv"
)

// Clicks and postbacks written through the plumbing land in the partition
// xxhash64(click_id) % n predicts, in both topics.
func TestProducersCoPartitionByClickID(t *testing.T) {
	const parts, ids = 6, 300
	addr := testenv.KafkaTopics(t, parts)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	for _, topic := range []string{bus.TopicClicks, bus.TopicPostbacks} {
		w := bus.NewWriter(bus.WriterConfig{Brokers: []string{addr}, Topic: topic})
		var msgs []kafka.Message
		for i := 0; i < ids; i++ {
			id := fmt.Sprintf("click-%04d", i)
			msgs = append(msgs, kafka.Message{Key: []byte(id), Value: []byte(topic)})
		}
		if err := w.WriteMessages(ctx, msgs...); err != nil {
			t.Fatalf("write %s: %v", topic, err)
		}
		w.Close()
	}

	for _, topic := range []string{bus.TopicClicks, bus.TopicPostbacks} {
		seen := 0
		for p := 0; p < parts; p++ {
			conn, err := kafka.DialLeader(ctx, "tcp", addr, topic, p)
			if err != nil {
				t.Fatalf("dial %s/%d: %v", topic, p, err)
			}
			last, err := conn.ReadLastOffset()
			if err != nil {
				t.Fatal(err)
			}
			conn.Close()
			if last == 0 {
				continue
			}
			r := kafka.NewReader(kafka.ReaderConfig{Brokers: []string{addr}, Topic: topic, Partition: p, MaxWait: 100 * time.Millisecond})
			for i := int64(0); i < last; i++ {
				m, err := r.ReadMessage(ctx)
				if err != nil {
					t.Fatalf("read %s/%d: %v", topic, p, err)
				}
				if want := bus.PartitionFor(m.Key, parts); want != p {
					t.Fatalf("%s: key %s in partition %d, want %d", topic, m.Key, p, want)
				}
				seen++
			}
			r.Close()
		}
		if seen != ids {
			t.Fatalf("%s: read %d records, want %d", topic, seen, ids)
		}
	}
}

func TestEnsureTopics(t *testing.T) {
	addr := testenv.Kafka(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cfg := bus.TopicsConfig{Brokers: []string{addr}, Partitions: 4, Retention: 31 * 24 * time.Hour}
	for i := 0; i < 2; i++ { // idempotent
		n, err := bus.EnsureTopics(ctx, cfg)
		if err != nil || n != 4 {
			t.Fatalf("EnsureTopics #%d = %d, %v; want 4, nil", i, n, err)
		}
	}
	// A later start with another default keeps the existing count.
	cfg.Partitions = 8
	if n, err := bus.EnsureTopics(ctx, cfg); err != nil || n != 4 {
		t.Fatalf("EnsureTopics with existing topics = %d, %v; want 4, nil", n, err)
	}
	client := &kafka.Client{Addr: kafka.TCP(addr)}
	for _, topic := range []string{bus.TopicClicks, bus.TopicPostbacks, bus.TopicConversions} {
		resp, err := client.DescribeConfigs(ctx, &kafka.DescribeConfigsRequest{Resources: []kafka.DescribeConfigRequestResource{
			{ResourceType: kafka.ResourceTypeTopic, ResourceName: topic, ConfigNames: []string{"retention.ms"}},
		}})
		if err != nil {
			t.Fatal(err)
		}
		got := ""
		for _, e := range resp.Resources[0].ConfigEntries {
			if e.ConfigName == "retention.ms" {
				got = e.ConfigValue
			}
		}
		if want := fmt.Sprint((31 * 24 * time.Hour).Milliseconds()); got != want {
			t.Fatalf("%s retention.ms = %q, want %q", topic, got, want)
		}
	}

	// A topic created with too short a retention is raised.
	cfg.Retention = 40 * 24 * time.Hour
	if _, err := bus.EnsureTopics(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	resp, err := client.DescribeConfigs(ctx, &kafka.DescribeConfigsRequest{Resources: []kafka.DescribeConfigRequestResource{
		{ResourceType: kafka.ResourceTypeTopic, ResourceName: bus.TopicConversions, ConfigNames: []string{"retention.ms"}},
	}})
	if err != nil {
		t.Fatal(err)
	}
	if got, want := resp.Resources[0].ConfigEntries[0].ConfigValue, fmt.Sprint((40 * 24 * time.Hour).Milliseconds()); got != want {
		t.Fatalf("raised conversions retention.ms = %q, want %q", got, want)
	}
}

func TestEnsureTopicsRefusesUnequalPartitions(t *testing.T) {
	addr := testenv.Kafka(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	client := &kafka.Client{Addr: kafka.TCP(addr)}
	_, err := client.CreateTopics(ctx, &kafka.CreateTopicsRequest{Topics: []kafka.TopicConfig{
		{Topic: bus.TopicClicks, NumPartitions: 4, ReplicationFactor: 1},
		{Topic: bus.TopicPostbacks, NumPartitions: 6, ReplicationFactor: 1},
	}})
	if err != nil {
		t.Fatal(err)
	}
	_, err = bus.EnsureTopics(ctx, bus.TopicsConfig{Brokers: []string{addr}, Partitions: 4})
	if !errors.Is(err, bus.ErrUnequalPartitions) {
		t.Fatalf("EnsureTopics = %v, want ErrUnequalPartitions", err)
	}
	t.Logf("error as printed: %v", err)
	// Refused before anything was created for the unequal pair.
	md, err := client.Metadata(ctx, &kafka.MetadataRequest{Topics: []string{bus.TopicConversions}})
	if err != nil {
		t.Fatal(err)
	}
	if len(md.Topics) == 1 && md.Topics[0].Error == nil {
		t.Fatalf("%s was created for a cluster refused for unequal partitions", bus.TopicConversions)
	}
}

// A conversions topic with another partition count than clicks still
// starts (conversions are decided and delivered), with a warning that a
// moved partition cannot restore the decisions made before.
func TestEnsureTopicsWarnsOfUnequalConversions(t *testing.T) {
	addr := testenv.Kafka(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	client := &kafka.Client{Addr: kafka.TCP(addr)}
	_, err := client.CreateTopics(ctx, &kafka.CreateTopicsRequest{Topics: []kafka.TopicConfig{
		{Topic: bus.TopicConversions, NumPartitions: 2, ReplicationFactor: 1},
	}})
	if err != nil {
		t.Fatal(err)
	}
	var logs bytes.Buffer
	n, err := bus.EnsureTopics(ctx, bus.TopicsConfig{Brokers: []string{addr}, Partitions: 4,
		Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	if err != nil || n != 4 {
		t.Fatalf("EnsureTopics = %d, %v; want 4, nil", n, err)
	}
	if !strings.Contains(logs.String(), "level=WARN") || !strings.Contains(logs.String(), "conversions_partitions=2") {
		t.Fatalf("no warning of the conversions topic's partition count; log:\n%s", logs.String())
	}
}

// groupMember joins the attributor-style consumer group and reports each
// generation's assignment until its context ends.
type groupMember struct {
	mu       sync.Mutex
	gen      int32
	assigned map[string][]int
}

func (m *groupMember) snapshot() (int32, map[string][]int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.gen, m.assigned
}

func runMember(ctx context.Context, t *testing.T, addr, id string) (*groupMember, *kafka.ConsumerGroup) {
	bal := &bus.CoPartitionBalancer{}
	cg, err := kafka.NewConsumerGroup(kafka.ConsumerGroupConfig{
		ID:                "copartition-test",
		Brokers:           []string{addr},
		Topics:            []string{bus.TopicClicks, bus.TopicPostbacks},
		GroupBalancers:    []kafka.GroupBalancer{bal},
		HeartbeatInterval: 200 * time.Millisecond,
		SessionTimeout:    6 * time.Second,
		RebalanceTimeout:  5 * time.Second,
		JoinGroupBackoff:  200 * time.Millisecond,
		Timeout:           5 * time.Second,
	})
	if err != nil {
		t.Fatalf("member %s: %v", id, err)
	}
	m := &groupMember{}
	go func() {
		for {
			gen, err := cg.Next(ctx)
			if err != nil {
				return
			}
			a := map[string][]int{}
			var owned []int
			for topic, ps := range gen.Assignments {
				for _, p := range ps {
					a[topic] = append(a[topic], p.ID)
					if topic == bus.TopicClicks {
						owned = append(owned, p.ID)
					}
				}
				sort.Ints(a[topic])
			}
			bal.SetOwned(owned)
			m.mu.Lock()
			m.gen, m.assigned = gen.ID, a
			m.mu.Unlock()
			// Hold the generation until it ends (a rebalance or close).
			gen.Start(func(ctx context.Context) { <-ctx.Done() })
		}
	}()
	return m, cg
}

func TestCoPartitionBalancerInGroup(t *testing.T) {
	const parts = 8
	addr := testenv.KafkaTopics(t, parts)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	a, cga := runMember(ctx, t, addr, "a")
	defer cga.Close()
	waitFor(t, "a owns everything", func() bool {
		_, as := a.snapshot()
		return len(as[bus.TopicClicks]) == parts && len(as[bus.TopicPostbacks]) == parts
	})

	b, cgb := runMember(ctx, t, addr, "b")
	waitFor(t, "a and b split the pairs", func() bool {
		ga, as := a.snapshot()
		gb, bs := b.snapshot()
		if ga != gb || as == nil || bs == nil {
			return false
		}
		return pairsOwnedOnce(as, bs, parts) == nil
	})
	ga, as := a.snapshot()
	_, bs := b.snapshot()
	t.Logf("generation %d: a=%v b=%v", ga, as, bs)

	cgb.Close()
	waitFor(t, "a owns everything again after b left", func() bool {
		g, as := a.snapshot()
		return g > ga && pairsOwnedOnce(as, nil, parts) == nil
	})
}

// pairsOwnedOnce checks that every partition number is owned in both topics
// by exactly one of the members.
func pairsOwnedOnce(a, b map[string][]int, parts int) error {
	owner := map[string]map[int]string{}
	for name, as := range map[string]map[string][]int{"a": a, "b": b} {
		for topic, ps := range as {
			if owner[topic] == nil {
				owner[topic] = map[int]string{}
			}
			for _, p := range ps {
				if prev, ok := owner[topic][p]; ok {
					return fmt.Errorf("%s/%d owned by %s and %s", topic, p, prev, name)
				}
				owner[topic][p] = name
			}
		}
	}
	for p := 0; p < parts; p++ {
		c, pb := owner[bus.TopicClicks][p], owner[bus.TopicPostbacks][p]
		if c == "" || c != pb {
			return fmt.Errorf("partition %d: clicks owned by %q, postbacks by %q", p, c, pb)
		}
	}
	return nil
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(45 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
