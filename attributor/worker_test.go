package attributor

import (
	"context"
	"encoding/json"
	"errors"
	"testing"
	"time"

	"github.com/segmentio/kafka-go"

	"github.com/trackstar/trackstar/internal/bus"
	"github.com/trackstar/trackstar/internal/testenv"
	"github.com/trackstar/trackstar/schemas"
)

// TestOutlive: the context a conversion write runs under ends at its limit
// while the generation lives, and a grace after the generation ends, not
// at once (a write cut halfway may still land) and not at the limit (the
// partition's next owner would rebuild without it).
func TestOutlive(t *testing.T) {
	wait := func(ctx context.Context, within time.Duration) time.Duration {
		t.Helper()
		start := time.Now()
		select {
		case <-ctx.Done():
			return time.Since(start)
		case <-time.After(within):
			t.Fatalf("the write's context did not end within %s", within)
			return 0
		}
	}

	// The generation lives: the limit ends the write.
	out, cancel := outlive(context.Background(), time.Hour, 50*time.Millisecond)
	wait(out, 10*time.Second)
	if !errors.Is(out.Err(), context.DeadlineExceeded) {
		t.Fatalf("at the limit: %v, want DeadlineExceeded", out.Err())
	}
	cancel()

	// The generation ends: the write goes on for the grace, then ends.
	gen, end := context.WithCancel(context.Background())
	out, cancel = outlive(gen, 2*time.Second, time.Hour)
	defer cancel()
	end()
	if out.Err() != nil {
		t.Fatalf("the write was cut the moment its generation ended: %v", out.Err())
	}
	if took := wait(out, 30*time.Second); took < time.Second {
		t.Fatalf("the write ended %s after its generation, want the 2s grace", took)
	}

	// A generation already over when the write starts gets the grace too.
	out, cancel = outlive(gen, 100*time.Millisecond, time.Hour)
	defer cancel()
	wait(out, 10*time.Second)

	// Cancelling ends it at once.
	out, cancel = outlive(context.Background(), time.Hour, time.Hour)
	cancel()
	wait(out, time.Second)
}

// TestPostbacksClock: a rebuild reckons the partition's time from the
// postbacks as expire does live: the last postback processed while they
// are behind (the first to process when none was), the clock once there
// is nothing left to read, and never a time after the clock.
func TestPostbacksClock(t *testing.T) {
	addr := testenv.KafkaTopics(t, 1)
	now := time.Now()
	old := now.Add(-40 * 24 * time.Hour).Truncate(time.Millisecond)
	var msgs []kafka.Message
	for i, ts := range []time.Time{old, old.Add(time.Hour), old.Add(2 * time.Hour), now.Add(time.Hour)} {
		pb := schemas.Postback{V: schemas.Version, EventID: schemas.NewID(ts), ClickID: schemas.NewID(ts.Add(-time.Minute)),
			TS: ts.UnixMilli(), AdvertiserID: 1, Status: "approved"}
		b, err := json.Marshal(pb)
		if err != nil {
			t.Fatal(err)
		}
		msgs = append(msgs, kafka.Message{Key: []byte{byte(i)}, Value: b})
	}
	produce(t, addr, bus.TopicPostbacks, msgs)

	w := &worker{a: &attributor{cfg: Config{Brokers: []string{addr}}, client: &kafka.Client{Addr: kafka.TCP(addr), Timeout: 10 * time.Second}}}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for _, c := range []struct {
		next int64
		want time.Time
	}{
		{0, old},                    // nothing processed yet: the first to process
		{1, old},                    // the last processed
		{3, old.Add(2 * time.Hour)}, // the last processed
		{4, now},                    // the last processed is from the future: the clock
		{5, now},                    // nothing left to read: the clock
	} {
		got, err := w.postbacksClock(ctx, c.next, now)
		if err != nil {
			t.Fatal(err)
		}
		if !got.Equal(c.want) {
			t.Errorf("postbacksClock(next %d) = %s, want %s", c.next, got, c.want)
		}
	}
}
