package attributor

import (
	"context"
	"errors"
	"testing"
	"time"
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
