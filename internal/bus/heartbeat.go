package bus

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"time"

	"github.com/segmentio/kafka-go"
)

// Heartbeater sends consumer group heartbeats for a member of a
// generation that kafka-go's ConsumerGroup no longer heartbeats for (a
// generation being handed over), or to confirm that the coordinator still
// counts the member. It speaks Heartbeat v0 — what kafka-go's own consumer
// group sends — to the group's coordinator over a connection of its own.
//
// kafka-go's Client.Heartbeat cannot do this: it sends the request to any
// broker of the cluster, not to the group's coordinator, and it decodes the
// v1+ response with its two fields swapped (segmentio/kafka-go#1371), so
// every error the broker answers reads as success.
//
// A Heartbeater is not safe for concurrent use.
type Heartbeater struct {
	client  *kafka.Client
	group   string
	timeout time.Duration
	conn    net.Conn
	r       *bufio.Reader
	corr    int32
}

// NewHeartbeater returns a Heartbeater for group. Each Beat waits at most
// timeout.
func NewHeartbeater(brokers []string, group string, timeout time.Duration) *Heartbeater {
	return &Heartbeater{
		client:  &kafka.Client{Addr: kafka.TCP(brokers...), Timeout: timeout},
		group:   group,
		timeout: timeout,
	}
}

// Beat sends one heartbeat for member of generation and returns the
// coordinator's answer: nil when it accepted it, a kafka.Error such as
// kafka.RebalanceInProgress, kafka.UnknownMemberId or
// kafka.IllegalGeneration when it did not, or a network error.
func (h *Heartbeater) Beat(ctx context.Context, generation int32, member string) error {
	ctx, cancel := context.WithTimeout(ctx, h.timeout)
	defer cancel()
	if h.conn == nil {
		if err := h.connect(ctx); err != nil {
			return err
		}
	}
	code, err := h.roundTrip(ctx, generation, member)
	if err != nil {
		h.Close() // find the coordinator again next time
		return fmt.Errorf("heartbeat of group %s: %w", h.group, err)
	}
	if code == 0 {
		return nil
	}
	kerr := kafka.Error(code)
	switch kerr {
	case kafka.NotCoordinatorForGroup, kafka.GroupCoordinatorNotAvailable, kafka.GroupLoadInProgress:
		h.Close() // the coordinator moved
	}
	return kerr
}

// connect finds the group's coordinator and dials it.
func (h *Heartbeater) connect(ctx context.Context) error {
	resp, err := h.client.FindCoordinator(ctx, &kafka.FindCoordinatorRequest{Key: h.group, KeyType: kafka.CoordinatorKeyTypeConsumer})
	if err == nil && resp.Error != nil {
		err = resp.Error
	}
	if err == nil && resp.Coordinator == nil {
		err = errors.New("no coordinator in the answer")
	}
	if err != nil {
		return fmt.Errorf("cannot find the coordinator of group %s: %w", h.group, err)
	}
	addr := net.JoinHostPort(resp.Coordinator.Host, strconv.Itoa(resp.Coordinator.Port))
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return fmt.Errorf("cannot reach the coordinator of group %s at %s: %w", h.group, addr, err)
	}
	h.conn, h.r = conn, bufio.NewReaderSize(conn, 64)
	return nil
}

const (
	apiKeyHeartbeat = 12
	heartbeatClient = "trackstar"
)

// roundTrip writes a Heartbeat v0 request and reads its response's error
// code.
func (h *Heartbeater) roundTrip(ctx context.Context, generation int32, member string) (int16, error) {
	conn := h.conn
	if deadline, ok := ctx.Deadline(); ok {
		if err := conn.SetDeadline(deadline); err != nil {
			return 0, err
		}
	}
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) }) // cut short
	defer stop()

	h.corr++
	req := make([]byte, 4, 64+len(h.group)+len(member))
	req = binary.BigEndian.AppendUint16(req, apiKeyHeartbeat)
	req = binary.BigEndian.AppendUint16(req, 0) // version
	req = binary.BigEndian.AppendUint32(req, uint32(h.corr))
	req = appendString(req, heartbeatClient)
	req = appendString(req, h.group)
	req = binary.BigEndian.AppendUint32(req, uint32(generation))
	req = appendString(req, member)
	binary.BigEndian.PutUint32(req, uint32(len(req)-4))
	if _, err := conn.Write(req); err != nil {
		return 0, err
	}

	var head [4 + 4 + 2]byte // size, correlation ID, error code
	if _, err := io.ReadFull(h.r, head[:]); err != nil {
		return 0, err
	}
	if size := binary.BigEndian.Uint32(head[0:]); size != 6 {
		return 0, fmt.Errorf("heartbeat response of %d bytes, want 6", size)
	}
	if corr := int32(binary.BigEndian.Uint32(head[4:])); corr != h.corr {
		return 0, fmt.Errorf("heartbeat response to request %d, want %d", corr, h.corr)
	}
	return int16(binary.BigEndian.Uint16(head[8:])), nil
}

func appendString(b []byte, s string) []byte {
	b = binary.BigEndian.AppendUint16(b, uint16(len(s)))
	return append(b, s...)
}

// Close closes the connection to the coordinator, if any.
func (h *Heartbeater) Close() {
	if h.conn != nil {
		h.conn.Close()
		h.conn, h.r = nil, nil
	}
}
