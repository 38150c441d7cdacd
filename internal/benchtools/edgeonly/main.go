// Command edgeonly runs the edge and the embedded broker and nothing else:
// `scripts/bench.sh edge` measures it beside `trackstar all` to tell the
// edge's own cost (HTTP, producing with acks) from that of the pipeline
// roles `all` runs in the same process (attributor, dispatcher, loader).
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/trackstar/trackstar/ingest"
	"github.com/trackstar/trackstar/internal/bus"
	"github.com/trackstar/trackstar/internal/catalog"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "edgeonly:", err)
		os.Exit(1)
	}
}

func run() error {
	config := flag.String("config", "examples/trackstar.yaml", "config file")
	listen := flag.String("listen", "127.0.0.1:8082", "edge address")
	broker := flag.String("embedded-broker", "127.0.0.1:9093", "embedded broker address")
	data := flag.String("data", "./data-edgeonly", "data directory (spool, broker)")
	partitions := flag.Int("partitions", 12, "partitions of the topics")
	flag.Parse()

	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	b, err := bus.StartEmbeddedBroker(*broker, filepath.Join(*data, "kafka"))
	if err != nil {
		return err
	}
	defer b.Close()
	brokers := []string{b.Addr()}
	if _, err := bus.EnsureTopics(ctx, bus.TopicsConfig{Brokers: brokers, Partitions: *partitions, Logger: log}); err != nil {
		return err
	}
	holder, err := catalog.NewHolder(*config)
	if err != nil {
		return err
	}
	return ingest.Run(ctx, ingest.Config{Listen: *listen, Brokers: brokers, DataDir: *data, Catalog: holder, Logger: log})
}
