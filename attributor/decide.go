package attributor

import (
	"github.com/trackstar/trackstar/internal/catalog"
	"github.com/trackstar/trackstar/schemas"
)

// SlotKey names the conversion a postback may update: its slot. A goal
// that allows one conversion per click has a slot per (click, goal); a
// "multiple" goal with a txn_id has one per (offer, goal, txn_id). Any
// postback with a txn_id also claims (offer, goal, txn_id), so that another
// click cannot convert again with the same transaction.
type SlotKey struct {
	ClickID string // the per-click slot, when TxnID is empty
	OfferID uint32 // with Goal and TxnID: the per-transaction slot
	Goal    string
	TxnID   string
}

func clickSlot(clickID, goal string) SlotKey { return SlotKey{ClickID: clickID, Goal: goal} }

func txnSlot(offerID uint32, goal, txnID string) SlotKey {
	return SlotKey{OfferID: offerID, Goal: goal, TxnID: txnID}
}

// slotKeys returns the slot of a conversion and its transaction claim
// (the zero SlotKey without a txn_id): the slot is the claim for a
// "multiple" goal with a txn_id, the click's otherwise.
func slotKeys(clickID string, offerID uint32, goal string, multiple bool, txnID string) (key, claim SlotKey) {
	key = clickSlot(clickID, goal)
	if txnID != "" {
		claim = txnSlot(offerID, goal, txnID)
		if multiple {
			key = claim
		}
	}
	return key, claim
}

// isMultiple reports whether the offer's goal allows one conversion per
// txn_id (false when the config no longer has it).
func isMultiple(cat *catalog.Catalog, offerID uint32, goal string) bool {
	if o := cat.Offer(offerID); o != nil {
		if g := o.Goal(goal); g != nil {
			return g.Multiple
		}
	}
	return false
}

// Slot is the latest state of one conversion.
type Slot struct {
	ConversionID string
	Version      uint32
	Status       string
	ClickID      string
	SaleAmount   schemas.Amount // kept so that an update without an amount keeps it
	// Currency is the conversion's, its offer's. Decide does not read it
	// (an update's currency is the offer's again); it stays in the stored
	// slot encoding, which existing stores hold.
	Currency string
	// TS is the time the edge took the postback behind this version, or
	// a later one with the same status (Unix nanoseconds, Postback.Time);
	// 0 in a slot stored before it was kept.
	TS int64
}

// Slots is what Decide may read of the earlier conversions.
type Slots interface {
	Slot(SlotKey) (Slot, bool)
}

// SlotSave is a slot state a Decision asks to store.
type SlotSave struct {
	Key  SlotKey
	Slot Slot
}

// Decision is the outcome of one postback: the conversion record to emit
// and the slot states to store with it.
type Decision struct {
	Conversion schemas.Conversion
	Saves      []SlotSave
}

// Decide applies the attribution rules to one postback. click is the
// postback's click, or nil when none is known (the caller has waited the
// grace period for it). Decide reads nothing but its arguments: the same
// inputs give the same decision, which is what makes a replayed postback
// re-emit the same record.
//
// Every time rule is measured from the click's time to the postback's (the
// time the edge received it), never to the time the attributor happens to
// run, so a backlog does not change outcomes. The checks run in this order,
// the first that fails deciding the reason: unknown_click (or expired, when
// the click ID is older than any offer's window), advertiser_mismatch,
// unknown_goal (also when the click's offer left the config), expired,
// ctit_too_short, currency_mismatch (a currency other than the offer's),
// then deduplication against the slot: a different click
// already holding the txn_id, or the same status again, is a duplicate; a
// spooled postback the edge took before the slot's current one is
// superseded; a different status updates the slot's conversion (same
// conversion_id, version+1). A postback with status rejected is advertiser_rejected, and
// takes or updates the slot like any other status.
func Decide(cat *catalog.Catalog, slots Slots, click *schemas.Click, pb *schemas.Postback) Decision {
	goalID := pb.Goal
	if goalID == "" {
		goalID = catalog.DefaultGoal
	}
	amount, hasAmount := schemas.Amount(0), false
	if pb.Amount != "" {
		if a, err := schemas.ParseAmount(pb.Amount); err == nil {
			amount, hasAmount = a, true
		}
	}
	c := schemas.Conversion{
		V:               schemas.Version,
		ConversionID:    pb.EventID,
		Version:         1,
		PostbackEventID: pb.EventID,
		ClickID:         pb.ClickID,
		TS:              pb.TS,
		TSNanos:         pb.TSNanos,
		AdvertiserID:    pb.AdvertiserID,
		Goal:            goalID,
		TxnID:           pb.TxnID,
		SaleAmount:      amount,
		Currency:        pb.Currency,
	}
	reject := func(reason string) Decision {
		c.Status, c.RejectReason = schemas.StatusRejected, reason
		return Decision{Conversion: c}
	}

	if click == nil {
		if ms, err := schemas.IDTime(pb.ClickID); err == nil && pb.TS-ms > cat.MaxAttributionWindow().Milliseconds() {
			return reject(schemas.RejectExpired)
		}
		return reject(schemas.RejectUnknownClick)
	}
	c.ClickTS, c.OfferID, c.AffID = click.TS, click.OfferID, click.AffID
	c.Source, c.Sub1, c.Sub2, c.Sub3, c.Sub4, c.Sub5 = click.Source, click.Sub1, click.Sub2, click.Sub3, click.Sub4, click.Sub5
	ctit := max(pb.TS-click.TS, 0) // a little clock skew between edges is not a negative time
	c.CTITSeconds = ctit / 1000

	offer := cat.Offer(click.OfferID)
	clickAdvertiser := click.AdvertiserID
	if clickAdvertiser == 0 && offer != nil {
		clickAdvertiser = offer.AdvertiserID
	}
	// Every rejection from here on carries the postback's currency, else
	// the offer's (docs/analyst.md).
	if c.Currency == "" && offer != nil {
		c.Currency = offer.Currency
	}
	if pb.AdvertiserID != clickAdvertiser {
		return reject(schemas.RejectAdvertiserMismatch)
	}
	if offer == nil {
		return reject(schemas.RejectUnknownGoal)
	}
	goal := offer.Goal(goalID)
	if goal == nil {
		return reject(schemas.RejectUnknownGoal)
	}
	if ctit > offer.AttributionWindow.Milliseconds() {
		return reject(schemas.RejectExpired)
	}
	if ctit < offer.MinCTIT.Milliseconds() {
		return reject(schemas.RejectCTITTooShort)
	}
	// A conversion's money — sale amount, revenue, payout — is in its
	// offer's currency, the one its goals' fixed amounts are written in.
	// An amount in another currency could only be mislabelled or summed
	// with the wrong ones: without exchange rates it is rejected, with
	// the currency sent, for the advertiser to resend it right.
	if c.Currency != offer.Currency {
		return reject(schemas.RejectCurrencyMismatch)
	}

	key, claim := slotKeys(click.ClickID, click.OfferID, goalID, goal.Multiple, pb.TxnID)
	if pb.TxnID != "" {
		if s, ok := slots.Slot(claim); ok && s.ClickID != click.ClickID {
			return reject(schemas.RejectDuplicate)
		}
	}
	status := pb.Status
	if status != schemas.StatusPending && status != schemas.StatusRejected {
		status = schemas.StatusApproved
	}
	prev, update := slots.Slot(key)
	if update {
		if prev.Status == status {
			d := reject(schemas.RejectDuplicate)
			if t := pb.Time(); t > prev.TS {
				// The same status again, taken later: the newest word on
				// the conversion, which an older spooled update must not
				// undo (RefreshOf restores it).
				prev.TS = t
				d.Saves = []SlotSave{{Key: key, Slot: prev}}
			}
			return d
		}
		if pb.Spooled && pb.Time() < prev.TS {
			// The edge answered this postback before the one behind the
			// current status, but only its spool brought it to Kafka, after
			// that one (two edges, Kafka down). The advertiser's order is
			// the edges' answers: the newer status stands. An update that
			// did not wait in a spool keeps Kafka's order, which is the
			// order of its answers, whatever the edges' clocks say.
			return reject(schemas.RejectSuperseded)
		}
		c.ConversionID, c.Version = prev.ConversionID, prev.Version+1
		if !hasAmount {
			c.SaleAmount = prev.SaleAmount
		}
	}
	c.Status = status
	if status == schemas.StatusRejected {
		c.RejectReason = schemas.RejectAdvertiserRejected
	} else {
		c.Revenue = goal.Revenue.Apply(c.SaleAmount)
		c.Payout = goal.Payout.Apply(c.SaleAmount)
	}

	d := Decision{Conversion: c}
	d.Saves = append(d.Saves, SlotSave{Key: key, Slot: slotOf(&c)})
	if pb.TxnID != "" && key != claim {
		if _, ok := slots.Slot(claim); !ok {
			d.Saves = append(d.Saves, SlotSave{Key: claim, Slot: slotOf(&c)})
		}
	}
	return d
}

// Restore returns the slot states an emitted conversion record implies: what
// Decide saved when it made it. A partition that moves to another member
// gets its slots back this way, from the conversions topic. Records that
// reject a postback (other than advertiser_rejected) hold no slot.
func Restore(cat *catalog.Catalog, c *schemas.Conversion) []SlotSave {
	if c.Status == schemas.StatusRejected && c.RejectReason != schemas.RejectAdvertiserRejected {
		return nil
	}
	key, claim := slotKeys(c.ClickID, c.OfferID, c.Goal, isMultiple(cat, c.OfferID, c.Goal), c.TxnID)
	s := slotOf(c)
	if c.TxnID == "" || key == claim {
		return []SlotSave{{Key: key, Slot: s}}
	}
	return []SlotSave{{Key: key, Slot: s}, {Key: claim, Slot: s}}
}

// RefreshOf returns the slot state a duplicate record implies: a postback
// with its conversion's current status again, taken after the one behind
// it, moved the slot's time on (see Decide). ok is false for any other
// record, and for a duplicate of a transaction another click holds.
func RefreshOf(cat *catalog.Catalog, slots Slots, c *schemas.Conversion) (save SlotSave, ok bool) {
	if c.Status != schemas.StatusRejected || c.RejectReason != schemas.RejectDuplicate {
		return save, false
	}
	key, claim := slotKeys(c.ClickID, c.OfferID, c.Goal, isMultiple(cat, c.OfferID, c.Goal), c.TxnID)
	if c.TxnID != "" {
		if s, found := slots.Slot(claim); found && s.ClickID != c.ClickID {
			return save, false
		}
	}
	prev, found := slots.Slot(key)
	if !found || prev.ClickID != c.ClickID || c.PostbackTime() <= prev.TS {
		return save, false
	}
	prev.TS = c.PostbackTime()
	return SlotSave{Key: key, Slot: prev}, true
}

func slotOf(c *schemas.Conversion) Slot {
	return Slot{
		ConversionID: c.ConversionID,
		Version:      c.Version,
		Status:       c.Status,
		ClickID:      c.ClickID,
		SaleAmount:   c.SaleAmount,
		Currency:     c.Currency,
		TS:           c.PostbackTime(),
	}
}
