package schemas

import (
	"math"
	"unicode/utf8"
)

// decodeClickFast decodes the JSON that Click.AppendJSON writes, which is
// what every consumer reads under click load: the keys in that order, no
// whitespace, strings without escapes, integers. It reports false for
// anything else, and the caller falls back to encoding/json; what it
// accepts it decodes exactly as encoding/json would.
func decodeClickFast(b []byte, c *Click) bool {
	d := fastDecoder{b: b}
	var v, offer, adv, aff int64
	ok := d.key(`{"v":`) && d.int(&v, math.MinInt, math.MaxInt) &&
		d.key(`,"click_id":`) && d.str(&c.ClickID) &&
		d.key(`,"ts":`) && d.int(&c.TS, math.MinInt64, math.MaxInt64) &&
		d.key(`,"offer_id":`) && d.int(&offer, 0, math.MaxUint32) &&
		d.key(`,"advertiser_id":`) && d.int(&adv, 0, math.MaxUint32) &&
		d.key(`,"aff_id":`) && d.int(&aff, 0, math.MaxUint32) &&
		d.key(`,"source":`) && d.str(&c.Source) &&
		d.key(`,"sub1":`) && d.str(&c.Sub1) &&
		d.key(`,"sub2":`) && d.str(&c.Sub2) &&
		d.key(`,"sub3":`) && d.str(&c.Sub3) &&
		d.key(`,"sub4":`) && d.str(&c.Sub4) &&
		d.key(`,"sub5":`) && d.str(&c.Sub5) &&
		d.key(`,"ip":`) && d.str(&c.IP) &&
		d.key(`,"user_agent":`) && d.str(&c.UserAgent) &&
		d.key(`,"referer":`) && d.str(&c.Referer) &&
		d.key(`}`) && d.i == len(d.b)
	if !ok {
		return false
	}
	c.V, c.OfferID, c.AdvertiserID, c.AffID = int(v), uint32(offer), uint32(adv), uint32(aff)
	return true
}

type fastDecoder struct {
	b []byte
	i int
}

// key consumes the literal k.
func (d *fastDecoder) key(k string) bool {
	if len(d.b)-d.i < len(k) || string(d.b[d.i:d.i+len(k)]) != k {
		return false
	}
	d.i += len(k)
	return true
}

// int consumes a JSON integer within [lo, hi]: an optional minus, then 0
// or digits not starting with 0, not followed by a fraction or exponent.
func (d *fastDecoder) int(dst *int64, lo, hi int64) bool {
	i, neg := d.i, false
	if i < len(d.b) && d.b[i] == '-' {
		neg = true
		i++
	}
	start := i
	var u uint64
	for ; i < len(d.b) && d.b[i] >= '0' && d.b[i] <= '9'; i++ {
		if i-start >= 18 { // 19 digits may overflow; leave them to encoding/json
			return false
		}
		u = u*10 + uint64(d.b[i]-'0')
	}
	n := i - start
	if n == 0 || n > 1 && d.b[start] == '0' {
		return false
	}
	if i < len(d.b) && (d.b[i] == '.' || d.b[i] == 'e' || d.b[i] == 'E') {
		return false
	}
	v := int64(u)
	if neg {
		v = -v
	}
	if v < lo || v > hi || neg && lo >= 0 {
		return false
	}
	*dst, d.i = v, i
	return true
}

// str consumes a JSON string without escapes or control characters whose
// bytes are valid UTF-8 (encoding/json would replace invalid bytes).
func (d *fastDecoder) str(dst *string) bool {
	if d.i >= len(d.b) || d.b[d.i] != '"' {
		return false
	}
	start, ascii := d.i+1, true
	for i := start; i < len(d.b); i++ {
		switch c := d.b[i]; {
		case c == '"':
			if !ascii && !utf8.Valid(d.b[start:i]) {
				return false
			}
			*dst, d.i = string(d.b[start:i]), i+1
			return true
		case c == '\\' || c < 0x20:
			return false
		case c >= utf8.RuneSelf:
			ascii = false
		}
	}
	return false
}
