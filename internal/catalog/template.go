package catalog

import (
	"errors"
	"fmt"
	"net/url"
	"strconv"
	"strings"
)

// Values are what the macros of a Template render. Offer URLs use only the
// click fields; partner postback URLs use all of them.
type Values struct {
	ClickID string    // {click_id}, {transaction_id}
	OfferID uint32    // {offer_id}
	AffID   uint32    // {aff_id}, {affiliate_id}
	Sub     [5]string // {sub1}..{sub5}, {aff_sub}, {aff_sub2}..{aff_sub5}
	Source  string    // {source}

	ConversionID string // {conversion_id}
	Goal         string // {goal}
	Payout       string // {payout}, already formatted (schemas.Amount.String)
	SaleAmount   string // {sale_amount}, already formatted
	Currency     string // {currency}
	Status       string // {status}
	TxnID        string // {txn_id}
	// ClickTS and ConversionTS are Unix milliseconds, as in
	// schemas.Conversion (ClickTS, TS); {click_ts} and {conversion_ts}
	// render them as Unix seconds. 0 (unknown) renders as 0.
	ClickTS      int64
	ConversionTS int64
}

type macro uint8

const (
	literal macro = iota
	macroClickID
	macroOfferID
	macroAffID
	macroSub1
	macroSub2
	macroSub3
	macroSub4
	macroSub5
	macroSource

	// Partner postback only, from here on.
	macroConversionID
	macroGoal
	macroPayout
	macroSaleAmount
	macroCurrency
	macroStatus
	macroTxnID
	macroClickTS
	macroConversionTS
)

// macros maps every macro name and alias of DESIGN.md to what it renders.
var macros = map[string]macro{
	"click_id":       macroClickID,
	"transaction_id": macroClickID,
	"offer_id":       macroOfferID,
	"aff_id":         macroAffID,
	"affiliate_id":   macroAffID,
	"sub1":           macroSub1,
	"sub2":           macroSub2,
	"sub3":           macroSub3,
	"sub4":           macroSub4,
	"sub5":           macroSub5,
	"aff_sub":        macroSub1,
	"aff_sub2":       macroSub2,
	"aff_sub3":       macroSub3,
	"aff_sub4":       macroSub4,
	"aff_sub5":       macroSub5,
	"source":         macroSource,

	"conversion_id": macroConversionID,
	"goal":          macroGoal,
	"payout":        macroPayout,
	"sale_amount":   macroSaleAmount,
	"currency":      macroCurrency,
	"status":        macroStatus,
	"txn_id":        macroTxnID,
	"click_ts":      macroClickTS,
	"conversion_ts": macroConversionTS,
}

// Template is a URL with macros, parsed once into literal and macro parts.
type Template struct {
	raw   string
	parts []part
	host  string // the URL's host name, without port or brackets
}

type part struct {
	lit   string // when macro == literal
	macro macro
}

// ParseTemplate parses an offer URL (partner false: click macros only) or
// a partner postback URL (partner true: click and conversion macros). The
// URL must be absolute http or https with a host, and macros may not stand
// in its scheme or host.
func ParseTemplate(raw string, partner bool) (*Template, error) {
	t, problems := parseTemplate(raw, partner)
	if len(problems) == 0 {
		return t, nil
	}
	errs := make([]error, len(problems))
	for i, p := range problems {
		errs[i] = fmt.Errorf("invalid URL template %q: %s", raw, p)
	}
	return nil, errors.Join(errs...)
}

// parseTemplate returns the template and every problem found in it. With
// problems the template is not usable, but its host is set when the URL
// names one (see below).
func parseTemplate(raw string, partner bool) (*Template, []string) {
	var problems []string
	t := &Template{raw: raw}
	firstMacro := -1
	unclosed, unclosedAt := false, 0
	rest := raw
	for len(rest) > 0 {
		open := strings.IndexByte(rest, '{')
		if open < 0 {
			t.parts = append(t.parts, part{lit: rest})
			break
		}
		if open > 0 {
			t.parts = append(t.parts, part{lit: rest[:open]})
		}
		offset := len(raw) - len(rest) + open
		end := strings.IndexByte(rest[open:], '}')
		if end < 0 {
			problems = append(problems, fmt.Sprintf("unclosed \"{\" at offset %d", offset))
			unclosed, unclosedAt = true, offset
			break
		}
		name := rest[open+1 : open+end]
		m, ok := macros[name]
		switch {
		case !ok && name == "revenue" && partner:
			problems = append(problems, `macro "{revenue}" is never offered to partners`)
		case !ok:
			problems = append(problems, fmt.Sprintf("unknown macro %q", "{"+name+"}"))
		case m >= macroConversionID && !partner:
			problems = append(problems, fmt.Sprintf("macro %q is only available in partner postback URLs", "{"+name+"}"))
		}
		if firstMacro < 0 {
			firstMacro = offset
		}
		t.parts = append(t.parts, part{macro: m})
		rest = rest[open+end+1:]
	}

	// Check the URL's shape with every macro standing for a harmless value.
	// The text before the first macro is the same in raw and sample, so
	// offsets into it compare directly.
	var sample strings.Builder
	for _, p := range t.parts {
		if p.macro == literal {
			sample.WriteString(p.lit)
		} else {
			sample.WriteString("1")
		}
	}
	s := sample.String()
	authorityEnd := -1 // where the host and port end, when s starts with a scheme
	if i := strings.Index(s, "://"); i >= 0 && !strings.ContainsAny(s[:i], "/?#") {
		authorityEnd = len(s)
		if end := strings.IndexAny(s[i+len("://"):], "/?#"); end >= 0 {
			authorityEnd = i + len("://") + end
		}
	}
	// The text after the authority is checked as it will go out (see
	// escapeLiteral below), so that a bare "%" anywhere is text, not an
	// escape url.Parse refuses.
	from := max(authorityEnd, 0)
	u, err := url.Parse(s[:from] + escapeLiteral(s[from:]))
	switch {
	case unclosed:
		// The shape of a URL cut short would only add noise.
	case strings.ContainsAny(raw, " \t\r\n"):
		problems = append(problems, "URL must not contain spaces (write %20 or +)")
	case strings.ContainsFunc(raw, func(r rune) bool { return r < 0x20 || r == 0x7f }):
		problems = append(problems, "URL must not contain control characters")
	case firstMacro >= 0 && firstMacro < authorityEnd:
		problems = append(problems, "macros are not allowed in the URL's scheme or host")
	case err != nil:
		problems = append(problems, fmt.Sprintf("malformed URL: %v", errors.Unwrap(err)))
	case (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.Hostname() == "":
		problems = append(problems, "URL must be absolute http:// or https:// with a host")
	case !validPort(u.Port()):
		problems = append(problems, fmt.Sprintf("malformed URL: port %q is not a TCP port (1 to 65535)", u.Port()))
	}
	if len(problems) == 0 {
		// Literal text a URI may not hold as it is goes out
		// percent-encoded: sent raw, the request line would not be what
		// a partner's server reads back, nor what was signed. The
		// scheme and authority are left as written.
		for i := range t.parts {
			if p := &t.parts[i]; p.macro == literal {
				p.lit = p.lit[:from] + escapeLiteral(p.lit[from:])
			}
			from = 0
		}
	}
	// The host is known, whatever else is wrong, when the URL's scheme and
	// authority, written out before any macro or unclosed "{", parse: the
	// caller checks it too, so that every problem is reported at once.
	if authorityEnd > 0 && !(unclosed && unclosedAt <= authorityEnd) && !(firstMacro >= 0 && firstMacro < authorityEnd) {
		if a, err := url.Parse(s[:authorityEnd]); err == nil && (a.Scheme == "http" || a.Scheme == "https") && a.Hostname() != "" {
			t.host = a.Hostname()
		}
	}
	return t, problems
}

// validPort reports whether a URL's port (empty: the scheme's default) is
// one a request can go to. net/url checks only that it is digits.
func validPort(port string) bool {
	if port == "" {
		return true
	}
	n, err := strconv.ParseUint(port, 10, 16)
	return err == nil && n > 0
}

// String returns the template as written in the config.
func (t *Template) String() string { return t.raw }

// Append appends the URL with macros replaced by v's values,
// percent-encoded (appendEscape) so that they read back the same from the
// URL's path, query or fragment. It does not allocate when dst has room.
func (t *Template) Append(dst []byte, v *Values) []byte {
	for i := range t.parts {
		p := &t.parts[i]
		switch p.macro {
		case literal:
			dst = append(dst, p.lit...)
		case macroClickID:
			dst = appendEscape(dst, v.ClickID)
		case macroOfferID:
			dst = strconv.AppendUint(dst, uint64(v.OfferID), 10)
		case macroAffID:
			dst = strconv.AppendUint(dst, uint64(v.AffID), 10)
		case macroSub1, macroSub2, macroSub3, macroSub4, macroSub5:
			dst = appendEscape(dst, v.Sub[p.macro-macroSub1])
		case macroSource:
			dst = appendEscape(dst, v.Source)
		case macroConversionID:
			dst = appendEscape(dst, v.ConversionID)
		case macroGoal:
			dst = appendEscape(dst, v.Goal)
		case macroPayout:
			dst = appendEscape(dst, v.Payout)
		case macroSaleAmount:
			dst = appendEscape(dst, v.SaleAmount)
		case macroCurrency:
			dst = appendEscape(dst, v.Currency)
		case macroStatus:
			dst = appendEscape(dst, v.Status)
		case macroTxnID:
			dst = appendEscape(dst, v.TxnID)
		case macroClickTS:
			dst = strconv.AppendInt(dst, unixSeconds(v.ClickTS), 10)
		case macroConversionTS:
			dst = strconv.AppendInt(dst, unixSeconds(v.ConversionTS), 10)
		default:
			panic("BUG: unknown macro in compiled template")
		}
	}
	return dst
}

// unixSeconds converts Unix milliseconds to seconds, rounding down.
func unixSeconds(ms int64) int64 {
	s := ms / 1000
	if ms%1000 < 0 {
		s--
	}
	return s
}

// unreserved marks the bytes RFC 3986 leaves as they are anywhere in a URL.
var unreserved = func() (t [256]bool) {
	for c := 'a'; c <= 'z'; c++ {
		t[c] = true
	}
	for c := 'A'; c <= 'Z'; c++ {
		t[c] = true
	}
	for c := '0'; c <= '9'; c++ {
		t[c] = true
	}
	t['-'], t['_'], t['.'], t['~'] = true, true, true, true
	return t
}()

// uriChars marks the bytes RFC 3986 allows anywhere after a URL's
// authority as they are: unreserved, gen-delims and sub-delims. A "%" is
// allowed only where it starts an escape.
var uriChars = func() [256]bool {
	t := unreserved
	for _, c := range ":/?#[]@!$&'()*+,;=" {
		t[c] = true
	}
	return t
}()

// escapeLiteral percent-encodes, upper case, every byte of a template's
// literal text that a URI may not hold: non-ASCII bytes (UTF-8 text
// becomes its UTF-8 escapes), the ASCII characters double quote, < > \ ^
// backquote { | }, and a "%" that starts no escape. Escapes already
// written stay as they are. (Spaces and control bytes do not get here:
// they are load errors.) The encoded text means the same to any server;
// only its bytes are now those of a valid request target.
func escapeLiteral(s string) string {
	const hex = "0123456789ABCDEF"
	var b []byte // nil while s needs no change
	for i := 0; i < len(s); i++ {
		c := s[i]
		if uriChars[c] || c == '%' && i+2 < len(s) && isHex(s[i+1]) && isHex(s[i+2]) {
			if b != nil {
				b = append(b, c)
			}
			continue
		}
		if b == nil {
			b = append(make([]byte, 0, len(s)+16), s[:i]...)
		}
		b = append(b, '%', hex[c>>4], hex[c&15])
	}
	if b == nil {
		return s
	}
	return string(b)
}

func isHex(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'
}

// appendEscape appends s to dst with every byte but the unreserved ones
// percent-encoded, without allocating. That is url.QueryEscape with a space
// written %20 instead of +: a macro may stand in a URL's path, where + is a
// plus sign, as well as in its query, where both decode to a space.
func appendEscape(dst []byte, s string) []byte {
	const hex = "0123456789ABCDEF"
	for i := 0; i < len(s); i++ {
		c := s[i]
		if unreserved[c] {
			dst = append(dst, c)
		} else {
			dst = append(dst, '%', hex[c>>4], hex[c&15])
		}
	}
	return dst
}
