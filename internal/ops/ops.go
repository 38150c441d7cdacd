// Package ops is what every role shows its operators: /healthz, /readyz
// and /metrics (Prometheus), and the readiness checks behind /readyz.
package ops

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// NewRegistry returns a Prometheus registry with the Go runtime and process
// collectors, for one process. Roles register their trackstar_* series on it.
func NewRegistry() *prometheus.Registry {
	r := prometheus.NewRegistry()
	r.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return r
}

// Health collects readiness checks from the roles of one process. A check
// returns nil when its part is ready, or an error saying what is wrong
// (for the edge: "degraded: spooling, Kafka unreachable").
type Health struct {
	mu     sync.Mutex
	checks map[string]func() error
}

// Register adds a named readiness check, replacing one of the same name.
func (h *Health) Register(name string, check func() error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.checks == nil {
		h.checks = map[string]func() error{}
	}
	h.checks[name] = check
}

// Ready runs every check. It returns nil when all pass, or an error listing
// each failing check by name.
func (h *Health) Ready() error {
	if msgs := h.failures(nil); len(msgs) > 0 {
		return errors.New(strings.Join(msgs, "; "))
	}
	return nil
}

// failures runs the checks and returns "name: error" for each that fails,
// sorted by name; with keep non-nil, only for the names it accepts.
func (h *Health) failures(keep func(name string) bool) []string {
	h.mu.Lock()
	names := make([]string, 0, len(h.checks))
	for n := range h.checks {
		if keep == nil || keep(n) {
			names = append(names, n)
		}
	}
	checks := h.checks
	h.mu.Unlock()
	sort.Strings(names)
	var msgs []string
	for _, n := range names {
		if err := checks[n](); err != nil {
			msgs = append(msgs, n+": "+err.Error())
		}
	}
	return msgs
}

// Handler serves /healthz (the process is alive), /readyz and /metrics.
//
// /readyz answers 503 with the reasons when a check named in gate fails
// (any check, when gate is empty), and 200 otherwise. The edge gates on its
// own check only: a load balancer reads its /readyz to decide where clicks
// go, and in `trackstar all` a loader waiting for ClickHouse must not take
// the edge out of rotation, since the edge still lands every event in
// Kafka. The other checks' failures are still listed in the body, after
// "ready", for the operator.
func Handler(reg *prometheus.Registry, h *Health, gate ...string) http.Handler {
	gates := func(name string) bool { return len(gate) == 0 || slices.Contains(gate, name) }
	others := func(name string) bool { return !gates(name) }
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		if msgs := h.failures(gates); len(msgs) > 0 {
			w.WriteHeader(http.StatusServiceUnavailable)
			fmt.Fprintln(w, "not ready:", strings.Join(msgs, "; "))
			return
		}
		fmt.Fprintln(w, "ready")
		if len(gate) > 0 {
			if msgs := h.failures(others); len(msgs) > 0 {
				fmt.Fprintln(w, "other roles in this process, not gating this listener:", strings.Join(msgs, "; "))
			}
		}
	})
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
	return mux
}

// Serve runs Handler on addr until ctx ends. Roles without an HTTP server of
// their own (attributor, dispatcher, loader) use it on --ops-listen.
func Serve(ctx context.Context, addr string, reg *prometheus.Registry, h *Health, log *slog.Logger) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("cannot listen for ops endpoints on %s: %w", addr, err)
	}
	srv := &http.Server{Handler: Handler(reg, h), ReadHeaderTimeout: 5 * time.Second}
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	log.Info("ops endpoints listening", "addr", ln.Addr().String())
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("ops server on %s: %w", addr, err)
	}
	return nil
}
