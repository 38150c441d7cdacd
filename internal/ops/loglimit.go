package ops

import (
	"sync/atomic"
	"time"
)

// LogLimiter lets one message a second through, so that an outage or a
// stream of bad records at thousands a second does not flood the log.
// The zero value is ready to use.
type LogLimiter struct{ last atomic.Int64 }

// Allow reports whether a message may be logged now.
func (l *LogLimiter) Allow() bool {
	now := time.Now().Unix()
	last := l.last.Load()
	return now > last && l.last.CompareAndSwap(last, now)
}
