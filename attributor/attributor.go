package attributor

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/segmentio/kafka-go"

	"github.com/trackstar/trackstar/internal/bus"
	"github.com/trackstar/trackstar/internal/catalog"
	"github.com/trackstar/trackstar/internal/ops"
)

// DefaultGroup is the consumer group of the attributor.
const DefaultGroup = "trackstar-attributor"

// LateMargin is how much longer than its attribution window (and grace) a
// click is kept, so that a postback the edge received inside the window
// but could produce only later — spooled through a Kafka outage, say —
// still finds it. Topics keep their records at least this much longer too
// (a moved partition is rebuilt from them).
const LateMargin = 24 * time.Hour

// keepFor is how long clicks, their conversions' slots and transaction
// claims, and processed postbacks are kept: the longest attribution window,
// grace, and LateMargin. A rebuild restores the same span.
func keepFor(cat *catalog.Catalog, grace time.Duration) time.Duration {
	return cat.MaxAttributionWindow() + grace + LateMargin
}

// Config configures Run.
type Config struct {
	Brokers []string // required
	// DataDir holds the state store, in DataDir/attributor. Required.
	DataDir string
	Catalog *catalog.Holder // required; read afresh for every batch

	// Group is the consumer group ID. Default DefaultGroup.
	Group string
	// Grace is how long a postback waits for its click: until the clicks
	// partition has moved this far past the click's time (or the
	// postback's, if earlier). Default 2m.
	Grace time.Duration
	// CommitInterval is how often offsets are committed to the group.
	// Default 1s.
	CommitInterval time.Duration
	// ExpireInterval is how often expired state is dropped. Default 1m.
	ExpireInterval time.Duration
	// MaxBatch caps the records applied in one store batch. Default 2000.
	MaxBatch int
	// SessionTimeout, RebalanceTimeout and HeartbeatInterval of the
	// consumer group. Defaults 10s, 10s and 1s.
	SessionTimeout    time.Duration
	RebalanceTimeout  time.Duration
	HeartbeatInterval time.Duration
	// Store tunes the state store. The zero value is a good default.
	Store StoreOptions

	Registry *prometheus.Registry // default: a new one
	Health   *ops.Health          // default: none
	Logger   *slog.Logger         // default slog.Default()

	hooks *testHooks
}

// testHooks let tests stop the attributor the way a crash would.
type testHooks struct {
	// crash is called at each step of a batch ("stored": decided and
	// stored, nothing sent; "sent": sent, not marked sent, offsets not
	// committed) with the number of conversions in the batch. When it
	// returns true, every worker stops at once, writing and committing
	// nothing more, and Run returns errCrashed.
	crash func(step string, records int) bool
}

var errCrashed = errors.New("attributor crashed on purpose (test hook)")

// attributor is one running member.
type attributor struct {
	cfg     Config
	log     *slog.Logger
	db      *pebble.DB
	m       *metrics
	writer  *kafka.Writer // conversions
	dlq     *kafka.Writer // dead letters of postbacks that cannot be decoded
	client  *kafka.Client
	crashed atomic.Bool
	// invalidLog limits the log lines about undecodable records.
	invalidLog ops.LogLimiter
	fatal      context.CancelCauseFunc

	mu         sync.Mutex
	joined     bool
	rebuilding map[int]bool
}

// Run is the attributor role: it joins the consumer group over the clicks
// and postbacks topics, owns whole partition pairs (bus.CoPartitionBalancer),
// and for each runs a worker that joins postbacks to clicks and produces
// one conversion record per postback. It returns nil once ctx is done and
// its workers have sent and committed what they could; an error when the
// state store fails or setup is impossible.
func Run(ctx context.Context, cfg Config) error {
	if len(cfg.Brokers) == 0 || cfg.DataDir == "" || cfg.Catalog == nil {
		return errors.New("attributor: Brokers, DataDir and Catalog are required")
	}
	if cfg.Group == "" {
		cfg.Group = DefaultGroup
	}
	if cfg.Grace <= 0 {
		cfg.Grace = 2 * time.Minute
	}
	if cfg.CommitInterval <= 0 {
		cfg.CommitInterval = time.Second
	}
	if cfg.ExpireInterval <= 0 {
		cfg.ExpireInterval = time.Minute
	}
	if cfg.MaxBatch <= 0 {
		cfg.MaxBatch = 2000
	}
	if cfg.SessionTimeout <= 0 {
		cfg.SessionTimeout = 10 * time.Second
	}
	if cfg.RebalanceTimeout <= 0 {
		cfg.RebalanceTimeout = 10 * time.Second
	}
	if cfg.HeartbeatInterval <= 0 {
		cfg.HeartbeatInterval = time.Second
	}
	if cfg.Registry == nil {
		cfg.Registry = ops.NewRegistry()
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	log := cfg.Logger.With("role", "attributor")
	if cfg.Store.Logger == nil {
		cfg.Store.Logger = log
	}

	dir := filepath.Join(cfg.DataDir, "attributor")
	db, err := openStore(dir, cfg.Store)
	if err != nil {
		return err
	}
	defer db.Close()

	a := &attributor{
		cfg:        cfg,
		log:        log,
		db:         db,
		m:          newMetrics(cfg.Registry),
		writer:     bus.NewWriter(bus.WriterConfig{Brokers: cfg.Brokers, Topic: bus.TopicConversions}),
		dlq:        bus.NewWriter(bus.WriterConfig{Brokers: cfg.Brokers, Topic: bus.TopicDLQ}),
		client:     &kafka.Client{Addr: kafka.TCP(cfg.Brokers...), Timeout: 10 * time.Second},
		rebuilding: map[int]bool{},
	}
	defer a.writer.Close()
	defer a.dlq.Close()
	if cfg.Health != nil {
		cfg.Health.Register("attributor", a.ready)
	}

	// Ask for the partitions we have state for, so that a restart keeps them.
	have, err := statePartitions(db)
	if err != nil {
		return err
	}
	balancer := &bus.CoPartitionBalancer{}
	balancer.SetOwned(have)
	cg, err := kafka.NewConsumerGroup(kafka.ConsumerGroupConfig{
		ID:                cfg.Group,
		Brokers:           cfg.Brokers,
		Topics:            []string{bus.TopicClicks, bus.TopicPostbacks},
		GroupBalancers:    []kafka.GroupBalancer{balancer},
		HeartbeatInterval: cfg.HeartbeatInterval,
		SessionTimeout:    cfg.SessionTimeout,
		RebalanceTimeout:  cfg.RebalanceTimeout,
		JoinGroupBackoff:  time.Second,
		Timeout:           10 * time.Second,
		ErrorLogger:       kafka.LoggerFunc(func(msg string, args ...any) { log.Warn("kafka consumer group: " + fmt.Sprintf(msg, args...)) }),
	})
	if err != nil {
		return fmt.Errorf("cannot create consumer group %s: %w", cfg.Group, err)
	}

	runCtx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	a.fatal = cancel
	var background sync.WaitGroup
	background.Go(func() { a.watchStoreSize(runCtx) })
	log.Info("attributor starting", "group", cfg.Group, "data", dir, "partitions_with_state", have)

	for {
		gen, err := cg.Next(runCtx)
		if err != nil {
			if runCtx.Err() != nil {
				break
			}
			log.Warn("cannot join consumer group; retrying", "group", cfg.Group, "err", err)
			continue
		}
		if err := a.startGeneration(gen, balancer); err != nil {
			cancel(err)
			break
		}
	}
	a.setJoined(false)
	// Ends the generation: workers send and commit what they hold, then
	// the member leaves the group.
	cg.Close()
	cause := context.Cause(runCtx)
	cancel(nil)
	background.Wait()
	if cause != nil && !errors.Is(cause, context.Canceled) && !errors.Is(cause, context.DeadlineExceeded) {
		return cause
	}
	log.Info("attributor stopped")
	return nil
}

// startGeneration drops the state of partitions this member lost and
// starts a worker per partition pair it owns.
func (a *attributor) startGeneration(gen *kafka.Generation, balancer *bus.CoPartitionBalancer) error {
	groupOffsets := map[int][2]int64{}
	var owned []int
	for _, pa := range gen.Assignments[bus.TopicClicks] {
		owned = append(owned, pa.ID)
		o := groupOffsets[pa.ID]
		o[0] = pa.Offset
		groupOffsets[pa.ID] = o
	}
	for _, pa := range gen.Assignments[bus.TopicPostbacks] {
		o := groupOffsets[pa.ID]
		o[1] = pa.Offset
		groupOffsets[pa.ID] = o
	}
	slices.Sort(owned)
	balancer.SetOwned(owned)

	// State of a partition another member owns now goes stale at once: if
	// the partition comes back it is rebuilt, so keeping it buys nothing.
	have, err := statePartitions(a.db)
	if err != nil {
		return err
	}
	for _, p := range have {
		if !slices.Contains(owned, p) {
			a.log.Info("dropping state of a partition owned elsewhere now", "partition", p)
			if err := dropPartition(a.db, p); err != nil {
				return err
			}
		}
	}
	a.m.partitions.Set(float64(len(owned)))
	a.m.lag.Reset()
	a.log.Info("consumer group generation", "generation", gen.ID, "member", gen.MemberID, "partitions", owned)
	a.setJoined(true)

	committer := &groupCommitter{gen: gen}
	for _, p := range owned {
		if p > maxPartition {
			return fmt.Errorf("partition %d is beyond the %d partitions the state store can hold", p, maxPartition+1)
		}
		w := &worker{a: a, id: p, groupClicks: groupOffsets[p][0], groupPostbacks: groupOffsets[p][1], committer: committer}
		gen.Start(func(ctx context.Context) {
			// kafka-go runs fn even when the generation has already ended
			// (a rebalance while this one was being set up), and then
			// does not wait for it: such a worker could overlap the next
			// generation's worker of the same partition, whose state a
			// rebuild drops. Its ctx is done already, so it stops here.
			if ctx.Err() != nil {
				return
			}
			if err := w.run(ctx); err != nil {
				if errors.Is(err, errCrashed) {
					a.fatal(err)
					return
				}
				if errors.Is(err, errStore) {
					a.log.Error("state store failed; stopping", "partition", p, "err", err)
					a.fatal(err)
					return
				}
				if ctx.Err() != nil {
					return // the generation ended while the worker was starting
				}
				// Kafka trouble: ending the generation makes the member
				// rejoin and start the worker afresh.
				a.log.Warn("partition worker stopped; rejoining", "partition", p, "err", err)
				select { // do not spin on a lasting failure
				case <-ctx.Done():
				case <-time.After(time.Second):
				}
			}
		})
	}
	return nil
}

// groupCommitter serializes offset commits of one generation's workers on
// its coordinator connection.
type groupCommitter struct {
	mu  sync.Mutex
	gen *kafka.Generation
}

func (c *groupCommitter) commit(p int, clicks, postbacks int64) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.gen.CommitOffsets(map[string]map[int]int64{
		bus.TopicClicks:    {p: clicks},
		bus.TopicPostbacks: {p: postbacks},
	})
}

func (a *attributor) setJoined(v bool) {
	a.mu.Lock()
	a.joined = v
	a.mu.Unlock()
}

func (a *attributor) setRebuilding(p int, v bool) {
	a.mu.Lock()
	if v {
		a.rebuilding[p] = true
	} else {
		delete(a.rebuilding, p)
	}
	a.mu.Unlock()
}

// ready is the readiness check: in a group generation, no partition
// rebuilding.
func (a *attributor) ready() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if !a.joined {
		return errors.New("not in a consumer group generation")
	}
	if n := len(a.rebuilding); n > 0 {
		return fmt.Errorf("rebuilding the state of %d partitions", n)
	}
	return nil
}

func (a *attributor) watchStoreSize(ctx context.Context) {
	t := time.NewTicker(10 * time.Second)
	defer t.Stop()
	for {
		a.m.storeBytes.Set(float64(a.db.Metrics().DiskSpaceUsage()))
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
