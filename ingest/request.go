package ingest

import (
	"bytes"
	"strconv"
	"unicode/utf8"
	"unsafe"

	"github.com/valyala/fasthttp"

	"github.com/trackstar/trackstar/schemas"
)

// requestError is a request the edge refuses: the status code, the
// parameter at fault ("" when none) and what is wrong with it.
type requestError struct {
	status int
	field  string
	msg    string
}

func (e *requestError) Error() string {
	if e.field == "" {
		return e.msg
	}
	return e.field + ": " + e.msg
}

func badRequest(field, msg string) *requestError {
	return &requestError{status: fasthttp.StatusBadRequest, field: field, msg: msg}
}

// clickRequest is a parsed /click or /aff_c. Its byte slices point into
// the request and are valid only while the handler runs.
type clickRequest struct {
	offerID uint32
	affID   uint32
	sub     [5][]byte
	source  []byte
}

var subNames = [2][5]string{
	{"sub1", "sub2", "sub3", "sub4", "sub5"},
	{"aff_sub", "aff_sub2", "aff_sub3", "aff_sub4", "aff_sub5"},
}

// parseClick reads a click's query. /click names the subs sub1..sub5 and
// /aff_c (hasOffers) aff_sub..aff_sub5; each route also takes the other's
// names, its own winning when both are sent.
func parseClick(args *fasthttp.Args, hasOffers bool, maxLen int) (clickRequest, *requestError) {
	var c clickRequest
	var ok bool
	if c.offerID, ok = parseID(args.Peek("offer_id")); !ok {
		return c, badID("offer_id", args.Peek("offer_id"))
	}
	if c.affID, ok = parseID(args.Peek("aff_id")); !ok {
		return c, badID("aff_id", args.Peek("aff_id"))
	}
	own, other := subNames[0], subNames[1]
	if hasOffers {
		own, other = other, own
	}
	for i := range c.sub {
		name := own[i]
		v := args.Peek(name)
		if len(v) == 0 {
			name = other[i]
			v = args.Peek(name)
		}
		if err := checkText(name, v, maxLen); err != nil {
			return c, err
		}
		c.sub[i] = v
	}
	c.source = args.Peek("source")
	if err := checkText("source", c.source, maxLen); err != nil {
		return c, err
	}
	return c, nil
}

func badID(field string, v []byte) *requestError {
	if len(v) == 0 {
		return badRequest(field, "missing")
	}
	return badRequest(field, "must be a positive integer, got "+quoteShort(v))
}

// checkText refuses a text parameter longer than maxLen bytes, or that is
// not UTF-8: events are JSON, so its bytes could only be recorded changed
// (two order IDs in Latin-1 would become one txn_id, a sub would be
// echoed back to the affiliate other than it was sent).
func checkText(field string, v []byte, maxLen int) *requestError {
	if len(v) > maxLen {
		return badRequest(field, "longer than "+strconv.Itoa(maxLen)+" bytes")
	}
	if !utf8.Valid(v) {
		return badRequest(field, "must be UTF-8 text (percent-encode its UTF-8 bytes), got "+quoteShort(v))
	}
	return nil
}

// parseID parses a catalog ID: 1 to 4294967295, decimal digits only.
func parseID(b []byte) (uint32, bool) {
	if len(b) == 0 || len(b) > 10 {
		return 0, false
	}
	var v uint64
	for _, c := range b {
		if c < '0' || c > '9' {
			return 0, false
		}
		v = v*10 + uint64(c-'0')
	}
	if v == 0 || v > 1<<32-1 {
		return 0, false
	}
	return uint32(v), true
}

// quoteShort quotes a value for an error message, cut to 40 bytes.
func quoteShort(b []byte) string {
	if len(b) > 40 {
		return strconv.Quote(string(b[:40])) + "..."
	}
	return strconv.Quote(string(b))
}

// postbackRequest is a parsed, validated postback. Its byte slices point
// into the request and are valid only while the handler runs.
type postbackRequest struct {
	clickID  []byte // as sent; upper case is accepted and stored lower
	goal     []byte
	amount   schemas.Amount
	currency [3]byte // upper case; zero when not sent
	txnID    []byte
	status   string
	token    []byte
}

// The parameter names of DESIGN.md, the canonical one first. When a
// request sends several names of one parameter, the first non-empty one in
// this order wins.
var (
	clickIDNames = []string{"click_id", "transaction_id", "clickid", "cid", "subid"}
	goalNames    = []string{"goal", "goal_id", "event"}
	amountNames  = []string{"amount", "sum", "sale_amount"}
	txnIDNames   = []string{"txn_id", "order_id", "tid", "txid", "adv_sub"}
	tokenNames   = []string{"token", "security_token", "verification_token"}
)

// lookup returns the first non-empty value of any of names, from the form
// body (form may be nil) before the query, and the name it came under.
func lookup(form, query *fasthttp.Args, names []string) ([]byte, string) {
	for _, n := range names {
		if form != nil {
			if v := form.Peek(n); len(v) > 0 {
				return v, n
			}
		}
		if v := query.Peek(n); len(v) > 0 {
			return v, n
		}
	}
	return nil, names[0]
}

// parsePostback reads and validates a postback from its query and form
// body (nil when none). goalRoute is /aff_goal, which must say a=lsr and
// name a goal.
func parsePostback(query, form *fasthttp.Args, goalRoute bool, maxLen int) (postbackRequest, *requestError) {
	var p postbackRequest
	var name string
	if goalRoute {
		if a, _ := lookup(form, query, []string{"a"}); string(a) != "lsr" {
			return p, badRequest("a", "must be lsr on /aff_goal")
		}
	}

	p.clickID, name = lookup(form, query, clickIDNames)
	if len(p.clickID) == 0 {
		return p, badRequest("click_id", "missing; send click_id (or transaction_id, clickid, cid, subid)")
	}
	if !schemas.ValidID(p.clickID) {
		return p, badRequest(name, "not a Trackstar click ID (26 characters of base32), got "+quoteShort(p.clickID))
	}

	p.goal, name = lookup(form, query, goalNames)
	if err := checkText(name, p.goal, maxLen); err != nil {
		return p, err
	}
	if goalRoute && len(p.goal) == 0 {
		return p, badRequest("goal_id", "missing; /aff_goal needs the goal")
	}

	amount, name := lookup(form, query, amountNames)
	if len(amount) == 0 {
		return p, badRequest("amount", "missing; send amount (or sum, sale_amount): the sale's value, 0 when it has none")
	}
	a, err := schemas.ParseAmountBytes(amount)
	if err != nil {
		return p, badRequest(name, "not a plain decimal number with at most 4 decimal places, got "+quoteShort(amount))
	}
	if a < 0 {
		return p, badRequest(name, "must not be negative, got "+quoteShort(amount))
	}
	if a > schemas.MaxAmount {
		return p, badRequest(name, "must be at most 99999999999999.9999, got "+quoteShort(amount))
	}
	p.amount = a

	if cur, _ := lookup(form, query, []string{"currency"}); len(cur) > 0 {
		if len(cur) != 3 || !isLetter(cur[0]) || !isLetter(cur[1]) || !isLetter(cur[2]) {
			return p, badRequest("currency", "must be a three-letter ISO 4217 code, got "+quoteShort(cur))
		}
		for i := range p.currency {
			p.currency[i] = cur[i] &^ 0x20 // upper case
		}
	}

	p.txnID, name = lookup(form, query, txnIDNames)
	if err := checkText(name, p.txnID, maxLen); err != nil {
		return p, err
	}

	p.status = schemas.StatusApproved
	if st, _ := lookup(form, query, []string{"status"}); len(st) > 0 {
		switch {
		case bytes.EqualFold(st, []byte(schemas.StatusApproved)):
		case bytes.EqualFold(st, []byte(schemas.StatusPending)):
			p.status = schemas.StatusPending
		case bytes.EqualFold(st, []byte(schemas.StatusRejected)):
			p.status = schemas.StatusRejected
		default:
			return p, badRequest("status", "must be approved, pending or rejected, got "+quoteShort(st))
		}
	}

	p.token, _ = lookup(form, query, tokenNames)
	return p, nil
}

func isLetter(c byte) bool { return c|0x20 >= 'a' && c|0x20 <= 'z' }

// appendLower appends an ID in lower case: IDs are case-insensitive, but
// the partitioner hashes the bytes, so a postback's key must be spelled
// exactly as its click's.
func appendLower(dst, id []byte) []byte {
	for _, c := range id {
		if c >= 'A' && c <= 'Z' {
			c += 'a' - 'A'
		}
		dst = append(dst, c)
	}
	return dst
}

// b2s views b as a string without copying. The string is valid only while
// b is unchanged: the handlers use it for values that are encoded or
// rendered before they return, never kept.
func b2s(b []byte) string {
	return unsafe.String(unsafe.SliceData(b), len(b))
}
