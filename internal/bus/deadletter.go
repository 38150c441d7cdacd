package bus

import (
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/segmentio/kafka-go"

	"github.com/trackstar/trackstar/schemas"
)

// MaxDeadLetterBytes bounds a dead letter, key and value together, below
// the 1 MB Kafka accepts in one record batch by default: a record that
// Kafka took may still make a dead letter it refuses, since the dead
// letter holds the value as a JSON string (a control character grows to
// six bytes, binary by a third as base64) and repeats the key, and a dead
// letter Kafka refuses would be retried forever, blocking its partition.
const MaxDeadLetterBytes = 900_000

// A dead letter keeps at most this much of the original key and of the
// error's text: a decoder's error may quote the whole record (a number
// too long to store, say), and a key may be as large as Kafka allows.
const (
	maxDeadLetterKey   = 4096
	maxDeadLetterError = 4096
)

// DeadLetter returns the trackstar.dlq record for m, a record that cannot
// be handled for reason: where it came from, its value byte for byte, why,
// and when (now). It is keyed like m. It never exceeds MaxDeadLetterBytes:
// a key or an error text longer than 4 KiB keeps its first 4 KiB, and then
// the value keeps a prefix only; its error says what was cut, and how much.
func DeadLetter(m kafka.Message, reason error, now time.Time) kafka.Message {
	key, errText := m.Key, reason.Error()
	var cuts []string
	if len(errText) > maxDeadLetterError {
		cuts = append(cuts, fmt.Sprintf("error truncated to its first %d of %d bytes", maxDeadLetterError, len(errText)))
		errText = truncateUTF8(errText, maxDeadLetterError)
	}
	if len(key) > maxDeadLetterKey {
		cuts = append(cuts, fmt.Sprintf("key truncated to its first %d of %d bytes", maxDeadLetterKey, len(key)))
		key = key[:maxDeadLetterKey]
	}
	dl := schemas.DeadLetter{
		V: schemas.Version, Topic: m.Topic, Partition: m.Partition, Offset: m.Offset, Key: string(key),
		TS: now.UnixMilli(),
	}
	keep := len(m.Value)
	for {
		dl.SetValue(m.Value[:keep])
		dl.Error = withCuts(errText, cuts, keep, len(m.Value))
		v, err := json.Marshal(&dl)
		if err != nil {
			panic("BUG: cannot encode a dead letter: " + err.Error())
		}
		if len(key)+len(v) <= MaxDeadLetterBytes || keep == 0 {
			return kafka.Message{Key: key, Value: v, Time: time.Now()}
		}
		keep /= 2
	}
}

// ShrinkDeadLetter returns dl, a record DeadLetter made, without the
// original value and with at most 1 KiB of its key and its error: for a
// broker or topic whose record size limit is below MaxDeadLetterBytes,
// where the dead letter as made would be refused forever.
func ShrinkDeadLetter(dl kafka.Message) kafka.Message {
	var d schemas.DeadLetter
	if json.Unmarshal(dl.Value, &d) != nil {
		d = schemas.DeadLetter{V: schemas.Version, Error: "a dead letter that could not be read back"}
	}
	const limit = 1024
	had := len(d.Value) + len(d.ValueBase64)
	d.SetValue(nil)
	d.Error = truncateUTF8(d.Error, limit) + fmt.Sprintf(" (dead letter too large for Kafka: the value, %d bytes, left out)", had)
	d.Key = truncateUTF8(d.Key, limit)
	key := dl.Key
	if len(key) > limit {
		key = key[:limit]
	}
	v, err := json.Marshal(&d)
	if err != nil {
		panic("BUG: cannot encode a dead letter: " + err.Error())
	}
	return kafka.Message{Key: key, Value: v, Time: dl.Time}
}

// TooLarge reports whether err, from writing records with kafka-go, says
// that one of them is larger than the writer or the broker accepts.
func TooLarge(err error) bool {
	if errors.Is(err, kafka.MessageSizeTooLarge) {
		return true
	}
	var we kafka.WriteErrors
	if errors.As(err, &we) {
		for _, e := range we {
			if errors.Is(e, kafka.MessageSizeTooLarge) {
				return true
			}
		}
	}
	return false
}

func withCuts(errText string, cuts []string, keep, size int) string {
	if keep < size {
		cuts = append(cuts, fmt.Sprintf("value truncated to its first %d of %d bytes", keep, size))
	}
	if len(cuts) == 0 {
		return errText
	}
	return errText + " (" + strings.Join(cuts, "; ") + ")"
}

// truncateUTF8 returns s cut to at most n bytes, not inside a character.
func truncateUTF8(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n]
}
