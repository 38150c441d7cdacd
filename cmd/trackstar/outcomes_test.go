package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/segmentio/kafka-go"

	"github.com/trackstar/trackstar/internal/bus"
	"github.com/trackstar/trackstar/internal/warehouse"
	"github.com/trackstar/trackstar/schemas"
)

// TestEndToEndEveryOutcome sends a few thousand clicks and postbacks through
// the edge of `trackstar all`, n of each scenario below, and checks that
// ClickHouse holds exactly the conversions each one must produce, and that
// the report views agree.
func TestEndToEndEveryOutcome(t *testing.T) {
	const n = 150
	edge, broker, chAddr, db := startAll(t, "testdata/outcomes.yaml", "")
	base := "http://" + edge
	client := &http.Client{
		Timeout:       30 * time.Second,
		Transport:     &http.Transport{MaxIdleConnsPerHost: 64},
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}

	click := func(offer int) string {
		resp, err := client.Get(fmt.Sprintf("%s/click?offer_id=%d&aff_id=7&sub1=e2e", base, offer))
		if err != nil {
			t.Error(err)
			return ""
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		loc, _ := url.Parse(resp.Header.Get("Location"))
		id := ""
		if loc != nil {
			id = loc.Query().Get("click_id")
		}
		if resp.StatusCode != http.StatusFound || !schemas.ValidID(id) {
			t.Errorf("click on offer %d: %d %q", offer, resp.StatusCode, resp.Header.Get("Location"))
		}
		return id
	}
	postback := func(clickID, token string, params ...string) {
		q := url.Values{"click_id": {clickID}, "token": {token}, "amount": {"0"}}
		for i := 0; i+1 < len(params); i += 2 {
			q.Set(params[i], params[i+1])
		}
		resp, err := client.Get(base + "/postback?" + q.Encode())
		if err != nil {
			t.Error(err)
			return
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Errorf("postback %s: %d %s", q.Encode(), resp.StatusCode, body)
		}
	}

	// What the last scenario puts in Kafka as if from two edges' spools.
	var drained struct {
		sync.Mutex
		msgs []kafka.Message
	}

	// Each scenario runs n times, each run one goroutine: its requests in
	// order, as an advertiser would send them.
	scenarios := map[string]func(){
		"approved": func() { postback(click(1), "adv-one") },
		"pending then approved": func() {
			id := click(1)
			postback(id, "adv-one", "status", "pending")
			postback(id, "adv-one", "status", "approved")
		},
		"repeated": func() {
			id := click(1)
			postback(id, "adv-one")
			postback(id, "adv-one")
		},
		"advertiser rejected": func() { postback(click(1), "adv-one", "status", "rejected") },
		"unknown goal":        func() { postback(click(1), "adv-one", "goal", "nope") },
		"other advertiser":    func() { postback(click(1), "adv-two") },
		"sales": func() {
			// Order IDs are the advertiser's: unique per order, so per click here
			// (one txn_id counts once per offer and goal, whatever the click).
			id := click(1)
			postback(id, "adv-one", "goal", "sale", "txn_id", id+"-1", "amount", "19.99")
			postback(id, "adv-one", "goal", "sale", "txn_id", id+"-2", "amount", "19.99")
			postback(id, "adv-one", "goal", "sale", "txn_id", id+"-1", "amount", "19.99")
		},
		"too fast":      func() { postback(click(3), "adv-one") },
		"unknown click": func() { postback(schemas.NewID(time.Now()), "adv-one") },
		"two spools drained in the other order": func() {
			// A pending and then its approval, taken by two edges while
			// Kafka was down: the approval's edge drained first. What
			// reaches Kafka is what the edges' spools hold.
			// The two edges took them within a millisecond (mostly the
			// same one), as a quick advertiser's two requests are.
			id := click(1)
			t0 := time.Now().Truncate(time.Millisecond)
			pending := schemas.Postback{V: schemas.Version, EventID: schemas.NewID(t0), ClickID: id,
				TS: t0.UnixMilli(), TSNanos: t0.UnixNano(), AdvertiserID: 1, Amount: "0", Status: schemas.StatusPending, Spooled: true}
			t1 := t0.Add(300 * time.Microsecond)
			approved := pending
			approved.EventID, approved.TS, approved.TSNanos, approved.Status = schemas.NewID(t1), t1.UnixMilli(), t1.UnixNano(), schemas.StatusApproved
			drained.Lock()
			defer drained.Unlock()
			for _, pb := range []schemas.Postback{approved, pending} {
				drained.msgs = append(drained.msgs, kafka.Message{Key: []byte(id), Value: pb.AppendJSON(nil)})
			}
		},
	}
	sem := make(chan struct{}, 32)
	var wg sync.WaitGroup
	run := func(f func()) {
		for i := 0; i < n; i++ {
			wg.Add(1)
			sem <- struct{}{}
			go func() {
				defer func() { <-sem; wg.Done() }()
				f()
			}()
		}
	}
	// Expired: clicks first, postbacks once the 2s window has passed.
	expiring := make([]string, n)
	for i := range expiring {
		expiring[i] = click(2)
	}
	started := time.Now()
	for _, f := range scenarios {
		run(f)
	}
	wg.Wait()
	w := bus.NewWriter(bus.WriterConfig{Brokers: []string{broker}, Topic: bus.TopicPostbacks})
	if err := w.WriteMessages(context.Background(), drained.msgs...); err != nil {
		t.Fatalf("cannot produce the drained postbacks: %v", err)
	}
	w.Close()
	time.Sleep(time.Until(started.Add(2500 * time.Millisecond)))
	for _, id := range expiring {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			postback(id, "adv-one")
		}()
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	conn, err := warehouse.Open(ctx, chAddr, db)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()

	amount := func(s string) uint64 {
		a, err := schemas.ParseAmount(s)
		if err != nil {
			t.Fatal(err)
		}
		return uint64(a.Units())
	}
	// approved: approved, pending then approved, the first of repeated, two
	// sales, the approval drained first; revenue 2.5 each (10% of 19.99 =
	// 1.999 for a sale), payout 1.75 each (7% of 19.99 = 1.3993).
	wantRevenue := n * (4*amount("2.5") + 2*amount("1.999"))
	wantPayout := n * (4*amount("1.75") + 2*amount("1.3993"))
	want := []struct {
		query string
		n     uint64
	}{
		{"SELECT count() FROM clicks FINAL", 10 * n},
		{"SELECT count() FROM conversions FINAL", 15 * n},
		{"SELECT count() FROM conversions FINAL WHERE status = 'approved'", 6 * n},
		{"SELECT count() FROM conversions FINAL WHERE status = 'approved' AND version = 2", n},
		{"SELECT count() FROM conversions FINAL WHERE status = 'pending'", 0},
		{"SELECT count() FROM conversions FINAL WHERE reject_reason = 'duplicate'", 2 * n},
		{"SELECT count() FROM conversions FINAL WHERE reject_reason = 'advertiser_rejected'", n},
		{"SELECT count() FROM conversions FINAL WHERE reject_reason = 'unknown_goal'", n},
		{"SELECT count() FROM conversions FINAL WHERE reject_reason = 'advertiser_mismatch'", n},
		{"SELECT count() FROM conversions FINAL WHERE reject_reason = 'ctit_too_short'", n},
		{"SELECT count() FROM conversions FINAL WHERE reject_reason = 'expired'", n},
		{"SELECT count() FROM conversions FINAL WHERE reject_reason = 'unknown_click'", n},
		{"SELECT count() FROM conversions FINAL WHERE reject_reason = 'superseded' AND status = 'rejected'", n},
		{"SELECT count() FROM conversions FINAL WHERE status = 'approved' AND goal = 'sale' AND payout = toDecimal64('1.3993', 4)", 2 * n},
		{"SELECT toUInt64(sum(revenue) * 10000) FROM conversions FINAL WHERE status = 'approved'", wantRevenue},
		{"SELECT toUInt64(sum(payout) * 10000) FROM conversions FINAL WHERE status = 'approved'", wantPayout},
		{"SELECT toUInt64(sum(clicks)) FROM report_daily", 10 * n},
		{"SELECT toUInt64(sum(conversions)) FROM report_daily", 6 * n},
		{"SELECT toUInt64(sum(rejected)) FROM report_daily", 9 * n},
		{"SELECT toUInt64(sum(revenue) * 10000) FROM report_daily", wantRevenue},
		{"SELECT toUInt64(sum(payout) * 10000) FROM report_hourly", wantPayout},
	}
	var mismatch []string
	waitUntil(t, 90*time.Second, "ClickHouse holds every expected conversion", func() bool {
		mismatch = mismatch[:0]
		for _, w := range want {
			var got uint64
			if err := conn.QueryRow(ctx, w.query).Scan(&got); err != nil {
				t.Fatalf("%s: %v", w.query, err)
			}
			if got != w.n {
				mismatch = append(mismatch, fmt.Sprintf("%s = %d, want %d", w.query, got, w.n))
			}
		}
		return len(mismatch) == 0
	}, func() {
		t.Logf("still different:\n%s", strings.Join(mismatch, "\n"))
		rows, err := conn.Query(ctx, "SELECT goal, status, reject_reason, toString(payout), count() FROM conversions FINAL GROUP BY goal, status, reject_reason, payout ORDER BY goal, status, reject_reason")
		if err != nil {
			t.Fatal(err)
		}
		defer rows.Close()
		for rows.Next() {
			var goal, status, reason, payout string
			var c uint64
			if err := rows.Scan(&goal, &status, &reason, &payout, &c); err != nil {
				t.Fatal(err)
			}
			t.Logf("goal=%q status=%s reason=%q payout=%s: %d", goal, status, reason, payout, c)
		}
	})
}
