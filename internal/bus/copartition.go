package bus

import (
	"encoding/json"
	"sort"
	"sync"

	"github.com/segmentio/kafka-go"
)

// CoPartitionBalancer is a kafka-go GroupBalancer that hands out whole
// partition numbers: a member gets partition p of every topic it consumes,
// or of none. The attributor depends on this to see a click and its
// postbacks in the same worker. kafka-go's RangeGroupBalancer does not
// guarantee it (it takes partitions in metadata order, which may differ
// between topics).
//
// The assignment is balanced (counts differ by at most one), deterministic
// for a given membership, and sticky: each member sends the partitions it
// owns (SetOwned) as user data and keeps as many of them as its fair share
// allows, so a rebalance moves as little state as it can.
type CoPartitionBalancer struct {
	mu    sync.Mutex
	owned []int
}

// ProtocolName implements kafka.GroupBalancer.
func (b *CoPartitionBalancer) ProtocolName() string { return "trackstar-copartition-v1" }

// SetOwned records the partition numbers this member owns now, to be sent
// as stickiness hints at the next rebalance.
func (b *CoPartitionBalancer) SetOwned(partitions []int) {
	b.mu.Lock()
	b.owned = append(b.owned[:0], partitions...)
	b.mu.Unlock()
}

type coPartitionUserData struct {
	Owned []int `json:"owned"`
}

// UserData implements kafka.GroupBalancer.
func (b *CoPartitionBalancer) UserData() ([]byte, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return json.Marshal(coPartitionUserData{Owned: b.owned})
}

// AssignGroups implements kafka.GroupBalancer. Partition numbers that do not
// exist in every consumed topic cannot be co-partitioned and are left
// unassigned (EnsureTopics refuses such a cluster at startup).
func (b *CoPartitionBalancer) AssignGroups(members []kafka.GroupMember, partitions []kafka.Partition) kafka.GroupMemberAssignments {
	out := make(kafka.GroupMemberAssignments, len(members))
	if len(members) == 0 {
		return out
	}
	members = append([]kafka.GroupMember(nil), members...)
	sort.Slice(members, func(i, j int) bool { return members[i].ID < members[j].ID })

	// Partition numbers present in every topic any member consumes.
	topics := map[string]map[int]bool{}
	for _, m := range members {
		for _, t := range m.Topics {
			if topics[t] == nil {
				topics[t] = map[int]bool{}
			}
		}
	}
	for _, p := range partitions {
		if ids := topics[p.Topic]; ids != nil {
			ids[p.ID] = true
		}
	}
	var nums []int
	for _, ids := range topics {
		for id := range ids {
			inAll := true
			for _, other := range topics {
				if !other[id] {
					inAll = false
					break
				}
			}
			if inAll {
				nums = append(nums, id)
			}
		}
		break // the intersection is complete after scanning one topic
	}
	sort.Ints(nums)

	owner := assignNumbers(members, nums)

	for _, m := range members {
		out[m.ID] = map[string][]int{}
		for _, t := range m.Topics {
			out[m.ID][t] = []int{}
		}
	}
	for _, p := range nums {
		m := members[owner[p]]
		for _, t := range m.Topics {
			out[m.ID][t] = append(out[m.ID][t], p)
		}
	}
	return out
}

// assignNumbers maps each partition number to an index into members
// (sorted by ID), keeping previous owners where the quota allows.
func assignNumbers(members []kafka.GroupMember, nums []int) map[int]int {
	n := len(members)
	base, extra := len(nums)/n, len(nums)%n
	count := make([]int, n)
	owner := make(map[int]int, len(nums))
	valid := make(map[int]bool, len(nums))
	for _, p := range nums {
		valid[p] = true
	}
	// canTake reports whether member i may take one more partition.
	canTake := func(i int) bool {
		if count[i] < base {
			return true
		}
		return count[i] == base && extra > 0
	}
	take := func(i, p int) {
		if count[i] == base {
			extra--
		}
		count[i]++
		owner[p] = i
	}

	// Sticky pass: keep previously owned partitions, first up to the base
	// quota for everyone, then the extras, so that no early member eats the
	// extras a later one needs to keep its own partitions.
	prev := make([][]int, n)
	for i, m := range members {
		var ud coPartitionUserData
		if json.Unmarshal(m.UserData, &ud) == nil {
			sort.Ints(ud.Owned)
			prev[i] = ud.Owned
		}
	}
	for round := 0; round < 2; round++ {
		for i := range members {
			for _, p := range prev[i] {
				if !valid[p] {
					continue
				}
				if _, taken := owner[p]; taken {
					continue
				}
				if count[i] < base || (round == 1 && canTake(i)) {
					take(i, p)
				}
			}
		}
	}

	// Fill: hand the rest to whoever has the fewest.
	for _, p := range nums {
		if _, taken := owner[p]; taken {
			continue
		}
		best := -1
		for i := range members {
			if canTake(i) && (best < 0 || count[i] < count[best]) {
				best = i
			}
		}
		if best < 0 {
			panic("BUG: co-partition balancer ran out of quota")
		}
		take(best, p)
	}
	return owner
}
