package catalog

import (
	"context"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

func writeConfig(t *testing.T, path string, offerID string) {
	t.Helper()
	cfg := strings.ReplaceAll(base, "- id: 1\n  advertiser_id", "- id: "+offerID+"\n  advertiser_id")
	if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestHolderReload(t *testing.T) {
	path := filepath.Join(t.TempDir(), "trackstar.yaml")
	writeConfig(t, path, "1")
	h, err := NewHolder(path)
	if err != nil {
		t.Fatal(err)
	}
	first := h.Current()
	if first.Offer(1) == nil {
		t.Fatalf("offer 1 missing after load")
	}

	writeConfig(t, path, "2")
	if err := h.Reload(); err != nil {
		t.Fatal(err)
	}
	second := h.Current()
	if second == first || second.Offer(2) == nil || second.Offer(1) != nil {
		t.Fatalf("reload did not swap in the new file")
	}

	if err := os.WriteFile(path, []byte(base+"offerz: []\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	err = h.Reload()
	if err == nil || !strings.Contains(err.Error(), `trackstar.yaml:9: unknown key "offerz"`) {
		t.Fatalf("reload of a bad file: got %v", err)
	}
	if h.Current() != second {
		t.Fatalf("a bad file replaced the catalog")
	}

	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	if err := h.Reload(); err == nil {
		t.Fatalf("reload of a missing file succeeded")
	}
	if h.Current() != second {
		t.Fatalf("a missing file replaced the catalog")
	}
}

func TestNewHolderBadFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "trackstar.yaml")
	if err := os.WriteFile(path, []byte("offers: {}\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if h, err := NewHolder(path); err == nil || h != nil {
		t.Fatalf("NewHolder accepted a bad file")
	}
}

func TestHolderWatchSIGHUP(t *testing.T) {
	path := filepath.Join(t.TempDir(), "trackstar.yaml")
	writeConfig(t, path, "1")
	h, err := NewHolder(path)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	h.WatchSIGHUP(ctx, slog.New(slog.NewTextHandler(io.Discard, nil)))

	writeConfig(t, path, "3")
	if err := syscall.Kill(os.Getpid(), syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for h.Current().Offer(3) == nil {
		if time.Now().After(deadline) {
			t.Fatalf("SIGHUP did not reload the file")
		}
		time.Sleep(10 * time.Millisecond)
	}
}
