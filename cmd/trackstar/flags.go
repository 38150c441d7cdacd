package main

import (
	"flag"
	"fmt"
	"os"
	"strings"
	"time"
)

// Default partition counts of the topics Trackstar creates.
const (
	defaultPartitions = 12
	// embeddedPartitions is the default of 'all' with the embedded broker.
	// Every partition costs a reader per consumer (attributor 2, loader 3,
	// dispatcher 1) and a produce stream at the edge, all sharing the one
	// process's cores with the edge: with 12, 'all' served about half the
	// clicks it serves with 4 (scripts/bench.sh edge). 4 still lets the
	// attributor's partition workers run in parallel.
	embeddedPartitions = 4
)

// options are the flags every command accepts. Each flag also reads
// TRACKSTAR_<FLAG> (upper case, dashes as underscores) from the environment
// when it is not given on the command line.
type options struct {
	config         string
	listen         string
	opsListen      string
	brokers        string
	embeddedBroker string
	clickhouse     string
	database       string
	data           string
	partitions     int
	trustProxy     bool
	grace          time.Duration
	logLevel       string
	drainRetries   bool

	// report
	days   int
	byHour bool

	// loadgen
	target        string
	rate          float64
	clicks        int
	duration      time.Duration
	concurrency   int
	postbackShare float64
	delayMean     time.Duration
	repeatShare   float64
	pendingShare  float64
	unknownShare  float64
	sink          string
}

func newFlagSet(cmd string, o *options) *flag.FlagSet {
	fs := flag.NewFlagSet("trackstar "+cmd, flag.ContinueOnError)
	fs.StringVar(&o.config, "config", "trackstar.yaml", "config file (YAML); reloaded on SIGHUP")
	fs.StringVar(&o.listen, "listen", ":8080", "edge HTTP address (clicks, postbacks, /healthz, /readyz, /metrics)")
	fs.StringVar(&o.opsListen, "ops-listen", ":9100", "address of /healthz, /readyz and /metrics for roles without the edge")
	fs.StringVar(&o.brokers, "brokers", "", "Kafka bootstrap brokers, comma separated (all: empty starts the embedded broker)")
	fs.StringVar(&o.embeddedBroker, "embedded-broker", "127.0.0.1:9092", "address the embedded broker listens on (all, without --brokers)")
	fs.StringVar(&o.clickhouse, "clickhouse", "127.0.0.1:9000", "ClickHouse native protocol address")
	fs.StringVar(&o.database, "clickhouse-database", "trackstar", "ClickHouse database")
	fs.StringVar(&o.data, "data", "./data", "directory for local state: spool, click store, retry schedule, embedded broker")
	fs.IntVar(&o.partitions, "partitions", 0, fmt.Sprintf("partitions of topics Trackstar creates (clicks and postbacks must be equal; "+
		"topics that exist keep theirs); 0: %d, or %d for 'all' with the embedded broker (one node, one process: "+
		"more partitions only add consumers competing for the same cores)", defaultPartitions, embeddedPartitions))
	fs.BoolVar(&o.trustProxy, "trust-proxy", false, "edge: take the client IP from X-Forwarded-For (only behind your own proxy)")
	fs.DurationVar(&o.grace, "grace", 2*time.Minute, "attributor: how long a postback waits for a click read after it")
	fs.StringVar(&o.logLevel, "log-level", "info", "debug, info, warn or error")
	if cmd == "dispatcher" {
		fs.BoolVar(&o.drainRetries, "drain-retries", false, "dispatcher: join no group and read no conversions; send the retries "+
			"scheduled under --data as they fall due, and exit once none is left (to retire a dispatcher for good)")
	}
	if cmd == "report" {
		fs.IntVar(&o.days, "days", 7, "report: how many days back from today")
		fs.BoolVar(&o.byHour, "hourly", false, "report: by hour instead of by day")
	}
	if cmd == "loadgen" {
		fs.StringVar(&o.target, "target", "http://127.0.0.1:8080", "loadgen: the edge's base URL")
		fs.Float64Var(&o.rate, "rate", 100, "loadgen: clicks per second (> 0)")
		fs.IntVar(&o.clicks, "clicks", 0, "loadgen: stop after this many clicks (0: run for --duration)")
		fs.DurationVar(&o.duration, "duration", 10*time.Second, "loadgen: how long to send clicks when --clicks is 0")
		fs.IntVar(&o.concurrency, "concurrency", 64, "loadgen: requests in flight at most")
		fs.Float64Var(&o.postbackShare, "postback-share", 0.1, "loadgen: share of clicks that convert (0: no postbacks)")
		fs.DurationVar(&o.delayMean, "delay-mean", 2*time.Second, "loadgen: mean click→postback delay (exponential; 0: at once)")
		fs.Float64Var(&o.repeatShare, "repeat-share", 0.05, "loadgen: share of postbacks the advertiser repeats")
		fs.Float64Var(&o.pendingShare, "pending-share", 0.1, "loadgen: share of conversions sent pending, then approved")
		fs.Float64Var(&o.unknownShare, "unknown-share", 0.02, "loadgen: extra postbacks for click IDs that never existed")
		fs.StringVar(&o.sink, "sink", "", "loadgen: run a partner postback receiver on this address and measure delivery latency")
	}
	return fs
}

// parseFlags parses args, then fills every flag not given on the command
// line from TRACKSTAR_<FLAG>. A bad environment value is an error naming it.
func parseFlags(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	var err error
	fs.VisitAll(func(f *flag.Flag) {
		if set[f.Name] || err != nil {
			return
		}
		name := envName(f.Name)
		if v, ok := os.LookupEnv(name); ok {
			if e := fs.Set(f.Name, v); e != nil {
				err = fmt.Errorf("bad value %q in %s: %w", v, name, e)
			}
		}
	})
	return err
}

func envName(flagName string) string {
	return "TRACKSTAR_" + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

func splitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}
