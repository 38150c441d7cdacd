package bus

import (
	"encoding/json"
	"time"

	"github.com/segmentio/kafka-go"

	"github.com/trackstar/trackstar/schemas"
)

// DeadLetter returns the trackstar.dlq record for m, a record that cannot
// be handled for reason: where it came from, its value byte for byte, why,
// and when (now). It is keyed like m.
func DeadLetter(m kafka.Message, reason error, now time.Time) kafka.Message {
	dl := schemas.DeadLetter{
		Topic: m.Topic, Partition: m.Partition, Offset: m.Offset, Key: string(m.Key),
		Error: reason.Error(), TS: now.UnixMilli(),
	}
	dl.SetValue(m.Value)
	v, err := json.Marshal(&dl)
	if err != nil {
		panic("BUG: cannot encode a dead letter: " + err.Error())
	}
	return kafka.Message{Key: m.Key, Value: v, Time: time.Now()}
}
