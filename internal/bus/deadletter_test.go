package bus_test

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/segmentio/kafka-go"

	"github.com/trackstar/trackstar/internal/bus"
	"github.com/trackstar/trackstar/schemas"
)

// A dead letter, key and value together, stays under MaxDeadLetterBytes
// whatever it is made of, and says what it left out. (Before, a large key
// or an error quoting a long number made one Kafka refused, which the
// loader retried forever.)
func TestDeadLetterStaysUnderTheBound(t *testing.T) {
	for name, c := range map[string]struct {
		key, value string
		err        error
		cut        string
	}{
		"large key":   {strings.Repeat("k", 600_000), `{"v":1,"click_id":`, errors.New("cannot decode click event: unexpected end of JSON input"), "key truncated to its first 4096 of 600000 bytes"},
		"long error":  {"k", "x", errors.New("json: cannot unmarshal number " + strings.Repeat("9", 950_000) + " into Go struct field"), "error truncated to its first 4096 of"},
		"large value": {"k", strings.Repeat("\x01", 400_000), errors.New("cannot decode"), "value truncated to its first"},
	} {
		dl := bus.DeadLetter(kafka.Message{Topic: bus.TopicClicks, Key: []byte(c.key), Value: []byte(c.value)}, c.err, time.Now())
		if size := len(dl.Key) + len(dl.Value); size > bus.MaxDeadLetterBytes {
			t.Errorf("%s: dead letter of %d bytes (key %d + value %d), over MaxDeadLetterBytes %d", name, size, len(dl.Key), len(dl.Value), bus.MaxDeadLetterBytes)
		}
		var d schemas.DeadLetter
		if err := json.Unmarshal(dl.Value, &d); err != nil {
			t.Fatalf("%s: dead letter is not JSON: %v", name, err)
		}
		if !strings.Contains(d.Error, c.cut) || !strings.HasPrefix(c.key, d.Key) || !strings.HasPrefix(c.key, string(dl.Key)) {
			t.Errorf("%s: error %.200q, key %d bytes (%d in the record): want %q said, and a prefix of the key", name, d.Error, len(dl.Key), len(d.Key), c.cut)
		}
	}
}

// ShrinkDeadLetter leaves the value out and keeps where the record came
// from; TooLarge recognises the writer's and the broker's refusals.
func TestShrinkDeadLetter(t *testing.T) {
	m := kafka.Message{Topic: bus.TopicClicks, Partition: 2, Offset: 7, Key: []byte("k"), Value: []byte(strings.Repeat("v", 100_000))}
	dl := bus.ShrinkDeadLetter(bus.DeadLetter(m, errors.New("cannot decode"), time.Now()))
	var d schemas.DeadLetter
	if err := json.Unmarshal(dl.Value, &d); err != nil {
		t.Fatal(err)
	}
	if len(dl.Value) > 2048 || d.Value != "" || d.Topic != bus.TopicClicks || d.Partition != 2 || d.Offset != 7 || d.Key != "k" ||
		!strings.HasPrefix(d.Error, "cannot decode") || !strings.Contains(d.Error, "the value, 100000 bytes, left out") {
		t.Fatalf("shrunk dead letter %s", dl.Value)
	}
	for _, err := range []error{kafka.MessageTooLargeError{}, kafka.WriteErrors{nil, kafka.MessageSizeTooLarge}} {
		if !bus.TooLarge(err) {
			t.Errorf("TooLarge(%#v) = false", err)
		}
	}
	if bus.TooLarge(kafka.WriteErrors{kafka.LeaderNotAvailable}) {
		t.Errorf("TooLarge(LeaderNotAvailable) = true")
	}
}
