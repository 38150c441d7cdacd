package warehouse

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/segmentio/kafka-go"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/trackstar/trackstar/internal/bus"
	"github.com/trackstar/trackstar/internal/ops"
	"github.com/trackstar/trackstar/internal/testenv"
	"github.com/trackstar/trackstar/schemas"
)

// Records whose dead letters would be larger than Kafka takes — a 600 kB
// key, or a 1 MB record whose decode error quotes its number whole — are
// dead-lettered, and the records after them load. (Before, the loader
// retried such a dead letter forever, and every table stopped behind it.)
func TestOversizedDeadLettersDoNotStopTheLoader(t *testing.T) {
	broker := testenv.KafkaTopics(t, 1)
	chAddr, db := testenv.ClickHouseDB(t)
	conn := migratedDB(t, chAddr, db)
	t0 := serverTime(t, conn)

	w := &kafka.Writer{Addr: kafka.TCP(broker), Topic: bus.TopicClicks, BatchBytes: 1_048_000, RequiredAcks: kafka.RequireAll}
	defer w.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	long := `{"v":1,"click_id":"x","ts":1,"offer_id":` + strings.Repeat("9", 1_030_000) + `}`
	for _, m := range []kafka.Message{
		goodClick(t0, 0),
		{Key: []byte(strings.Repeat("k", 600_000)), Value: []byte(`{"v":1,"click_id":`)},
		{Key: []byte("long"), Value: []byte(long)},
		goodClick(t0, 1),
	} {
		if err := w.WriteMessages(ctx, m); err != nil {
			t.Fatalf("produce: %v", err)
		}
	}
	conv := schemas.Conversion{ConversionID: "conv-1", Version: 1, ClickID: "c", TS: t0.UnixMilli(), Status: schemas.StatusApproved}
	produce(t, broker, bus.TopicConversions, []kafka.Message{{Key: []byte("c"), Value: schemas.EncodeConversion(conv)}})

	reg := prometheus.NewRegistry()
	startLoader(t, LoaderConfig{Brokers: []string{broker}, ClickHouse: chAddr, Database: db, Group: "loader-oversized",
		MaxRows: 1, FlushInterval: 20 * time.Millisecond, MaxRetryWait: 200 * time.Millisecond, Registry: reg})
	allCommitted(t, broker, "loader-oversized")
	if n := queryUint64(t, conn, "SELECT count() FROM "+db+".clicks FINAL"); n != 2 {
		t.Errorf("clicks holds %d rows, want the 2 good ones", n)
	}
	if n := queryUint64(t, conn, "SELECT count() FROM "+db+".conversions FINAL"); n != 1 {
		t.Errorf("conversions holds %d rows, want 1", n)
	}
	if n := metricValue(t, reg, "trackstar_loader_dead_letters_total", "topic", bus.TopicClicks); n != 2 {
		t.Errorf("dead letters of %s = %v, want 2", bus.TopicClicks, n)
	}
}

// While trackstar.dlq refuses a batch's dead letters, /readyz says the
// table waits; a topic whose record size limit is below the dead letters'
// gets them without the records' values, rather than never.
func TestDeadLettersRefusedAreReportedAndShrunk(t *testing.T) {
	const (
		refuseAll   = int32(29) // TOPIC_AUTHORIZATION_FAILED
		refuseLarge = int32(10) // MESSAGE_TOO_LARGE, for record batches over 10 KiB
	)
	var mode atomic.Int32
	mode.Store(refuseAll)
	broker := testenv.KafkaControlled(t, 1, kmsg.Produce, func(_ *kfake.Cluster, kr kmsg.Request) kmsg.Response {
		req := kr.(*kmsg.ProduceRequest)
		size, dlq := 0, false
		for _, rt := range req.Topics {
			if rt.Topic == bus.TopicDLQ {
				dlq = true
				for _, rp := range rt.Partitions {
					size += len(rp.Records)
				}
			}
		}
		code := mode.Load()
		if !dlq || code == 0 || code == refuseLarge && size <= 10<<10 {
			return nil
		}
		resp := req.ResponseKind().(*kmsg.ProduceResponse)
		for _, rt := range req.Topics {
			st := kmsg.NewProduceResponseTopic()
			st.Topic = rt.Topic
			for _, rp := range rt.Partitions {
				sp := kmsg.NewProduceResponseTopicPartition()
				sp.Partition, sp.ErrorCode = rp.Partition, int16(code)
				st.Partitions = append(st.Partitions, sp)
			}
			resp.Topics = append(resp.Topics, st)
		}
		return resp
	})
	chAddr, db := testenv.ClickHouseDB(t)
	conn := migratedDB(t, chAddr, db)
	t0 := serverTime(t, conn)
	produce(t, broker, bus.TopicClicks, []kafka.Message{
		goodClick(t0, 0),
		{Key: []byte("bad"), Value: []byte(strings.Repeat("x", 50_000))},
		goodClick(t0, 1),
	})

	health := &ops.Health{}
	startLoader(t, LoaderConfig{Brokers: []string{broker}, ClickHouse: chAddr, Database: db, Group: "loader-refused",
		MaxRows: 1, FlushInterval: 20 * time.Millisecond, MaxRetryWait: 200 * time.Millisecond, Health: health})
	eventually(t, "readiness to say the clicks wait", 30*time.Second, func() error {
		if err := health.Ready(); err == nil || !strings.Contains(err.Error(), "clicks is inserted but cannot be finished") {
			return fmt.Errorf("readiness: %v", err)
		}
		return nil
	})

	mode.Store(refuseLarge)
	allCommitted(t, broker, "loader-refused")
	eventually(t, "readiness", 10*time.Second, func() error { return health.Ready() })
	if n := queryUint64(t, conn, "SELECT count() FROM "+db+".clicks FINAL"); n != 2 {
		t.Errorf("clicks holds %d rows, want the 2 good ones", n)
	}
	r := kafka.NewReader(kafka.ReaderConfig{Brokers: []string{broker}, Topic: bus.TopicDLQ, Partition: 0, MaxWait: 100 * time.Millisecond})
	defer r.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	m, err := r.ReadMessage(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var dl schemas.DeadLetter
	if err := json.Unmarshal(m.Value, &dl); err != nil {
		t.Fatal(err)
	}
	if string(m.Key) != "bad" || dl.Offset != 1 || dl.Value != "" || !strings.Contains(dl.Error, "the value, 50000 bytes, left out") {
		t.Errorf("dead letter: key %q, offset %d, value %d bytes, error %q; want it without its value, saying so", m.Key, dl.Offset, len(dl.Value), dl.Error)
	}
}

// A batch of clicks spanning more than 100 months (a backfill of old
// events) loads. Current ClickHouse releases refuse an insert touching
// more than 100 partitions unless max_partitions_per_insert_block lifts
// it, which the loader sets where the server knows it (18.16 does not,
// and has no such limit); without it the batch was retried forever.
func TestBatchSpanningYearsLoads(t *testing.T) {
	broker := testenv.KafkaTopics(t, 1)
	chAddr, db := testenv.ClickHouseDB(t)
	conn := migratedDB(t, chAddr, db)
	var msgs []kafka.Message
	for i := range 101 {
		at := time.Date(2000, time.January, 1, 0, 0, 0, 0, time.UTC).AddDate(0, i, 0)
		c := schemas.Click{ClickID: schemas.NewID(at), TS: at.UnixMilli(), OfferID: 1, AffID: 7}
		msgs = append(msgs, kafka.Message{Key: []byte(c.ClickID), Value: c.AppendJSON(nil)})
	}
	produce(t, broker, bus.TopicClicks, msgs)
	startLoader(t, LoaderConfig{Brokers: []string{broker}, ClickHouse: chAddr, Database: db, Group: "loader-years",
		FlushInterval: 200 * time.Millisecond, MaxRetryWait: 200 * time.Millisecond})
	allCommitted(t, broker, "loader-years")
	if n := queryUint64(t, conn, "SELECT count() FROM "+db+".clicks FINAL"); n != 101 {
		t.Fatalf("clicks holds %d rows, want 101", n)
	}
	settings, err := insertSettings(context.Background(), conn)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("insert settings on this server: %v", settings)
}
