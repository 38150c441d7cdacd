package catalog

import (
	"context"
	"log/slog"
	"os"
	"os/signal"
	"sync"
	"sync/atomic"
	"syscall"
)

// Holder keeps the current Catalog of a config file. Readers call Current
// on every request and never block; Reload swaps in a new Catalog only when
// the whole file is valid.
type Holder struct {
	path   string
	reload sync.Mutex // one Reload at a time, so the newest file wins
	cur    atomic.Pointer[Catalog]
}

// NewHolder loads the config file at path.
func NewHolder(path string) (*Holder, error) {
	c, err := Load(path)
	if err != nil {
		return nil, err
	}
	h := &Holder{path: path}
	h.cur.Store(c)
	return h, nil
}

// Current returns the catalog in force. A caller that needs several
// lookups to agree keeps the returned pointer for the whole request.
func (h *Holder) Current() *Catalog { return h.cur.Load() }

// Reload loads the file again. On error the current catalog stays.
func (h *Holder) Reload() error {
	h.reload.Lock()
	defer h.reload.Unlock()
	c, err := Load(h.path)
	if err != nil {
		return err
	}
	h.cur.Store(c)
	return nil
}

// WatchSIGHUP reloads the file on every SIGHUP until ctx is done, logging
// each outcome. It returns at once: the signal is subscribed to before it
// returns and handled on a goroutine of its own.
func (h *Holder) WatchSIGHUP(ctx context.Context, log *slog.Logger) {
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGHUP)
	go func() {
		defer signal.Stop(sig)
		for {
			select {
			case <-ctx.Done():
				return
			case <-sig:
			}
			if err := h.Reload(); err != nil {
				log.Error("config reload failed; keeping the previous config", "path", h.path, "err", err)
				continue
			}
			c := h.Current()
			log.Info("config reloaded", "path", h.path,
				"advertisers", len(c.Advertisers), "offers", len(c.Offers), "affiliates", len(c.Affiliates))
		}
	}()
}
