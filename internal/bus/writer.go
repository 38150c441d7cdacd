package bus

import (
	"time"

	"github.com/segmentio/kafka-go"
)

// WriterConfig configures NewWriter. The zero value of every field but
// Brokers and Topic is a safe default.
type WriterConfig struct {
	Brokers []string
	Topic   string

	// Balancer picks the partition. Default: ClickIDBalancer (key = click ID).
	Balancer kafka.Balancer

	// BatchTimeout is how long a partial batch lingers for more messages.
	// Default 1ms: kafka-go's own default of 1s would hold every synchronous
	// request for a second.
	BatchTimeout time.Duration

	// BatchSize caps messages per produce request. Default 256. kafka-go
	// preallocates a batch of this size, so a large value burns CPU.
	BatchSize int

	// WriteTimeout bounds one produce request. Default 10s.
	WriteTimeout time.Duration

	// MaxAttempts is how many times kafka-go tries a write. Default 3.
	MaxAttempts int
}

// NewWriter returns a kafka-go Writer that waits for all in-sync replicas
// (kafka-go's default is to wait for none), batches concurrent WriteMessages
// calls together for at most BatchTimeout, and never auto-creates topics
// (EnsureTopics creates them with the right partition counts).
func NewWriter(cfg WriterConfig) *kafka.Writer {
	if cfg.Balancer == nil {
		cfg.Balancer = ClickIDBalancer{}
	}
	if cfg.BatchTimeout <= 0 {
		cfg.BatchTimeout = time.Millisecond
	}
	if cfg.BatchSize <= 0 {
		cfg.BatchSize = 256
	}
	if cfg.WriteTimeout <= 0 {
		cfg.WriteTimeout = 10 * time.Second
	}
	if cfg.MaxAttempts <= 0 {
		cfg.MaxAttempts = 3
	}
	return &kafka.Writer{
		Addr:         kafka.TCP(cfg.Brokers...),
		Topic:        cfg.Topic,
		Balancer:     cfg.Balancer,
		RequiredAcks: kafka.RequireAll,
		BatchTimeout: cfg.BatchTimeout,
		BatchSize:    cfg.BatchSize,
		// One record batch per partition and request: at most what a
		// broker takes by default (message.max.bytes, 1 MB), or a batch of
		// large records (dead letters, up to MaxDeadLetterBytes each) would
		// be refused, and retried, forever.
		BatchBytes:             1_000_000,
		WriteTimeout:           cfg.WriteTimeout,
		ReadTimeout:            cfg.WriteTimeout,
		MaxAttempts:            cfg.MaxAttempts,
		WriteBackoffMin:        50 * time.Millisecond,
		WriteBackoffMax:        time.Second,
		AllowAutoTopicCreation: false,
	}
}
