package attributor

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/segmentio/kafka-go"

	"github.com/trackstar/trackstar/internal/bus"
	"github.com/trackstar/trackstar/internal/catalog"
	"github.com/trackstar/trackstar/schemas"
)

// memberPartition is one member's partition 0 over its own in-memory store.
type memberPartition struct {
	t   *testing.T
	cat *catalog.Catalog
	db  *pebble.DB
	p   *partition
	out []schemas.Conversion
}

func newMemberPartition(t *testing.T, cat *catalog.Catalog) *memberPartition {
	db, err := openStore("s", StoreOptions{FS: vfs.NewMem()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return &memberPartition{t: t, cat: cat, db: db, p: newPartition(db, 0, scriptGrace, newMetrics(prometheus.NewRegistry()))}
}

// batch is what worker.apply does with one batch: clicks, due held
// postbacks, postbacks; then commit and ack.
func (r *memberPartition) batch(now time.Time, caughtUp bool, clicks map[int64][]byte, postbacks map[int64][]byte) {
	r.t.Helper()
	w := r.p.begin()
	for off, v := range clicks {
		if err := r.p.addClick(w, r.cat, off, v); err != nil {
			r.t.Fatal(err)
		}
	}
	r.p.clicksCaughtUp = caughtUp
	if err := r.p.resolveDue(w, r.cat, now); err != nil {
		r.t.Fatal(err)
	}
	for off, v := range postbacks {
		if err := r.p.addPostback(w, r.cat, off, nil, v, now); err != nil {
			r.t.Fatal(err)
		}
	}
	out := w.out
	if err := r.p.commit(w); err != nil {
		r.t.Fatal(err)
	}
	for _, o := range out {
		c, err := schemas.DecodeConversion(o.value)
		if err != nil {
			r.t.Fatal(err)
		}
		r.out = append(r.out, c)
	}
	if err := r.p.acked(out); err != nil {
		r.t.Fatal(err)
	}
}

// Whatever the members claim (stale, overlapping or out-of-range
// ownership hints), the balancer gives every partition number to exactly
// one member for both topics, and member counts differ by at most one.
func TestCoPartitionBalancerRandomGroups(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for iter := 0; iter < 2000; iter++ {
		nparts := 1 + rng.IntN(40)
		nmem := 1 + rng.IntN(8)
		var parts []kafka.Partition
		for _, topic := range []string{bus.TopicClicks, bus.TopicPostbacks} {
			for i := range nparts {
				parts = append(parts, kafka.Partition{Topic: topic, ID: i})
			}
		}
		var members []kafka.GroupMember
		for m := range nmem {
			var owned []int
			for range rng.IntN(nparts + 3) {
				owned = append(owned, rng.IntN(nparts+5))
			}
			ud, _ := json.Marshal(map[string][]int{"owned": owned})
			members = append(members, kafka.GroupMember{ID: fmt.Sprintf("m%02d-%d", m, rng.IntN(100)), Topics: []string{bus.TopicClicks, bus.TopicPostbacks}, UserData: ud})
		}
		out := (&bus.CoPartitionBalancer{}).AssignGroups(members, parts)
		seen := map[int]string{}
		minC, maxC := 1<<30, 0
		for id, a := range out {
			if !slices.Equal(a[bus.TopicClicks], a[bus.TopicPostbacks]) {
				t.Fatalf("member %s: clicks %v postbacks %v", id, a[bus.TopicClicks], a[bus.TopicPostbacks])
			}
			for _, p := range a[bus.TopicClicks] {
				if o, ok := seen[p]; ok {
					t.Fatalf("partition %d to %s and %s", p, o, id)
				}
				seen[p] = id
			}
			minC, maxC = min(minC, len(a[bus.TopicClicks])), max(maxC, len(a[bus.TopicClicks]))
		}
		if len(seen) != nparts || maxC-minC > 1 {
			t.Fatalf("iter %d: %d of %d partitions assigned, counts %d..%d", iter, len(seen), nparts, minC, maxC)
		}
	}
}

// While the postbacks partition is behind, expire counts back from the
// last postback's time, but never from later than the clock (as the
// rebuild does, postbacksClock). Before, one postback from an edge whose
// clock was 40 days ahead made the next expiry pass drop every click and
// slot of the partition, for good, and keep new clicks out: the status
// update of a conversion an hour old was then unknown_click.
func TestExpiryIgnoresAPostbackTimeAheadOfTheClock(t *testing.T) {
	cat := loadTestCatalog(t)
	at := func(d time.Duration) time.Time { return scriptT0.Add(d) }
	r := newMemberPartition(t, cat)
	c1 := schemas.Click{V: schemas.Version, ClickID: makeID(at(0), "c1"), TS: at(0).UnixMilli(), OfferID: 1, AdvertiserID: 1, AffID: 7}
	r.batch(at(time.Minute), false, map[int64][]byte{0: c1.AppendJSON(nil)}, nil)
	p1 := schemas.Postback{V: schemas.Version, EventID: makeID(at(time.Hour), "p1"), ClickID: c1.ClickID, TS: at(time.Hour).UnixMilli(), AdvertiserID: 1, Status: "pending"}
	r.batch(at(time.Hour), true, nil, map[int64][]byte{0: p1.AppendJSON(nil)})

	// A postback from an edge whose clock is 40 days ahead (its click too).
	future := at(time.Hour + 40*24*time.Hour)
	px := schemas.Postback{V: schemas.Version, EventID: makeID(future, "px"), ClickID: makeID(future, "cx"), TS: future.UnixMilli(), AdvertiserID: 1}
	r.batch(at(time.Hour), true, nil, map[int64][]byte{1: px.AppendJSON(nil)})
	// An expiry pass while the postbacks partition is behind (a backlog).
	r.p.postbacksCaughtUp = false
	if err := r.p.expire(cat, at(time.Hour)); err != nil {
		t.Fatal(err)
	}
	t.Logf("cut after expire at t0+1h: %s (c1 is %s)", r.p.cut, c1.ClickID)

	// A new click read after that pass is not even stored (it is older
	// than the cut), so its conversion is lost too.
	c2 := schemas.Click{V: schemas.Version, ClickID: makeID(at(90*time.Minute), "c2"), TS: at(90 * time.Minute).UnixMilli(), OfferID: 1, AdvertiserID: 1, AffID: 7}
	r.batch(at(90*time.Minute), true, map[int64][]byte{1: c2.AppendJSON(nil)}, nil)
	wk := r.p.begin()
	defer wk.b.Close()
	if _, found, _ := r.p.click(wk, c2.ClickID); !found {
		t.Errorf("click c2 (read at t0+90m, after the pass) was not stored")
	}

	// The advertiser approves p1's conversion.
	p2 := schemas.Postback{V: schemas.Version, EventID: makeID(at(2*time.Hour), "p2"), ClickID: c1.ClickID, TS: at(2 * time.Hour).UnixMilli(), AdvertiserID: 1}
	r.batch(at(2*time.Hour), true, nil, map[int64][]byte{2: p2.AppendJSON(nil)})
	r.batch(at(2*time.Hour+5*time.Minute), true, nil, nil)
	last := r.out[len(r.out)-1]
	if last.PostbackEventID != p2.EventID || last.ConversionID != p1.EventID || last.Version != 2 || last.Status != schemas.StatusApproved {
		t.Errorf("p2 decided %s v%d %s/%s (conversion %s), want the update of p1's conversion to v2 approved",
			last.PostbackEventID, last.Version, last.Status, last.RejectReason, last.ConversionID)
	}
}

// A click time ahead of the clock does not show that the clicks partition
// has passed a waiting postback's deadline. Before, one click from an edge
// whose clock was 10 minutes ahead, read just before the click a waiting
// postback needed, made that postback unknown_click at once, though its
// click was the next record and grace (2m) had not passed by any clock.
func TestClickTimeAheadOfTheClockReleasesNoWaitingPostback(t *testing.T) {
	cat := loadTestCatalog(t)
	at := func(d time.Duration) time.Time { return scriptT0.Add(d) }
	r := newMemberPartition(t, cat)
	now := at(time.Hour)
	x := schemas.Click{V: schemas.Version, ClickID: makeID(now, "x"), TS: now.UnixMilli(), OfferID: 1, AdvertiserID: 1, AffID: 7}
	// The postback overtakes its click (the clicks feed reads in larger, slower fetches).
	p := schemas.Postback{V: schemas.Version, EventID: makeID(now.Add(time.Second), "p"), ClickID: x.ClickID, TS: now.Add(time.Second).UnixMilli(), AdvertiserID: 1}
	r.batch(now.Add(time.Second), false, nil, map[int64][]byte{0: p.AppendJSON(nil)})
	if r.p.heldCount != 1 {
		t.Fatalf("held %d, want 1", r.p.heldCount)
	}
	// A click from a skewed edge, produced just before x.
	skewed := now.Add(10 * time.Minute)
	z := schemas.Click{V: schemas.Version, ClickID: makeID(skewed, "z"), TS: skewed.UnixMilli(), OfferID: 1, AdvertiserID: 1, AffID: 7}
	r.batch(now.Add(time.Second), false, map[int64][]byte{0: z.AppendJSON(nil)}, nil)
	r.batch(now.Add(time.Second), false, map[int64][]byte{1: x.AppendJSON(nil)}, nil)
	for _, c := range r.out {
		if c.PostbackEventID == p.EventID && c.Status != schemas.StatusApproved {
			t.Errorf("postback p decided %s/%s 1s after its click, which was read right after", c.Status, c.RejectReason)
		}
	}
}

// With no offers in the config (being edited, or every offer paused),
// expire keeps everything, and so does a rebuild under that config. Before,
// the rebuild counted back only grace plus LateMargin: the clicks and
// slots of the rest of the window were not restored, and stayed lost once
// the offers were back.
func TestRebuildWithoutOffersKeepsTheWholeLog(t *testing.T) {
	empty, err := catalog.Parse([]byte("advertisers:\n  - {id: 1, name: Shop, token: shop-token}\n"), "empty.yaml")
	if err != nil {
		t.Fatal(err)
	}
	full := loadTestCatalog(t)
	clock := scriptT0.Add(10 * 24 * time.Hour)
	click := scriptT0.Add(5 * 24 * time.Hour) // well inside the 720h window
	// In place, expire keeps it.
	r := newMemberPartition(t, empty)
	r.p.postbacksCaughtUp = true
	if err := r.p.expire(empty, clock); err != nil {
		t.Fatal(err)
	}
	if r.p.cut != "" {
		t.Fatalf("expire with no offers set cut %s", r.p.cut)
	}
	// A rebuild under the same config (worker.rebuild: restoreSince, then p.cut = minIDAt(since)).
	since := restoreSince(empty, scriptGrace, clock)
	id := makeID(click, "c1")
	if id < minIDAt(since) {
		t.Errorf("a rebuild with no offers restores from %s: the click of %s (inside the %s window of the config restored later) is not restored",
			since.Format(time.RFC3339), click.Format(time.RFC3339), full.MaxAttributionWindow())
	}
}

// The cut (clicks older than it are not stored, because their slots are
// gone) is stored with the partition's offsets. Before, it lived in memory
// only: a member that rebuilt a partition and restarted before it had
// read the clicks again (or before its next expiry pass) stored a click
// older than the cut without its slot, and the click's status update
// became a second conversion — what the cut is there to prevent.
func TestCutSurvivesARestart(t *testing.T) {
	cat := loadTestCatalog(t)
	at := func(d time.Duration) time.Time { return scriptT0.Add(d) }
	c1 := schemas.Click{V: schemas.Version, ClickID: makeID(at(0), "c1"), TS: at(0).UnixMilli(), OfferID: 1, AdvertiserID: 1, AffID: 7}
	p1 := schemas.Postback{V: schemas.Version, EventID: makeID(at(700*time.Hour), "p1"), ClickID: c1.ClickID, TS: at(700 * time.Hour).UnixMilli(), AdvertiserID: 1, Status: "pending"}

	// Where the partition was: c1, p1 pending.
	a := newMemberPartition(t, cat)
	a.batch(at(0), true, map[int64][]byte{0: c1.AppendJSON(nil)}, nil)
	a.batch(at(700*time.Hour), true, nil, map[int64][]byte{0: p1.AppendJSON(nil)})
	conv := schemas.EncodeConversion(a.out[0])

	// The rebuild on the new member (worker.rebuild), at 746h: c1 is older
	// than the window it restores; the meta is stored, then the member
	// restarts before reading the clicks again.
	b := newMemberPartition(t, cat)
	since := restoreSince(cat, scriptGrace, at(746*time.Hour))
	w := b.p.begin()
	if err := b.p.restore(w, cat, conv, since); err != nil {
		t.Fatal(err)
	}
	b.p.setCut(minIDAt(since))
	if err := b.p.commit(w); err != nil {
		t.Fatal(err)
	}
	b2 := &memberPartition{t: t, cat: cat, db: b.db, p: newPartition(b.db, 0, scriptGrace, newMetrics(prometheus.NewRegistry()))}
	if ok, err := b2.p.load(); !ok || err != nil {
		t.Fatalf("load = %v, %v", ok, err)
	}
	t.Logf("cut before the restart %q, after %q", b.p.cut, b2.p.cut)
	// Clicks read again from the window's start (by record time): c1's record is among them.
	b2.batch(at(746*time.Hour), false, map[int64][]byte{0: c1.AppendJSON(nil)}, nil)
	// The advertiser's approval of p1, out of an edge's spool, with its old time.
	p2 := schemas.Postback{V: schemas.Version, EventID: makeID(at(701*time.Hour), "p2"), ClickID: c1.ClickID, TS: at(701 * time.Hour).UnixMilli(), AdvertiserID: 1}
	b2.batch(at(746*time.Hour), true, nil, map[int64][]byte{0: p2.AppendJSON(nil)})
	for _, c := range b2.out {
		if c.PostbackEventID == p2.EventID && c.Status == schemas.StatusApproved && c.ConversionID != p1.EventID {
			t.Errorf("p2 is a second conversion of c1 (%s v%d approved) next to p1's pending one: the restarted member stored c1 without its slot",
				c.ConversionID, c.Version)
		}
	}
}
