package catalog

import (
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/trackstar/trackstar/schemas"
)

// base is a valid config that the error cases below extend; its lines are
// counted in the expected messages, so it must not change.
const base = `advertisers:
- {id: 1, token: t1}
offers:
- id: 1
  advertiser_id: 1
  url: "https://shop.example/?c={click_id}"
  goals:
  - {id: default, revenue: {fixed: 1}, payout: {fixed: 0.5}}
`

func TestParseErrors(t *testing.T) {
	f := func(yaml string, want ...string) {
		t.Helper()
		c, err := Parse([]byte(yaml), "t.yaml")
		if err == nil {
			t.Fatalf("Parse succeeded, want errors:\n%s\nconfig:\n%s", strings.Join(want, "\n"), yaml)
		}
		if c != nil {
			t.Fatalf("Parse returned a catalog along with an error")
		}
		got := strings.Split(err.Error(), "\n")
		if !slices.Equal(got, want) {
			t.Fatalf("unexpected errors\ngot:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
		}
	}

	// Unknown keys, at any level.
	f(base+"offer: []\n",
		`t.yaml:9: unknown key "offer" (want one of: allow_private_partner_urls, advertisers, offers, delivery, affiliates)`)
	f(`advertisers:
- {id: 1, token: t1, ip: 1.2.3.4}
`, `t.yaml:2: advertisers[0]: unknown key "ip" (want one of: id, name, token, allowed_ips)`)
	f(`advertisers:
- {id: 1, token: t1}
offers:
- id: 1
  advertiser_id: 1
  url: "https://shop.example/?c={click_id}"
  goals:
  - {id: default, revenue: {fixed: 1}, payout: {fixed: 0.5}}
  - id: sale
    revenue:
      fixd: 2
    payout: {percent: 7}
`, `t.yaml:11: offers[0].goals[1].revenue: unknown key "fixd" (want one of: fixed, percent)`,
		`t.yaml:11: offers[0].goals[1].revenue: set one of fixed (an amount) or percent (of the sale amount)`)
	f(base+"delivery: {timeout: 5s, retry: [1s]}\n",
		`t.yaml:9: delivery: unknown key "retry" (want one of: timeout, retries)`)
	f(base+`affiliates:
- id: 7
  postback: {url: "https://p.example/", methd: GET}
`, `t.yaml:11: affiliates[0].postback: unknown key "methd" (want one of: url, method, goals, statuses, secret)`)
	f(base+"advertisers: []\n", `t.yaml:9: duplicate key "advertisers" (first at line 1)`)

	// Duplicate IDs and tokens.
	f(`advertisers:
- {id: 1, token: t1}
- {id: 1, token: t2}
`, `t.yaml:3: advertisers[1].id: duplicate advertiser id 1 (first defined at line 2)`)
	f(`advertisers:
- {id: 1, token: same-secret}
- {id: 2, token: same-secret}
`, `t.yaml:3: advertisers[1].token: duplicate token (already used at line 2)`)
	f(base+`- id: 1
  advertiser_id: 1
  url: "https://other.example/"
  goals: [{id: default, revenue: {fixed: 1}, payout: {fixed: 1}}]
`, `t.yaml:9: offers[1].id: duplicate offer id 1 (first defined at line 4)`)
	f(base+`affiliates:
- {id: 7}
- {id: 8}
- {id: 7, name: again}
`, `t.yaml:12: affiliates[2].id: duplicate affiliate id 7 (first defined at line 10)`)
	f(base+`  - id: default
    revenue: {fixed: 2}
    payout: {fixed: 1}
`, `t.yaml:9: offers[0].goals[1].id: duplicate goal id "default" (first defined at line 8)`)

	// Dangling reference.
	f(`advertisers:
- {id: 1, token: t1}
offers:
- id: 1
  advertiser_id: 2
  url: "https://shop.example/"
  goals: [{id: default, revenue: {fixed: 1}, payout: {fixed: 1}}]
`, `t.yaml:5: offers[0].advertiser_id: advertiser 2 is not defined`)

	// Unknown and misplaced macros.
	offerURL := func(url string) string {
		return `advertisers: [{id: 1, token: t1}]
offers:
- id: 1
  advertiser_id: 1
  url: "` + url + `"
  goals: [{id: default, revenue: {fixed: 1}, payout: {fixed: 1}}]
`
	}
	f(offerURL("https://shop.example/?c={clickid}"),
		`t.yaml:5: offers[0].url: unknown macro "{clickid}"`)
	f(offerURL("https://shop.example/?c={click_id}&p={payout}&r={revenue}"),
		`t.yaml:5: offers[0].url: macro "{payout}" is only available in partner postback URLs`,
		`t.yaml:5: offers[0].url: unknown macro "{revenue}"`)
	f(offerURL("https://shop.example/?c={click_id"),
		`t.yaml:5: offers[0].url: unclosed "{" at offset 24`)
	partnerURL := func(url string) string {
		return base + `affiliates:
- id: 7
  postback:
    url: "` + url + `"
`
	}
	f(partnerURL("https://p.example/?p={payout}&r={revenue}"),
		`t.yaml:12: affiliates[0].postback.url: macro "{revenue}" is never offered to partners`)
	f(partnerURL("https://p.example/?x={profit}"),
		`t.yaml:12: affiliates[0].postback.url: unknown macro "{profit}"`)

	// Malformed URLs.
	f(offerURL("/land?c={click_id}"),
		`t.yaml:5: offers[0].url: URL must be absolute http:// or https:// with a host`)
	f(offerURL("ftp://shop.example/"),
		`t.yaml:5: offers[0].url: URL must be absolute http:// or https:// with a host`)
	f(offerURL("https:///land"),
		`t.yaml:5: offers[0].url: URL must be absolute http:// or https:// with a host`)
	f(offerURL("https://{sub1}.shop.example/"),
		`t.yaml:5: offers[0].url: macros are not allowed in the URL's scheme or host`)
	f(offerURL("https://shop.example/a b"),
		`t.yaml:5: offers[0].url: URL must not contain spaces (write %20 or +)`)
	f(offerURL("https://shop example/"),
		`t.yaml:5: offers[0].url: URL must not contain spaces (write %20 or +)`)
	f(offerURL("https://shop.example:port/"),
		`t.yaml:5: offers[0].url: malformed URL: invalid port ":port" after host`)
	f(partnerURL("p.example/pb"),
		`t.yaml:12: affiliates[0].postback.url: URL must be absolute http:// or https:// with a host`)

	// Durations.
	offerTimes := func(window, ctit string) string {
		return `advertisers: [{id: 1, token: t1}]
offers:
- id: 1
  advertiser_id: 1
  url: "https://shop.example/"
  attribution_window: ` + window + `
  min_ctit: ` + ctit + `
  goals: [{id: default, revenue: {fixed: 1}, payout: {fixed: 1}}]
`
	}
	f(offerTimes("30d", "0"),
		`t.yaml:6: offers[0].attribution_window: malformed duration "30d" (write it like 90s, 15m or 720h)`)
	f(offerTimes("720", "1m"),
		`t.yaml:6: offers[0].attribution_window: malformed duration "720" (write it like 90s, 15m or 720h)`)
	f(offerTimes("0s", "0s"),
		`t.yaml:6: offers[0].attribution_window: must be longer than 0`)
	f(offerTimes("24h", "-5s"),
		`t.yaml:7: offers[0].min_ctit: duration "-5s" must not be negative`)
	f(offerTimes("1h", "1h"),
		`t.yaml:7: offers[0].min_ctit: 1h0m0s is not shorter than attribution_window 1h0m0s: every conversion would be rejected`)
	f(base+"delivery: {timeout: 5, retries: [1m, soon, 0s]}\n",
		`t.yaml:9: delivery.timeout: malformed duration "5" (write it like 90s, 15m or 720h)`,
		`t.yaml:9: delivery.retries[1]: malformed duration "soon" (write it like 90s, 15m or 720h)`,
		`t.yaml:9: delivery.retries[2]: must be longer than 0`)
	f(base+"delivery: {timeout: 0s}\n", `t.yaml:9: delivery.timeout: must be longer than 0`)

	// Revenue and payout rules.
	rule := func(revenue, payout string) string {
		return `advertisers: [{id: 1, token: t1}]
offers:
- id: 1
  advertiser_id: 1
  url: "https://shop.example/"
  goals:
  - id: default
    revenue: ` + revenue + `
    payout: ` + payout + `
`
	}
	f(rule("{fixed: 1, percent: 10}", "{}"),
		`t.yaml:8: offers[0].goals[0].revenue: set one of fixed or percent, not both`,
		`t.yaml:9: offers[0].goals[0].payout: set one of fixed (an amount) or percent (of the sale amount)`)
	f(rule("{fixed: -1}", "{percent: -7}"),
		`t.yaml:8: offers[0].goals[0].revenue.fixed: must not be negative`,
		`t.yaml:9: offers[0].goals[0].payout.percent: must not be negative`)
	f(rule("{fixed: 100000000000000}", "{fixed: 99999999999999.9999}"),
		`t.yaml:8: offers[0].goals[0].revenue.fixed: 100000000000000 is more than the warehouse holds (at most 99999999999999.9999)`)
	f(rule("{percent: 100.0001}", "{percent: 100}"),
		`t.yaml:8: offers[0].goals[0].revenue.percent: 100.0001% is more than the whole sale amount (at most 100)`)
	f(rule("{fixed: 1.23456}", `{fixed: "1,5"}`),
		`t.yaml:8: offers[0].goals[0].revenue.fixed: "1.23456" is not a decimal number with at most 4 decimal places`,
		`t.yaml:9: offers[0].goals[0].payout.fixed: "1,5" is not a decimal number with at most 4 decimal places`)
	f(rule("{fixed: 1e3}", "5"),
		`t.yaml:8: offers[0].goals[0].revenue.fixed: "1e3" is not a decimal number with at most 4 decimal places`,
		`t.yaml:9: offers[0].goals[0].payout: expected a mapping, got the value "5"`)
	f(`advertisers: [{id: 1, token: t1}]
offers:
- id: 1
  advertiser_id: 1
  url: "https://shop.example/"
  goals:
  - id: default
    revenue: {fixed: 1}
`, `t.yaml:7: offers[0].goals[0]: missing required key "payout"`)

	// Partner postback method, statuses, goals.
	postback := func(fields string) string {
		return base + `affiliates:
- id: 7
  postback: {url: "https://p.example/", ` + fields + `}
`
	}
	f(postback("method: PUT"),
		`t.yaml:11: affiliates[0].postback.method: method "PUT" is neither GET nor POST`)
	f(postback("method: get"),
		`t.yaml:11: affiliates[0].postback.method: method "get" is neither GET nor POST`)
	f(postback("statuses: [approved, aproved, approved]"),
		`t.yaml:11: affiliates[0].postback.statuses[1]: unknown status "aproved" (want approved, pending or rejected)`,
		`t.yaml:11: affiliates[0].postback.statuses[2]: status "approved" is listed twice`)
	f(postback("statuses: []"),
		`t.yaml:11: affiliates[0].postback.statuses: an empty list would send nothing; leave statuses out for the default [approved]`)
	f(postback(`goals: [sale, ""]`),
		`t.yaml:11: affiliates[0].postback.goals[1]: goal id must not be empty`)

	// CIDRs.
	f(`advertisers:
- id: 1
  token: t1
  allowed_ips: [10.0.0.0/8, 10.0.0.0/33, 2001:db8::/32, example.com, 203.0.113.7]
`, `t.yaml:4: advertisers[0].allowed_ips[1]: "10.0.0.0/33" is not a CIDR (like 203.0.113.0/24) or an IP address`,
		`t.yaml:4: advertisers[0].allowed_ips[3]: "example.com" is not a CIDR (like 203.0.113.0/24) or an IP address`)

	// Missing or empty required fields.
	f(`advertisers:
- {name: Shop}
- {id: 2, token: ""}
- {id: 3, token: "  "}
`, `t.yaml:2: advertisers[0]: missing required key "id"`,
		`t.yaml:2: advertisers[0]: missing required key "token"`,
		`t.yaml:3: advertisers[1].token: must not be empty`,
		`t.yaml:4: advertisers[2].token: must not be empty`)
	f(`advertisers: [{id: 1, token: t1}]
offers:
- id: 1
  goals: []
`, `t.yaml:3: offers[0]: missing required key "advertiser_id"`,
		`t.yaml:3: offers[0]: missing required key "url"`,
		`t.yaml:4: offers[0].goals: an offer needs at least one goal`)
	f(`advertisers: [{id: 1, token: t1}]
offers:
- id: 1
  advertiser_id: 1
  url:
`, `t.yaml:3: offers[0]: missing required key "url"`,
		`t.yaml:3: offers[0]: missing required key "goals"`)
	f(base+`affiliates:
- {id: 7, postback: {method: POST}}
- {id: 8, postback: {url: "https://p.example/"}}
- {name: no id}
`, `t.yaml:10: affiliates[0].postback: missing required key "url"`,
		`t.yaml:12: affiliates[2]: missing required key "id"`)
	f(`advertisers:
- {id: 0, token: a}
- {id: seven, token: b}
- {id: 4294967296, token: c}
`, `t.yaml:2: advertisers[0].id: "0" is not an ID (a whole number from 1 to 4294967295)`,
		`t.yaml:3: advertisers[1].id: "seven" is not an ID (a whole number from 1 to 4294967295)`,
		`t.yaml:4: advertisers[2].id: "4294967296" is not an ID (a whole number from 1 to 4294967295)`)
	f(offerURL("https://shop.example/")+"  currency: usd\n",
		`t.yaml:7: offers[0].currency: "usd" is not an ISO 4217 code of three capital letters (like USD)`)

	// Partner URLs at non-public hosts are refused unless allowed.
	for _, c := range []struct{ url, host, why string }{
		{"http://127.0.0.1:9999/pb", "127.0.0.1", "a loopback address"},
		{"http://[::1]/pb", "::1", "a loopback address"},
		{"http://localhost:8080/pb", "localhost", "a loopback name"},
		{"http://api.LOCALHOST./pb", "api.LOCALHOST.", "a loopback name"},
		{"https://10.1.2.3/pb", "10.1.2.3", "a private address"},
		{"https://192.168.0.10/pb", "192.168.0.10", "a private address"},
		{"https://[fd00::1]/pb", "fd00::1", "a private address"},
		{"http://169.254.169.254/latest/meta-data", "169.254.169.254", "a link-local address"},
		{"http://0.0.0.0/", "0.0.0.0", "an unspecified address"},
		{"http://224.0.0.1/", "224.0.0.1", "a link-local address"},
		{"http://239.1.2.3/", "239.1.2.3", "a multicast address"},
		{"http://100.100.100.200/", "100.100.100.200", "a shared (carrier-grade NAT) address"},
		{"http://[::ffff:127.0.0.1]/", "::ffff:127.0.0.1", "a loopback address"},
		{"http://2130706433/", "2130706433", "a non-canonical IP address"},
		{"http://127.1/", "127.1", "a non-canonical IP address"},
		{"http://0x7f.0.0.1/", "0x7f.0.0.1", "a non-canonical IP address"},
	} {
		f(partnerURL(c.url), `t.yaml:12: affiliates[0].postback.url: host "`+c.host+`" is `+c.why+
			`; partner postbacks go to public hosts only (allow_private_partner_urls: true allows it for local testing)`)
		if _, err := Parse([]byte("allow_private_partner_urls: true\n"+partnerURL(c.url)), "t.yaml"); err != nil {
			t.Fatalf("with allow_private_partner_urls, %s is refused: %v", c.url, err)
		}
	}

	// Wrong shapes, YAML errors, empty files.
	f("", `t.yaml: the file is empty`)
	f("# nothing here\n", `t.yaml: the file is empty`)
	f("- 1\n- 2\n", `t.yaml:1: expected a mapping, got a list`)
	f("advertisers: {id: 1}\n", `t.yaml:1: advertisers: expected a list, got a mapping`)
	f("advertisers:\n- {id: 1, token: [a]}\n", `t.yaml:2: advertisers[0].token: expected a single value, got a list`)
	f(base+"allow_private_partner_urls: yes\n", `t.yaml:9: allow_private_partner_urls: expected true or false, got the value "yes"`)
	f("advertisers:\n- {id: 1, token: t1}\noffers: x: y\n", `t.yaml:3: invalid YAML: mapping values are not allowed in this context`)
	f(base+"---\nadvertisers: []\n", `t.yaml:9: the file must hold exactly one YAML document`)
	f("offers:\n\t- id: 1\n", `t.yaml:2: invalid YAML: found character that cannot start any token`)

	// Every problem of a file at once, in file order.
	f(`advertisers:
- {id: 1, token: t1}
- {id: 1, token: t1}
offers:
- id: 2
  advertiser_id: 5
  url: "https://shop.example/?c={clickid}"
  attribution_window: 30d
  goals:
  - {id: default, revenue: {fixd: 1}, payout: {fixed: 0.5}}
affiliates:
- id: 7
  postback: {url: "http://10.0.0.1/?r={revenue}", method: PUT}
`, `t.yaml:3: advertisers[1].id: duplicate advertiser id 1 (first defined at line 2)`,
		`t.yaml:3: advertisers[1].token: duplicate token (already used at line 2)`,
		`t.yaml:6: offers[0].advertiser_id: advertiser 5 is not defined`,
		`t.yaml:7: offers[0].url: unknown macro "{clickid}"`,
		`t.yaml:8: offers[0].attribution_window: malformed duration "30d" (write it like 90s, 15m or 720h)`,
		`t.yaml:10: offers[0].goals[0].revenue: unknown key "fixd" (want one of: fixed, percent)`,
		`t.yaml:10: offers[0].goals[0].revenue: set one of fixed (an amount) or percent (of the sale amount)`,
		`t.yaml:13: affiliates[0].postback.url: macro "{revenue}" is never offered to partners`,
		`t.yaml:13: affiliates[0].postback.url: host "10.0.0.1" is a private address; partner postbacks go to public hosts only (allow_private_partner_urls: true allows it for local testing)`,
		`t.yaml:13: affiliates[0].postback.method: method "PUT" is neither GET nor POST`)

	// A partner URL with a problem in its template still has its host
	// checked: fixing the one must not reveal the other.
	private := `; partner postbacks go to public hosts only (allow_private_partner_urls: true allows it for local testing)`
	f(partnerURL("http://127.0.0.1/pb?x={revenue}"),
		`t.yaml:12: affiliates[0].postback.url: macro "{revenue}" is never offered to partners`,
		`t.yaml:12: affiliates[0].postback.url: host "127.0.0.1" is a loopback address`+private)
	f(partnerURL("http://localhost/pb?x={bogus}&y={offer_id"),
		`t.yaml:12: affiliates[0].postback.url: unknown macro "{bogus}"`,
		`t.yaml:12: affiliates[0].postback.url: unclosed "{" at offset 32`,
		`t.yaml:12: affiliates[0].postback.url: host "localhost" is a loopback name`+private)
	f(partnerURL("http://[::1]/pb?x=a b"),
		`t.yaml:12: affiliates[0].postback.url: URL must not contain spaces (write %20 or +)`,
		`t.yaml:12: affiliates[0].postback.url: host "::1" is a loopback address`+private)
	f(partnerURL("http://127.0.0.1{x/pb"),
		`t.yaml:12: affiliates[0].postback.url: unclosed "{" at offset 16`)
	f(partnerURL("http://{aff_id}.127.0.0.1/pb"),
		`t.yaml:12: affiliates[0].postback.url: macros are not allowed in the URL's scheme or host`)
	f(partnerURL("http://127.0.0.1:99999/pb?x={revenue}"),
		`t.yaml:12: affiliates[0].postback.url: macro "{revenue}" is never offered to partners`,
		`t.yaml:12: affiliates[0].postback.url: malformed URL: port "99999" is not a TCP port (1 to 65535)`,
		`t.yaml:12: affiliates[0].postback.url: host "127.0.0.1" is a loopback address`+private)
}

func TestParseValid(t *testing.T) {
	c, err := Parse([]byte(`advertisers:
- id: 1
  name: Shop Inc
  token: "s3cret"
  allowed_ips: [203.0.113.0/24, "2001:db8::1"]
- {id: 2, token: 0123}
offers:
- id: 10
  advertiser_id: 1
  name: Summer Sale
  url: "https://shop.example/land?click_id={click_id}&aff={aff_id}&s1={sub1}"
  goals:
  - &default {id: default, revenue: {fixed: 2.50}, payout: {fixed: 1.75}}
  - id: sale
    multiple: true
    revenue: {percent: 10}
    payout: {percent: 7}
- id: 11
  advertiser_id: 2
  url: "http://app.example/"
  attribution_window: 168h
  min_ctit: 30s
  currency: EUR
  goals: [*default]
delivery: {retries: []}
affiliates:
- id: 7
  name: Partner A
  postback:
    url: "https://partner.example/pb?cid={sub1}&p={payout}&tx={conversion_id}"
- id: 8
  postback:
    url: "https://partner.example/b"
    method: POST
    goals: [sale]
    statuses: [approved, rejected]
    secret: k
- id: 9
`), "t.yaml")
	if err != nil {
		t.Fatal(err)
	}

	f := func(what string, got, want any) {
		t.Helper()
		if got != want {
			t.Fatalf("%s: got %v, want %v", what, got, want)
		}
	}
	shop := c.Advertiser(1)
	f("advertiser 1 name", shop.Name, "Shop Inc")
	f("advertiser by token", c.AdvertiserByToken("s3cret"), shop)
	f("advertiser by leading-zero token", c.AdvertiserByToken("0123"), c.Advertiser(2))
	f("advertiser by unknown token", c.AdvertiserByToken("s3cre"), (*Advertiser)(nil))
	f("advertiser by empty token", c.AdvertiserByToken(""), (*Advertiser)(nil))
	f("unknown advertiser", c.Advertiser(3), (*Advertiser)(nil))
	f("allows 203.0.113.9", shop.AllowsIP(netip.MustParseAddr("203.0.113.9")), true)
	f("allows mapped 203.0.113.9", shop.AllowsIP(netip.MustParseAddr("::ffff:203.0.113.9")), true)
	f("allows 2001:db8::1", shop.AllowsIP(netip.MustParseAddr("2001:db8::1")), true)
	f("allows 2001:db8::2", shop.AllowsIP(netip.MustParseAddr("2001:db8::2")), false)
	f("allows 198.51.100.1", shop.AllowsIP(netip.MustParseAddr("198.51.100.1")), false)
	f("advertiser 2 allows any", c.Advertiser(2).AllowsIP(netip.MustParseAddr("198.51.100.1")), true)

	o := c.Offer(10)
	f("offer 10 advertiser", o.AdvertiserID, uint32(1))
	f("offer 10 raw URL", o.RawURL, "https://shop.example/land?click_id={click_id}&aff={aff_id}&s1={sub1}")
	f("offer 10 template", o.URL.String(), o.RawURL)
	f("offer 10 default window", o.AttributionWindow, 720*time.Hour)
	f("offer 10 default min_ctit", o.MinCTIT, time.Duration(0))
	f("offer 10 default currency", o.Currency, "USD")
	f("goal by empty id", o.Goal(""), o.Goals[0])
	f("goal default", o.Goal("default").Payout, Rule{Fixed: 1_7500})
	f("goal default revenue", o.Goal("default").Revenue, Rule{Fixed: 2_5000})
	f("goal sale", o.Goal("sale").Payout, Rule{Percent: 7_0000, IsPercent: true})
	f("goal sale multiple", o.Goal("sale").Multiple, true)
	f("goal default multiple", o.Goal("default").Multiple, false)
	f("unknown goal", o.Goal("install"), (*Goal)(nil))
	o11 := c.Offer(11)
	f("offer 11 window", o11.AttributionWindow, 168*time.Hour)
	f("offer 11 min_ctit", o11.MinCTIT, 30*time.Second)
	f("offer 11 currency", o11.Currency, "EUR")
	f("offer 11 aliased goal", o11.Goal("").Revenue, Rule{Fixed: 2_5000})
	f("unknown offer", c.Offer(12), (*Offer)(nil))
	f("max window", c.MaxAttributionWindow(), 720*time.Hour)

	f("delivery default timeout", c.Delivery.Timeout, 5*time.Second)
	f("delivery explicit no retries", len(c.Delivery.Retries), 0)

	a := c.Affiliate(7).Postback
	f("affiliate 7 default method", a.Method, "GET")
	f("affiliate 7 wants any goal", a.WantsGoal("whatever"), true)
	f("affiliate 7 wants approved", a.WantsStatus("approved"), true)
	f("affiliate 7 wants pending", a.WantsStatus("pending"), false)
	f("affiliate 7 no secret", a.Secret, "")
	b := c.Affiliate(8).Postback
	f("affiliate 8 method", b.Method, "POST")
	f("affiliate 8 wants sale", b.WantsGoal("sale"), true)
	f("affiliate 8 wants default", b.WantsGoal(""), false)
	f("affiliate 8 wants rejected", b.WantsStatus("rejected"), true)
	f("affiliate 8 wants pending", b.WantsStatus("pending"), false)
	f("affiliate 8 secret", b.Secret, "k")
	f("affiliate 9 has no postback", c.Affiliate(9).Postback, (*PartnerPostback)(nil))
	f("unknown affiliate", c.Affiliate(1), (*Affiliate)(nil))
}

func TestParseDefaults(t *testing.T) {
	c, err := Parse([]byte("advertisers: []\n"), "t.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if c.Delivery.Timeout != 5*time.Second || !slices.Equal(c.Delivery.Retries, DefaultRetries) {
		t.Fatalf("delivery defaults: got %+v", c.Delivery)
	}
	if c.MaxAttributionWindow() != 0 || c.AllowPrivatePartnerURLs {
		t.Fatalf("unexpected catalog defaults: %+v", c)
	}
	// The defaults are the catalog's own copy.
	c.Delivery.Retries[0] = time.Hour
	if DefaultRetries[0] != 10*time.Second {
		t.Fatalf("a catalog shares DefaultRetries")
	}
}

func TestExampleConfigLoads(t *testing.T) {
	c, err := Load("../../examples/trackstar.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Advertisers) != 1 || len(c.Offers) != 2 || len(c.Affiliates) != 2 {
		t.Fatalf("got %d advertisers, %d offers, %d affiliates; want 1, 2, 2",
			len(c.Advertisers), len(c.Offers), len(c.Affiliates))
	}
	for _, o := range c.Offers {
		if o.Goal("default") == nil || o.Goal("sale") == nil {
			t.Fatalf("offer %d lacks goal default or sale", o.ID)
		}
		if c.Advertiser(o.AdvertiserID) == nil || c.Advertiser(o.AdvertiserID).Token == "" {
			t.Fatalf("offer %d has no advertiser with a token", o.ID)
		}
	}
	for _, a := range c.Affiliates {
		if a.Postback == nil {
			t.Fatalf("affiliate %d has no postback", a.ID)
		}
	}
}

func TestLoadMissingFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "missing.yaml")
	_, err := Load(path)
	if err == nil || !strings.Contains(err.Error(), "cannot read config: open "+path) {
		t.Fatalf("got %v", err)
	}
}

func TestRuleApply(t *testing.T) {
	f := func(r Rule, amount, want string) {
		t.Helper()
		a, err := schemas.ParseAmount(amount)
		if err != nil {
			t.Fatal(err)
		}
		if got := r.Apply(a).String(); got != want {
			t.Fatalf("%+v of %s: got %s, want %s", r, amount, got, want)
		}
	}
	pct := func(s string) Rule {
		a, err := schemas.ParseAmount(s)
		if err != nil {
			t.Fatal(err)
		}
		return Rule{Percent: a, IsPercent: true}
	}
	f(pct("7"), "19.99", "1.3993")
	f(pct("7.5"), "19.99", "1.4993")
	f(pct("10"), "0", "0")
	f(pct("100"), "12.3456", "12.3456")
	f(pct("0"), "99", "0")
	f(Rule{Fixed: 2_5000}, "19.99", "2.5")
	f(Rule{Fixed: 1_7500}, "0", "1.75")
}

func TestIsPublicAddr(t *testing.T) {
	f := func(addr string, want bool) {
		t.Helper()
		if got := IsPublicAddr(netip.MustParseAddr(addr)); got != want {
			t.Fatalf("IsPublicAddr(%s) = %v, want %v", addr, got, want)
		}
	}
	f("8.8.8.8", true)
	f("203.0.113.7", true)
	f("2606:4700::1111", true)
	f("172.32.0.1", true)
	f("127.0.0.1", false)
	f("127.255.0.9", false)
	f("::1", false)
	f("10.0.0.1", false)
	f("172.16.5.4", false)
	f("192.168.1.1", false)
	f("fc00::1", false)
	f("fd12:3456::1", false)
	f("fec0::1", false)
	f("169.254.169.254", false)
	f("fe80::1", false)
	f("fe80::1%eth0", false)
	f("0.0.0.0", false)
	f("0.1.2.3", false)
	f("::", false)
	f("224.0.0.251", false)
	f("ff02::1", false)
	f("ff0e::1", false)
	f("100.64.0.1", false)
	f("100.100.100.200", false)
	f("255.255.255.255", false)
	f("::ffff:10.0.0.1", false)
	f("::ffff:8.8.8.8", true)
	f("64:ff9b::7f00:1", false)
	f("64:ff9b::808:808", true)
	f("2002:7f00:1::1", false)   // 6to4 of 127.0.0.1
	f("2002:a9fe:a9fe::", false) // 6to4 of 169.254.169.254
	f("2002:808:808::1", true)
	f("64:ff9b:1::a00:1", false)
	f("::7f00:1", false) // IPv4-compatible 127.0.0.1
	f("192.0.0.170", false)
	f("198.18.0.1", false)
	f("198.20.0.1", true)
	f("::ffff:0:7f00:1", false)                      // IPv4-translated (SIIT) 127.0.0.1
	f("::ffff:0:a9fe:a9fe", false)                   // SIIT 169.254.169.254
	f("::ffff:0:808:808", true)                      // SIIT 8.8.8.8
	f("2001:0:4136:e378:8000:63bf:f5ff:fffe", false) // Teredo, client 10.0.0.1
	f("2001:2::1", false)
	f("2001:4860:4860::8888", true)
	if IsPublicAddr(netip.Addr{}) {
		t.Fatalf("the zero Addr is public")
	}
}

// allowed_ips written as IPv4-mapped IPv6 (as many logs and `ss` print
// client addresses) matches the IPv4 addresses it means. AllowsIP compares
// IPv4-mapped clients as IPv4, and a prefix never matches across families,
// so kept as IPv6 such an entry matched nothing: every postback of that
// advertiser got 403.
func TestAllowedIPsIPv4Mapped(t *testing.T) {
	for _, entry := range []string{"::ffff:203.0.113.5", "::ffff:203.0.113.0/120"} {
		cfg := `advertisers:
- {id: 1, token: t1, allowed_ips: ["` + entry + `"]}
`
		c, err := Parse([]byte(cfg), "t.yaml")
		if err != nil {
			t.Fatalf("allowed_ips %q: %v", entry, err)
		}
		adv := c.Advertiser(1)
		for _, ip := range []string{"203.0.113.5", "::ffff:203.0.113.5"} {
			if !adv.AllowsIP(netip.MustParseAddr(ip)) {
				t.Errorf("allowed_ips [%q] loaded as %v, but a postback from %s is refused", entry, adv.AllowedIPs, ip)
			}
		}
	}
}

func TestAllowedIPsRefusesMixedMappedPrefix(t *testing.T) {
	_, err := Parse([]byte("advertisers:\n- {id: 1, token: t1, allowed_ips: [\"::ffff:0.0.0.0/80\"]}\n"), "t.yaml")
	if err == nil || !strings.Contains(err.Error(), "IPv4-mapped") {
		t.Fatalf("Parse = %v, want an error about IPv4-mapped addresses", err)
	}
}

func TestParsePortOutOfRangeNamesTheLine(t *testing.T) {
	_, err := Parse([]byte(`advertisers:
- {id: 1, token: t1}
offers:
- id: 1
  advertiser_id: 1
  url: "https://shop.example:99999/?c={click_id}"
  goals:
  - {id: default, revenue: {fixed: 1}, payout: {fixed: 0.5}}
affiliates:
- id: 7
  postback:
    url: "https://partner.example:123456/pb?tx={conversion_id}"
`), "t.yaml")
	if err == nil {
		t.Fatalf("a config whose URLs have ports out of range loads")
	}
	lines := strings.Split(err.Error(), "\n")
	if len(lines) != 2 || !strings.HasPrefix(lines[0], "t.yaml:6: offers[0].url: ") || !strings.HasPrefix(lines[1], "t.yaml:12: affiliates[0].postback.url: ") {
		t.Fatalf("errors = %q; want one naming line 6 and one naming line 12", lines)
	}
}
