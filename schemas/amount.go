package schemas

import (
	"errors"
	"math"
	"math/big"
	"strconv"
)

// AmountScale is the number of decimal places an Amount keeps. It matches
// the Decimal(18, 4) columns in ClickHouse.
const AmountScale = 4

const amountUnit = 10000 // 10^AmountScale

// MaxAmount is the largest amount Trackstar accepts as a sale amount or a
// fixed revenue or payout: 99999999999999.9999, what the warehouse's
// Decimal(18, 4) columns hold. Refusing more at the door keeps the loader
// from having to dead-letter a conversion it cannot store.
const MaxAmount Amount = 999_999_999_999_999_999

// Amount is a non-negative-or-negative decimal money value with four decimal
// places, stored as an integer count of 1/10000 units so that arithmetic on
// it never drifts the way float64 does. Its JSON form is a decimal string
// ("19.99"), never a JSON number, so no decoder turns it into a float.
type Amount int64

// ErrBadAmount is returned for text that is not a plain decimal number.
var ErrBadAmount = errors.New("not a decimal number with at most 4 decimal places")

// ParseAmount parses a plain decimal ("12", "12.5", "0.0001", "-3.25").
// Exponents, thousands separators, more than four decimal places and values
// that do not fit are errors, so that no input is silently rounded.
func ParseAmount(s string) (Amount, error) {
	return parseAmount(s)
}

// ParseAmountBytes is ParseAmount over a byte slice, without allocating.
func ParseAmountBytes(b []byte) (Amount, error) {
	return parseAmount(b)
}

// maxWhole is the largest whole part an Amount holds: 922337203685477.
const maxWhole = math.MaxInt64 / amountUnit

func parseAmount[T string | []byte](s T) (Amount, error) {
	if len(s) == 0 || len(s) > 24 {
		return 0, ErrBadAmount
	}
	neg := false
	i := 0
	if s[0] == '-' || s[0] == '+' {
		neg = s[0] == '-'
		i++
	}
	var whole, frac int64
	digits, fracDigits := 0, 0
	seenDot := false
	for ; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '.' && !seenDot:
			seenDot = true
		case c >= '0' && c <= '9':
			if seenDot {
				if fracDigits == AmountScale {
					return 0, ErrBadAmount
				}
				frac = frac*10 + int64(c-'0')
				fracDigits++
			} else {
				if d := int64(c - '0'); whole > (maxWhole-d)/10 {
					return 0, ErrBadAmount
				}
				whole = whole*10 + int64(c-'0')
				digits++
			}
		default:
			return 0, ErrBadAmount
		}
	}
	if digits == 0 && fracDigits == 0 {
		return 0, ErrBadAmount
	}
	if seenDot && fracDigits == 0 {
		return 0, ErrBadAmount
	}
	for ; fracDigits < AmountScale; fracDigits++ {
		frac *= 10
	}
	if whole == maxWhole && frac > math.MaxInt64%amountUnit {
		return 0, ErrBadAmount
	}
	v := whole*amountUnit + frac
	if neg {
		v = -v
	}
	return Amount(v), nil
}

// AmountFromUnits builds an Amount from a count of 1/10000 units.
func AmountFromUnits(units int64) Amount { return Amount(units) }

// Units returns the amount as a count of 1/10000 units.
func (a Amount) Units() int64 { return int64(a) }

// String returns the shortest exact decimal form: "19.99", "2.5", "0".
func (a Amount) String() string {
	return string(a.Append(nil))
}

// Append appends the String form to dst.
func (a Amount) Append(dst []byte) []byte {
	v := int64(a)
	if v < 0 {
		dst = append(dst, '-')
		if v == math.MinInt64 {
			return append(dst, "922337203685477.5808"...)
		}
		v = -v
	}
	dst = strconv.AppendInt(dst, v/amountUnit, 10)
	frac := v % amountUnit
	if frac == 0 {
		return dst
	}
	var buf [AmountScale]byte
	for i := AmountScale - 1; i >= 0; i-- {
		buf[i] = byte('0' + frac%10)
		frac /= 10
	}
	n := AmountScale
	for n > 0 && buf[n-1] == '0' {
		n--
	}
	dst = append(dst, '.')
	return append(dst, buf[:n]...)
}

// Percent returns pct percent of a, rounded to four decimal places half away
// from zero (7% of 19.99 is 1.3993; 7.5% of 19.99 is 1.4993 from 1.49925).
// The product is computed exactly, so no intermediate step rounds.
func (a Amount) Percent(pct Amount) Amount {
	// a and pct both carry 4 decimals: a*pct has 8, and dividing by 100
	// for "percent" leaves us needing to divide by 10^6 to get back to 4.
	p := new(big.Int).Mul(big.NewInt(int64(a)), big.NewInt(int64(pct)))
	const div = amountUnit * 100
	q, r := new(big.Int).QuoRem(p, big.NewInt(div), new(big.Int))
	// Round half away from zero: |r|*2 >= div bumps |q| by one.
	r.Abs(r)
	r.Lsh(r, 1)
	if r.Cmp(big.NewInt(div)) >= 0 {
		if p.Sign() < 0 {
			q.Sub(q, big.NewInt(1))
		} else {
			q.Add(q, big.NewInt(1))
		}
	}
	if !q.IsInt64() {
		if q.Sign() < 0 {
			return Amount(math.MinInt64)
		}
		return Amount(math.MaxInt64)
	}
	return Amount(q.Int64())
}

// MarshalJSON encodes the amount as a JSON string.
func (a Amount) MarshalJSON() ([]byte, error) {
	b := make([]byte, 0, 24)
	b = append(b, '"')
	b = a.Append(b)
	return append(b, '"'), nil
}

// UnmarshalJSON accepts a JSON string or number holding a plain decimal.
func (a *Amount) UnmarshalJSON(b []byte) error {
	if len(b) >= 2 && b[0] == '"' && b[len(b)-1] == '"' {
		b = b[1 : len(b)-1]
	}
	v, err := ParseAmountBytes(b)
	if err != nil {
		return err
	}
	*a = v
	return nil
}
