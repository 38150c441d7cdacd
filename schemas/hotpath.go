package schemas

import (
	"strconv"
	"unicode/utf8"
)

// The edge encodes a click or a postback per request. These appenders write
// the same JSON that encoding/json would, without reflection and without
// allocating beyond dst's growth.

// AppendJSON appends c as JSON (with the current version) to dst.
func (c *Click) AppendJSON(dst []byte) []byte {
	dst = append(dst, `{"v":`...)
	dst = strconv.AppendInt(dst, Version, 10)
	dst = appendStr(dst, `,"click_id":`, c.ClickID)
	dst = appendInt(dst, `,"ts":`, c.TS)
	dst = appendInt(dst, `,"offer_id":`, int64(c.OfferID))
	dst = appendInt(dst, `,"advertiser_id":`, int64(c.AdvertiserID))
	dst = appendInt(dst, `,"aff_id":`, int64(c.AffID))
	dst = appendStr(dst, `,"source":`, c.Source)
	dst = appendStr(dst, `,"sub1":`, c.Sub1)
	dst = appendStr(dst, `,"sub2":`, c.Sub2)
	dst = appendStr(dst, `,"sub3":`, c.Sub3)
	dst = appendStr(dst, `,"sub4":`, c.Sub4)
	dst = appendStr(dst, `,"sub5":`, c.Sub5)
	dst = appendStr(dst, `,"ip":`, c.IP)
	dst = appendStr(dst, `,"user_agent":`, c.UserAgent)
	dst = appendStr(dst, `,"referer":`, c.Referer)
	return append(dst, '}')
}

// AppendJSON appends p as JSON (with the current version) to dst.
func (p *Postback) AppendJSON(dst []byte) []byte {
	dst = append(dst, `{"v":`...)
	dst = strconv.AppendInt(dst, Version, 10)
	dst = appendStr(dst, `,"event_id":`, p.EventID)
	dst = appendStr(dst, `,"click_id":`, p.ClickID)
	dst = appendInt(dst, `,"ts":`, p.TS)
	if p.TSNanos != 0 {
		dst = appendInt(dst, `,"ts_ns":`, p.TSNanos)
	}
	dst = appendInt(dst, `,"advertiser_id":`, int64(p.AdvertiserID))
	dst = appendStr(dst, `,"goal":`, p.Goal)
	dst = appendStr(dst, `,"amount":`, p.Amount)
	dst = appendStr(dst, `,"currency":`, p.Currency)
	dst = appendStr(dst, `,"txn_id":`, p.TxnID)
	dst = appendStr(dst, `,"status":`, p.Status)
	dst = appendStr(dst, `,"ip":`, p.IP)
	if p.Spooled {
		dst = append(dst, `,"spooled":true`...)
	}
	return append(dst, '}')
}

// MarkSpooled appends to dst the postback event value (as AppendJSON wrote
// it) with "spooled":true added, as if AppendJSON had written it with
// Spooled set. The edge marks what it spools this way. A value that is not
// a JSON object is appended unchanged.
func MarkSpooled(dst, value []byte) []byte {
	if len(value) < 2 || value[0] != '{' || value[len(value)-1] != '}' {
		return append(dst, value...)
	}
	dst = append(dst, value[:len(value)-1]...)
	return append(dst, `,"spooled":true}`...)
}

func appendInt(dst []byte, key string, v int64) []byte {
	dst = append(dst, key...)
	return strconv.AppendInt(dst, v, 10)
}

func appendStr(dst []byte, key, s string) []byte {
	dst = append(dst, key...)
	return AppendJSONString(dst, s)
}

const hex = "0123456789abcdef"

// AppendJSONString appends s as a quoted JSON string. Invalid UTF-8 becomes
// U+FFFD, as with encoding/json, so the output is always valid JSON.
func AppendJSONString(dst []byte, s string) []byte {
	dst = append(dst, '"')
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			if c >= 0x20 && c != '"' && c != '\\' && c != '<' && c != '>' && c != '&' {
				i++
				continue
			}
			dst = append(dst, s[start:i]...)
			switch c {
			case '"', '\\':
				dst = append(dst, '\\', c)
			case '\n':
				dst = append(dst, '\\', 'n')
			case '\r':
				dst = append(dst, '\\', 'r')
			case '\t':
				dst = append(dst, '\\', 't')
			default:
				dst = append(dst, '\\', 'u', '0', '0', hex[c>>4], hex[c&0xF])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			dst = append(dst, s[start:i]...)
			dst = append(dst, `\ufffd`...)
			i += size
			start = i
			continue
		}
		if r == '\u2028' || r == '\u2029' {
			dst = append(dst, s[start:i]...)
			dst = append(dst, '\\', 'u', '2', '0', '2', hex[r&0xF])
			i += size
			start = i
			continue
		}
		i += size
	}
	dst = append(dst, s[start:]...)
	return append(dst, '"')
}
