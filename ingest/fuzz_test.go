package ingest

import (
	"net/netip"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/valyala/fasthttp"

	"github.com/trackstar/trackstar/internal/catalog"
	"github.com/trackstar/trackstar/schemas"
)

// The seeds run in every `go test`; `go test -fuzz FuzzParsePostback
// ./ingest` explores further.
func FuzzParsePostback(f *testing.F) {
	id := "01m8h3sky1pqsmh9dvvknffcrt"
	for _, s := range []struct {
		query, body string
		goalRoute   bool
	}{
		{"click_id=" + id + "&token=t", "", false},
		{"click_id=" + id + "&amount=0&token=t", "", false},
		{"transaction_id=" + strings.ToUpper(id) + "&amount=19.99&currency=usd&status=Pending", "", false},
		{"", "cid=" + id + "&sum=0.0001&txn_id=a%20b&goal=sale", false},
		{"a=lsr&goal_id=lead&transaction_id=" + id, "adv_sub=x&amount=2", true},
		{"a=lsr", "", true},
		{"click_id=" + id + "&amount=-1", "", false},
		{"click_id=" + id + "&amount=1e9", "", false},
		{"click_id=" + id + "&amount=99999999999999999999", "", false},
		{"click_id=" + id + "&amount=922337203685477.5807", "", false},
		{"click_id=" + id + "&amount=99999999999999.9999", "", false},
		{"click_id=" + id + "&amount=1&currency=%FF%FEx", "", false},
		{"click_id=" + id + "&amount=1&goal=%ff%fe%00", "", false},
		{"click_id=%00&&&===&%", "%zz", false},
		{"subid=" + id + "&amount=1&event=" + strings.Repeat("g", 501), "", false},
	} {
		f.Add(s.query, s.body, s.goalRoute)
	}
	f.Fuzz(func(t *testing.T, query, body string, goalRoute bool) {
		var q, b fasthttp.Args
		q.Parse(query)
		var form *fasthttp.Args
		if body != "" {
			b.Parse(body)
			form = &b
		}
		req, rerr := parsePostback(&q, form, goalRoute, 500)
		if rerr != nil {
			if rerr.status != 400 || rerr.field == "" || rerr.msg == "" {
				t.Fatalf("refusal without a status, field or message: %+v", rerr)
			}
			return
		}
		if !schemas.ValidID(req.clickID) {
			t.Fatalf("accepted click ID %q", req.clickID)
		}
		if req.amount < 0 || req.amount > schemas.MaxAmount {
			t.Fatalf("accepted amount %v, outside 0..MaxAmount", req.amount)
		}
		if len(req.goal) > 500 || len(req.txnID) > 500 || goalRoute && len(req.goal) == 0 {
			t.Fatalf("accepted goal %q, txn_id %q", req.goal, req.txnID)
		}
		switch req.status {
		case schemas.StatusApproved, schemas.StatusPending, schemas.StatusRejected:
		default:
			t.Fatalf("accepted status %q", req.status)
		}
		if c := req.currency; c != [3]byte{} && (c[0] < 'A' || c[0] > 'Z' || c[1] < 'A' || c[1] > 'Z' || c[2] < 'A' || c[2] > 'Z') {
			t.Fatalf("accepted currency %q", c)
		}

		// What is accepted encodes to a record every consumer decodes.
		ev := &event{}
		now := time.UnixMilli(1_700_000_000_123)
		buildPostback(ev, &req, 3, netip.MustParseAddr("2001:db8::7"), now)
		p, err := schemas.DecodePostback(ev.value)
		if err != nil {
			t.Fatalf("record %s does not decode: %v", ev.value, err)
		}
		if p.ClickID != strings.ToLower(string(req.clickID)) || string(ev.key) != p.ClickID || p.EventID != string(ev.id) ||
			p.TS != now.UnixMilli() || p.AdvertiserID != 3 || p.Status != req.status || p.IP != "2001:db8::7" {
			t.Fatalf("record %+v from %+v", p, req)
		}
		if a, err := schemas.ParseAmount(p.Amount); err != nil || a != req.amount {
			t.Fatalf("amount %q in the record, %v parsed", p.Amount, req.amount)
		}
		// Recorded exactly as sent: what cannot be is refused.
		if p.Goal != string(req.goal) || p.TxnID != string(req.txnID) {
			t.Fatalf("goal %q / txn_id %q became %q / %q", req.goal, req.txnID, p.Goal, p.TxnID)
		}
	})
}

func FuzzParseClick(f *testing.F) {
	cat, err := catalog.Parse([]byte(testConfig), "test.yaml")
	if err != nil {
		f.Fatal(err)
	}
	offer := cat.Offer(1)
	for _, s := range []struct {
		query     string
		hasOffers bool
	}{
		{"offer_id=1&aff_id=7&sub1=a+b&sub2=%26%3D&source=x", false},
		{"offer_id=1&aff_id=7&aff_sub=1&aff_sub5=%E6%97%A5", true},
		{"offer_id=01&aff_id=4294967295&sub3=%ff%00", false},
		{"offer_id=4294967296&aff_id=7", false},
		{"offer_id=&aff_id=7", false},
		{"offer_id=1&aff_id=7&sub1=" + strings.Repeat("z", 501), false},
		{"offer_id=1&aff_id=7&source=%0d%0aLocation:%20evil", false},
	} {
		f.Add(s.query, s.hasOffers)
	}
	f.Fuzz(func(t *testing.T, query string, hasOffers bool) {
		var args fasthttp.Args
		args.Parse(query)
		req, rerr := parseClick(&args, hasOffers, 500)
		if rerr != nil {
			if rerr.status != 400 || rerr.field == "" || rerr.msg == "" {
				t.Fatalf("refusal without a status, field or message: %+v", rerr)
			}
			return
		}
		if req.offerID == 0 || req.affID == 0 || len(req.source) > 500 {
			t.Fatalf("accepted %+v", req)
		}
		for _, s := range req.sub {
			if len(s) > 500 {
				t.Fatalf("accepted a sub of %d bytes", len(s))
			}
		}

		ev := &event{}
		now := time.UnixMilli(1_700_000_000_123)
		buildClick(ev, &req, offer, netip.MustParseAddr("192.0.2.1"), []byte("ua"), []byte("ref"), now)
		c, err := schemas.DecodeClick(ev.value)
		if err != nil {
			t.Fatalf("record %s does not decode: %v", ev.value, err)
		}
		if c.ClickID != string(ev.key) || c.TS != now.UnixMilli() || c.OfferID != req.offerID || c.AffID != req.affID || c.IP != "192.0.2.1" {
			t.Fatalf("record %+v from %+v", c, req)
		}
		// Recorded exactly as sent: what cannot be is refused.
		if got := [...]string{c.Sub1, c.Sub2, c.Sub3, c.Sub4, c.Sub5, c.Source}; got != [...]string{string(req.sub[0]),
			string(req.sub[1]), string(req.sub[2]), string(req.sub[3]), string(req.sub[4]), string(req.source)} {
			t.Fatalf("subs and source %q recorded as %q", append(req.sub[:], req.source), got)
		}
		// The redirect is one URL whose parameters carry exactly what was
		// sent: no value can break out of its macro.
		loc := string(ev.text)
		if strings.ContainsAny(loc, " \r\n\t") {
			t.Fatalf("Location %q has whitespace", loc)
		}
		u, err := url.Parse(loc)
		if err != nil || u.Host != "shop.example" {
			t.Fatalf("Location %q: %v", loc, err)
		}
		vals, err := url.ParseQuery(u.RawQuery)
		if err != nil {
			t.Fatalf("Location %q: %v", loc, err)
		}
		for i, s := range req.sub {
			for _, name := range []string{"s", "as"} {
				key := name + string(rune('1'+i))
				if got := vals[key]; len(got) != 1 || got[0] != string(s) {
					t.Fatalf("Location %q: %s = %q, want %q", loc, key, got, s)
				}
			}
		}
		if got := vals.Get("src"); got != string(req.source) || vals.Get("c") != c.ClickID || len(vals) != 16 {
			t.Fatalf("Location %q: src %q, c %q, %d parameters", loc, got, vals.Get("c"), len(vals))
		}
	})
}
