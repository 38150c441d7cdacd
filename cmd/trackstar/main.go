// Command trackstar runs any Trackstar role: the edge, the attributor, the
// dispatcher, the warehouse loader, or all of them in one process with an
// embedded Kafka-protocol broker. It only parses flags and wires packages.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/trackstar/trackstar/attributor"
	"github.com/trackstar/trackstar/dispatcher"
	"github.com/trackstar/trackstar/ingest"
	"github.com/trackstar/trackstar/internal/bus"
	"github.com/trackstar/trackstar/internal/catalog"
	"github.com/trackstar/trackstar/internal/loadgen"
	"github.com/trackstar/trackstar/internal/ops"
	"github.com/trackstar/trackstar/internal/warehouse"
)

const usage = `usage: trackstar <command> [flags]

commands:
  all         edge + attributor + dispatcher + loader in one process
              (without --brokers: with an embedded Kafka-protocol broker)
  edge        the click and postback HTTP edge
  attributor  the partitioned join of postbacks to clicks
  dispatcher  partner postback delivery
  loader      the ClickHouse warehouse loader
  migrate     create or upgrade the ClickHouse schema
  report      print the standard report from ClickHouse
  loadgen     synthetic traffic against a running edge

Every flag also reads TRACKSTAR_<FLAG> from the environment
(--embedded-broker: TRACKSTAR_EMBEDDED_BROKER). 'trackstar <command> -h' lists them.
`

func main() {
	if err := run(os.Args[1:], os.Stdout, os.Stderr); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(0)
		}
		fmt.Fprintln(os.Stderr, "trackstar:", err)
		os.Exit(1)
	}
}

func run(args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		fmt.Fprint(stderr, usage)
		if len(args) == 0 {
			return errors.New("no command given")
		}
		return nil
	}
	cmd := args[0]
	var o options
	fs := newFlagSet(cmd, &o)
	fs.SetOutput(stderr)
	switch cmd {
	case "all", "edge", "attributor", "dispatcher", "loader", "migrate", "report", "loadgen":
	default:
		fmt.Fprint(stderr, usage)
		return fmt.Errorf("unknown command %q", cmd)
	}
	if err := parseFlags(fs, args[1:]); err != nil {
		return err
	}
	log, err := newLogger(o.logLevel, stderr)
	if err != nil {
		return err
	}
	slog.SetDefault(log)

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	// SIGHUP reloads the config where there is one; everywhere else, and
	// during shutdown, it must not kill the process (its default action).
	signal.Notify(make(chan os.Signal, 1), syscall.SIGHUP)

	switch cmd {
	case "migrate":
		if err := warehouse.Migrate(ctx, o.clickhouse, o.database); err != nil {
			return err
		}
		log.Info("schema is up to date", "clickhouse", o.clickhouse, "database", o.database)
		return nil
	case "report":
		return runReport(ctx, o, stdout)
	case "loadgen":
		return runLoadgen(ctx, o, stdout, stderr)
	}
	return runRoles(ctx, cmd, o, log)
}

func newLogger(level string, w io.Writer) (*slog.Logger, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("bad --log-level %q: %w", level, err)
	}
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: l})), nil
}

func runLoadgen(ctx context.Context, o options, stdout, stderr io.Writer) error {
	cat, err := catalog.Load(o.config)
	if err != nil {
		return err
	}
	cfg := loadgen.Config{
		Target: o.target, Rate: o.rate, Clicks: o.clicks, Duration: o.duration, Concurrency: o.concurrency,
		PostbackShare: o.postbackShare, DelayMean: o.delayMean, RepeatShare: o.repeatShare,
		PendingShare: o.pendingShare, UnknownShare: o.unknownShare, Sink: o.sink, Progress: stderr,
	}
	for _, of := range cat.Offers {
		cfg.Offers = append(cfg.Offers, of.ID)
	}
	for _, a := range cat.Affiliates {
		cfg.Affiliates = append(cfg.Affiliates, a.ID)
	}
	if len(cat.Advertisers) > 0 {
		// Postbacks go to offers of every advertiser; one token must do for
		// all, so loadgen clicks only the first advertiser's offers.
		adv := cat.Advertisers[0]
		cfg.Token = adv.Token
		cfg.Offers = cfg.Offers[:0]
		for _, of := range cat.Offers {
			if of.AdvertiserID == adv.ID {
				cfg.Offers = append(cfg.Offers, of.ID)
			}
		}
	}
	res, err := loadgen.Run(ctx, cfg)
	if res != nil {
		res.Print(stdout)
	}
	if err == nil && res != nil {
		err = res.Failed() // a run whose requests failed exits non-zero
	}
	return err
}

func runReport(ctx context.Context, o options, stdout io.Writer) error {
	conn, err := warehouse.Open(ctx, o.clickhouse, o.database)
	if err != nil {
		return err
	}
	defer conn.Close()
	to := time.Now().UTC()
	from := to.AddDate(0, 0, -o.days)
	return warehouse.Report(ctx, conn, stdout, warehouse.ReportOptions{From: from, To: to, ByHour: o.byHour})
}

// errFinished is what a role returns when it has done all it was run for
// (dispatcher --drain-retries): the process exits 0.
var errFinished = errors.New("finished")

// runRoles starts the roles of cmd and waits for them. The first role to
// fail stops the others.
func runRoles(ctx context.Context, cmd string, o options, log *slog.Logger) error {
	brokers := splitList(o.brokers)
	if cmd != "all" && len(brokers) == 0 {
		return fmt.Errorf("%s: --brokers is required (only 'all' starts an embedded broker)", cmd)
	}
	if cmd != "loader" { // the loader keeps no local state
		if err := os.MkdirAll(o.data, 0o755); err != nil {
			return fmt.Errorf("cannot create data dir %q: %w", o.data, err)
		}
	}

	var holder *catalog.Holder
	if cmd != "loader" {
		h, err := catalog.NewHolder(o.config)
		if err != nil {
			return err
		}
		holder = h
		holder.WatchSIGHUP(ctx, log) // subscribed before start-up goes on; it watches in a goroutine of its own
	}

	if o.partitions <= 0 {
		o.partitions = defaultPartitions
		if len(brokers) == 0 {
			o.partitions = embeddedPartitions
		}
	}
	if len(brokers) == 0 {
		b, err := bus.StartEmbeddedBroker(o.embeddedBroker, filepath.Join(o.data, "kafka"))
		if err != nil {
			return err
		}
		defer b.Close()
		brokers = []string{b.Addr()}
		log.Info("embedded Kafka-protocol broker listening", "addr", b.Addr(), "data", filepath.Join(o.data, "kafka"))
	}

	// The edge alone does not wait for Kafka: it must answer, spooling,
	// while Kafka is away (that is what its spool is for), including after
	// a restart during an outage. It reads topic metadata as it produces,
	// so the topics are ensured beside it (the "topics" role below).
	edgeOnly := cmd == "edge"
	if !edgeOnly {
		if err := ensureTopics(ctx, o, brokers, holder, log); err != nil {
			if ctx.Err() != nil {
				// Asked to stop while waiting for Kafka: nothing was
				// started, so this is a clean stop, not a failure.
				log.Info("stopped before start-up finished", "command", cmd)
				return nil
			}
			return err
		}
	}

	reg := ops.NewRegistry()
	health := &ops.Health{}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	type role struct {
		name string
		run  func(context.Context) error
	}
	var roles []role
	add := func(name string, f func(context.Context) error) { roles = append(roles, role{name, f}) }

	if edgeOnly {
		add("topics", func(ctx context.Context) error {
			return ensureTopicsBeside(ctx, o, brokers, holder, health, log)
		})
	}
	if cmd == "all" || cmd == "edge" {
		add("edge", func(ctx context.Context) error {
			return ingest.Run(ctx, ingest.Config{
				Listen: o.listen, Brokers: brokers, DataDir: o.data, Catalog: holder,
				TrustProxy: o.trustProxy, Registry: reg, Health: health, Logger: log.With("role", "edge"),
			})
		})
	}
	if cmd == "all" || cmd == "attributor" {
		add("attributor", func(ctx context.Context) error {
			return attributor.Run(ctx, attributor.Config{
				Brokers: brokers, DataDir: o.data, Catalog: holder, Grace: o.grace,
				Registry: reg, Health: health, Logger: log, // the attributor tags its own lines
			})
		})
	}
	if cmd == "all" || cmd == "dispatcher" {
		add("dispatcher", func(ctx context.Context) error {
			err := dispatcher.Run(ctx, dispatcher.Config{
				Brokers: brokers, DataDir: o.data, Catalog: holder, DrainRetries: o.drainRetries,
				Registry: reg, Health: health, Logger: log.With("role", "dispatcher"),
			})
			if err == nil && o.drainRetries && ctx.Err() == nil {
				return errFinished // the schedule is empty
			}
			return err
		})
	}
	if cmd == "all" || cmd == "loader" {
		add("loader", func(ctx context.Context) error {
			if cmd == "all" {
				// One process for the demo: create the schema first, and keep
				// trying while ClickHouse is away; the other roles go on.
				migrateUntilDone(ctx, o, health, log)
			}
			return warehouse.RunLoader(ctx, warehouse.LoaderConfig{
				Brokers: brokers, ClickHouse: o.clickhouse, Database: o.database,
				Registry: reg, Health: health, Logger: log.With("role", "loader"),
			})
		})
	}
	if cmd != "all" && cmd != "edge" {
		add("ops", func(ctx context.Context) error { return ops.Serve(ctx, o.opsListen, reg, health, log) })
	}

	errs := make(chan error, len(roles))
	var wg sync.WaitGroup
	for _, r := range roles {
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := r.run(ctx)
			switch {
			case errors.Is(err, errFinished):
				err = nil // done, and the others stop with it
			case err != nil:
				err = fmt.Errorf("%s: %w", r.name, err)
			case ctx.Err() == nil:
				err = fmt.Errorf("%s stopped unexpectedly", r.name)
			}
			errs <- err
			cancel()
		}()
	}
	log.Info("trackstar started", "command", cmd, "brokers", brokers)
	wg.Wait()
	close(errs)
	var all []error
	for err := range errs {
		if err != nil {
			all = append(all, err)
		}
	}
	return errors.Join(all...)
}

func ensureTopics(ctx context.Context, o options, brokers []string, holder *catalog.Holder, log *slog.Logger) error {
	retention := topicsRetention(o, holder)
	var lastErr error
	for attempt := 0; attempt < 30; attempt++ {
		err := ensureTopicsOnce(ctx, o, brokers, retention, log)
		if err == nil {
			return nil
		}
		if errors.Is(err, bus.ErrUnequalPartitions) || ctx.Err() != nil {
			return err
		}
		lastErr = err
		log.Warn("Kafka not ready; retrying", "err", err)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(time.Second):
		}
	}
	return lastErr
}

// topicsRetention is the retention clicks and postbacks (and conversions)
// need: they must outlive what the attributor keeps (the longest
// attribution window, grace and attributor.LateMargin), since a partition
// that moves is rebuilt from them; a day more for slack.
func topicsRetention(o options, holder *catalog.Holder) time.Duration {
	retention := 7 * 24 * time.Hour
	if holder != nil {
		if w := holder.Current().MaxAttributionWindow() + o.grace + attributor.LateMargin + 24*time.Hour; w > retention {
			retention = w
		}
	}
	return retention
}

func ensureTopicsOnce(ctx context.Context, o options, brokers []string, retention time.Duration, log *slog.Logger) error {
	tctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	n, err := bus.EnsureTopics(tctx, bus.TopicsConfig{Brokers: brokers, Partitions: o.partitions, Retention: retention, Logger: log})
	if err == nil {
		log.Info("topics ready", "partitions", n, "retention", retention)
	}
	return err
}

// ensureTopicsBeside is the edge's "topics" role: it ensures the topics
// while the edge serves, retrying with a backoff for as long as it takes
// (the edge spools meanwhile), and lists the last error on /readyz, beside
// the edge's own check. A cluster with unequal clicks and postbacks
// topics stops the process, as it stops every other role at start.
func ensureTopicsBeside(ctx context.Context, o options, brokers []string, holder *catalog.Holder, health *ops.Health, log *slog.Logger) error {
	var last atomic.Pointer[error]
	health.Register("topics", func() error {
		if err := last.Load(); err != nil {
			return fmt.Errorf("not ensured yet: %w", *err)
		}
		return nil
	})
	retention := topicsRetention(o, holder)
	for wait := time.Second; ; wait = min(2*wait, 30*time.Second) {
		err := ensureTopicsOnce(ctx, o, brokers, retention, log)
		if ctx.Err() != nil {
			return nil
		}
		if err == nil {
			last.Store(nil)
			<-ctx.Done()
			return nil
		}
		if errors.Is(err, bus.ErrUnequalPartitions) {
			return err
		}
		last.Store(&err)
		log.Warn("cannot ensure the Kafka topics yet; the edge spools meanwhile", "err", err, "retry_in", wait)
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(wait):
		}
	}
}

// migrateUntilDone applies the schema, retrying while ClickHouse is away.
// Meanwhile the loader's readiness check says so (the loader replaces it
// with its own once it starts), so that /readyz lists it.
func migrateUntilDone(ctx context.Context, o options, health *ops.Health, log *slog.Logger) {
	var last atomic.Pointer[error]
	health.Register("loader", func() error {
		if err := last.Load(); err != nil {
			return fmt.Errorf("waiting for the ClickHouse schema: %w", *err)
		}
		return errors.New("creating the ClickHouse schema")
	})
	for wait := time.Second; ; wait = min(2*wait, 30*time.Second) {
		err := warehouse.Migrate(ctx, o.clickhouse, o.database)
		if err == nil {
			return
		}
		last.Store(&err)
		log.Warn("cannot migrate ClickHouse schema yet; analytics wait, the pipeline goes on", "err", err, "retry_in", wait)
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
	}
}
