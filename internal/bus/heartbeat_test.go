package bus_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/segmentio/kafka-go"

	"github.com/trackstar/trackstar/internal/bus"
	"github.com/trackstar/trackstar/internal/testenv"
)

// The coordinator's answer reaches the caller: accepted for the member of
// the current generation, refused for another generation or an unknown
// member. (kafka-go's Client.Heartbeat reports every refusal as success.)
func TestHeartbeaterReportsTheCoordinatorsAnswer(t *testing.T) {
	addr := testenv.KafkaTopics(t, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	gen := joinGroup(ctx, t, addr, "heartbeat-test")

	h := bus.NewHeartbeater([]string{addr}, "heartbeat-test", 5*time.Second)
	defer h.Close()
	for i := range 2 { // the second one on the same connection
		if err := h.Beat(ctx, gen.ID, gen.MemberID); err != nil {
			t.Fatalf("heartbeat %d of the current member: %v", i+1, err)
		}
	}
	if err := h.Beat(ctx, gen.ID+1, gen.MemberID); !errors.Is(err, kafka.IllegalGeneration) {
		t.Fatalf("heartbeat of another generation: %v, want %v", err, kafka.IllegalGeneration)
	}
	if err := h.Beat(ctx, gen.ID, "nobody"); !errors.Is(err, kafka.UnknownMemberId) {
		t.Fatalf("heartbeat of an unknown member: %v, want %v", err, kafka.UnknownMemberId)
	}
	if err := h.Beat(ctx, gen.ID, gen.MemberID); err != nil {
		t.Fatalf("heartbeat after refusals: %v", err)
	}

	// What kafka-go's own client makes of the same refusal.
	resp, err := (&kafka.Client{Addr: kafka.TCP(addr)}).Heartbeat(ctx, &kafka.HeartbeatRequest{
		GroupID: "heartbeat-test", GenerationID: gen.ID, MemberID: "nobody",
	})
	if err == nil && resp.Error == nil {
		t.Logf("kafka-go's Client.Heartbeat read a refusal as success (throttle %v): the reason for Heartbeater", resp.Throttle)
	}
}

// A coordinator slower than the Heartbeater's timeout makes each Beat an
// error, and nothing else: the cancel hook of a timed-out round trip once
// reached for the connection Beat had just closed, and crashed.
func TestHeartbeaterTimeout(t *testing.T) {
	addr := testenv.KafkaSlowHeartbeats(t, 1, 300*time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	gen := joinGroup(ctx, t, addr, "heartbeat-timeout")
	h := bus.NewHeartbeater([]string{addr}, "heartbeat-timeout", 200*time.Millisecond)
	defer h.Close()
	for range 20 {
		if err := h.Beat(ctx, gen.ID, gen.MemberID); err == nil {
			t.Fatal("a heartbeat answered after the timeout reported success")
		}
		time.Sleep(20 * time.Millisecond) // let a late cancel hook run
	}
	slow := bus.NewHeartbeater([]string{addr}, "heartbeat-timeout", 5*time.Second)
	defer slow.Close()
	if err := slow.Beat(ctx, gen.ID, gen.MemberID); err != nil {
		t.Fatalf("a heartbeat given time enough: %v", err)
	}
}

// joinGroup makes the test a member of group and returns its generation;
// the member leaves when the test ends.
func joinGroup(ctx context.Context, t *testing.T, addr, group string) *kafka.Generation {
	t.Helper()
	cg, err := kafka.NewConsumerGroup(kafka.ConsumerGroupConfig{
		ID: group, Brokers: []string{addr}, Topics: []string{bus.TopicConversions},
		HeartbeatInterval: time.Second, SessionTimeout: 10 * time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cg.Close() })
	gen, err := cg.Next(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return gen
}
