package warehouse

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/segmentio/kafka-go"

	"github.com/trackstar/trackstar/internal/bus"
	"github.com/trackstar/trackstar/internal/testenv"
	"github.com/trackstar/trackstar/schemas"
)

// TestLoaderDeadLettersALargeRecord: an undecodable record well within
// what Kafka accepts (300 kB here; the broker takes 1 MB) may make a dead
// letter Kafka refuses, since the dead letter escapes the value as a JSON
// string (a control character takes six bytes, binary grows by a third as
// base64). The loader must still dead-letter it and go on: the records
// after it land and every offset is committed.
func TestLoaderDeadLettersALargeRecord(t *testing.T) {
	broker := testenv.KafkaTopics(t, 1)
	chAddr, db := testenv.ClickHouseDB(t)
	conn := migratedDB(t, chAddr, db)

	t0 := serverTime(t, conn)
	good := func(i int) kafka.Message {
		c := schemas.Click{ClickID: schemas.NewID(t0.Add(time.Duration(i) * time.Second)), TS: t0.UnixMilli(), OfferID: 1, AffID: 7}
		return kafka.Message{Key: []byte(c.ClickID), Value: c.AppendJSON(nil)}
	}
	big := `{"v":1,"click_id":"` + strings.Repeat("\x01", 300_000)
	produce(t, broker, bus.TopicClicks, []kafka.Message{good(0), {Key: []byte("big"), Value: []byte(big)}, good(1), good(2)})
	// Two dead letters of 600 kB each, which fit one at a time but not
	// in one record batch.
	mid := `{"v":1,"click_id":"` + strings.Repeat("\x01", 100_000)
	produce(t, broker, bus.TopicClicks, []kafka.Message{{Key: []byte("mid"), Value: []byte(mid)}})
	produce(t, broker, bus.TopicClicks, []kafka.Message{{Key: []byte("mid"), Value: []byte(mid)}, good(3)})

	reg := prometheus.NewRegistry()
	startLoader(t, LoaderConfig{Brokers: []string{broker}, ClickHouse: chAddr, Database: db, Group: "loader-bigdlq",
		MaxRows: 3, FlushInterval: 200 * time.Millisecond, MaxRetryWait: 200 * time.Millisecond, Registry: reg})
	allCommitted(t, broker, "loader-bigdlq")
	if n := queryUint64(t, conn, "SELECT count() FROM "+db+".clicks FINAL"); n != 4 {
		t.Fatalf("clicks holds %d rows, want the 4 good ones", n)
	}
	if n := metricValue(t, reg, "trackstar_loader_dead_letters_total", "topic", bus.TopicClicks); n != 3 {
		t.Fatalf("dead letters of %s = %v, want 3", bus.TopicClicks, n)
	}
	r := kafka.NewReader(kafka.ReaderConfig{Brokers: []string{broker}, Topic: bus.TopicDLQ, Partition: 0, MaxWait: 100 * time.Millisecond})
	defer r.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	m, err := r.ReadMessage(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var dl DeadLetter
	if err := json.Unmarshal(m.Value, &dl); err != nil {
		t.Fatalf("dead letter is not JSON: %v", err)
	}
	if string(m.Key) != "big" || dl.Offset != 1 || !strings.HasPrefix(big, dl.Value) || dl.Value == "" ||
		!strings.Contains(dl.Error, "cannot decode click event") || !strings.Contains(dl.Error, "truncated") {
		t.Fatalf("dead letter: key %q, offset %d, %d bytes of value, error %q; want key big, offset 1, a prefix of the value, the reason and the truncation",
			m.Key, dl.Offset, len(dl.Value), dl.Error)
	}
}
