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
