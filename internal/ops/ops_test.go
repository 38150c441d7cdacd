package ops

import (
	"errors"
	"io"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
)

func TestHandler(t *testing.T) {
	reg := NewRegistry()
	c := prometheus.NewCounter(prometheus.CounterOpts{Name: "trackstar_test_things_total", Help: "x"})
	reg.MustRegister(c)
	c.Add(3)
	var h Health
	spooling := false
	h.Register("edge", func() error {
		if spooling {
			return errors.New("degraded: spooling")
		}
		return nil
	})
	srv := httptest.NewServer(Handler(reg, &h))
	defer srv.Close()

	f := func(path string, wantCode int, wantBody string) {
		t.Helper()
		resp, err := srv.Client().Get(srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != wantCode || !strings.Contains(string(body), wantBody) {
			t.Fatalf("GET %s = %d %q, want %d containing %q", path, resp.StatusCode, body, wantCode, wantBody)
		}
	}
	f("/healthz", 200, "ok")
	f("/readyz", 200, "ready")
	f("/metrics", 200, "trackstar_test_things_total 3")
	spooling = true
	f("/readyz", 503, "edge: degraded: spooling")
}

// TestHandlerGate: a listener that gates on some checks answers 200 while
// only the others fail, and still names them; a gating failure is a 503.
func TestHandlerGate(t *testing.T) {
	var h Health
	var edgeErr, loaderErr error
	h.Register("edge", func() error { return edgeErr })
	h.Register("loader", func() error { return loaderErr })
	gated := httptest.NewServer(Handler(NewRegistry(), &h, "edge"))
	defer gated.Close()
	all := httptest.NewServer(Handler(NewRegistry(), &h))
	defer all.Close()

	get := func(srv *httptest.Server) (int, string) {
		t.Helper()
		resp, err := srv.Client().Get(srv.URL + "/readyz")
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		return resp.StatusCode, string(body)
	}

	loaderErr = errors.New("ClickHouse unreachable")
	if code, body := get(gated); code != 200 || !strings.HasPrefix(body, "ready\n") || !strings.Contains(body, "loader: ClickHouse unreachable") {
		t.Fatalf("edge-gated /readyz with the loader failing = %d %q, want 200 ready naming the loader", code, body)
	}
	if code, body := get(all); code != 503 || !strings.Contains(body, "loader: ClickHouse unreachable") {
		t.Fatalf("ungated /readyz with the loader failing = %d %q, want 503", code, body)
	}
	edgeErr = errors.New("degraded: spooling")
	if code, body := get(gated); code != 503 || !strings.Contains(body, "edge: degraded: spooling") || strings.Contains(body, "loader") {
		t.Fatalf("edge-gated /readyz with the edge failing = %d %q, want 503 naming only the edge", code, body)
	}
	edgeErr, loaderErr = nil, nil
	if code, body := get(gated); code != 200 || body != "ready\n" {
		t.Fatalf("edge-gated /readyz, all well = %d %q", code, body)
	}
}
