package schemas

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"time"
)

// IDLen is the length of a click ID or event ID: 26 characters.
const IDLen = 26

// An ID is 128 bits: 48 bits of Unix milliseconds followed by 80 random
// bits, written as 26 characters of Crockford's base32 in lower case. It
// sorts by time as a string, is URL-safe, and needs no escaping in macros.
const idAlphabet = "0123456789abcdefghjkmnpqrstvwxyz"

var idDecode = func() (t [256]byte) {
	for i := range t {
		t[i] = 0xff
	}
	for i := 0; i < len(idAlphabet); i++ {
		t[idAlphabet[i]] = byte(i)
		if c := idAlphabet[i]; c >= 'a' {
			t[c-'a'+'A'] = byte(i) // accept upper case too
		}
	}
	return t
}()

// ErrBadID is returned by ParseIDTime for text that is not an ID.
var ErrBadID = errors.New("not a trackstar ID (26 base32 characters)")

// AppendNewID appends a fresh ID minted at t to dst.
func AppendNewID(dst []byte, t time.Time) []byte {
	var raw [16]byte
	ms := uint64(t.UnixMilli())
	binary.BigEndian.PutUint16(raw[0:2], uint16(ms>>32))
	binary.BigEndian.PutUint32(raw[2:6], uint32(ms))
	_, _ = rand.Read(raw[6:]) // crypto/rand.Read never fails on supported platforms
	return appendBase32(dst, raw)
}

// NewID returns a fresh ID minted at t.
func NewID(t time.Time) string {
	return string(AppendNewID(make([]byte, 0, IDLen), t))
}

func appendBase32(dst []byte, raw [16]byte) []byte {
	hi := binary.BigEndian.Uint64(raw[0:8])
	lo := binary.BigEndian.Uint64(raw[8:16])
	// 128 bits in 26 characters of 5 bits: the first character carries the
	// top 3 bits (so it is always 0-7), the rest 5 bits each.
	var out [IDLen]byte
	for i := IDLen - 1; i >= 0; i-- {
		out[i] = idAlphabet[lo&31]
		lo = lo>>5 | hi<<59
		hi >>= 5
	}
	return append(dst, out[:]...)
}

// ValidID reports whether s is well-formed as an ID.
func ValidID[T string | []byte](s T) bool {
	if len(s) != IDLen || idDecode[s[0]] > 7 {
		return false
	}
	for i := 1; i < IDLen; i++ {
		if idDecode[s[i]] == 0xff {
			return false
		}
	}
	return true
}

// IDTime returns the Unix milliseconds embedded in an ID.
func IDTime[T string | []byte](s T) (int64, error) {
	if !ValidID(s) {
		return 0, ErrBadID
	}
	// The first 10 characters hold 50 bits: 2 bits of padding above the
	// 128-bit value (always zero), then its top 48 bits, the milliseconds.
	var v uint64
	for i := 0; i < 10; i++ {
		v = v<<5 | uint64(idDecode[s[i]])
	}
	return int64(v), nil
}
