package dispatcher

import "time"

// Breaker states, as the trackstar_dispatcher_breaker_state gauge shows them.
const (
	breakerClosed   = 0 // deliveries flow
	breakerOpen     = 1 // paused: deliveries wait in the schedule
	breakerHalfOpen = 2 // one probe request is deciding
)

// breaker is the circuit breaker of one partner host. After threshold
// retryable failures in a row the host is paused for cooldown; then one
// request goes through as a probe: its success resumes the host, its
// failure pauses it again. Not safe for concurrent use: the engine holds
// its lock around every call.
type breaker struct {
	state     int
	failures  int       // retryable failures in a row
	openUntil time.Time // when state is breakerOpen
	probeEnd  time.Time // when state is breakerHalfOpen: the probe is over by then
}

// blocked reports whether deliveries to the host must wait, and until when.
func (b *breaker) blocked(now time.Time) (bool, time.Time) {
	switch b.state {
	case breakerOpen:
		if now.Before(b.openUntil) {
			return true, b.openUntil
		}
	case breakerHalfOpen:
		if now.Before(b.probeEnd) {
			return true, b.probeEnd
		}
	}
	return false, time.Time{}
}

// allow is asked before each request. When the cool-down is over it lets
// one request through as the probe (probe true) and blocks the others until
// probeEnd; a probe that never reported back (its job was dropped at
// shutdown) is replaced by a new one after probeEnd.
func (b *breaker) allow(now, probeEnd time.Time) (ok, probe bool, until time.Time) {
	if blocked, until := b.blocked(now); blocked {
		return false, false, until
	}
	if b.state == breakerClosed {
		return true, false, time.Time{}
	}
	b.state = breakerHalfOpen
	b.probeEnd = probeEnd
	return true, true, time.Time{}
}

// record takes the result of a request: failed is true for a retryable
// failure, probe for the request allow let through as the probe. It
// returns the state before and after. Once the host is paused, only the
// probe decides: the results of requests sent before the pause, answering
// during the cool-down or the probe, change nothing.
func (b *breaker) record(failed, probe bool, now time.Time, threshold int, cooldown time.Duration) (from, to int) {
	from = b.state
	if b.state != breakerClosed && !probe {
		return from, from
	}
	if !failed {
		b.failures = 0
		b.state = breakerClosed
		return from, b.state
	}
	b.failures++
	if b.state == breakerHalfOpen || (b.state == breakerClosed && b.failures >= threshold) {
		b.state = breakerOpen
		b.openUntil = now.Add(cooldown)
	}
	return from, b.state
}

// dropProbe takes back the probe allow let through, when its request is not
// made after all (the conversion moved to another host): the next request
// becomes the probe, without waiting for probeEnd.
func (b *breaker) dropProbe() {
	if b.state == breakerHalfOpen {
		b.state = breakerOpen
		b.openUntil = time.Time{}
	}
}
