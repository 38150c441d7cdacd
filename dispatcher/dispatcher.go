package dispatcher

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/trackstar/trackstar/internal/ops"
)

// dispatcher is one running dispatcher: the consumer and the engine.
type dispatcher struct {
	cfg     *Config
	log     *slog.Logger
	metrics *metrics
	engine  *engine

	joined atomic.Bool

	// learned holds the partitions this member has owned without a break
	// since it learned their deliveries (see learnPartition).
	learnedMu sync.Mutex
	learned   map[int]bool
	// learnFailing holds the partitions whose learning failed last time,
	// with the error: /readyz lists them, since they are not read.
	learnFailing map[int]error
	learnLog     ops.LogLimiter
	leaseLog     ops.LogLimiter
	// followErrs says why followDeliveries cannot read trackstar.deliveries, by
	// partition (-1: the partition count); empty while it can.
	followMu   sync.Mutex
	followErrs map[int]error

	cancel    context.CancelFunc
	fatalOnce sync.Once
	fatalErr  error
}

// fatal stops the dispatcher; Run returns err.
func (d *dispatcher) fatal(err error) {
	d.fatalOnce.Do(func() {
		d.fatalErr = err
		d.log.Error("dispatcher stopping on a fatal error", "err", err)
		d.cancel()
	})
}

// Run consumes conversions and delivers partner postbacks until ctx ends
// (with DrainRetries: until its retry schedule is empty), then stops
// taking work, lets the requests in flight finish and records them,
// commits the offsets it can, and returns nil. It returns an error
// when it cannot start, or when its schedule store fails.
func Run(ctx context.Context, cfg Config) error {
	if err := cfg.setDefaults(); err != nil {
		return err
	}
	dir := filepath.Join(cfg.DataDir, "dispatcher")
	if cfg.DrainRetries {
		// A mistyped directory would drain nothing, successfully.
		if fi, err := os.Stat(dir); err != nil || !fi.IsDir() {
			return fmt.Errorf("no retry schedule to drain at %q: give the --data of the dispatcher being retired", dir)
		}
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("cannot create dispatcher data dir %q: %w", dir, err)
	}
	store, err := openScheduleStore(dir, cfg.Logger)
	if err != nil {
		return err
	}
	storeClosed := false
	defer func() {
		if !storeClosed {
			store.Close()
		}
	}()

	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	d := &dispatcher{cfg: &cfg, log: cfg.Logger, metrics: newMetrics(cfg.Registry), cancel: cancel,
		learned: map[int]bool{}, learnFailing: map[int]error{}, followErrs: map[int]error{}}
	d.engine, err = newEngine(d.cfg, d.metrics, store, d.fatal)
	if err != nil {
		return err
	}
	since, err := d.followSince() // where followDeliveries starts
	if err != nil {
		d.engine.deliveries.Close()
		d.engine.dlq.Close()
		return err
	}
	if cfg.Health != nil {
		cfg.Health.Register("dispatcher", func() error {
			if !cfg.DrainRetries && !d.joined.Load() {
				return errors.New("not yet a member of consumer group " + cfg.Group)
			}
			if err := d.learnHealth(); err != nil {
				return err
			}
			if err := d.engine.lease.health(cfg.SessionTimeout); err != nil {
				return err
			}
			if err := d.followHealth(); err != nil {
				return err
			}
			return d.engine.health()
		})
	}
	if cfg.DrainRetries {
		d.log.Info("dispatcher starting to drain its retry schedule; it reads no conversions and stops once no retry is left",
			"data", dir, "retries_pending", d.engine.pending.Load())
	} else {
		d.log.Info("dispatcher starting", "group", cfg.Group, "data", dir, "retries_pending", d.engine.pending.Load())
	}

	hardStop, hardCancel := context.WithCancel(context.Background())
	defer hardCancel()
	go d.engine.finalize(hardStop)
	var bg sync.WaitGroup
	bg.Add(3)
	// caughtUp holds the schedule's retries back until the dispatcher
	// knows the status updates the group's members have sent (see
	// followDeliveries).
	caughtUp := make(chan struct{})
	go func() {
		defer bg.Done()
		d.followDeliveries(runCtx, since, caughtUp)
	}()
	go func() {
		defer bg.Done()
		select {
		case <-caughtUp:
		case <-runCtx.Done():
			return
		}
		d.engine.runScheduler(runCtx)
	}()
	go func() {
		defer bg.Done()
		d.dropOldMarkers(runCtx)
	}()
	drained := make(chan struct{})
	consumed := make(chan struct{})
	if cfg.DrainRetries {
		close(consumed)
		bg.Add(1)
		go func() {
			defer bg.Done()
			d.stopWhenDrained(runCtx)
		}()
	} else {
		go func() {
			defer close(consumed)
			d.consume(runCtx, drained)
		}()
	}

	<-runCtx.Done()
	shutdown := cfg.ShutdownTimeout
	if shutdown <= 0 {
		shutdown = cfg.Catalog.Current().Delivery.Timeout + 10*time.Second
	}
	// Past the shutdown timeout, Kafka writes that still fail are given up.
	stopHard := time.AfterFunc(shutdown, hardCancel)
	defer stopHard.Stop()
	bg.Wait()
	clean := d.engine.stop(shutdown)
	close(drained)
	<-consumed
	d.engine.deliveries.Close()
	d.engine.dlq.Close()
	if clean {
		storeClosed = true
		if err := store.Close(); err != nil && d.fatalErr == nil {
			return fmt.Errorf("cannot close retry schedule: %w", err)
		}
	} else {
		// A worker still runs and may write: leave the store to the exit.
		storeClosed = true
	}
	d.log.Info("dispatcher stopped")
	return d.fatalErr
}

// dropOldMarkers deletes stale dedup markers and version notes every
// quarter window.
func (d *dispatcher) dropOldMarkers(ctx context.Context) {
	t := time.NewTicker(max(d.cfg.DedupWindow/4, time.Second))
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if err := d.engine.store.dropOldMarkers(d.cfg.Now(), d.cfg.DedupWindow); err != nil {
				d.log.Warn("cannot drop old dedup markers", "err", err)
			}
			if err := d.engine.store.dropOldVersions(d.cfg.Now()); err != nil {
				d.log.Warn("cannot drop old version notes", "err", err)
			}
		}
	}
}
