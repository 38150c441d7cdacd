package ingest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/segmentio/kafka-go"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/trackstar/trackstar/internal/bus"
	"github.com/trackstar/trackstar/schemas"
)

const flightTestPartitions = 4

// flightCluster starts a kfake broker holding both edge topics, and returns
// it with its address; the test may steer its answers with ControlKey.
func flightCluster(t *testing.T) (*kfake.Cluster, string) {
	t.Helper()
	c, addrs := flightClusterOf(t, 1)
	return c, addrs[0]
}

// flightClusterOf starts a kfake cluster of n brokers, which spreads the
// partitions' leadership over them.
func flightClusterOf(t *testing.T, n int) (*kfake.Cluster, []string) {
	t.Helper()
	c, err := kfake.NewCluster(kfake.NumBrokers(n), kfake.SeedTopics(flightTestPartitions, bus.TopicClicks, bus.TopicPostbacks))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c, c.ListenAddrs()
}

// startFlight runs a flight on a queue of its own until the test ends.
func startFlight(t *testing.T, addrs ...string) chan<- *event {
	t.Helper()
	q := make(chan *event, 1024)
	ctx, cancel := context.WithCancel(context.Background())
	f := newFlight(ctx, addrs, q, 5*time.Second)
	done := make(chan struct{})
	go func() {
		defer close(done)
		f.run()
	}()
	t.Cleanup(func() {
		close(q)
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Error("flight did not stop within 10s of its queue closing")
		}
		cancel()
	})
	return q
}

// flightEvent is an event as the producer queues it.
func flightEvent(topic topicID, key, value string) *event {
	ev := &event{topic: topic, key: []byte(key), value: []byte(value), result: make(chan error, 1)}
	ev.refs.Store(2)
	ev.state.Store(stateQueued)
	return ev
}

// testKey returns a fresh click ID (IDs carry randomness: call it once
// per click).
func testKey(i int) string {
	return strings.ToLower(schemas.NewID(time.Unix(1700000000, int64(i))))
}

// readPartitions reads every record of topic, partition by partition.
func readPartitions(t *testing.T, addr, topic string, want int) map[int][]kafka.Message {
	t.Helper()
	out := map[int][]kafka.Message{}
	got := 0
	for p := range flightTestPartitions {
		conn, err := kafka.DialLeader(context.Background(), "tcp", addr, topic, p)
		if err != nil {
			t.Fatal(err)
		}
		last, err := conn.ReadLastOffset()
		conn.Close()
		if err != nil {
			t.Fatal(err)
		}
		if last == 0 {
			continue
		}
		r := kafka.NewReader(kafka.ReaderConfig{Brokers: []string{addr}, Topic: topic, Partition: p, MaxWait: 100 * time.Millisecond})
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		for int64(len(out[p])) < last {
			m, err := r.ReadMessage(ctx)
			if err != nil {
				t.Fatalf("%s partition %d: read %d of %d records: %v", topic, p, len(out[p]), last, err)
			}
			out[p] = append(out[p], m)
		}
		cancel()
		r.Close()
		got += len(out[p])
	}
	if got != want {
		t.Fatalf("%s holds %d records, want %d", topic, got, want)
	}
	return out
}

func TestFlightProducesInOrderAcrossTopicsAndPartitions(t *testing.T) {
	t.Run("one broker", func(t *testing.T) {
		_, addr := flightCluster(t)
		testFlightOrder(t, []string{addr})
	})
	// Partitions led by different brokers: one request per leader per
	// round, sent at once.
	t.Run("three brokers", func(t *testing.T) {
		c, addrs := flightClusterOf(t, 3)
		var leaders sync.Map
		c.ControlKey(int16(kmsg.Produce), func(req kmsg.Request) (kmsg.Response, error, bool) {
			c.KeepControl()
			leaders.Store(c.CurrentNode(), true)
			return nil, nil, false
		})
		testFlightOrder(t, addrs)
		n := 0
		leaders.Range(func(any, any) bool { n++; return true })
		if n < 2 {
			t.Fatalf("produce requests went to %d broker(s); the test wants partitions led by several", n)
		}
	})
}

func testFlightOrder(t *testing.T, addrs []string) {
	addr := addrs[0]
	q := startFlight(t, addrs...)

	// 40 clicks, each with many events of both topics, queued in bursts so
	// that rounds carry several partitions of both topics at once.
	const clicks, perClick = 40, 50
	keys := make([]string, clicks)
	for c := range keys {
		keys[c] = testKey(c)
	}
	var evs []*event
	for n := range perClick {
		for c := range clicks {
			topic := topicID(n % 2)
			evs = append(evs, flightEvent(topic, keys[c], fmt.Sprintf("%d/%d", c, n)))
		}
	}
	for _, ev := range evs {
		q <- ev
	}
	for i, ev := range evs {
		select {
		case err := <-ev.result:
			if err != nil {
				t.Fatalf("event %d: %v", i, err)
			}
		case <-time.After(20 * time.Second):
			t.Fatalf("event %d was not acked within 20s", i)
		}
	}

	for topic := range numTopics {
		parts := readPartitions(t, addr, topicNames[topic], clicks*perClick/2)
		last := map[string]int{} // per click: the last event seen
		for p, msgs := range parts {
			for _, m := range msgs {
				if want := bus.PartitionFor(m.Key, flightTestPartitions); want != p {
					t.Fatalf("%s: key %s in partition %d, want %d", topicNames[topic], m.Key, p, want)
				}
				if m.Time.IsZero() || time.Since(m.Time) > time.Minute {
					t.Fatalf("%s: record time %v, want the produce time", topicNames[topic], m.Time)
				}
				c, n, _ := strings.Cut(string(m.Value), "/")
				seq, _ := strconv.Atoi(n)
				if seq%2 != int(topic) {
					t.Fatalf("%s holds %q, an event of the other topic", topicNames[topic], m.Value)
				}
				if prev, ok := last[c]; ok && seq <= prev {
					t.Fatalf("%s: click %s: event %d after %d: out of order", topicNames[topic], c, seq, prev)
				}
				last[c] = seq
			}
		}
		if len(last) != clicks {
			t.Fatalf("%s holds events of %d clicks, want %d", topicNames[topic], len(last), clicks)
		}
	}
}

// notLeader answers a produce request with NOT_LEADER_OR_FOLLOWER for
// every partition, as a broker does while leadership moves.
func notLeader(req kmsg.Request) kmsg.Response {
	pr := req.(*kmsg.ProduceRequest)
	resp := pr.ResponseKind().(*kmsg.ProduceResponse)
	for _, rt := range pr.Topics {
		st := kmsg.NewProduceResponseTopic()
		st.Topic = rt.Topic
		for _, rp := range rt.Partitions {
			sp := kmsg.NewProduceResponseTopicPartition()
			sp.Partition = rp.Partition
			sp.ErrorCode = kerr.NotLeaderForPartition.Code
			st.Partitions = append(st.Partitions, sp)
		}
		resp.Topics = append(resp.Topics, st)
	}
	return resp
}

func TestFlightRetriesAPartitionWhoseLeaderMoved(t *testing.T) {
	c, addr := flightCluster(t)
	var refused atomic.Int32
	c.ControlKey(int16(kmsg.Produce), func(req kmsg.Request) (kmsg.Response, error, bool) {
		c.KeepControl()
		if refused.Load() >= 2 {
			return nil, nil, false // the broker's own answer
		}
		refused.Add(1)
		return notLeader(req), nil, true
	})
	q := startFlight(t, addr)

	keys := make([]string, 5)
	for i := range keys {
		keys[i] = testKey(i)
	}
	var evs []*event
	for i := range 20 {
		ev := flightEvent(topicClicks, keys[i%5], fmt.Sprint(i))
		evs = append(evs, ev)
		q <- ev
	}
	for i, ev := range evs {
		select {
		case err := <-ev.result:
			if err != nil {
				t.Fatalf("event %d: %v (want it acked after the retries)", i, err)
			}
		case <-time.After(20 * time.Second):
			t.Fatalf("event %d was not settled within 20s", i)
		}
	}
	if n := refused.Load(); n != 2 {
		t.Fatalf("the broker refused %d requests, want 2", n)
	}
	// Each event once, in queue order per key, though the first requests
	// were refused.
	parts := readPartitions(t, addr, bus.TopicClicks, len(evs))
	for _, msgs := range parts {
		last := map[string]int{}
		for _, m := range msgs {
			n, _ := strconv.Atoi(string(m.Value))
			if prev, ok := last[string(m.Key)]; ok && n <= prev {
				t.Fatalf("key %s: event %d after %d", m.Key, n, prev)
			}
			last[string(m.Key)] = n
		}
	}
}

func TestFlightGivesUpAfterItsAttempts(t *testing.T) {
	c, addr := flightCluster(t)
	var requests atomic.Int32
	c.ControlKey(int16(kmsg.Produce), func(req kmsg.Request) (kmsg.Response, error, bool) {
		c.KeepControl()
		requests.Add(1)
		return notLeader(req), nil, true
	})
	q := startFlight(t, addr)
	ev := flightEvent(topicPostbacks, testKey(1), "x")
	q <- ev
	select {
	case err := <-ev.result:
		if !errors.Is(err, kafka.NotLeaderForPartition) {
			t.Fatalf("got %v, want NOT_LEADER_FOR_PARTITION", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("the event was not settled within 20s")
	}
	if n := requests.Load(); n != flightAttempts {
		t.Fatalf("%d produce requests, want %d", n, flightAttempts)
	}
}

func TestFlightDoesNotRetryAFinalError(t *testing.T) {
	c, addr := flightCluster(t)
	var requests atomic.Int32
	c.ControlKey(int16(kmsg.Produce), func(req kmsg.Request) (kmsg.Response, error, bool) {
		c.KeepControl()
		requests.Add(1)
		resp := notLeader(req).(*kmsg.ProduceResponse)
		for i := range resp.Topics {
			for j := range resp.Topics[i].Partitions {
				resp.Topics[i].Partitions[j].ErrorCode = kerr.MessageTooLarge.Code
			}
		}
		return resp, nil, true
	})
	q := startFlight(t, addr)
	ev := flightEvent(topicClicks, testKey(1), "x")
	q <- ev
	select {
	case err := <-ev.result:
		if !errors.Is(err, kafka.MessageSizeTooLarge) {
			t.Fatalf("got %v, want MESSAGE_TOO_LARGE", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("the event was not settled within 20s")
	}
	if n := requests.Load(); n != 1 {
		t.Fatalf("%d produce requests, want 1 (no retry of a final error)", n)
	}
}

func TestFlightFailsAtOnceWhenTheBrokerIsDown(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close() // nothing listens there now
	q := startFlight(t, addr)
	start := time.Now()
	ev := flightEvent(topicClicks, testKey(1), "x")
	q <- ev
	select {
	case err := <-ev.result:
		if err == nil {
			t.Fatal("an event to a broker that is down was acked")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the event was not settled within 10s")
	}
	// The handler spools it: waiting here would only hold the request.
	if d := time.Since(start); d > 3*time.Second {
		t.Fatalf("failing took %v", d)
	}
}

// TestDrainKeepsPartitionOrderWhenARoundFails: the spool holds events of
// one click ID (one partition), answered in order 0..n-1 (think: pending,
// then approved). While it drains, a leader election outlasts flight's
// attempts. Had the later events succeeded in a later round while the
// earlier ones failed, the drainer would produce the earlier ones again
// after them, and Kafka's last copy of the spool would be out of order.
func TestDrainKeepsPartitionOrderWhenARoundFails(t *testing.T) {
	c, addr := flightCluster(t)
	// A leader election that outlasts flight's three attempts (20 ms and
	// 40 ms apart): the first three produce requests are refused with
	// NOT_LEADER_OR_FOLLOWER, then the broker answers normally.
	var refused atomic.Int32
	c.ControlKey(int16(kmsg.Produce), func(req kmsg.Request) (kmsg.Response, error, bool) {
		c.KeepControl()
		if refused.Load() >= flightAttempts {
			return nil, nil, false // the broker's own answer from now on
		}
		refused.Add(1)
		return notLeader(req), nil, true
	})

	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	sp, err := openSpool(t.TempDir(), 1<<30, log)
	if err != nil {
		t.Fatal(err)
	}
	key := []byte(testKey(1))
	const n = 50
	// Events of 64 KiB (as flight counts them: key + value + 64), so that
	// a round holds at most 16 of them (flightMaxBytes) and the first
	// round never takes every event, however the goroutines are scheduled.
	pad := strings.Repeat("x", 1<<16-64-len(key)-3)
	for i := range n {
		if err := sp.append(topicPostbacks, key, fmt.Appendf(nil, "%02d|%s", i, pad), time.Now()); err != nil {
			t.Fatal(err)
		}
	}
	m, err := newMetrics(prometheus.NewRegistry(), sp)
	if err != nil {
		t.Fatal(err)
	}
	cfg := Config{Brokers: []string{addr}, ProduceTimeout: time.Second, Logger: log}
	p := newProducer(&cfg, sp, m)
	p.start()
	deadline := time.Now().Add(15 * time.Second)
	for sp.count.Load() > 0 || sp.active.Load() {
		if time.Now().After(deadline) {
			t.Fatalf("the spool did not drain: %d events left", sp.count.Load())
		}
		time.Sleep(20 * time.Millisecond)
	}
	p.close()
	sp.close()

	// The last occurrence of each event decides what a consumer that lets
	// a later record win ends up with: it must be in spool order.
	var seq []int
	for _, msg := range readTopic(t, addr, bus.TopicPostbacks) {
		v, _ := strconv.Atoi(string(msg.Value[:2]))
		seq = append(seq, v)
	}
	last := map[int]int{}
	for i, v := range seq {
		last[v] = i
	}
	for v := 1; v < n; v++ {
		if last[v] < last[v-1] {
			t.Fatalf("Kafka holds the spooled events out of order: event %d last at offset %d, after event %d last at offset %d; partition: %v",
				v-1, last[v-1], v, last[v], fmt.Sprint(seq))
		}
	}
}

// TestFlightFollowsALeaderMove: kafka-go's Transport answers metadata
// requests from its cache (refreshed every few seconds) and routes produce
// requests by it. Unless flight drops that cache after a failed round, all
// of its attempts go to the old leader, and every leader move sends the
// edge into spooling.
func TestFlightFollowsALeaderMove(t *testing.T) {
	c, addrs := flightClusterOf(t, 2)
	q := startFlight(t, addrs...)
	key := testKey(1)
	part := int32(bus.PartitionFor([]byte(key), flightTestPartitions))

	settle := func(ev *event) error {
		select {
		case err := <-ev.result:
			return err
		case <-time.After(15 * time.Second):
			t.Fatal("the event was not settled within 15s")
			return nil
		}
	}
	ev := flightEvent(topicClicks, key, "before")
	q <- ev
	if err := settle(ev); err != nil {
		t.Fatalf("before the move: %v", err)
	}

	old := c.LeaderFor(bus.TopicClicks, part)
	var other int32 = -1
	for _, n := range []int32{0, 1, 2} {
		if n != old {
			if err := c.MoveTopicPartition(bus.TopicClicks, part, n); err == nil {
				other = n
				break
			}
		}
	}
	if other < 0 || c.LeaderFor(bus.TopicClicks, part) == old {
		t.Fatalf("could not move the leader of partition %d away from %d", part, old)
	}

	ev = flightEvent(topicClicks, key, "after")
	q <- ev
	if err := settle(ev); err != nil {
		t.Fatalf("after moving the leader of partition %d from node %d to %d, flight gave up: %v", part, old, other, err)
	}
}
