package bus

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"time"

	"github.com/segmentio/kafka-go"
)

// TopicsConfig configures EnsureTopics.
type TopicsConfig struct {
	Brokers []string

	// Partitions of every topic Trackstar creates. Clicks and postbacks must
	// have the same count; the others use it too so a conversion stays in
	// its click's partition number. Default 12.
	Partitions int

	// ReplicationFactor of created topics. Default 0 means the broker's
	// default.replication.factor.
	ReplicationFactor int

	// Retention of clicks, postbacks and conversions. It must cover the
	// longest attribution window plus a margin, since a partition that moves
	// is rebuilt from the clicks and conversions topics; brokers default to
	// 7 days. Default: broker default.
	Retention time.Duration

	Logger *slog.Logger // default slog.Default()
}

// ErrUnequalPartitions is returned when an existing cluster has different
// partition counts for clicks and postbacks: the join cannot work there.
var ErrUnequalPartitions = errors.New("clicks and postbacks topics have different partition counts")

// EnsureTopics creates the missing Trackstar topics and checks the existing
// ones. It refuses an existing cluster whose clicks and postbacks topics
// differ in partition count, and raises retention.ms on the topics the
// attributor rebuilds from when it is shorter than cfg.Retention. It returns the partition count of clicks.
func EnsureTopics(ctx context.Context, cfg TopicsConfig) (int, error) {
	if cfg.Partitions <= 0 {
		cfg.Partitions = 12
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	client := &kafka.Client{Addr: kafka.TCP(cfg.Brokers...), Timeout: 10 * time.Second}

	existing, err := topicPartitions(ctx, client)
	if err != nil {
		return 0, err
	}
	// Refuse an unequal pair before creating anything for it.
	if nc, ok := existing[TopicClicks]; ok {
		if np, ok := existing[TopicPostbacks]; ok && nc != np {
			return 0, unequalPartitions(nc, np)
		}
	}
	var create []kafka.TopicConfig
	for _, t := range AllTopics {
		if _, ok := existing[t]; ok {
			continue
		}
		want := cfg.Partitions
		// A half-created pair must be completed with the partner's count.
		if t == TopicClicks || t == TopicPostbacks {
			if n, ok := existing[pairOf(t)]; ok {
				want = n
			}
		}
		tc := kafka.TopicConfig{Topic: t, NumPartitions: want, ReplicationFactor: cfg.ReplicationFactor}
		if tc.ReplicationFactor <= 0 {
			tc.ReplicationFactor = -1
		}
		if cfg.Retention > 0 && windowTopic(t) {
			tc.ConfigEntries = []kafka.ConfigEntry{{ConfigName: "retention.ms", ConfigValue: strconv.FormatInt(cfg.Retention.Milliseconds(), 10)}}
		}
		create = append(create, tc)
	}
	if len(create) > 0 {
		resp, err := client.CreateTopics(ctx, &kafka.CreateTopicsRequest{Topics: create})
		if err != nil {
			return 0, fmt.Errorf("cannot create topics: %w", err)
		}
		for topic, terr := range resp.Errors {
			// Another member may have created it first: that is fine.
			if terr != nil && !errors.Is(terr, kafka.TopicAlreadyExists) {
				return 0, fmt.Errorf("cannot create topic %s: %w", topic, terr)
			}
		}
		for _, tc := range create {
			cfg.Logger.Info("created topic", "topic", tc.Topic, "partitions", tc.NumPartitions)
		}
		if existing, err = waitForTopics(ctx, client); err != nil {
			return 0, err
		}
	}

	nc, np := existing[TopicClicks], existing[TopicPostbacks]
	if nc != np {
		return 0, unequalPartitions(nc, np)
	}
	if nv := existing[TopicConversions]; nv != nc {
		// Not fatal: conversions are still decided and delivered. But a
		// moved partition is rebuilt without the decisions made before.
		cfg.Logger.Warn("the conversions topic has another partition count than clicks: a partition that moves to another attributor "+
			"cannot restore the conversions decided before, so their status updates and duplicates are not recognised there; "+
			"give them the same count", "clicks_partitions", nc, "conversions_partitions", nv)
	}
	if cfg.Retention > 0 {
		if err := ensureRetention(ctx, client, cfg.Retention, cfg.Logger); err != nil {
			return 0, err
		}
	}
	return nc, nil
}

// windowTopic reports whether t must be kept for the attribution window.
func windowTopic(t string) bool {
	return t == TopicClicks || t == TopicPostbacks || t == TopicConversions
}

func pairOf(t string) string {
	if t == TopicClicks {
		return TopicPostbacks
	}
	return TopicClicks
}

// topicPartitions returns the partition count of every Trackstar topic that exists.
func topicPartitions(ctx context.Context, client *kafka.Client) (map[string]int, error) {
	md, err := client.Metadata(ctx, &kafka.MetadataRequest{Topics: AllTopics})
	if err != nil {
		return nil, fmt.Errorf("cannot read topic metadata from %s: %w", client.Addr, err)
	}
	out := make(map[string]int)
	for _, t := range md.Topics {
		if t.Error != nil {
			if errors.Is(t.Error, kafka.UnknownTopicOrPartition) {
				continue
			}
			return nil, fmt.Errorf("cannot read metadata of topic %s: %w", t.Name, t.Error)
		}
		out[t.Name] = len(t.Partitions)
	}
	return out, nil
}

// waitForTopics waits until every topic shows up in metadata with leaders.
func waitForTopics(ctx context.Context, client *kafka.Client) (map[string]int, error) {
	deadline := time.Now().Add(30 * time.Second)
	for {
		got, err := topicPartitions(ctx, client)
		if err == nil && len(got) == len(AllTopics) {
			return got, nil
		}
		if time.Now().After(deadline) {
			if err == nil {
				err = fmt.Errorf("only %d of %d topics visible", len(got), len(AllTopics))
			}
			return nil, fmt.Errorf("topics did not appear after creation: %w", err)
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func ensureRetention(ctx context.Context, client *kafka.Client, want time.Duration, log *slog.Logger) error {
	var res []kafka.DescribeConfigRequestResource
	for _, t := range []string{TopicClicks, TopicPostbacks, TopicConversions} {
		res = append(res, kafka.DescribeConfigRequestResource{ResourceType: kafka.ResourceTypeTopic, ResourceName: t, ConfigNames: []string{"retention.ms"}})
	}
	resp, err := client.DescribeConfigs(ctx, &kafka.DescribeConfigsRequest{Resources: res})
	if err != nil {
		return fmt.Errorf("cannot describe topic configs: %w", err)
	}
	var alter []kafka.IncrementalAlterConfigsRequestResource
	for _, r := range resp.Resources {
		if r.Error != nil {
			return fmt.Errorf("cannot describe config of topic %s: %w", r.ResourceName, r.Error)
		}
		cur := int64(-2) // unknown: treat as too short
		for _, e := range r.ConfigEntries {
			if e.ConfigName == "retention.ms" {
				if v, err := strconv.ParseInt(e.ConfigValue, 10, 64); err == nil {
					cur = v
				}
			}
		}
		if cur == -1 || cur >= want.Milliseconds() {
			continue
		}
		log.Warn("topic retention is shorter than the attribution window plus margin; raising it",
			"topic", r.ResourceName, "retention_ms", cur, "want_ms", want.Milliseconds())
		alter = append(alter, kafka.IncrementalAlterConfigsRequestResource{
			ResourceType: kafka.ResourceTypeTopic,
			ResourceName: r.ResourceName,
			Configs: []kafka.IncrementalAlterConfigsRequestConfig{{
				Name: "retention.ms", Value: strconv.FormatInt(want.Milliseconds(), 10), ConfigOperation: kafka.ConfigOperationSet,
			}},
		})
	}
	if len(alter) == 0 {
		return nil
	}
	aresp, err := client.IncrementalAlterConfigs(ctx, &kafka.IncrementalAlterConfigsRequest{Resources: alter})
	if err != nil {
		return fmt.Errorf("cannot raise topic retention: %w", err)
	}
	for _, r := range aresp.Resources {
		if r.Error != nil {
			return fmt.Errorf("cannot raise retention of topic %s: %w", r.ResourceName, r.Error)
		}
	}
	return nil
}

func unequalPartitions(clicks, postbacks int) error {
	return fmt.Errorf("%w: %s has %d, %s has %d; give them the same count (kafka-topics --alter --partitions) before starting Trackstar",
		ErrUnequalPartitions, TopicClicks, clicks, TopicPostbacks, postbacks)
}
