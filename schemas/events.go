package schemas

import (
	"encoding/json"
	"errors"
	"fmt"
)

// Version is the schema version this build writes and reads.
const Version = 1

// Conversion statuses.
const (
	StatusApproved = "approved"
	StatusPending  = "pending"
	StatusRejected = "rejected"
)

// Reject reasons of a rejected conversion.
const (
	RejectUnknownClick       = "unknown_click"
	RejectExpired            = "expired"
	RejectCTITTooShort       = "ctit_too_short"
	RejectDuplicate          = "duplicate"
	RejectAdvertiserMismatch = "advertiser_mismatch"
	RejectUnknownGoal        = "unknown_goal"
	RejectAdvertiserRejected = "advertiser_rejected"
	// RejectCurrencyMismatch: the postback's amount is in another currency
	// than its offer's, and Trackstar keeps no exchange rates.
	RejectCurrencyMismatch = "currency_mismatch"
	// RejectSuperseded: a status update that the edge took before the
	// conversion's current status but that reached Kafka after it, through
	// an edge's spool; the newer status stands.
	RejectSuperseded = "superseded"
)

// Delivery outcomes of one partner postback attempt.
const (
	OutcomeDelivered = "delivered"
	OutcomeRetrying  = "retrying"
	OutcomeFailed    = "failed"
	OutcomeDead      = "dead"
)

// Click is produced by the edge for every /click it answers with a redirect.
// Kafka key: ClickID.
type Click struct {
	V            int    `json:"v"`
	ClickID      string `json:"click_id"`
	TS           int64  `json:"ts"` // Unix milliseconds; equals the time embedded in ClickID
	OfferID      uint32 `json:"offer_id"`
	AdvertiserID uint32 `json:"advertiser_id"` // the offer's advertiser when the click happened
	AffID        uint32 `json:"aff_id"`
	Source       string `json:"source"`
	Sub1         string `json:"sub1"`
	Sub2         string `json:"sub2"`
	Sub3         string `json:"sub3"`
	Sub4         string `json:"sub4"`
	Sub5         string `json:"sub5"`
	IP           string `json:"ip"`
	UserAgent    string `json:"user_agent"`
	Referer      string `json:"referer"`
}

// Postback is produced by the edge for every advertiser postback it accepts.
// Kafka key: ClickID.
type Postback struct {
	V       int    `json:"v"`
	EventID string `json:"event_id"` // unique per accepted request; conversion IDs derive from it
	ClickID string `json:"click_id"`
	TS      int64  `json:"ts"` // Unix milliseconds the edge received it
	// TSNanos is the same time in Unix nanoseconds (0 from an edge that
	// did not record it): two edges can take two statuses of one
	// conversion within a millisecond (see Time).
	TSNanos      int64  `json:"ts_ns,omitempty"`
	AdvertiserID uint32 `json:"advertiser_id"`
	Goal         string `json:"goal"`   // empty: the offer's default goal
	Amount       string `json:"amount"` // validated decimal; empty when the postback had none
	Currency     string `json:"currency"`
	TxnID        string `json:"txn_id"`
	Status       string `json:"status"` // approved, pending or rejected (the advertiser's word)
	IP           string `json:"ip"`
	// Spooled says the edge answered the postback before Kafka had it: it
	// went through the edge's spool, so it may reach Kafka after postbacks
	// other edges took later (see MarkSpooled).
	Spooled bool `json:"spooled,omitempty"`
}

// Time is the time the edge received the postback, in Unix nanoseconds
// (TSNanos, else TS).
func (p *Postback) Time() int64 { return eventNanos(p.TS, p.TSNanos) }

func eventNanos(ms, ns int64) int64 {
	if ns != 0 {
		return ns
	}
	return ms * 1e6
}

// Conversion is produced by the attributor, one per postback, whatever the
// outcome. Kafka key: ClickID. ConversionID is stable across status updates;
// Version grows with each update (ReplacingMergeTree keeps the highest).
type Conversion struct {
	V               int    `json:"v"`
	ConversionID    string `json:"conversion_id"`
	Version         uint32 `json:"version"`
	PostbackEventID string `json:"postback_event_id"` // the postback this record answers
	ClickID         string `json:"click_id"`
	TS              int64  `json:"ts"`              // Unix milliseconds of the postback
	TSNanos         int64  `json:"ts_ns,omitempty"` // the postback's TSNanos
	ClickTS         int64  `json:"click_ts"`        // Unix milliseconds of the click; 0 when unknown
	OfferID         uint32 `json:"offer_id"`
	AdvertiserID    uint32 `json:"advertiser_id"`
	AffID           uint32 `json:"aff_id"`
	Goal            string `json:"goal"`
	Status          string `json:"status"`
	RejectReason    string `json:"reject_reason"`
	TxnID           string `json:"txn_id"`
	SaleAmount      Amount `json:"sale_amount"`
	Revenue         Amount `json:"revenue"`
	Payout          Amount `json:"payout"`
	Currency        string `json:"currency"`
	CTITSeconds     int64  `json:"ctit_seconds"`
	Source          string `json:"source"`
	Sub1            string `json:"sub1"`
	Sub2            string `json:"sub2"`
	Sub3            string `json:"sub3"`
	Sub4            string `json:"sub4"`
	Sub5            string `json:"sub5"`
}

// Delivery is produced by the dispatcher for every partner postback attempt.
// Kafka key: ConversionID.
type Delivery struct {
	V            int    `json:"v"`
	ConversionID string `json:"conversion_id"`
	Version      uint32 `json:"version"` // the conversion version being delivered
	Status       string `json:"status"`  // the conversion status being delivered
	AffID        uint32 `json:"aff_id"`
	Attempt      uint32 `json:"attempt"` // 1 for the first try
	TS           int64  `json:"ts"`      // Unix milliseconds the attempt started
	Method       string `json:"method"`
	URL          string `json:"url"`
	StatusCode   uint16 `json:"status_code"` // 0 when no response came
	DurationMS   uint32 `json:"duration_ms"`
	Outcome      string `json:"outcome"`
	Error        string `json:"error"`
}

// PostbackTime is the time of the conversion's postback, in Unix
// nanoseconds, as Postback.Time.
func (c *Conversion) PostbackTime() int64 { return eventNanos(c.TS, c.TSNanos) }

// ErrUnknownVersion is wrapped by every decoder when "v" is missing or not
// a version this build reads.
var ErrUnknownVersion = errors.New("unknown schema version")

// versioned is implemented by every event so that one decoder checks "v".
type versioned interface {
	*Click | *Postback | *Conversion | *Delivery
	version() int
}

func (e *Click) version() int      { return e.V }
func (e *Postback) version() int   { return e.V }
func (e *Conversion) version() int { return e.V }
func (e *Delivery) version() int   { return e.V }

func decode[T versioned](b []byte, e T, kind string) error {
	if err := json.Unmarshal(b, e); err != nil {
		return fmt.Errorf("cannot decode %s event: %w", kind, err)
	}
	if v := e.version(); v != Version {
		return fmt.Errorf("cannot decode %s event: %w %d (this build reads %d)", kind, ErrUnknownVersion, v, Version)
	}
	return nil
}

// DecodeClick decodes a click event and checks its version.
func DecodeClick(b []byte) (Click, error) {
	var e Click
	if decodeClickFast(b, &e) && e.V == Version {
		return e, nil
	}
	e = Click{}
	err := decode(b, &e, "click")
	return e, err
}

// DecodePostback decodes a postback event and checks its version.
func DecodePostback(b []byte) (Postback, error) {
	var e Postback
	err := decode(b, &e, "postback")
	return e, err
}

// DecodeConversion decodes a conversion event and checks its version.
func DecodeConversion(b []byte) (Conversion, error) {
	var e Conversion
	err := decode(b, &e, "conversion")
	return e, err
}

// DecodeDelivery decodes a delivery event and checks its version.
func DecodeDelivery(b []byte) (Delivery, error) {
	var e Delivery
	err := decode(b, &e, "delivery")
	return e, err
}

// EncodeConversion encodes c with the current version.
func EncodeConversion(c Conversion) []byte {
	c.V = Version
	b, err := json.Marshal(&c)
	if err != nil {
		panic("BUG: cannot encode conversion: " + err.Error())
	}
	return b
}

// EncodeDelivery encodes d with the current version.
func EncodeDelivery(d Delivery) []byte {
	d.V = Version
	b, err := json.Marshal(&d)
	if err != nil {
		panic("BUG: cannot encode delivery: " + err.Error())
	}
	return b
}
