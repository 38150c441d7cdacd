package ingest

import (
	"errors"
	"log/slog"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/trackstar/trackstar/internal/catalog"
	"github.com/trackstar/trackstar/internal/ops"
)

// Config configures the edge. Brokers, DataDir and Catalog are required;
// every other zero value is a working default.
type Config struct {
	// Listen is the address the edge serves clicks, postbacks and its ops
	// endpoints on. Default ":8080".
	Listen string

	// Brokers are the Kafka bootstrap addresses. Required.
	Brokers []string

	// DataDir holds the spool, under DataDir/edge-spool. Required: the
	// spool is what makes an answer durable while Kafka is away. Two
	// edges cannot share one DataDir (Pebble locks it).
	DataDir string

	// Catalog holds the offers, affiliates and advertisers. Required.
	Catalog *catalog.Holder

	// TrustProxy takes the client address from the last entry of
	// X-Forwarded-For — the one the proxy in front of the edge appended —
	// instead of the TCP peer. Default false: X-Forwarded-For is ignored,
	// since anyone can send it and allowed_ips would mean nothing.
	TrustProxy bool

	// ProduceTimeout is how long a request waits for the Kafka ack before
	// its event goes to the spool instead. Default 1s: a healthy cluster
	// acks in milliseconds, so 1s only trips on a broker that hangs rather
	// than refuses (refusal spools at once), while a user following a
	// click waits at most about a second for the redirect.
	ProduceTimeout time.Duration

	// SpoolMaxBytes caps the spool's size; beyond it the edge answers 503.
	// Default 4 GiB (about ten million clicks).
	SpoolMaxBytes int64

	// MaxParamBytes caps every sub, source, goal and txn_id value; a longer
	// value is a 400, never a truncation. Default 500.
	MaxParamBytes int

	// ReadTimeout bounds reading one request, headers and body. Default 10s.
	ReadTimeout time.Duration
	// WriteTimeout bounds writing one response. Default 10s.
	WriteTimeout time.Duration
	// IdleTimeout closes a keep-alive connection idle this long. Default 60s.
	IdleTimeout time.Duration
	// MaxRequestBodyBytes caps a request body (postback forms); more is a
	// 413. Default 64 KiB.
	MaxRequestBodyBytes int
	// MaxHeaderBytes caps the request line plus headers; more is a 431.
	// Default 8 KiB.
	MaxHeaderBytes int

	// Registry receives the trackstar_edge_* series. Default: a new one.
	Registry *prometheus.Registry
	// Health receives the edge's readiness check, which fails while the
	// spool holds events. Default: a private one, still served on /readyz.
	Health *ops.Health
	// Logger default slog.Default().
	Logger *slog.Logger
}

const spoolDirName = "edge-spool"

func (c *Config) setDefaults() error {
	switch {
	case len(c.Brokers) == 0:
		return errors.New("edge config: Brokers is required")
	case c.DataDir == "":
		return errors.New("edge config: DataDir is required (the spool lives there)")
	case c.Catalog == nil:
		return errors.New("edge config: Catalog is required")
	}
	if c.Listen == "" {
		c.Listen = ":8080"
	}
	if c.ProduceTimeout <= 0 {
		c.ProduceTimeout = time.Second
	}
	if c.SpoolMaxBytes <= 0 {
		c.SpoolMaxBytes = 4 << 30
	}
	if c.MaxParamBytes <= 0 {
		c.MaxParamBytes = 500
	}
	if c.ReadTimeout <= 0 {
		c.ReadTimeout = 10 * time.Second
	}
	if c.WriteTimeout <= 0 {
		c.WriteTimeout = 10 * time.Second
	}
	if c.IdleTimeout <= 0 {
		c.IdleTimeout = 60 * time.Second
	}
	if c.MaxRequestBodyBytes <= 0 {
		c.MaxRequestBodyBytes = 64 << 10
	}
	if c.MaxHeaderBytes <= 0 {
		c.MaxHeaderBytes = 8 << 10
	}
	if c.Registry == nil {
		c.Registry = ops.NewRegistry()
	}
	if c.Health == nil {
		c.Health = &ops.Health{}
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	return nil
}
