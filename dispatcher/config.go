package dispatcher

import (
	"context"
	"crypto/tls"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/trackstar/trackstar/internal/catalog"
	"github.com/trackstar/trackstar/internal/ops"
)

// DefaultGroup is the consumer group of the dispatcher.
const DefaultGroup = "trackstar-dispatcher"

// Config configures the dispatcher. Brokers, DataDir and Catalog are
// required; every other zero value is a working default. The delivery
// timeout and the retry schedule are the catalog's (delivery: in the
// config file), read again on every attempt, so a SIGHUP changes them.
type Config struct {
	// Brokers are the Kafka bootstrap addresses. Required.
	Brokers []string

	// DataDir holds the retry schedule, under DataDir/dispatcher. Required:
	// the schedule is what lets a retry survive a restart. Two dispatchers
	// cannot share one DataDir (Pebble locks it).
	DataDir string

	// Catalog holds the affiliates, their postback URLs, and the delivery
	// settings. Required.
	Catalog *catalog.Holder

	// Group is the Kafka consumer group. Default "trackstar-dispatcher".
	Group string

	// DrainRetries runs the dispatcher for its retry schedule alone, to
	// retire it for good: it joins no consumer group and reads no
	// conversions, sends the retries under DataDir as they fall due, and
	// Run returns nil by itself once none is left (at once when there is
	// none). The schedule belongs to the dispatcher that wrote it, so a
	// member removed from the group must run like this on its data
	// directory, or its retries wait there.
	DrainRetries bool

	// Registry receives the trackstar_dispatcher_* metrics. Default: a new
	// registry of its own.
	Registry *prometheus.Registry

	// Health receives the "dispatcher" readiness check. Default: none.
	Health *ops.Health

	// Logger is where the dispatcher logs. Default slog.Default().
	Logger *slog.Logger

	// Now is the clock: delivery record timestamps, signature timestamps,
	// due times, breaker cool-downs and Retry-After dates are read from it.
	// Default time.Now.
	Now func() time.Time

	// Concurrency caps the requests in flight to all partners together.
	// Default 512.
	Concurrency int

	// HostConcurrency caps the requests in flight to one partner host (and
	// its keep-alive connections). Default 32.
	HostConcurrency int

	// HostQueue caps the conversions waiting in memory for one host; beyond
	// it they wait in the durable schedule instead. Default 1024.
	HostQueue int

	// MaxQueued caps the conversions waiting in memory for all hosts
	// together. Default 16384.
	MaxQueued int

	// BreakerFailures is how many retryable failures in a row (network
	// errors, timeouts, 5xx, 429) pause a host. Default 10.
	BreakerFailures int

	// BreakerCooldown is how long a paused host waits before one probe
	// request decides whether it resumes. Default 30s.
	BreakerCooldown time.Duration

	// CommitInterval is how often consumed offsets are committed. Default 1s.
	CommitInterval time.Duration

	// DedupWindow is how long a handled conversion is remembered, so that
	// a replay of its Kafka record (after a crash, before the offset was
	// committed) is not sent to the partner again. Default 1h.
	DedupWindow time.Duration

	// SessionTimeout is the consumer group session timeout: how long a
	// dispatcher that died silently keeps its partitions. Default 10s.
	SessionTimeout time.Duration

	// ShutdownTimeout bounds how long Run waits, once its context ends,
	// for requests in flight and their delivery records. Default: the
	// catalog's delivery timeout plus 10s.
	ShutdownTimeout time.Duration

	// TLSConfig is the TLS client config for https partner URLs (the server
	// name is always the URL's host). Default: the system's root CAs.
	TLSConfig *tls.Config

	// LookupNetIP resolves a partner host name. Default
	// net.DefaultResolver.LookupNetIP(ctx, "ip", host). Whatever it
	// returns goes through the SSRF guard before it is dialled.
	LookupNetIP func(ctx context.Context, host string) ([]netip.Addr, error)
}

// bodyCap is how much of a partner's response body is read and, on a
// failure, recorded in the delivery's error.
const bodyCap = 512

// maxRetryAfter caps a partner's Retry-After, so that a typo in it cannot
// park a conversion for a year.
const maxRetryAfter = 24 * time.Hour

func (c *Config) setDefaults() error {
	if len(c.Brokers) == 0 {
		return errors.New("dispatcher: Brokers is required")
	}
	if c.DataDir == "" {
		return errors.New("dispatcher: DataDir is required")
	}
	if c.Catalog == nil {
		return errors.New("dispatcher: Catalog is required")
	}
	if c.Group == "" {
		c.Group = DefaultGroup
	}
	if c.Registry == nil {
		c.Registry = prometheus.NewRegistry()
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	setInt := func(v *int, def int) {
		if *v <= 0 {
			*v = def
		}
	}
	setInt(&c.Concurrency, 512)
	setInt(&c.HostConcurrency, 32)
	setInt(&c.HostQueue, 1024)
	setInt(&c.MaxQueued, 16384)
	setInt(&c.BreakerFailures, 10)
	setDur := func(v *time.Duration, def time.Duration) {
		if *v <= 0 {
			*v = def
		}
	}
	setDur(&c.BreakerCooldown, 30*time.Second)
	setDur(&c.CommitInterval, time.Second)
	setDur(&c.DedupWindow, time.Hour)
	c.DedupWindow = max(c.DedupWindow, time.Second) // markers are bucketed by the second
	setDur(&c.SessionTimeout, 10*time.Second)
	if c.LookupNetIP == nil {
		c.LookupNetIP = func(ctx context.Context, host string) ([]netip.Addr, error) {
			return net.DefaultResolver.LookupNetIP(ctx, "ip", host)
		}
	}
	return nil
}
