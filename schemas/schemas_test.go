package schemas

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"
)

func TestAmount(t *testing.T) {
	f := func(in, want string) {
		t.Helper()
		a, err := ParseAmount(in)
		if err != nil {
			t.Fatalf("ParseAmount(%q): %v", in, err)
		}
		if got := a.String(); got != want {
			t.Fatalf("ParseAmount(%q).String() = %q, want %q", in, got, want)
		}
	}
	f("0", "0")
	f("19.99", "19.99")
	f("19.990", "19.99")
	f("-3.25", "-3.25")
	f("0.0001", "0.0001")
	f("+12", "12")
	f("1000000", "1000000")
	// Everything an int64 of 1/10000 units holds, and nothing more.
	f("922337203685477.5807", "922337203685477.5807")
	f("922337203685470", "922337203685470")
	f("922337203685477", "922337203685477")
	f("-922337203685477.5807", "-922337203685477.5807")
	f("99999999999999.9999", MaxAmount.String())

	bad := func(in string) {
		t.Helper()
		if a, err := ParseAmount(in); err == nil {
			t.Fatalf("ParseAmount(%q) = %v, want error", in, a)
		}
	}
	bad("")
	bad("922337203685477.5808")
	bad("922337203685478")
	bad("9223372036854775807")
	bad("-922337203685477.5808")
	bad("1e5")
	bad("1,5")
	bad("0.00001")
	bad("12.")
	bad(".")
	bad("-")
	bad("NaN")
	bad("99999999999999999999")
}

func TestAmountPercent(t *testing.T) {
	f := func(amount, pct, want string) {
		t.Helper()
		a, _ := ParseAmount(amount)
		p, _ := ParseAmount(pct)
		if got := a.Percent(p).String(); got != want {
			t.Fatalf("%s%% of %s = %s, want %s", pct, amount, got, want)
		}
	}
	f("19.99", "7", "1.3993")
	f("19.99", "7.5", "1.4993") // 1.49925 rounds half away from zero
	f("19.99", "10", "1.999")
	f("100", "100", "100")
	f("0.0001", "50", "0.0001") // 0.00005 rounds up
	f("-19.99", "7.5", "-1.4993")
	f("0", "7", "0")
}

func TestAmountJSON(t *testing.T) {
	var c Conversion
	if err := json.Unmarshal([]byte(`{"v":1,"revenue":"2.5","payout":1.75}`), &c); err != nil {
		t.Fatal(err)
	}
	if c.Revenue.String() != "2.5" || c.Payout.String() != "1.75" {
		t.Fatalf("got revenue %s payout %s", c.Revenue, c.Payout)
	}
	b := EncodeConversion(c)
	if !strings.Contains(string(b), `"revenue":"2.5"`) || !strings.Contains(string(b), `"v":1`) {
		t.Fatalf("encoded %s", b)
	}
}

func TestDecodeRefusesUnknownVersion(t *testing.T) {
	f := func(in string) {
		t.Helper()
		_, err := DecodeClick([]byte(in))
		if !errors.Is(err, ErrUnknownVersion) {
			t.Fatalf("DecodeClick(%s) = %v, want ErrUnknownVersion", in, err)
		}
	}
	f(`{"click_id":"x"}`)
	f(`{"v":2,"click_id":"x"}`)
	if _, err := DecodePostback([]byte(`{"v":1,`)); err == nil || errors.Is(err, ErrUnknownVersion) {
		t.Fatalf("truncated JSON: %v", err)
	}
}

func TestHotPathEncodersMatchEncodingJSON(t *testing.T) {
	c := Click{V: Version, ClickID: NewID(time.Now()), TS: 1700000000123, OfferID: 1, AdvertiserID: 2, AffID: 7,
		Source: "fb <&>", Sub1: "a\"b\\c", Sub2: "ünï\u2028", Sub3: "\x00\x1f\t\n", Sub4: "bad\xffutf8", IP: "10.0.0.1", UserAgent: "Mozilla/5.0"}
	want, _ := json.Marshal(&c)
	if got := c.AppendJSON(nil); string(got) != string(want) {
		t.Fatalf("click:\n got %s\nwant %s", got, want)
	}
	back, err := DecodeClick(c.AppendJSON(nil))
	if err != nil || back.Sub1 != c.Sub1 || back.Sub2 != c.Sub2 {
		t.Fatalf("round trip: %+v, %v", back, err)
	}

	p := Postback{V: Version, EventID: NewID(time.Now()), ClickID: c.ClickID, TS: 1, TSNanos: 1_000_123, AdvertiserID: 2, Goal: "sale", Amount: "19.99", Currency: "USD", TxnID: "o-1", Status: StatusPending, IP: "::1"}
	want, _ = json.Marshal(&p)
	if got := p.AppendJSON(nil); string(got) != string(want) {
		t.Fatalf("postback:\n got %s\nwant %s", got, want)
	}

	// What the edge spools: the same event, marked.
	marked := MarkSpooled(nil, p.AppendJSON(nil))
	p.Spooled = true
	want, _ = json.Marshal(&p)
	if got := p.AppendJSON(nil); string(got) != string(want) || string(marked) != string(want) {
		t.Fatalf("spooled postback:\n got %s\nmarked %s\n  want %s", got, marked, want)
	}
	back2, err := DecodePostback(marked)
	if err != nil || back2 != p {
		t.Fatalf("spooled round trip: %+v, %v", back2, err)
	}
}

func TestID(t *testing.T) {
	now := time.UnixMilli(1764331200123)
	id := NewID(now)
	if len(id) != IDLen || !ValidID(id) {
		t.Fatalf("NewID = %q (len %d), not valid", id, len(id))
	}
	ms, err := IDTime(id)
	if err != nil || ms != now.UnixMilli() {
		t.Fatalf("IDTime(%q) = %d, %v; want %d", id, ms, err, now.UnixMilli())
	}
	if up, _ := IDTime(strings.ToUpper(id)); up != ms {
		t.Fatalf("upper case ID time %d", up)
	}
	later := NewID(now.Add(time.Millisecond))
	if later <= id {
		t.Fatalf("IDs not time-ordered: %s then %s", id, later)
	}
	if NewID(now) == id {
		t.Fatal("two IDs minted at the same time are equal")
	}
	for _, bad := range []string{"", "abc", strings.Repeat("z", IDLen), id[:25] + "!", id[:25] + "u", id + "0"} {
		if ValidID(bad) {
			t.Fatalf("ValidID(%q) = true", bad)
		}
	}
}

func BenchmarkClickAppendJSON(b *testing.B) {
	c := Click{ClickID: NewID(time.Now()), TS: 1, OfferID: 1, AffID: 7, Sub1: "abc", UserAgent: "Mozilla/5.0 (X11; Linux x86_64)", IP: "203.0.113.9"}
	buf := make([]byte, 0, 512)
	b.ReportAllocs()
	b.SetBytes(int64(len(c.AppendJSON(nil))))
	for b.Loop() {
		buf = c.AppendJSON(buf[:0])
	}
}

func BenchmarkNewID(b *testing.B) {
	buf := make([]byte, 0, IDLen)
	now := time.Now()
	b.ReportAllocs()
	for b.Loop() {
		buf = AppendNewID(buf[:0], now)
	}
}
