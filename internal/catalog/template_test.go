package catalog

import (
	"fmt"
	"net/url"
	"strings"
	"testing"
)

func TestTemplateAppend(t *testing.T) {
	v := &Values{
		ClickID:      "0190b5c3f2a07c1d9e4b2a6f8c3d1e5a",
		OfferID:      12,
		AffID:        4294967295,
		Sub:          [5]string{"a&b=c", "two words", "héllo wörld", "€/?#%+", ""},
		Source:       "news feed",
		ConversionID: "cv-1",
		Goal:         "sale",
		Payout:       "1.3993",
		SaleAmount:   "19.99",
		Currency:     "EUR",
		Status:       "approved",
		TxnID:        "order 42/B",
		ClickTS:      1_700_000_000_999,
		ConversionTS: 1_700_000_123_000,
	}
	f := func(raw string, partner bool, want string) {
		t.Helper()
		tpl, err := ParseTemplate(raw, partner)
		if err != nil {
			t.Fatal(err)
		}
		if got := string(tpl.Append(nil, v)); got != want {
			t.Fatalf("rendering %s\ngot  %s\nwant %s", raw, got, want)
		}
		if got := string(tpl.Append([]byte("prefix "), v)); got != "prefix "+want {
			t.Fatalf("Append does not append: %s", got)
		}
		if tpl.String() != raw {
			t.Fatalf("String() = %q, want %q", tpl.String(), raw)
		}
	}
	f("https://shop.example/land", false, "https://shop.example/land")
	f("https://shop.example/?c={click_id}&t={transaction_id}", false,
		"https://shop.example/?c=0190b5c3f2a07c1d9e4b2a6f8c3d1e5a&t=0190b5c3f2a07c1d9e4b2a6f8c3d1e5a")
	f("https://shop.example/{offer_id}/?a={aff_id}&a2={affiliate_id}", false,
		"https://shop.example/12/?a=4294967295&a2=4294967295")
	f("https://shop.example/?s1={sub1}&s2={sub2}&s3={sub3}&s4={sub4}&s5={sub5}&src={source}", false,
		"https://shop.example/?s1=a%26b%3Dc&s2=two%20words&s3=h%C3%A9llo%20w%C3%B6rld&s4=%E2%82%AC%2F%3F%23%25%2B&s5=&src=news%20feed")
	f("https://shop.example/?s1={aff_sub}&s2={aff_sub2}&s3={aff_sub3}&s4={aff_sub4}&s5={aff_sub5}", false,
		"https://shop.example/?s1=a%26b%3Dc&s2=two%20words&s3=h%C3%A9llo%20w%C3%B6rld&s4=%E2%82%AC%2F%3F%23%25%2B&s5=")
	f("https://shop.example/{click_id}{offer_id}", false,
		"https://shop.example/0190b5c3f2a07c1d9e4b2a6f8c3d1e5a12")
	f("https://p.example/pb?cv={conversion_id}&g={goal}&p={payout}&s={sale_amount}&c={currency}&st={status}&tx={txn_id}", true,
		"https://p.example/pb?cv=cv-1&g=sale&p=1.3993&s=19.99&c=EUR&st=approved&tx=order%2042%2FB")
	f("https://p.example/pb?ct={click_ts}&vt={conversion_ts}&c={click_id}", true,
		"https://p.example/pb?ct=1700000000&vt=1700000123&c=0190b5c3f2a07c1d9e4b2a6f8c3d1e5a")
	// A stray "}" is literal text, and not one a URI may hold as it is.
	f("https://p.example/pb#}{sub1}", true, "https://p.example/pb#%7Da%26b%3Dc")
	// In a path, + is a plus sign: a space must be %20 there.
	f("https://shop.example/c/{sub2}/{sub4}?q={sub2}", false,
		"https://shop.example/c/two%20words/%E2%82%AC%2F%3F%23%25%2B?q=two%20words")
	u, err := url.Parse("https://shop.example/c/two%20words/%E2%82%AC%2F%3F%23%25%2B?q=two%20words")
	if err != nil || u.Path != "/c/two words/€/?#%+" || u.Query().Get("q") != "two words" {
		t.Fatalf("the rendered URL reads back as path %q, q %q (%v)", u.Path, u.Query().Get("q"), err)
	}

	// Unknown timestamps render as 0.
	zero := &Values{}
	tpl, err := ParseTemplate("https://p.example/?ct={click_ts}&s={sub1}&o={offer_id}", true)
	if err != nil {
		t.Fatal(err)
	}
	if got := string(tpl.Append(nil, zero)); got != "https://p.example/?ct=0&s=&o=0" {
		t.Fatalf("zero values: got %s", got)
	}
}

func TestParseTemplateErrors(t *testing.T) {
	f := func(raw string, partner bool, want ...string) {
		t.Helper()
		tpl, err := ParseTemplate(raw, partner)
		if err == nil {
			t.Fatalf("ParseTemplate(%q) succeeded", raw)
		}
		if tpl != nil {
			t.Fatalf("ParseTemplate(%q) returned a template with an error", raw)
		}
		var wantLines []string
		for _, w := range want {
			wantLines = append(wantLines, fmt.Sprintf("invalid URL template %q: %s", raw, w))
		}
		if got := err.Error(); got != strings.Join(wantLines, "\n") {
			t.Fatalf("ParseTemplate(%q)\ngot:  %s\nwant: %s", raw, got, strings.Join(wantLines, "\n"))
		}
	}
	f("https://s.example/?c={click}", false, `unknown macro "{click}"`)
	f("https://s.example/?c={}", true, `unknown macro "{}"`)
	f("https://s.example/?c={CLICK_ID}", false, `unknown macro "{CLICK_ID}"`)
	f("https://s.example/?c={status}", false, `macro "{status}" is only available in partner postback URLs`)
	f("https://s.example/?c={revenue}", false, `unknown macro "{revenue}"`)
	f("https://s.example/?c={revenue}", true, `macro "{revenue}" is never offered to partners`)
	f("https://s.example/?c={click_id}&d={sub1", false, `unclosed "{" at offset 34`)
	f("https://s.example/?a={x}&b={y}", false, `unknown macro "{x}"`, `unknown macro "{y}"`)
	f("{click_id}", false, "URL must be absolute http:// or https:// with a host")
	f("mailto:a@b.example", false, "URL must be absolute http:// or https:// with a host")
	f("https://{sub1}/", false, "macros are not allowed in the URL's scheme or host")
	f("https://a{sub1}.example:80/", false, "macros are not allowed in the URL's scheme or host")
	f("{source}://a.example/", false, "macros are not allowed in the URL's scheme or host")
	f("http{sub1}://a.example/", false, "macros are not allowed in the URL's scheme or host")
	f("/land?next=https://{sub1}/", false, "URL must be absolute http:// or https:// with a host")
	f("https://a.example/\x7f", false, "URL must not contain control characters")
	f("https://a.example/x\x01y", false, "URL must not contain control characters")
}

// A bare "%" is text wherever it stands after the host, as the operator
// docs say: it goes out as %25, in the path and fragment too, where
// url.Parse alone would refuse it.
func TestTemplateBarePercent(t *testing.T) {
	for raw, want := range map[string]string{
		"https://p.example/50%off/{click_id}":       "https://p.example/50%25off/c1",
		"https://p.example/sale-100%/?c={click_id}": "https://p.example/sale-100%25/?c=c1",
		"https://p.example/a#top%{click_id}":        "https://p.example/a#top%25c1",
		"https://p.example/a%20b?c={click_id}":      "https://p.example/a%20b?c=c1",
		"https://p.example/pb%zz?x={click_id}":      "https://p.example/pb%25zz?x=c1",
	} {
		tpl, err := ParseTemplate(raw, false)
		if err != nil {
			t.Errorf("%s: %v", raw, err)
			continue
		}
		if got := string(tpl.Append(nil, &Values{ClickID: "c1"})); got != want {
			t.Errorf("%s renders %s, want %s", raw, got, want)
		}
	}
}

// TestTemplateEscapesLiterals: bytes of a template's literal text that a
// URI may not hold (RFC 3986) are percent-encoded, as UTF-8, upper case,
// once, when the template is parsed; unreserved, reserved and sub-delim
// characters and valid escapes are left as written. The request line is
// then the URL as rendered, and a partner's server sees what was signed.
func TestTemplateEscapesLiterals(t *testing.T) {
	v := &Values{Sub: [5]string{"é|"}}
	f := func(raw, want string) {
		t.Helper()
		tpl, err := ParseTemplate(raw, true)
		if err != nil {
			t.Fatal(err)
		}
		got := string(tpl.Append(nil, v))
		if got != want {
			t.Fatalf("rendering %s\ngot  %s\nwant %s", raw, got, want)
		}
		if tpl.String() != raw {
			t.Fatalf("String() = %q, want %q as written", tpl.String(), raw)
		}
		// What Go's URL parser makes of it is the same request URI.
		u, err := url.Parse(got)
		if err != nil || u.RequestURI() != strings.TrimPrefix(strings.TrimPrefix(got, "https://p.example"), "https://ü.example") {
			t.Fatalf("%s reads back as request URI %q (%v)", got, u.RequestURI(), err)
		}
	}
	f("https://p.example/é|/{sub1}?a=é|&b={sub1}", "https://p.example/%C3%A9%7C/%C3%A9%7C?a=%C3%A9%7C&b=%C3%A9%7C")
	f(`https://p.example/x?q="<>\^`+"`"+`}`, "https://p.example/x?q=%22%3C%3E%5C%5E%60%7D")
	// Reserved, sub-delims and escapes as written: no double encoding.
	f("https://p.example/a:b@c!$&'()*+,;=/~._-?x=/?:@[]&y=%41%c3%a9", "https://p.example/a:b@c!$&'()*+,;=/~._-?x=/?:@[]&y=%41%c3%a9")
	// A "%" that starts no escape is a percent sign.
	f("https://p.example/?off=10%&z=%4", "https://p.example/?off=10%25&z=%254")
	// The host is left alone.
	f("https://ü.example/é", "https://ü.example/%C3%A9")
}

// TestAppendEscapeMatchesStdlib: appendEscape is url.QueryEscape with a
// space as %20 (QueryEscape writes a + only for a space), and what it
// writes reads back the same with both the path and the query unescaper.
func TestAppendEscapeMatchesStdlib(t *testing.T) {
	f := func(s string) {
		t.Helper()
		got := string(appendEscape(nil, s))
		if want := strings.ReplaceAll(url.QueryEscape(s), "+", "%20"); got != want {
			t.Fatalf("escaping %q: got %q, want %q", s, got, want)
		}
		if back, err := url.PathUnescape(got); err != nil || back != s {
			t.Fatalf("PathUnescape(%q) = %q, %v; want %q", got, back, err, s)
		}
		if back, err := url.QueryUnescape(got); err != nil || back != s {
			t.Fatalf("QueryUnescape(%q) = %q, %v; want %q", got, back, err, s)
		}
	}
	for c := 0; c < 256; c++ {
		f(string([]byte{byte(c)}))
	}
	f("")
	f("plain-Text_1.2~")
	f("a b&c=d/e?f#g%h+i")
	f("日本語 🚀")
	f("\x00\xff invalid utf8 \xc3")
}

func TestTemplateAppendDoesNotAllocate(t *testing.T) {
	tpl, err := ParseTemplate("https://p.example/pb?c={click_id}&o={offer_id}&a={aff_id}&s={sub1}&p={payout}&t={click_ts}", true)
	if err != nil {
		t.Fatal(err)
	}
	v := &Values{ClickID: "abc", OfferID: 1, AffID: 2, Sub: [5]string{"x y&z"}, Payout: "1.5", ClickTS: 1_700_000_000_000}
	dst := make([]byte, 0, 256)
	allocs := testing.AllocsPerRun(100, func() {
		dst = tpl.Append(dst[:0], v)
	})
	if allocs != 0 {
		t.Fatalf("Append allocates %v times per call", allocs)
	}
}

// A port outside 1..65535 makes a URL no request can be sent to (browsers
// refuse to follow a redirect to it, the dispatcher cannot dial it): a
// malformed URL, which DESIGN.md makes a load error.
func TestParseTemplatePortOutOfRange(t *testing.T) {
	for _, raw := range []string{
		"https://shop.example:99999/land?c={click_id}",
		"https://shop.example:65536/",
		"http://shop.example:0/",
		"http://[2001:db8::1]:70000/pb",
	} {
		for _, partner := range []bool{false, true} {
			tpl, err := ParseTemplate(raw, partner)
			if err == nil || tpl != nil {
				t.Fatalf("ParseTemplate(%q, %v) succeeded", raw, partner)
			}
			if !strings.Contains(err.Error(), "port") {
				t.Fatalf("ParseTemplate(%q, %v): %v; want an error about the port", raw, partner, err)
			}
		}
	}
	for _, raw := range []string{"https://shop.example:65535/", "http://shop.example:1/", "http://[2001:db8::1]:8080/pb", "https://shop.example:/x"} {
		if _, err := ParseTemplate(raw, false); err != nil {
			t.Fatalf("ParseTemplate(%q): %v", raw, err)
		}
	}
}
