package bus

import (
	"encoding/json"
	"fmt"
	"time"

	"github.com/segmentio/kafka-go"

	"github.com/trackstar/trackstar/schemas"
)

// MaxDeadLetterBytes bounds the value of a dead letter, below the 1 MB
// Kafka accepts in one record batch by default: a record that Kafka took
// may still make a dead letter it refuses, since the dead letter holds the
// value as a JSON string (a control character grows to six bytes, binary
// by a third as base64), and a dead letter Kafka refuses would be retried
// forever, blocking its partition.
const MaxDeadLetterBytes = 900_000

// DeadLetter returns the trackstar.dlq record for m, a record that cannot
// be handled for reason: where it came from, its value byte for byte, why,
// and when (now). It is keyed like m. When the dead letter would exceed
// MaxDeadLetterBytes, it keeps a prefix of the value only, and its error
// says how much of it.
func DeadLetter(m kafka.Message, reason error, now time.Time) kafka.Message {
	dl := schemas.DeadLetter{
		V: schemas.Version, Topic: m.Topic, Partition: m.Partition, Offset: m.Offset, Key: string(m.Key),
		Error: reason.Error(), TS: now.UnixMilli(),
	}
	keep := len(m.Value)
	for {
		dl.SetValue(m.Value[:keep])
		if keep < len(m.Value) {
			dl.Error = fmt.Sprintf("%s (value truncated to its first %d of %d bytes)", reason.Error(), keep, len(m.Value))
		}
		v, err := json.Marshal(&dl)
		if err != nil {
			panic("BUG: cannot encode a dead letter: " + err.Error())
		}
		if len(v) <= MaxDeadLetterBytes || keep == 0 {
			return kafka.Message{Key: m.Key, Value: v, Time: time.Now()}
		}
		keep /= 2
	}
}
