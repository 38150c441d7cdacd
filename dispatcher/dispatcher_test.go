package dispatcher_test

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/segmentio/kafka-go"

	"github.com/trackstar/trackstar/dispatcher"
	"github.com/trackstar/trackstar/internal/bus"
	"github.com/trackstar/trackstar/internal/testenv"
	"github.com/trackstar/trackstar/schemas"
)

// A partner that fails three times then succeeds gets exactly four
// requests, spaced at least as the schedule says, all with the same
// idempotency key, and exactly one success; each attempt is a delivery
// record on trackstar.deliveries.
func TestFailsThenSucceeds(t *testing.T) {
	const fails = 3
	retries := []time.Duration{100 * time.Millisecond, 200 * time.Millisecond, 300 * time.Millisecond, 400 * time.Millisecond}
	p := newPartner(t, func(w http.ResponseWriter, r *http.Request, nth int) {
		if nth <= fails {
			w.WriteHeader(http.StatusServiceUnavailable)
			w.Write([]byte("try later"))
			return
		}
		w.Write([]byte("ok"))
	})
	addr := testenv.KafkaTopics(t, 2)
	recs := collect(t, addr, bus.TopicDeliveries, 2)
	reg := startDispatcher(t, dispatcher.Config{
		Brokers: []string{addr},
		Catalog: holder(t, true, "2s", "[100ms, 200ms, 300ms, 400ms]",
			affiliate(7, p.srv.URL+"/pb?cid={sub1}&p={payout}&st={status}&tx={conversion_id}&g={goal}")),
	})
	c := newConversion(7)
	produce(t, addr, c)
	waitFor(t, "the delivered record", func() bool { return recs.hasOutcome(t, c.ConversionID, schemas.OutcomeDelivered) })
	waitFor(t, "the dispatcher to settle", func() bool { return settled(t, reg) })

	reqs := p.requestsFor(c.ConversionID)
	if len(reqs) != fails+1 || len(p.requests()) != fails+1 {
		t.Fatalf("partner got %d requests (%d for the conversion), want %d", len(p.requests()), len(reqs), fails+1)
	}
	wantURI := "/pb?cid=" + strings.ReplaceAll(url.QueryEscape(c.Sub1), "+", "%20") + "&p=1.75&st=approved&tx=" + c.ConversionID + "&g=default"
	for i, r := range reqs {
		if r.method != http.MethodGet || r.uri != wantURI {
			t.Fatalf("request %d: %s %s, want GET %s", i+1, r.method, r.uri, wantURI)
		}
		if i > 0 {
			gap := r.at.Sub(reqs[i-1].at)
			t.Logf("attempt %d came %v after attempt %d (schedule: %v)", i+1, gap.Round(time.Millisecond), i, retries[i-1])
			if gap < retries[i-1] {
				t.Fatalf("attempt %d came %v after the previous one; the schedule says wait %v", i+1, gap, retries[i-1])
			}
		}
	}

	ds := recs.deliveries(t, c.ConversionID)
	if len(ds) != fails+1 {
		t.Fatalf("got %d delivery records, want %d: %+v", len(ds), fails+1, ds)
	}
	for i, d := range ds {
		wantOutcome, wantCode := schemas.OutcomeRetrying, uint16(503)
		if i == fails {
			wantOutcome, wantCode = schemas.OutcomeDelivered, 200
		}
		if d.Attempt != uint32(i+1) || d.Outcome != wantOutcome || d.StatusCode != wantCode ||
			d.AffID != 7 || d.Version != 1 || d.Status != schemas.StatusApproved || d.Method != "GET" ||
			d.URL != p.srv.URL+wantURI || d.TS == 0 {
			t.Fatalf("record %d = %+v; want attempt %d, outcome %s, status code %d, URL %s", i, d, i+1, wantOutcome, wantCode, p.srv.URL+wantURI)
		}
		if wantOutcome == schemas.OutcomeRetrying && d.Error != "HTTP 503: try later" {
			t.Fatalf("record %d error = %q, want %q", i, d.Error, "HTTP 503: try later")
		}
		if wantOutcome == schemas.OutcomeDelivered && d.Error != "" {
			t.Fatalf("delivered record has error %q", d.Error)
		}
	}
	if got := metric(t, reg, "trackstar_dispatcher_deliveries_total", "outcome", "retrying"); got != fails {
		t.Fatalf("deliveries_total{outcome=retrying} = %v, want %d", got, fails)
	}
	if got := metric(t, reg, "trackstar_dispatcher_deliveries_total", "outcome", "delivered"); got != 1 {
		t.Fatalf("deliveries_total{outcome=delivered} = %v, want 1", got)
	}
}

// A partner that hangs past the delivery timeout gets its attempt cut off
// and retried.
func TestHangingPartnerTimesOut(t *testing.T) {
	p := newPartner(t, func(w http.ResponseWriter, r *http.Request, nth int) {
		if nth == 1 {
			select {
			case <-r.Context().Done():
			case <-time.After(20 * time.Second):
			}
			return
		}
		w.WriteHeader(http.StatusNoContent)
	})
	addr := testenv.KafkaTopics(t, 1)
	recs := collect(t, addr, bus.TopicDeliveries, 1)
	startDispatcher(t, dispatcher.Config{
		Brokers: []string{addr},
		Catalog: holder(t, true, "300ms", "[100ms]", affiliate(7, p.srv.URL+"/pb?tx={conversion_id}")),
	})
	c := newConversion(7)
	produce(t, addr, c)
	waitFor(t, "the delivered record", func() bool { return recs.hasOutcome(t, c.ConversionID, schemas.OutcomeDelivered) })
	ds := recs.deliveries(t, c.ConversionID)
	if len(ds) != 2 {
		t.Fatalf("got %d delivery records, want 2: %+v", len(ds), ds)
	}
	first := ds[0]
	if first.Outcome != schemas.OutcomeRetrying || first.StatusCode != 0 || first.Error != "timeout after 300ms" ||
		first.DurationMS < 300 || first.DurationMS > 5000 {
		t.Fatalf("first attempt = %+v; want retrying, no status code, a 300ms timeout", first)
	}
	if ds[1].Outcome != schemas.OutcomeDelivered || ds[1].StatusCode != 204 {
		t.Fatalf("second attempt = %+v; want delivered with 204", ds[1])
	}
	if n := len(p.requestsFor(c.ConversionID)); n != 2 {
		t.Fatalf("partner got %d requests, want 2", n)
	}
}

// 4xx other than 429 is final: one request, a failed record with the
// response body, and no retry. A redirect is final too, and not followed.
func TestClientErrorIsFinal(t *testing.T) {
	redirectTarget := newPartner(t, func(w http.ResponseWriter, r *http.Request, nth int) {})
	p := newPartner(t, func(w http.ResponseWriter, r *http.Request, nth int) {
		if strings.HasPrefix(r.URL.Path, "/moved") {
			http.Redirect(w, r, redirectTarget.srv.URL+"/elsewhere", http.StatusFound)
			return
		}
		w.WriteHeader(http.StatusNotFound)
		w.Write([]byte(strings.Repeat("no such offer. ", 100)))
	})
	addr := testenv.KafkaTopics(t, 1)
	recs := collect(t, addr, bus.TopicDeliveries, 1)
	reg := startDispatcher(t, dispatcher.Config{
		Brokers: []string{addr},
		Catalog: holder(t, true, "2s", "[50ms, 50ms]",
			affiliate(7, p.srv.URL+"/pb?tx={conversion_id}"),
			affiliate(8, p.srv.URL+"/moved?tx={conversion_id}")),
	})
	c404, c302 := newConversion(7), newConversion(8)
	produce(t, addr, c404, c302)
	waitFor(t, "both failed records", func() bool {
		return recs.hasOutcome(t, c404.ConversionID, schemas.OutcomeFailed) && recs.hasOutcome(t, c302.ConversionID, schemas.OutcomeFailed)
	})
	waitFor(t, "the dispatcher to settle", func() bool { return settled(t, reg) })

	ds := recs.deliveries(t, c404.ConversionID)
	if len(ds) != 1 || ds[0].StatusCode != 404 || !strings.HasPrefix(ds[0].Error, "HTTP 404: no such offer. no such") {
		t.Fatalf("404 records = %+v; want one failed record with the body", ds)
	}
	if len(ds[0].Error) > 700 {
		t.Fatalf("error holds %d bytes of the response body; it should be capped", len(ds[0].Error))
	}
	ds = recs.deliveries(t, c302.ConversionID)
	if len(ds) != 1 || ds[0].StatusCode != 302 || !strings.Contains(ds[0].Error, "redirects are not followed") {
		t.Fatalf("302 records = %+v; want one failed record", ds)
	}
	if n := len(p.requests()); n != 2 {
		t.Fatalf("partner got %d requests, want 2 (no retries)", n)
	}
	if n := len(redirectTarget.requests()); n != 0 {
		t.Fatalf("the redirect was followed (%d requests)", n)
	}
	// Counted once the records are written (settled says only that no
	// request is in flight), so maybe a moment after.
	waitFor(t, "deliveries_total{outcome=failed} = 2", func() bool {
		return metric(t, reg, "trackstar_dispatcher_deliveries_total", "outcome", "failed") == 2
	})
}

// 429 is retried, and no sooner than its Retry-After says, even when the
// schedule says sooner.
func TestTooManyRequestsHonoursRetryAfter(t *testing.T) {
	p := newPartner(t, func(w http.ResponseWriter, r *http.Request, nth int) {
		if nth == 1 {
			w.Header().Set("Retry-After", "1")
			w.WriteHeader(http.StatusTooManyRequests)
			return
		}
		w.WriteHeader(http.StatusOK)
	})
	addr := testenv.KafkaTopics(t, 1)
	recs := collect(t, addr, bus.TopicDeliveries, 1)
	startDispatcher(t, dispatcher.Config{
		Brokers: []string{addr},
		Catalog: holder(t, true, "2s", "[50ms]", affiliate(7, p.srv.URL+"/pb?tx={conversion_id}")),
	})
	c := newConversion(7)
	produce(t, addr, c)
	waitFor(t, "the delivered record", func() bool { return recs.hasOutcome(t, c.ConversionID, schemas.OutcomeDelivered) })
	reqs := p.requestsFor(c.ConversionID)
	if len(reqs) != 2 {
		t.Fatalf("partner got %d requests, want 2", len(reqs))
	}
	gap := reqs[1].at.Sub(reqs[0].at)
	t.Logf("retry came %v after the 429", gap.Round(time.Millisecond))
	if gap < time.Second {
		t.Fatalf("retry came %v after a 429 with Retry-After: 1", gap)
	}
	ds := recs.deliveries(t, c.ConversionID)
	if len(ds) != 2 || ds[0].Outcome != schemas.OutcomeRetrying || ds[0].StatusCode != 429 || ds[0].Error != "HTTP 429 (Retry-After 1s)" {
		t.Fatalf("records = %+v; want a retrying 429 with its Retry-After, then delivered", ds)
	}
}

// verifySignature checks an X-Trackstar-Signature header the way a partner
// would, with crypto/hmac over the raw request: the request URI for GET,
// the body for POST.
func verifySignature(header, secret string, payload []byte, now time.Time) error {
	var ts, v1 string
	for _, part := range strings.Split(header, ",") {
		k, v, _ := strings.Cut(part, "=")
		switch k {
		case "t":
			ts = v
		case "v1":
			v1 = v
		}
	}
	t, err := strconv.ParseInt(ts, 10, 64)
	if err != nil {
		return fmt.Errorf("bad t in %q", header)
	}
	if d := now.Sub(time.Unix(t, 0)); d < -time.Minute || d > 5*time.Minute {
		return fmt.Errorf("t=%d is %v away from now", t, d)
	}
	got, err := hex.DecodeString(v1)
	if err != nil {
		return fmt.Errorf("bad v1 in %q", header)
	}
	mac := hmac.New(sha256.New, []byte(secret))
	mac.Write([]byte(ts + "."))
	mac.Write(payload)
	if !hmac.Equal(got, mac.Sum(nil)) {
		return errors.New("signature mismatch")
	}
	return nil
}

// Signed GET and POST postbacks verify with an independent HMAC
// implementation; the POST body is the conversion without its revenue.
func TestSignedRequestsVerify(t *testing.T) {
	p := newPartner(t, func(w http.ResponseWriter, r *http.Request, nth int) {})
	addr := testenv.KafkaTopics(t, 1)
	recs := collect(t, addr, bus.TopicDeliveries, 1)
	startDispatcher(t, dispatcher.Config{
		Brokers: []string{addr},
		Catalog: holder(t, true, "2s", "[50ms]",
			// Literal text a URI may not hold as it is (é, |) goes out
			// percent-encoded, as signed.
			affiliate(7, p.srv.URL+"/get/é|{sub1}?tx={conversion_id}&s1={sub1}&n=é|", `secret: "get-secret"`),
			affiliate(8, p.srv.URL+"/post?tx={conversion_id}", `method: POST`, `secret: "post-secret"`),
			affiliate(9, p.srv.URL+"/plain?tx={conversion_id}")),
	})
	cGet, cPost, cPlain := newConversion(7), newConversion(8), newConversion(9)
	produce(t, addr, cGet, cPost, cPlain)
	waitFor(t, "three delivered records", func() bool { return len(recs.deliveries(t, "")) == 3 })

	get := p.requestsFor(cGet.ConversionID)
	if len(get) != 1 || get[0].method != http.MethodGet {
		t.Fatalf("GET partner requests = %+v", get)
	}
	if err := verifySignature(get[0].header.Get("X-Trackstar-Signature"), "get-secret", []byte(get[0].uri), time.Now()); err != nil {
		t.Fatalf("GET %s: %v", get[0].uri, err)
	}
	if !strings.Contains(get[0].uri, "/get/%C3%A9%7C") || !strings.HasSuffix(get[0].uri, "&n=%C3%A9%7C") {
		t.Fatalf("GET %s: want the literal é| sent as %%C3%%A9%%7C", get[0].uri)
	}
	docReq := &http.Request{Method: http.MethodGet, RequestURI: get[0].uri, Header: get[0].header}
	if !partnerDocVerify([]byte("get-secret"), docReq, nil) {
		t.Fatalf("GET %s: the verifier of docs/partner.md rejects it", get[0].uri)
	}
	// A verifier that re-encodes the target, as docs/partner.md once
	// did, reads the same: the URI is sent in the form Go gives back.
	if u, err := url.ParseRequestURI(get[0].uri); err != nil || u.RequestURI() != get[0].uri {
		t.Fatalf("GET %s reads back as %q (%v)", get[0].uri, u.RequestURI(), err)
	}
	// The check can fail: another secret or another URI does not verify.
	if verifySignature(get[0].header.Get("X-Trackstar-Signature"), "post-secret", []byte(get[0].uri), time.Now()) == nil ||
		verifySignature(get[0].header.Get("X-Trackstar-Signature"), "get-secret", []byte(get[0].uri+"&x=1"), time.Now()) == nil {
		t.Fatalf("a wrong secret or payload verifies")
	}

	post := p.requestsFor(cPost.ConversionID)
	if len(post) != 1 || post[0].method != http.MethodPost || post[0].header.Get("Content-Type") != "application/json" {
		t.Fatalf("POST partner requests = %+v", post)
	}
	if err := verifySignature(post[0].header.Get("X-Trackstar-Signature"), "post-secret", post[0].body, time.Now()); err != nil {
		t.Fatalf("POST body %s: %v", post[0].body, err)
	}
	if !partnerDocVerify([]byte("post-secret"), &http.Request{Method: http.MethodPost, Header: post[0].header}, post[0].body) {
		t.Fatalf("POST body %s: the verifier of docs/partner.md rejects it", post[0].body)
	}
	var body map[string]any
	if err := json.Unmarshal(post[0].body, &body); err != nil {
		t.Fatalf("POST body is not JSON: %v: %s", err, post[0].body)
	}
	if _, ok := body["revenue"]; ok {
		t.Fatalf("POST body tells the partner our revenue: %s", post[0].body)
	}
	if _, ok := body["ts_ns"]; ok {
		t.Fatalf("POST body carries Trackstar's own ordering time: %s", post[0].body)
	}
	if body["conversion_id"] != cPost.ConversionID || body["payout"] != "1.75" || body["sale_amount"] != "19.99" ||
		body["status"] != "approved" || body["sub1"] != cPost.Sub1 || body["v"] != 1.0 {
		t.Fatalf("POST body = %s", post[0].body)
	}

	plain := p.requestsFor(cPlain.ConversionID)
	if len(plain) != 1 || plain[0].header.Get("X-Trackstar-Signature") != "" {
		t.Fatalf("an affiliate without a secret got a signature: %+v", plain)
	}
}

// After the last retry the postback is dead: a dead record, and the
// conversion with the last error on trackstar.dlq.
func TestDeadLetterAfterLastRetry(t *testing.T) {
	p := newPartner(t, func(w http.ResponseWriter, r *http.Request, nth int) {
		w.WriteHeader(http.StatusInternalServerError)
		w.Write([]byte("boom"))
	})
	addr := testenv.KafkaTopics(t, 1)
	recs := collect(t, addr, bus.TopicDeliveries, 1)
	dlq := collect(t, addr, bus.TopicDLQ, 1)
	reg := startDispatcher(t, dispatcher.Config{
		Brokers: []string{addr},
		Catalog: holder(t, true, "2s", "[50ms, 100ms]", affiliate(7, p.srv.URL+"/pb?tx={conversion_id}")),
	})
	c := newConversion(7)
	produce(t, addr, newConversion(99), c) // 99 has no postback: c is at offset 1
	waitFor(t, "a dead letter", func() bool { return len(dlq.messages()) > 0 })
	waitFor(t, "the dead record", func() bool { return recs.hasOutcome(t, c.ConversionID, schemas.OutcomeDead) })
	waitFor(t, "the dispatcher to settle", func() bool { return settled(t, reg) })

	ds := recs.deliveries(t, c.ConversionID)
	want := []string{schemas.OutcomeRetrying, schemas.OutcomeRetrying, schemas.OutcomeDead}
	if len(ds) != len(want) {
		t.Fatalf("got %d records, want %d: %+v", len(ds), len(want), ds)
	}
	for i, d := range ds {
		if d.Outcome != want[i] || d.Attempt != uint32(i+1) || d.StatusCode != 500 || d.Error != "HTTP 500: boom" {
			t.Fatalf("record %d = %+v, want outcome %s", i, d, want[i])
		}
	}
	msgs := dlq.messages()
	if len(msgs) != 1 || string(msgs[0].Key) != c.ClickID {
		t.Fatalf("dlq holds %d messages (first key %q), want one keyed by the click ID %s", len(msgs), msgs[0].Key, c.ClickID)
	}
	var dl dispatcher.DeadLetter
	if err := json.Unmarshal(msgs[0].Value, &dl); err != nil {
		t.Fatal(err)
	}
	checkSchemaVersion(t, msgs[0].Value)
	if dl.Topic != bus.TopicConversions || dl.Partition != 0 || dl.Offset != 1 || dl.Key != c.ClickID ||
		dl.ConversionID != c.ConversionID || dl.Attempts != 3 || dl.AffID != 7 || dl.StatusCode != 500 ||
		dl.Error != "HTTP 500: boom" || dl.Method != "GET" || !strings.Contains(dl.URL, c.ConversionID) || dl.TS == 0 {
		t.Fatalf("dead letter = %+v", dl)
	}
	if conv, err := schemas.DecodeConversion([]byte(dl.Value)); err != nil || conv != c {
		t.Fatalf("dead letter value %s decodes to %+v, %v; want the conversion", dl.Value, conv, err)
	}
	if n := len(p.requests()); n != 3 {
		t.Fatalf("partner got %d requests, want 3", n)
	}
}

// checkSchemaVersion fails t unless the JSON value carries "v", the schema
// version, like every topic's (DESIGN.md "Topics").
func checkSchemaVersion(t *testing.T, value []byte) {
	t.Helper()
	var v struct {
		V *int `json:"v"`
	}
	if err := json.Unmarshal(value, &v); err != nil {
		t.Fatal(err)
	}
	if v.V == nil || *v.V != schemas.Version {
		t.Fatalf("dead letter %s: want \"v\":%d", value, schemas.Version)
	}
}

// A conversion record the dispatcher cannot decode (a schema version it
// does not know, or not JSON at all) is written to trackstar.dlq with where
// it came from and why, byte for byte, before its offset is committed; the
// records after it are delivered as usual.
func TestUndecodableConversionIsDeadLettered(t *testing.T) {
	p := newPartner(t, func(w http.ResponseWriter, r *http.Request, nth int) {})
	addr := testenv.KafkaTopics(t, 1)
	dlq := collect(t, addr, bus.TopicDLQ, 1)
	reg := startDispatcher(t, dispatcher.Config{
		Brokers: []string{addr},
		Catalog: holder(t, true, "2s", "[50ms]", affiliate(7, p.srv.URL+"/pb?tx={conversion_id}")),
	})
	future := []byte(`{"v":2,"conversion_id":"x"}`)
	binary := []byte{0xff, 0xfe, '{'}
	w := bus.NewWriter(bus.WriterConfig{Brokers: []string{addr}, Topic: bus.TopicConversions})
	defer w.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := w.WriteMessages(ctx,
		kafka.Message{Key: []byte("k1"), Value: future},
		kafka.Message{Key: []byte("k2"), Value: binary},
	); err != nil {
		t.Fatal(err)
	}
	c := newConversion(7)
	produce(t, addr, c)
	waitFor(t, "the conversion after them to be delivered", func() bool { return len(p.requestsFor(c.ConversionID)) == 1 })
	waitFor(t, "two dead letters", func() bool { return len(dlq.messages()) == 2 })
	waitFor(t, "all three offsets committed", func() bool { return committed(t, addr, 1) == 3 })

	for i, m := range dlq.messages() {
		var dl dispatcher.DeadLetter
		if err := json.Unmarshal(m.Value, &dl); err != nil {
			t.Fatal(err)
		}
		checkSchemaVersion(t, m.Value)
		want := [][]byte{future, binary}[i]
		got := []byte(dl.Value)
		if dl.ValueBase64 != nil {
			got = dl.ValueBase64
		}
		if string(m.Key) != fmt.Sprintf("k%d", i+1) || dl.Key != string(m.Key) || dl.Topic != bus.TopicConversions ||
			dl.Partition != 0 || dl.Offset != int64(i) || !bytes.Equal(got, want) ||
			!strings.HasPrefix(dl.Error, "cannot decode conversion event: ") || dl.TS == 0 {
			t.Fatalf("dead letter %d (key %q) = %+v; want offset %d, value %q", i, m.Key, dl, i, want)
		}
		t.Logf("dead letter %d: %s", i, m.Value)
	}
	if got := metric(t, reg, "trackstar_dispatcher_conversions_total", "result", "invalid"); got != 2 {
		t.Fatalf("conversions_total{result=invalid} = %v, want 2", got)
	}
}

// With allow_private_partner_urls false, a partner host whose name
// resolves to a loopback address is refused at send time, and nothing is
// sent. Allowed, the request goes to the address that was checked (the
// name is unknown to the system resolver).
func TestSSRFGuardAtSendTime(t *testing.T) {
	f := func(allowPrivate bool, wantOutcome string) {
		t.Helper()
		p := newPartner(t, func(w http.ResponseWriter, r *http.Request, nth int) {})
		u, _ := url.Parse(p.srv.URL)
		addr := testenv.KafkaTopics(t, 1)
		recs := collect(t, addr, bus.TopicDeliveries, 1)
		var lookups atomic.Int32
		reg := startDispatcher(t, dispatcher.Config{
			Brokers: []string{addr},
			Catalog: holder(t, allowPrivate, "2s", "[50ms]", affiliate(7, "http://partner.invalid:"+u.Port()+"/pb?tx={conversion_id}")),
			LookupNetIP: func(ctx context.Context, host string) ([]netip.Addr, error) {
				lookups.Add(1)
				if host != "partner.invalid" {
					return nil, fmt.Errorf("unexpected lookup of %q", host)
				}
				return []netip.Addr{netip.MustParseAddr("127.0.0.1")}, nil
			},
		})
		c := newConversion(7)
		produce(t, addr, c)
		waitFor(t, "a "+wantOutcome+" record", func() bool { return recs.hasOutcome(t, c.ConversionID, wantOutcome) })
		waitFor(t, "the dispatcher to settle", func() bool { return settled(t, reg) })
		ds := recs.deliveries(t, c.ConversionID)
		if len(ds) != 1 {
			t.Fatalf("allow_private=%v: records = %+v, want one", allowPrivate, ds)
		}
		if lookups.Load() == 0 {
			t.Fatalf("the host was never resolved")
		}
		if allowPrivate {
			if n := len(p.requests()); n != 1 {
				t.Fatalf("allowed partner got %d requests, want 1", n)
			}
			return
		}
		if n := len(p.requests()); n != 0 {
			t.Fatalf("a refused partner got %d requests", n)
		}
		if !strings.Contains(ds[0].Error, "refused: partner.invalid resolves to no public address") {
			t.Fatalf("refusal record error = %q", ds[0].Error)
		}
		if got := metric(t, reg, "trackstar_dispatcher_refused_total"); got != 1 {
			t.Fatalf("refused_total = %v, want 1", got)
		}
	}
	f(false, schemas.OutcomeFailed)
	f(true, schemas.OutcomeDelivered)
}

// An https partner is reached by name: the connection goes to the address
// the guard checked, and TLS verifies the certificate for the URL's host.
func TestHTTPSPartnerByName(t *testing.T) {
	var got atomic.Int32
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !strings.HasPrefix(r.Host, "example.com:") {
			w.WriteHeader(http.StatusBadRequest)
			return
		}
		got.Add(1)
	}))
	t.Cleanup(srv.Close)
	u, _ := url.Parse(srv.URL)
	roots := x509.NewCertPool()
	roots.AddCert(srv.Certificate()) // valid for example.com and 127.0.0.1
	addr := testenv.KafkaTopics(t, 1)
	recs := collect(t, addr, bus.TopicDeliveries, 1)
	startDispatcher(t, dispatcher.Config{
		Brokers:   []string{addr},
		Catalog:   holder(t, true, "2s", "[50ms]", affiliate(7, "https://example.com:"+u.Port()+"/pb?tx={conversion_id}")),
		TLSConfig: &tls.Config{RootCAs: roots},
		LookupNetIP: func(ctx context.Context, host string) ([]netip.Addr, error) {
			return []netip.Addr{netip.MustParseAddr("127.0.0.1")}, nil
		},
	})
	c := newConversion(7)
	produce(t, addr, c)
	waitFor(t, "a final record", func() bool { return len(recs.deliveries(t, c.ConversionID)) > 0 })
	if ds := recs.deliveries(t, c.ConversionID); ds[0].Outcome != schemas.OutcomeDelivered || got.Load() != 1 {
		t.Fatalf("records %+v, partner requests %d; want delivered once", ds, got.Load())
	}
}

// Turning allow_private_partner_urls off by a reload stops postbacks to a
// private address at once, even over a connection kept alive from before.
func TestPrivateURLsOffClosesTheWay(t *testing.T) {
	p := newPartner(t, func(w http.ResponseWriter, r *http.Request, nth int) {})
	addr := testenv.KafkaTopics(t, 1)
	recs := collect(t, addr, bus.TopicDeliveries, 1)
	u, _ := url.Parse(p.srv.URL)
	port := u.Port()
	aff := affiliate(7, "http://partner.invalid:"+port+"/pb?tx={conversion_id}")
	cat, reload := reloadableHolder(t, true, "2s", "[50ms]", aff)
	startDispatcher(t, dispatcher.Config{Brokers: []string{addr}, Catalog: cat,
		LookupNetIP: func(ctx context.Context, host string) ([]netip.Addr, error) {
			return []netip.Addr{netip.MustParseAddr("127.0.0.1")}, nil
		}})
	c1 := newConversion(7)
	produce(t, addr, c1)
	waitFor(t, "the first conversion to be delivered", func() bool { return recs.hasOutcome(t, c1.ConversionID, schemas.OutcomeDelivered) })

	reload(false, aff)
	c2 := newConversion(7)
	produce(t, addr, c2)
	waitFor(t, "the second conversion's final record", func() bool { return recs.hasOutcome(t, c2.ConversionID, schemas.OutcomeFailed) })
	if n := len(p.requestsFor(c2.ConversionID)); n != 0 {
		t.Fatalf("after private partner URLs were turned off the partner on loopback still got %d requests", n)
	}
	if d := recs.deliveries(t, c2.ConversionID); !strings.Contains(d[0].Error, "refused") {
		t.Fatalf("record = %+v, want a refusal", d[0])
	}
}

// DESIGN.md, "Topics": every topic's key is the click ID, trackstar.deliveries
// included, whatever the attempt's outcome.
func TestDeliveriesAreKeyedByClickID(t *testing.T) {
	p := newPartner(t, func(w http.ResponseWriter, r *http.Request, nth int) {
		if nth == 1 {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
	})
	addr := testenv.KafkaTopics(t, 1)
	recs := collect(t, addr, bus.TopicDeliveries, 1)
	startDispatcher(t, dispatcher.Config{
		Brokers: []string{addr},
		Catalog: holder(t, true, "2s", "[50ms]", affiliate(7, p.srv.URL+"/pb?tx={conversion_id}")),
	})
	c := newConversion(7)
	produce(t, addr, c)
	waitFor(t, "the delivered record", func() bool { return recs.hasOutcome(t, c.ConversionID, schemas.OutcomeDelivered) })
	msgs := recs.messages()
	if len(msgs) != 2 {
		t.Fatalf("deliveries holds %d records, want 2 (retrying, delivered)", len(msgs))
	}
	for _, m := range msgs {
		if string(m.Key) != c.ClickID {
			t.Fatalf("delivery record keyed %q, want the click ID %s (conversion %s): %s", m.Key, c.ClickID, c.ConversionID, m.Value)
		}
	}
}
