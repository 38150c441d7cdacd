package attributor

import (
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/trackstar/trackstar/schemas"
)

// The held_postbacks gauge counts the postbacks a partition loads from the
// store (after a restart, or when a rebalance keeps the partition), not
// only those it holds from its next batch on; and a partition rebuilt
// after loading them takes them out again.
func TestHeldPostbacksGaugeAfterLoad(t *testing.T) {
	db, err := openStore("s", StoreOptions{FS: vfs.NewMem()})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	cat := loadTestCatalog(t)
	now := scriptT0.Add(time.Hour)
	p := newPartition(db, 1, time.Minute, newMetrics(prometheus.NewRegistry()))
	w := p.begin()
	for i, name := range []string{"p1", "p2"} {
		pb := schemas.Postback{V: schemas.Version, EventID: makeID(now, name), ClickID: makeID(now, "c"+name), TS: now.UnixMilli(), AdvertiserID: 1}
		if err := p.addPostback(w, cat, int64(i), pb.AppendJSON(nil), now); err != nil {
			t.Fatal(err)
		}
	}
	if err := p.commit(w); err != nil {
		t.Fatal(err)
	}
	p.close()

	// The member restarts (or a new generation starts): the partition's
	// worker loads its state and has nothing to read yet.
	reg := prometheus.NewRegistry()
	q := newPartition(db, 1, time.Minute, newMetrics(reg))
	if ok, err := q.load(); !ok || err != nil {
		t.Fatalf("load = %v, %v", ok, err)
	}
	if q.heldCount != 2 {
		t.Fatalf("loaded %d held postbacks, want 2", q.heldCount)
	}
	if got := metricValue(t, reg, "trackstar_attributor_held_postbacks"); got != 2 {
		t.Fatalf("held_postbacks = %v after load, want 2", got)
	}
	q.close()
	if got := metricValue(t, reg, "trackstar_attributor_held_postbacks"); got != 0 {
		t.Fatalf("held_postbacks = %v after close, want 0", got)
	}
}
