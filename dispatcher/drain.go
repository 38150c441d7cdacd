package dispatcher

import (
	"context"
	"time"
)

// A dispatcher run with DrainRetries sends the retries of its schedule and
// nothing else (see Config.DrainRetries). The functions here are its own.

// stopWhenDrained ends a DrainRetries run once the schedule is empty: an
// entry leaves it only once its delivery is final and recorded (or moved
// to a later due time, which keeps it there), so nothing is left behind.
func (d *dispatcher) stopWhenDrained(ctx context.Context) {
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	lastLog := time.Now()
	for {
		n := d.engine.pending.Load()
		if n == 0 {
			d.log.Info("retry schedule drained; stopping")
			d.cancel()
			return
		}
		if time.Since(lastLog) >= time.Minute {
			d.log.Info("draining the retry schedule", "retries_pending", n)
			lastLog = time.Now()
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
