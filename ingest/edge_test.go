package ingest

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/valyala/fasthttp"

	"github.com/trackstar/trackstar/internal/bus"
	"github.com/trackstar/trackstar/internal/catalog"
	"github.com/trackstar/trackstar/internal/testenv"
	"github.com/trackstar/trackstar/schemas"
)

func TestClickRedirectsWithEveryMacro(t *testing.T) {
	broker := testenv.KafkaTopics(t, testPartitions)
	te := startEdge(t, broker, t.TempDir(), nil)

	// Values that need escaping: space, &, =, #, %, +, /, ?, quotes,
	// non-ASCII and a control character.
	subs := []string{"a b&c=d", "50%+1", "x/y?z#w", `"quoted" é 日本`, "tab\there"}
	type sent struct {
		route, query string
		subs         [5]string
		source       string
	}
	var cases []sent
	q := url.Values{"offer_id": {"1"}, "aff_id": {"7"}, "source": {"news letter"}}
	for i, s := range subs {
		q.Set(fmt.Sprintf("sub%d", i+1), s)
	}
	cases = append(cases, sent{"/click", q.Encode(), [5]string(subs), "news letter"})
	// The HasOffers route names its subs aff_sub..aff_sub5.
	q = url.Values{"offer_id": {"1"}, "aff_id": {"8"}, "source": {"ho"}}
	for i, name := range []string{"aff_sub", "aff_sub2", "aff_sub3", "aff_sub4", "aff_sub5"} {
		q.Set(name, subs[4-i])
	}
	cases = append(cases, sent{"/aff_c", q.Encode(), [5]string{subs[4], subs[3], subs[2], subs[1], subs[0]}, "ho"})
	// Each route takes the other's names too; its own win.
	cases = append(cases, sent{"/click", "offer_id=1&aff_id=7&aff_sub=other&sub2=own&aff_sub2=lost", [5]string{"other", "own"}, ""})
	cases = append(cases, sent{"/aff_c", "offer_id=1&aff_id=7&sub1=other&aff_sub2=own&sub2=lost", [5]string{"other", "own"}, ""})

	var ids []string
	wantByID := map[string]sent{}
	for _, c := range cases {
		before := time.Now().UnixMilli()
		r := do(t, "GET", te.url+c.route+"?"+c.query, "", "", map[string]string{
			"User-Agent": "Mozilla/5.0 (test) \"quoted\"",
			"Referer":    "https://news.example/story?id=1",
		})
		if r.code != 302 {
			t.Fatalf("GET %s?%s = %d %q, want 302", c.route, c.query, r.code, r.body)
		}
		id := clickIDOf(t, r.location)
		if !schemas.ValidID(id) || len(id) > 32 {
			t.Fatalf("click ID %q is not a valid ID", id)
		}
		if ts, _ := schemas.IDTime(id); ts < before || ts > time.Now().UnixMilli() {
			t.Fatalf("click ID %q embeds %d, not the time of the click", id, ts)
		}
		aff := "7"
		if strings.Contains(c.query, "aff_id=8") {
			aff = "8"
		}
		esc := func(s string) string { return strings.ReplaceAll(url.QueryEscape(s), "+", "%20") }
		want := "https://shop.example/land?c=" + id + "&t=" + id + "&o=1&a=" + aff + "&af=" + aff
		for i, s := range c.subs {
			want += fmt.Sprintf("&s%d=%s", i+1, esc(s))
		}
		for i, s := range c.subs {
			want += fmt.Sprintf("&as%d=%s", i+1, esc(s))
		}
		want += "&src=" + esc(c.source)
		if r.location != want {
			t.Fatalf("GET %s?%s redirected to\n%s\nwant\n%s", c.route, c.query, r.location, want)
		}
		ids = append(ids, id)
		wantByID[id] = c
	}

	recs := waitRecords(t, broker, bus.TopicClicks, ids)
	for _, id := range ids {
		m := recs[id]
		c, err := schemas.DecodeClick(m.Value)
		if err != nil {
			t.Fatalf("click record %s: %v", m.Value, err)
		}
		if p := bus.PartitionFor(m.Key, testPartitions); m.Partition != p {
			t.Fatalf("click %s in partition %d, want %d", id, m.Partition, p)
		}
		s := wantByID[id]
		ts, _ := schemas.IDTime(id)
		want := schemas.Click{
			V: 1, ClickID: id, TS: ts, OfferID: 1, AdvertiserID: 1, AffID: c.AffID,
			Source: s.source, Sub1: s.subs[0], Sub2: s.subs[1], Sub3: s.subs[2], Sub4: s.subs[3], Sub5: s.subs[4],
			IP: "127.0.0.1", UserAgent: "Mozilla/5.0 (test) \"quoted\"", Referer: "https://news.example/story?id=1",
		}
		if c != want {
			t.Fatalf("click record\n%+v\nwant\n%+v", c, want)
		}
	}
}

func TestClientIP(t *testing.T) {
	broker := testenv.KafkaTopics(t, testPartitions)
	direct := startEdge(t, broker, t.TempDir(), nil)
	proxied := startEdge(t, broker, t.TempDir(), func(c *Config) { c.TrustProxy = true })

	f := func(te *testEdge, xff, wantIP string) {
		t.Helper()
		r := do(t, "GET", te.url+"/click?offer_id=2&aff_id=7", "", "", map[string]string{"X-Forwarded-For": xff})
		if r.code != 302 {
			t.Fatalf("click: %d %s", r.code, r.body)
		}
		id := clickIDOf(t, r.location)
		c, err := schemas.DecodeClick(waitRecords(t, broker, bus.TopicClicks, []string{id})[id].Value)
		if err != nil {
			t.Fatal(err)
		}
		if c.IP != wantIP {
			t.Fatalf("X-Forwarded-For %q: click IP %q, want %q", xff, c.IP, wantIP)
		}
	}
	f(direct, "198.51.100.7", "127.0.0.1")
	f(proxied, "198.51.100.7", "198.51.100.7")
	// Only the entry the proxy appended counts; the client wrote the rest.
	f(proxied, "203.0.113.5, 198.51.100.7", "198.51.100.7")
	f(proxied, "2001:db8::1", "2001:db8::1")
	f(proxied, "::ffff:198.51.100.9", "198.51.100.9")
	f(proxied, "garbage", "127.0.0.1")
	// A proxy that adds its own header line (HAProxy) after the client's.
	host := strings.TrimPrefix(proxied.url, "http://")
	r := rawRequest(t, host, "GET /click?offer_id=2&aff_id=7 HTTP/1.1\r\nHost: x\r\n"+
		"X-Forwarded-For: 203.0.113.5\r\nX-Forwarded-For: 198.51.100.8\r\nConnection: close\r\n\r\n")
	if r.code != 302 {
		t.Fatalf("click: %d %s", r.code, r.body)
	}
	id := clickIDOf(t, r.header.Get("Location"))
	if c, _ := schemas.DecodeClick(waitRecords(t, broker, bus.TopicClicks, []string{id})[id].Value); c.IP != "198.51.100.8" {
		t.Fatalf("two X-Forwarded-For lines: click IP %q, want the last line's 198.51.100.8", c.IP)
	}

	// allowed_ips judges the same address.
	id = schemas.NewID(time.Now())
	pb := func(te *testEdge, xff string) int {
		t.Helper()
		return do(t, "GET", te.url+"/postback?amount=0&click_id="+id+"&token=locked-token", "", "", map[string]string{"X-Forwarded-For": xff}).code
	}
	if code := pb(direct, "203.0.113.5"); code != 403 {
		t.Fatalf("postback from 127.0.0.1 claiming 203.0.113.5 without TrustProxy: %d, want 403", code)
	}
	if code := pb(proxied, "203.0.113.5"); code != 200 {
		t.Fatalf("postback via proxy from 203.0.113.5: %d, want 200", code)
	}
	if code := pb(proxied, "203.0.113.5, 198.51.100.7"); code != 403 {
		t.Fatalf("postback via proxy from 198.51.100.7 claiming 203.0.113.5: %d, want 403", code)
	}
}

func TestPostbackAliasesAndFields(t *testing.T) {
	broker := testenv.KafkaTopics(t, testPartitions)
	te := startEdge(t, broker, t.TempDir(), nil)

	type want struct {
		goal, amount, currency, txnID, status string
		advertiser                            uint32
	}
	var eventIDs []string
	wants := map[string]want{}
	clickIDs := map[string]string{}
	f := func(method, path, query, contentType, body string, w want) {
		t.Helper()
		clickID := schemas.NewID(time.Now())
		fill := func(s string) string { return strings.ReplaceAll(s, "CID", clickID) }
		u := te.url + path
		if query != "" {
			u += "?" + fill(query)
		}
		r := do(t, method, u, contentType, fill(body), nil)
		if r.code != 200 {
			t.Fatalf("%s %s %s = %d %s, want 200", method, u, body, r.code, r.body)
		}
		if ct := r.header.Get("Content-Type"); ct != "application/json" {
			t.Fatalf("Content-Type %q", ct)
		}
		var got struct {
			Status  string `json:"status"`
			EventID string `json:"event_id"`
		}
		if err := json.Unmarshal([]byte(r.body), &got); err != nil || got.Status != "accepted" || !schemas.ValidID(got.EventID) {
			t.Fatalf("%s %s: body %q (%v)", method, u, r.body, err)
		}
		eventIDs = append(eventIDs, got.EventID)
		if w.status == "" {
			w.status = "approved"
		}
		if w.advertiser == 0 {
			w.advertiser = 1
		}
		wants[got.EventID] = w
		clickIDs[got.EventID] = strings.ToLower(clickID)
	}
	// Every alias of click_id.
	for _, name := range []string{"click_id", "transaction_id", "clickid", "cid", "subid"} {
		f("GET", "/postback", name+"=CID&token=shop-token&amount=0", "", "", want{amount: "0"})
	}
	// Every alias of goal, amount, txn_id and token.
	for _, name := range []string{"goal", "goal_id", "event"} {
		f("GET", "/postback", "click_id=CID&token=shop-token&amount=0&"+name+"=sale", "", "", want{goal: "sale", amount: "0"})
	}
	for _, name := range []string{"amount", "sum", "sale_amount"} {
		f("GET", "/postback", "click_id=CID&token=shop-token&"+name+"=019.990", "", "", want{amount: "19.99"})
	}
	for _, name := range []string{"txn_id", "order_id", "tid", "txid", "adv_sub"} {
		f("GET", "/postback", "click_id=CID&token=shop-token&amount=0&"+name+"=T-1%20x", "", "", want{txnID: "T-1 x", amount: "0"})
	}
	for _, name := range []string{"token", "security_token", "verification_token"} {
		f("GET", "/postback", "click_id=CID&amount=0&"+name+"=shop-token", "", "", want{amount: "0"})
	}
	// Everything at once, normalised: the amount, the currency's case, the
	// status's case, an upper-case click ID (stored lower case).
	f("GET", "/postback", "click_id=CID&token=shop-token&goal=sale&amount=%2B5.5000&currency=eur&txn_id=o-9&status=PENDING", "", "",
		want{goal: "sale", amount: "5.5", currency: "EUR", txnID: "o-9", status: "pending"})
	f("GET", "/postback", "click_id=CID&token=shop-token&status=rejected&amount=0", "", "", want{status: "rejected", amount: "0"})
	// Empty values count as absent, so an unfilled macro does not shadow an alias.
	f("GET", "/postback", "click_id=&cid=CID&amount=&sum=3&token=shop-token", "", "", want{amount: "3"})
	// POST: a form body, a body without a content type, and body over query.
	f("POST", "/postback", "", "application/x-www-form-urlencoded", "click_id=CID&token=shop-token&amount=12.34&currency=USD", want{amount: "12.34", currency: "USD"})
	f("POST", "/postback", "", "", "clickid=CID&security_token=shop-token&goal=sale&sum=2", want{goal: "sale", amount: "2"})
	f("POST", "/postback", "goal=query&amount=1", "application/x-www-form-urlencoded; charset=utf-8", "click_id=CID&token=shop-token&goal=body", want{goal: "body", amount: "1"})
	// HasOffers paths.
	f("GET", "/aff_lsr", "transaction_id=CID&amount=7.25&adv_sub=ord-1&security_token=shop-token", "", "", want{amount: "7.25", txnID: "ord-1"})
	f("GET", "/aff_goal", "a=lsr&goal_id=sale&transaction_id=CID&amount=100&adv_sub=ord-2&security_token=shop-token", "", "", want{goal: "sale", amount: "100", txnID: "ord-2"})
	f("POST", "/aff_goal", "a=lsr", "application/x-www-form-urlencoded", "goal_id=lead&transaction_id=CID&security_token=shop-token&amount=0", want{goal: "lead", amount: "0"})
	// The upper-case spelling of a click ID is the same click.
	f("GET", "/postback", "click_id=CID&token=shop-token&amount=0", "", "", want{amount: "0"})
	clickIDs[eventIDs[len(eventIDs)-1]] = strings.ToLower(clickIDs[eventIDs[len(eventIDs)-1]])

	var keys []string
	for _, e := range eventIDs {
		keys = append(keys, clickIDs[e])
	}
	waitRecords(t, broker, bus.TopicPostbacks, keys)
	byEvent := map[string]schemas.Postback{}
	for _, m := range readTopic(t, broker, bus.TopicPostbacks) {
		p, err := schemas.DecodePostback(m.Value)
		if err != nil {
			t.Fatalf("postback record %s: %v", m.Value, err)
		}
		if string(m.Key) != p.ClickID {
			t.Fatalf("postback keyed %q carries click_id %q", m.Key, p.ClickID)
		}
		if part := bus.PartitionFor(m.Key, testPartitions); m.Partition != part {
			t.Fatalf("postback for %s in partition %d, want %d", p.ClickID, m.Partition, part)
		}
		byEvent[p.EventID] = p
	}
	for _, e := range eventIDs {
		p, ok := byEvent[e]
		if !ok {
			t.Fatalf("no postback record with event_id %s", e)
		}
		ts, _ := schemas.IDTime(e)
		w := wants[e]
		want := schemas.Postback{V: 1, EventID: e, ClickID: clickIDs[e], TS: ts, AdvertiserID: w.advertiser,
			Goal: w.goal, Amount: w.amount, Currency: w.currency, TxnID: w.txnID, Status: w.status, IP: "127.0.0.1"}
		// The same time to the nanosecond, for ordering status updates.
		if p.TSNanos/1e6 != p.TS {
			t.Fatalf("postback %s: ts_ns %d is not ts %d", e, p.TSNanos, p.TS)
		}
		p.TSNanos = 0
		if p != want {
			t.Fatalf("postback record\n%+v\nwant\n%+v", p, want)
		}
	}
}

func TestUpperCaseClickIDKeysLikeItsClick(t *testing.T) {
	broker := testenv.KafkaTopics(t, testPartitions)
	te := startEdge(t, broker, t.TempDir(), nil)
	r := get(t, te.url+"/click?offer_id=1&aff_id=7")
	id := clickIDOf(t, r.location)
	r = get(t, te.url+"/postback?token=shop-token&amount=0&click_id="+strings.ToUpper(id))
	if r.code != 200 {
		t.Fatalf("postback: %d %s", r.code, r.body)
	}
	clicks := waitRecords(t, broker, bus.TopicClicks, []string{id})
	pbs := waitRecords(t, broker, bus.TopicPostbacks, []string{id})
	if clicks[id].Partition != pbs[id].Partition {
		t.Fatalf("click in partition %d, its postback in %d", clicks[id].Partition, pbs[id].Partition)
	}
}

func TestRejections(t *testing.T) {
	broker := testenv.KafkaTopics(t, testPartitions)
	te := startEdge(t, broker, t.TempDir(), nil)
	long := strings.Repeat("x", 501)
	id := schemas.NewID(time.Now())

	// Clicks answer in plain text.
	click := func(query string, code int, msg string) {
		t.Helper()
		r := get(t, te.url+"/click?"+query)
		if r.code != code || !strings.Contains(r.body, msg) || !strings.HasPrefix(r.header.Get("Content-Type"), "text/plain") {
			t.Fatalf("GET /click?%s = %d %q (%s), want %d containing %q", query, r.code, r.body, r.header.Get("Content-Type"), code, msg)
		}
		if r.location != "" {
			t.Fatalf("GET /click?%s redirected to %q", query, r.location)
		}
	}
	click("aff_id=7", 400, "offer_id: missing")
	click("offer_id=abc&aff_id=7", 400, `offer_id: must be a positive integer, got "abc"`)
	click("offer_id=0&aff_id=7", 400, "offer_id: must be a positive integer")
	click("offer_id=4294967296&aff_id=7", 400, "offer_id: must be a positive integer")
	click("offer_id=1", 400, "aff_id: missing")
	click("offer_id=1&aff_id=-7", 400, "aff_id: must be a positive integer")
	click("offer_id=99&aff_id=7", 404, "unknown offer 99")
	click("offer_id=1&aff_id=99", 404, "unknown affiliate 99")
	click("offer_id=1&aff_id=7&sub3="+long, 400, "sub3: longer than 500 bytes")
	click("offer_id=1&aff_id=7&aff_sub5="+long, 400, "aff_sub5: longer than 500 bytes")
	click("offer_id=1&aff_id=7&source="+long, 400, "source: longer than 500 bytes")
	// Not UTF-8 (Latin-1 "été"): recorded, it could only be changed.
	click("offer_id=1&aff_id=7&sub1=%E9t%E9", 400, `sub1: must be UTF-8 text (percent-encode its UTF-8 bytes), got "\xe9t\xe9"`)
	click("offer_id=1&aff_id=7&source=%FF", 400, "source: must be UTF-8 text")
	if r := get(t, te.url+"/click?offer_id=1&aff_id=7&sub1="+strings.Repeat("x", 500)); r.code != 302 {
		t.Fatalf("a sub of exactly 500 bytes: %d %q, want 302", r.code, r.body)
	}

	// Postbacks answer in JSON naming the field.
	pb := func(method, path, query, contentType, body string, code int, field, msg string) {
		t.Helper()
		r := do(t, method, te.url+path+"?"+query, contentType, body, nil)
		var got struct{ Status, Field, Error string }
		if err := json.Unmarshal([]byte(r.body), &got); err != nil {
			t.Fatalf("%s %s?%s: body %q is not JSON: %v", method, path, query, r.body, err)
		}
		if r.code != code || got.Status != "error" || got.Field != field || !strings.Contains(got.Error, msg) {
			t.Fatalf("%s %s?%s = %d %q, want %d field %q containing %q", method, path, query, r.code, r.body, code, field, msg)
		}
	}
	tok := "&token=shop-token"
	pb("GET", "/postback", "amount=1"+tok, "", "", 400, "click_id", "missing; send click_id (or transaction_id, clickid, cid, subid)")
	pb("GET", "/postback", "click_id=not-an-id"+tok, "", "", 400, "click_id", `not a Trackstar click ID (26 characters of base32), got "not-an-id"`)
	pb("GET", "/postback", "cid="+id[:25]+"u"+tok, "", "", 400, "cid", "not a Trackstar click ID")
	pb("GET", "/postback", "click_id="+id+tok, "", "", 400, "amount", "missing; send amount (or sum, sale_amount)")
	pb("GET", "/postback", "click_id="+id+"&sale_amount="+tok, "", "", 400, "amount", "missing")
	pb("GET", "/postback", "click_id="+id+"&amount=12,50"+tok, "", "", 400, "amount", `not a plain decimal number with at most 4 decimal places, got "12,50"`)
	pb("GET", "/postback", "click_id="+id+"&amount=1e3"+tok, "", "", 400, "amount", "not a plain decimal")
	pb("GET", "/postback", "click_id="+id+"&amount=1.23456"+tok, "", "", 400, "amount", "at most 4 decimal places")
	pb("GET", "/postback", "click_id="+id+"&sum=-1"+tok, "", "", 400, "sum", `must not be negative, got "-1"`)
	pb("GET", "/postback", "click_id="+id+"&amount=100000000000000"+tok, "", "", 400, "amount", `must be at most 99999999999999.9999, got "100000000000000"`)
	pb("GET", "/postback", "amount=1&click_id="+id+"&currency=US"+tok, "", "", 400, "currency", "three-letter ISO 4217 code")
	pb("GET", "/postback", "amount=1&click_id="+id+"&currency=U$D"+tok, "", "", 400, "currency", "three-letter ISO 4217 code")
	pb("GET", "/postback", "amount=1&click_id="+id+"&status=paid"+tok, "", "", 400, "status", `must be approved, pending or rejected, got "paid"`)
	pb("GET", "/postback", "amount=1&click_id="+id+"&goal_id="+long+tok, "", "", 400, "goal_id", "longer than 500 bytes")
	pb("GET", "/postback", "amount=1&click_id="+id+"&order_id="+long+tok, "", "", 400, "order_id", "longer than 500 bytes")
	// Two Latin-1 order IDs would be recorded as one txn_id, the second
	// sale then a duplicate.
	pb("GET", "/postback", "amount=1&click_id="+id+"&txn_id=order-%E9"+tok, "", "", 400, "txn_id", `must be UTF-8 text (percent-encode its UTF-8 bytes), got "order-\xe9"`)
	pb("GET", "/postback", "amount=1&click_id="+id+"&goal=%C3"+tok, "", "", 400, "goal", "must be UTF-8 text")
	pb("GET", "/aff_goal", "goal_id=sale&transaction_id="+id+tok, "", "", 400, "a", "must be lsr")
	pb("GET", "/aff_goal", "a=lsr&transaction_id="+id+tok, "", "", 400, "goal_id", "missing")
	pb("GET", "/postback", "amount=1&click_id="+id, "", "", 403, "token", "missing; send token (or security_token, verification_token)")
	pb("GET", "/postback", "amount=1&click_id="+id+"&token=guess", "", "", 403, "token", "unknown token")
	pb("GET", "/postback", "amount=1&click_id="+id+"&token=locked-token", "", "", 403, "ip", "not accepted from 127.0.0.1")
	pb("POST", "/postback", "", "application/json", `{"click_id":"`+id+`"}`, 415, "content-type", "application/x-www-form-urlencoded")

	// Methods, paths and HTTP itself.
	plain := func(r response, code int, msg string) {
		t.Helper()
		if r.code != code || !strings.Contains(r.body, msg) {
			t.Fatalf("got %d %q, want %d containing %q", r.code, r.body, code, msg)
		}
	}
	r := do(t, "POST", te.url+"/click?offer_id=1&aff_id=7", "", "", nil)
	plain(r, 405, "method not allowed; use GET")
	if r.header.Get("Allow") != "GET" {
		t.Fatalf("405 without Allow: GET: %v", r.header)
	}
	pb("PUT", "/postback", "click_id="+id+tok, "", "", 405, "method", "method not allowed; use GET, POST")
	if r := do(t, "PUT", te.url+"/postback?click_id="+id+tok, "", "", nil); r.header.Get("Allow") != "GET, POST" {
		t.Fatalf("405 of a postback without Allow: GET, POST: %v", r.header)
	}
	plain(get(t, te.url+"/nope"), 404, "not found")
	host := strings.TrimPrefix(te.url, "http://")
	plain(rawRequest(t, host, "POST /postback HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 70000\r\n\r\n"+strings.Repeat("a", 70000)),
		413, "request body is larger than 65536 bytes")
	plain(rawRequest(t, host, "GET /click?offer_id=1&aff_id=7 HTTP/1.1\r\nHost: x\r\nX-Big: "+strings.Repeat("b", 9000)+"\r\n\r\n"),
		431, "request line and headers are larger than 8192 bytes")
	plain(rawRequest(t, host, "GET /click HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n"), 400, "malformed HTTP request")

	// None of it was produced: one accepted click and postback later, the
	// topics hold exactly those (and the one 500-byte click above).
	ok := get(t, te.url+"/click?offer_id=2&aff_id=7")
	lastID := clickIDOf(t, ok.location)
	if r := get(t, te.url+"/postback?amount=0&click_id="+lastID+tok); r.code != 200 {
		t.Fatalf("postback: %d %s", r.code, r.body)
	}
	waitRecords(t, broker, bus.TopicClicks, []string{lastID})
	waitRecords(t, broker, bus.TopicPostbacks, []string{lastID})
	if n := len(readTopic(t, broker, bus.TopicClicks)); n != 2 {
		t.Fatalf("clicks topic holds %d records, want 2", n)
	}
	if n := len(readTopic(t, broker, bus.TopicPostbacks)); n != 1 {
		t.Fatalf("postbacks topic holds %d records, want 1", n)
	}

	// The metrics count by route and code.
	f := func(route, code string, want float64) {
		t.Helper()
		if got := metricValue(t, te, "trackstar_edge_requests_total", `route="`+route+`"`, `code="`+code+`"`); got != want {
			t.Fatalf("requests_total{route=%q,code=%q} = %v, want %v", route, code, got, want)
		}
	}
	f("click", "404", 2)
	f("click", "302", 2)
	f("postback", "403", 3)
	f("aff_goal", "400", 2)
	f("invalid", "413", 1)
	f("invalid", "431", 1)
	f("unknown", "404", 1)
}

func TestOpsEndpoints(t *testing.T) {
	broker := testenv.KafkaTopics(t, testPartitions)
	te := startEdge(t, broker, t.TempDir(), nil)
	if r := get(t, te.url+"/healthz"); r.code != 200 || !strings.Contains(r.body, "ok") {
		t.Fatalf("/healthz: %d %q", r.code, r.body)
	}
	if r := get(t, te.url+"/readyz"); r.code != 200 {
		t.Fatalf("/readyz: %d %q", r.code, r.body)
	}
	// In `trackstar all` the roles share one Health. Another role's trouble
	// (the loader without ClickHouse) is shown but must not take the edge
	// out of a load balancer: the edge still lands its events in Kafka.
	te.health.Register("loader", func() error { return errors.New("ClickHouse unreachable") })
	if r := get(t, te.url+"/readyz"); r.code != 200 || !strings.Contains(r.body, "loader: ClickHouse unreachable") {
		t.Fatalf("/readyz with the loader not ready: %d %q, want 200 naming the loader", r.code, r.body)
	}
	if r := get(t, te.url+"/click?offer_id=1&aff_id=7"); r.code != 302 {
		t.Fatalf("click: %d", r.code)
	}
	body := get(t, te.url+"/metrics").body
	for _, series := range []string{
		`trackstar_edge_requests_total{code="302",route="click"} 1`,
		`trackstar_edge_produce_seconds_count{result="acked",topic="trackstar.clicks"} 1`,
		"trackstar_edge_spool_events 0",
		"trackstar_edge_spool_oldest_age_seconds 0",
		"trackstar_edge_spool_active 0",
		"trackstar_edge_panics_total 0",
		"go_goroutines",
		`trackstar_edge_produce_phase_seconds_count{phase="queue"} 1`,
		`trackstar_edge_produce_phase_seconds_count{phase="kafka"} 1`,
		`trackstar_edge_produce_phase_seconds_count{phase="wakeup"} 1`,
	} {
		if !strings.Contains(body, series) {
			t.Fatalf("/metrics lacks %q:\n%s", series, body)
		}
	}
	// The phases split the click's produce time: none is negative, the
	// round trip to Kafka takes some time, and together they are the whole.
	total := metricValue(t, te, "trackstar_edge_produce_seconds_sum", `result="acked"`)
	var phases float64
	for _, ph := range []string{"queue", "kafka", "wakeup"} {
		v := metricValue(t, te, "trackstar_edge_produce_phase_seconds_sum", `phase="`+ph+`"`)
		if v < 0 || (ph == "kafka" && v == 0) {
			t.Errorf("produce phase %s: %g s", ph, v)
		}
		phases += v
	}
	if math.Abs(phases-total) > 1e-6 {
		t.Errorf("produce phases add up to %g s, the produce time is %g s", phases, total)
	}
}

func TestPanicIsRecoveredAndCounted(t *testing.T) {
	broker := testenv.KafkaTopics(t, testPartitions)
	te := startEdge(t, broker, t.TempDir(), nil)
	h := te.edge.guard(func(ctx *fasthttp.RequestCtx) {
		ctx.SetStatusCode(302)
		var offer *catalog.Offer
		_ = offer.URL // a nil dereference, as a bug would have it
	})
	var req fasthttp.Request
	req.SetRequestURI("/click?offer_id=1&aff_id=7")
	var ctx fasthttp.RequestCtx
	ctx.Init(&req, &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)}, nil)
	h(&ctx)
	if code, body := ctx.Response.StatusCode(), string(ctx.Response.Body()); code != 500 || body != "internal error\n" {
		t.Fatalf("panicking handler answered %d %q, want 500", code, body)
	}
	if got := metricValue(t, te, "trackstar_edge_panics_total"); got != 1 {
		t.Fatalf("panics_total = %v, want 1", got)
	}
	if got := metricValue(t, te, "trackstar_edge_requests_total", `route="click"`, `code="500"`); got != 1 {
		t.Fatalf("requests_total{route=click,code=500} = %v, want 1", got)
	}
	if r := get(t, te.url+"/click?offer_id=1&aff_id=7"); r.code != 302 {
		t.Fatalf("click after the panic: %d %q", r.code, r.body)
	}
}
