package attributor

import (
	"bufio"
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"runtime"
	"strconv"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/trackstar/trackstar/internal/catalog"
	"github.com/trackstar/trackstar/schemas"
)

// Benchmarks of the store side of one partition, on disk, without Kafka:
// what a worker does with the records it reads. Run them with -cpu 1 for
// per-core figures (Pebble's flushes and compactions then share the core).
//
//	go test -run '^$' -bench . -cpu 1 ./attributor
//	TRACKSTAR_BENCH_CLICKS=10000000 go test -run '^$' -bench BenchmarkClickStore10M -cpu 1 -timeout 1h ./attributor

const benchBatch = 1000

// benchClick is a click of realistic size (about 330 bytes of JSON).
func benchClick(rng *rand.Rand, at time.Time) schemas.Click {
	return schemas.Click{
		V: schemas.Version, ClickID: schemas.NewID(at), TS: at.UnixMilli(),
		OfferID: 1 + uint32(rng.IntN(2)), AdvertiserID: 1, AffID: 7 + uint32(rng.IntN(50)),
		Source: "feed-" + strconv.Itoa(rng.IntN(20)), Sub1: strconv.FormatUint(rng.Uint64(), 36), Sub2: "campaign-42",
		IP:        "203.0.113." + strconv.Itoa(rng.IntN(256)),
		UserAgent: "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/125.0 Mobile Safari/537.36",
		Referer:   "https://publisher.example/article/" + strconv.Itoa(rng.IntN(1000)),
	}
}

type benchPartition struct {
	p      *partition
	cat    *catalog.Catalog
	db     *pebble.DB
	dir    string
	closed bool
}

func newBenchPartition(b *testing.B) *benchPartition {
	b.Helper()
	dir, err := os.MkdirTemp("", "trackstar-bench-store-")
	if err != nil {
		b.Fatal(err)
	}
	db, err := openStore(dir, StoreOptions{})
	if err != nil {
		os.RemoveAll(dir)
		b.Fatal(err)
	}
	bp := &benchPartition{p: newPartition(db, 0, 2*time.Minute, newMetrics(prometheus.NewRegistry())), cat: loadTestCatalog(b), db: db, dir: dir}
	b.Cleanup(bp.close)
	return bp
}

// close closes the store and deletes its files. A benchmark that makes a
// store per iteration calls it at the end of each, so that its stores
// (150 MB each at 200,000 clicks) do not pile up on disk until it ends.
func (bp *benchPartition) close() {
	if bp.closed {
		return
	}
	bp.closed = true
	bp.db.Close()
	os.RemoveAll(bp.dir)
}

// addClicks stores clicks in batches, as a worker does.
func (bp *benchPartition) addClicks(b *testing.B, values [][]byte, offset int64) {
	for len(values) > 0 {
		n := min(len(values), benchBatch)
		w := bp.p.begin()
		for i, v := range values[:n] {
			if err := bp.p.addClick(w, bp.cat, offset+int64(i), v); err != nil {
				b.Fatal(err)
			}
		}
		if err := bp.p.commit(w); err != nil {
			b.Fatal(err)
		}
		values, offset = values[n:], offset+int64(n)
	}
}

// BenchmarkClickStore measures clicks stored per second: decoding the
// record, writing the click, committing batches of 1000 with their offsets.
func BenchmarkClickStore(b *testing.B) {
	rng := rand.New(rand.NewPCG(1, 2))
	now := time.Now()
	const pool = 100_000
	values := make([][]byte, pool)
	size := 0
	for i := range values {
		c := benchClick(rng, now.Add(time.Duration(i)*time.Millisecond))
		values[i] = c.AppendJSON(nil)
		size += len(values[i])
	}
	bp := newBenchPartition(b)
	b.SetBytes(int64(size / pool))
	b.ReportAllocs()
	b.ResetTimer()
	start := time.Now()
	for done := 0; done < b.N; {
		n := min(b.N-done, pool)
		// Fresh IDs per round: stored clicks are new keys, not overwrites.
		if done > 0 && done%pool == 0 {
			b.StopTimer()
			for i := range values[:n] {
				c := benchClick(rng, now.Add(time.Duration(done+i)*time.Millisecond))
				values[i] = c.AppendJSON(values[i][:0])
			}
			b.StartTimer()
		}
		bp.addClicks(b, values[:n], int64(done))
		done += n
	}
	b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "clicks/s")
}

// BenchmarkPostbackJoin measures postbacks joined per second against a
// store of 100k clicks: decoding, click lookup, the rules, slot and
// replay records, the outbox, a synced commit per batch of 1000 and the
// outbox cleared afterwards. A third of the postbacks use the percent goal
// with a txn_id.
func BenchmarkPostbackJoin(b *testing.B) {
	rng := rand.New(rand.NewPCG(3, 4))
	now := time.Now()
	const clicks = 100_000
	ids := make([]string, clicks)
	values := make([][]byte, clicks)
	for i := range values {
		c := benchClick(rng, now.Add(-time.Hour+time.Duration(i)*time.Millisecond))
		c.OfferID = 1
		ids[i], values[i] = c.ClickID, c.AppendJSON(nil)
	}
	bp := newBenchPartition(b)
	bp.addClicks(b, values, 0)

	pbs := make([][]byte, benchBatch)
	b.ReportAllocs()
	b.ResetTimer()
	start := time.Now()
	for done := 0; done < b.N; {
		n := min(b.N-done, benchBatch)
		b.StopTimer()
		for i := range pbs[:n] {
			pb := schemas.Postback{V: schemas.Version, EventID: schemas.NewID(now), ClickID: ids[rng.IntN(clicks)],
				TS: now.UnixMilli(), AdvertiserID: 1, IP: "198.51.100.1"}
			if i%3 == 0 {
				pb.Goal, pb.Amount, pb.TxnID = "sale", "19.99", strconv.Itoa(done+i)
			}
			pbs[i] = pb.AppendJSON(pbs[i][:0])
		}
		b.StartTimer()
		w := bp.p.begin()
		for i, v := range pbs[:n] {
			if err := bp.p.addPostback(w, bp.cat, int64(done+i), nil, v, now); err != nil {
				b.Fatal(err)
			}
		}
		out := w.out
		if err := bp.p.commit(w); err != nil {
			b.Fatal(err)
		}
		if err := bp.p.acked(out); err != nil {
			b.Fatal(err)
		}
		done += n
	}
	b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "postbacks/s")
}

// BenchmarkClickStore10M stores TRACKSTAR_BENCH_CLICKS clicks (default
// 200k; the target figure is for 10 million, all inside the window) in one
// run and reports the throughput, the peak resident memory of the process
// and the store's size on disk. Goal: peak RSS under 500 MB and at least
// 100k clicks/s per core.
func BenchmarkClickStore10M(b *testing.B) {
	total := 200_000
	if s := os.Getenv("TRACKSTAR_BENCH_CLICKS"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n <= 0 {
			b.Fatalf("TRACKSTAR_BENCH_CLICKS=%q: want a positive number", s)
		}
		total = n
	}
	b.ReportAllocs()
	for b.Loop() {
		rng := rand.New(rand.NewPCG(5, 6))
		bp := newBenchPartition(b)
		// Clicks spread over the last 30 days, in time order as they arrive.
		first := time.Now().Add(-720 * time.Hour)
		step := 720 * time.Hour / time.Duration(total)
		values := make([][]byte, benchBatch)
		probe := map[int]string{0: "", total / 2: "", total - 1: ""}
		var stored time.Duration
		for done := 0; done < total; {
			n := min(total-done, benchBatch)
			for i := range values[:n] {
				c := benchClick(rng, first.Add(time.Duration(done+i)*step))
				values[i] = c.AppendJSON(values[i][:0])
				if _, ok := probe[done+i]; ok {
					probe[done+i] = c.ClickID
				}
			}
			t0 := time.Now()
			bp.addClicks(b, values[:n], int64(done))
			stored += time.Since(t0)
			done += n
		}
		if err := bp.db.Flush(); err != nil {
			b.Fatal(err)
		}
		w := bp.p.begin()
		for i, id := range probe {
			if _, found, err := bp.p.click(w, id); !found || err != nil {
				b.Fatalf("click %d of %d not found (%v)", i, total, err)
			}
		}
		w.b.Close()
		b.ReportMetric(float64(total)/stored.Seconds(), "clicks/s")
		b.ReportMetric(float64(peakRSS())/(1<<20), "peak-RSS-MB")
		b.ReportMetric(float64(bp.db.Metrics().DiskSpaceUsage())/(1<<20), "store-MB")
		b.ReportMetric(float64(total), "clicks")
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		b.ReportMetric(float64(ms.HeapInuse)/(1<<20), "go-heap-MB")
		bp.close()
	}
}

// peakRSS returns the process's peak resident set size in bytes (VmHWM),
// or 0 where /proc is not there.
func peakRSS() int64 {
	f, err := os.Open("/proc/self/status")
	if err != nil {
		return 0
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		if rest, ok := bytes.CutPrefix(s.Bytes(), []byte("VmHWM:")); ok {
			var kb int64
			fmt.Sscan(string(rest), &kb)
			return kb << 10
		}
	}
	return 0
}
