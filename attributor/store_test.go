package attributor

import (
	"reflect"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/trackstar/trackstar/schemas"
)

func TestValueCodecs(t *testing.T) {
	c := schemas.Click{V: schemas.Version, ClickID: makeID(scriptT0, "c"), TS: scriptT0.UnixMilli(), OfferID: 70000, AdvertiserID: 3,
		AffID: 1 << 31, Source: "fb", Sub1: "ä", Sub2: "", Sub3: "x y", Sub4: "4", Sub5: "\x00"}
	got, err := decodeClickValue(c.ClickID, appendClickValue(nil, &c))
	if err != nil || got != c {
		t.Fatalf("click round trip: %+v, %v; want %+v", got, err, c)
	}
	if _, err := decodeClickValue(c.ClickID, appendClickValue(nil, &c)[:5]); err == nil {
		t.Fatalf("truncated click value decoded")
	}

	for _, s := range []Slot{
		{ConversionID: "a", Version: 1, Status: schemas.StatusApproved, ClickID: "c", SaleAmount: -5, Currency: "USD", TS: scriptT0.UnixMilli()},
		{ConversionID: "b", Version: 1 << 31, Status: schemas.StatusPending},
		{Status: schemas.StatusRejected, SaleAmount: 19_9900},
	} {
		got, err := decodeSlotValue(appendSlotValue(nil, &s))
		if err != nil || got != s {
			t.Fatalf("slot round trip: %+v, %v; want %+v", got, err, s)
		}
	}
	// A slot stored before the postback's time was kept ends at its
	// currency: it reads with no time.
	old := Slot{ConversionID: "a", Version: 2, Status: schemas.StatusPending, ClickID: "c", SaleAmount: 7, Currency: "EUR"}
	v := appendSlotValue(nil, &old)
	if got, err := decodeSlotValue(v[:len(v)-1]); err != nil || got != old {
		t.Fatalf("slot of an older store: %+v, %v; want %+v", got, err, old)
	}

	m := meta{ClicksNext: 12, PostbacksNext: 0, OutboxSeq: 7, AttemptClicks: -1, AttemptPostbacks: -1, ConfirmedClicks: 3, ConfirmedPostbacks: 4}
	if got, err := decodeMeta(m.append(nil)); err != nil || got != m {
		t.Fatalf("meta round trip: %+v, %v; want %+v", got, err, m)
	}
}

func TestStatePartitions(t *testing.T) {
	db, err := openStore("s", StoreOptions{FS: vfs.NewMem()})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	for _, p := range []int{300, 0, 3, 3} {
		if err := db.Set(clickKey(nil, p, makeID(scriptT0, "c")), nil, nil); err != nil {
			t.Fatal(err)
		}
		if err := db.Set(metaKey(p), nil, nil); err != nil {
			t.Fatal(err)
		}
	}
	f := func(want ...int) {
		t.Helper()
		got, err := statePartitions(db)
		if err != nil || !reflect.DeepEqual(got, want) {
			t.Fatalf("statePartitions = %v, %v; want %v", got, err, want)
		}
	}
	f(0, 3, 300)
	if err := dropPartition(db, 3); err != nil {
		t.Fatal(err)
	}
	f(0, 300)
	if err := dropPartition(db, 300); err != nil {
		t.Fatal(err)
	}
	f(0)
}

// The group may commit postbacks only up to the first one still held: a
// member that takes the partition over must read that one again.
func TestCommitOffsetsStopAtHeldPostbacks(t *testing.T) {
	db, err := openStore("s", StoreOptions{FS: vfs.NewMem()})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	cat := loadTestCatalog(t)
	p := newPartition(db, 1, time.Minute, newMetrics(prometheus.NewRegistry()))
	now := scriptT0.Add(time.Hour)
	w := p.begin()
	add := func(offset int64, name, click string) {
		t.Helper()
		pb := schemas.Postback{V: schemas.Version, EventID: makeID(now, name), ClickID: makeID(now, click), TS: now.UnixMilli(), AdvertiserID: 1}
		if err := p.addPostback(w, cat, offset, []byte(pb.ClickID), pb.AppendJSON(nil), now); err != nil {
			t.Fatal(err)
		}
	}
	add(5, "p5", "a")
	add(6, "p6", "b")
	add(7, "p7", "a")
	if err := p.commit(w); err != nil {
		t.Fatal(err)
	}
	if c, pb := p.commitOffsets(); c != 0 || pb != 5 || p.heldCount != 3 {
		t.Fatalf("commitOffsets = %d, %d with %d held; want 0, 5 with 3", c, pb, p.heldCount)
	}

	// Click a arrives: p5 and p7 are decided; p6 still holds the offset.
	w = p.begin()
	c := schemas.Click{V: schemas.Version, ClickID: makeID(now, "a"), TS: now.UnixMilli(), OfferID: 1, AdvertiserID: 1}
	if err := p.addClick(w, cat, 41, c.AppendJSON(nil)); err != nil {
		t.Fatal(err)
	}
	if len(w.out) != 2 {
		t.Fatalf("click released %d conversions, want 2", len(w.out))
	}
	if err := p.commit(w); err != nil {
		t.Fatal(err)
	}
	if c, pb := p.commitOffsets(); c != 42 || pb != 6 {
		t.Fatalf("commitOffsets = %d, %d; want 42, 6", c, pb)
	}
	// A restart finds the same.
	q := newPartition(db, 1, time.Minute, p.m)
	if ok, err := q.load(); !ok || err != nil {
		t.Fatalf("load = %v, %v", ok, err)
	}
	if c, pb := q.commitOffsets(); c != 42 || pb != 6 || q.heldCount != 1 {
		t.Fatalf("after load: commitOffsets = %d, %d with %d held; want 42, 6 with 1", c, pb, q.heldCount)
	}
	if out, err := q.pendingOutbox(); err != nil || len(out) != 2 {
		t.Fatalf("outbox after load: %d records, %v; want the 2 not acknowledged", len(out), err)
	}
}

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
		if err := p.addPostback(w, cat, int64(i), []byte(pb.ClickID), pb.AppendJSON(nil), now); err != nil {
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
