package catalog

import (
	"crypto/sha256"
	"net/netip"
	"slices"
	"time"

	"github.com/trackstar/trackstar/schemas"
)

// Defaults of the config file, applied when a key is absent.
const (
	DefaultAttributionWindow = 720 * time.Hour
	DefaultCurrency          = "USD"
	DefaultDeliveryTimeout   = 5 * time.Second
	DefaultPostbackMethod    = "GET"
	// DefaultGoal is the goal of a postback that names none.
	DefaultGoal = "default"
)

// DefaultRetries is the delivery retry schedule when the file sets none.
var DefaultRetries = []time.Duration{
	10 * time.Second, time.Minute, 5 * time.Minute, 30 * time.Minute,
	2 * time.Hour, 6 * time.Hour, 12 * time.Hour,
}

// Catalog is one loaded config file. Build it with Load or Parse, which
// also build its lookup indexes, and treat it as read-only afterwards:
// every role shares it without locks.
type Catalog struct {
	// AllowPrivatePartnerURLs lets partner postback URLs point at loopback,
	// private and other non-public addresses. Default false; true only for
	// local testing.
	AllowPrivatePartnerURLs bool
	Advertisers             []*Advertiser
	Offers                  []*Offer
	Affiliates              []*Affiliate
	Delivery                Delivery

	advertisers map[uint32]*Advertiser
	tokens      map[[sha256.Size]byte]*Advertiser
	offers      map[uint32]*Offer
	affiliates  map[uint32]*Affiliate
	maxWindow   time.Duration
}

// Offer returns the offer with this ID, or nil.
func (c *Catalog) Offer(id uint32) *Offer { return c.offers[id] }

// Affiliate returns the affiliate with this ID, or nil.
func (c *Catalog) Affiliate(id uint32) *Affiliate { return c.affiliates[id] }

// Advertiser returns the advertiser with this ID, or nil.
func (c *Catalog) Advertiser(id uint32) *Advertiser { return c.advertisers[id] }

// AdvertiserByToken returns the advertiser whose token this is, or nil. The
// index is keyed by the token's SHA-256, so the time a lookup takes tells
// nothing about how much of a guessed token was right.
func (c *Catalog) AdvertiserByToken(token string) *Advertiser {
	return c.tokens[sha256.Sum256([]byte(token))]
}

// MaxAttributionWindow returns the longest attribution window of any offer
// (0 when there are no offers): how long a click must be kept.
func (c *Catalog) MaxAttributionWindow() time.Duration { return c.maxWindow }

// Advertiser is a party that sends postbacks and pays us.
type Advertiser struct {
	ID   uint32 // required, 1 or more, unique
	Name string
	// Token is required on every postback of this advertiser and names it.
	// Required, non-empty, unique among advertisers.
	Token string
	// AllowedIPs are the networks postbacks must come from. Empty (the
	// default): any address. A bare IP address in the file is a /32 or /128.
	AllowedIPs []netip.Prefix
}

// AllowsIP reports whether a postback from ip is accepted.
func (a *Advertiser) AllowsIP(ip netip.Addr) bool {
	if len(a.AllowedIPs) == 0 {
		return true
	}
	ip = ip.Unmap().WithZone("")
	for _, p := range a.AllowedIPs {
		if p.Contains(ip) {
			return true
		}
	}
	return false
}

// Offer is what affiliates send clicks to.
type Offer struct {
	ID           uint32 // required, 1 or more, unique
	AdvertiserID uint32 // required; the advertiser must be defined
	Name         string
	// URL is where a click is redirected, with click macros filled in.
	// Required: absolute http or https with a host.
	URL    *Template
	RawURL string
	// AttributionWindow is how long after a click a conversion counts.
	// Default 720h; must be positive.
	AttributionWindow time.Duration
	// MinCTIT is the shortest click-to-conversion time accepted. Default
	// 0; must be shorter than AttributionWindow.
	MinCTIT time.Duration
	// Currency is the ISO 4217 code of the offer's amounts. Default USD.
	Currency string
	// Goals has at least one goal; IDs are unique within the offer.
	Goals []*Goal
}

// Goal returns the goal with this ID, or nil. The empty ID means the
// default goal ("default").
func (o *Offer) Goal(id string) *Goal {
	if id == "" {
		id = DefaultGoal
	}
	for _, g := range o.Goals {
		if g.ID == id {
			return g
		}
	}
	return nil
}

// Goal is one kind of conversion of an offer, with its money rules.
type Goal struct {
	ID string // required, non-empty; "default" is used when a postback names none
	// Multiple allows one conversion per txn_id instead of one per click.
	// Default false.
	Multiple bool
	Revenue  Rule // what the advertiser pays us; required
	Payout   Rule // what the affiliate earns; required
}

// Rule computes a money amount: a fixed amount, or a percentage of the
// postback's sale amount. In the file it is {fixed: 2.50} or {percent: 7},
// exactly one of the two, never negative, and a percent at most 100: both
// revenue and payout are shares of the same sale amount, so more than all
// of it is taken to be a typo.
type Rule struct {
	Fixed     schemas.Amount
	Percent   schemas.Amount
	IsPercent bool
}

// Apply returns the rule's amount for a postback whose sale amount is
// amount: Fixed, or Percent percent of amount (rounded to four places).
func (r Rule) Apply(amount schemas.Amount) schemas.Amount {
	if r.IsPercent {
		return amount.Percent(r.Percent)
	}
	return r.Fixed
}

// Affiliate is a partner that sends clicks and earns payouts.
type Affiliate struct {
	ID       uint32 // required, 1 or more, unique
	Name     string
	Postback *PartnerPostback // nil when the affiliate wants no postbacks
}

// PartnerPostback is how an affiliate is told about its conversions.
type PartnerPostback struct {
	// URL is rendered with click and conversion macros. Required: absolute
	// http or https with a host. Its host may not be a non-public IP
	// literal or localhost unless AllowPrivatePartnerURLs is set.
	URL    *Template
	RawURL string
	// Method is GET (the rendered URL is the request) or POST (the
	// conversion as JSON, to the rendered URL). Default GET.
	Method string
	// Goals lists the goals reported. Empty (the default): all goals.
	Goals []string
	// Statuses lists the conversion statuses reported. Default [approved].
	Statuses []string
	// Secret, when set, signs every request (X-Trackstar-Signature).
	// Default empty: unsigned.
	Secret string
}

// WantsGoal reports whether conversions of goal are reported. The empty
// goal means "default".
func (p *PartnerPostback) WantsGoal(goal string) bool {
	if len(p.Goals) == 0 {
		return true
	}
	if goal == "" {
		goal = DefaultGoal
	}
	return slices.Contains(p.Goals, goal)
}

// WantsStatus reports whether conversions with this status are reported.
func (p *PartnerPostback) WantsStatus(status string) bool {
	return slices.Contains(p.Statuses, status)
}

// Delivery configures how partner postbacks are sent.
type Delivery struct {
	// Timeout bounds one attempt. Default 5s; must be positive.
	Timeout time.Duration
	// Retries are the waits before each retry; after the last one the
	// postback is dead-lettered. Default [10s, 1m, 5m, 30m, 2h, 6h, 12h];
	// an explicit empty list means no retries. Every wait is positive.
	Retries []time.Duration
}
