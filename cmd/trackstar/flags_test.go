package main

import (
	"strings"
	"testing"
	"time"
)

func TestFlagsReadEnvironment(t *testing.T) {
	t.Setenv("TRACKSTAR_EMBEDDED_BROKER", "127.0.0.1:19092")
	t.Setenv("TRACKSTAR_GRACE", "5m")
	t.Setenv("TRACKSTAR_LISTEN", ":1")
	var o options
	fs := newFlagSet("all", &o)
	if err := parseFlags(fs, []string{"--listen", ":2"}); err != nil {
		t.Fatal(err)
	}
	if o.embeddedBroker != "127.0.0.1:19092" || o.grace != 5*time.Minute {
		t.Fatalf("environment not read: %+v", o)
	}
	if o.listen != ":2" {
		t.Fatalf("command line must win over the environment: listen = %q", o.listen)
	}

	t.Setenv("TRACKSTAR_PARTITIONS", "twelve")
	err := parseFlags(newFlagSet("all", &o), nil)
	if err == nil || !strings.Contains(err.Error(), "TRACKSTAR_PARTITIONS") {
		t.Fatalf("bad env value: %v, want an error naming TRACKSTAR_PARTITIONS", err)
	}
}

func TestUnknownCommandAndLoadgen(t *testing.T) {
	var out, errw strings.Builder
	if err := run([]string{"frobnicate"}, &out, &errw); err == nil || !strings.Contains(err.Error(), "unknown command") {
		t.Fatalf("unknown command: %v", err)
	}
	if err := run([]string{"edge", "--config", "/nonexistent.yaml"}, &out, &errw); err == nil || !strings.Contains(err.Error(), "--brokers is required") {
		t.Fatalf("edge without brokers: %v", err)
	}
}
