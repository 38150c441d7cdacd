package bus

import (
	"context"
	"errors"
	"fmt"

	"github.com/segmentio/kafka-go"
)

// ListOffset answers one ListOffsets question about one partition of a
// topic: its first offset (kafka.FirstOffsetOf), its high watermark
// (kafka.LastOffsetOf), or, for kafka.TimeOffsetOf, the first offset of a
// record from that time or later, -1 when there is none.
func ListOffset(ctx context.Context, client *kafka.Client, topic string, req kafka.OffsetRequest) (int64, error) {
	resp, err := client.ListOffsets(ctx, &kafka.ListOffsetsRequest{
		Topics: map[string][]kafka.OffsetRequest{topic: {req}},
	})
	if err == nil {
		for _, po := range resp.Topics[topic] {
			if po.Partition != req.Partition {
				continue
			}
			if po.Error != nil {
				err = po.Error
				break
			}
			switch req.Timestamp {
			case kafka.FirstOffset:
				return po.FirstOffset, nil
			case kafka.LastOffset:
				return po.LastOffset, nil
			}
			for off := range po.Offsets {
				return off, nil
			}
			return -1, nil
		}
		if err == nil {
			err = errors.New("partition missing from the response")
		}
	}
	return 0, fmt.Errorf("cannot list offsets of %s/%d: %w", topic, req.Partition, err)
}
