package bus

import (
	"encoding/json"
	"fmt"
	"math/rand"
	"sort"
	"testing"

	"github.com/segmentio/kafka-go"
)

func shuffledPartitions(rng *rand.Rand, topics []string, n int) []kafka.Partition {
	var ps []kafka.Partition
	for _, t := range topics {
		for i := 0; i < n; i++ {
			ps = append(ps, kafka.Partition{Topic: t, ID: i})
		}
	}
	rng.Shuffle(len(ps), func(i, j int) { ps[i], ps[j] = ps[j], ps[i] })
	return ps
}

func member(id string, owned ...int) kafka.GroupMember {
	ud, _ := json.Marshal(coPartitionUserData{Owned: owned})
	return kafka.GroupMember{ID: id, Topics: []string{TopicClicks, TopicPostbacks}, UserData: ud}
}

// checkCoPartitioned asserts every partition number 0..n-1 is owned by
// exactly one member, for both topics, and that counts differ by at most one.
func checkCoPartitioned(t *testing.T, got kafka.GroupMemberAssignments, n int) map[string][]int {
	t.Helper()
	owners := map[int]string{}
	byMember := map[string][]int{}
	for m, topics := range got {
		c, p := topics[TopicClicks], topics[TopicPostbacks]
		sort.Ints(c)
		sort.Ints(p)
		if fmt.Sprint(c) != fmt.Sprint(p) {
			t.Fatalf("member %s owns clicks %v but postbacks %v", m, c, p)
		}
		for _, id := range c {
			if prev, ok := owners[id]; ok {
				t.Fatalf("partition %d owned by %s and %s", id, prev, m)
			}
			owners[id] = m
		}
		byMember[m] = c
	}
	if len(owners) != n {
		t.Fatalf("%d of %d partitions assigned: %v", len(owners), n, got)
	}
	lo, hi := n, 0
	for _, ps := range byMember {
		lo, hi = min(lo, len(ps)), max(hi, len(ps))
	}
	if hi-lo > 1 {
		t.Fatalf("unbalanced assignment: %v", byMember)
	}
	return byMember
}

func TestCoPartitionBalancerShuffled(t *testing.T) {
	rng := rand.New(rand.NewSource(1))
	f := func(nMembers, nParts int) {
		t.Helper()
		var members []kafka.GroupMember
		for i := 0; i < nMembers; i++ {
			members = append(members, member(fmt.Sprintf("m%02d", i)))
		}
		for trial := 0; trial < 20; trial++ {
			parts := shuffledPartitions(rng, []string{TopicClicks, TopicPostbacks}, nParts)
			rng.Shuffle(len(members), func(i, j int) { members[i], members[j] = members[j], members[i] })
			got := (&CoPartitionBalancer{}).AssignGroups(members, parts)
			checkCoPartitioned(t, got, nParts)
		}
	}
	f(1, 1)
	f(1, 12)
	f(2, 12)
	f(3, 12)
	f(5, 12)
	f(7, 3) // more members than partitions: some get none
	f(4, 64)
}

func TestCoPartitionBalancerSticky(t *testing.T) {
	rng := rand.New(rand.NewSource(2))
	parts := shuffledPartitions(rng, []string{TopicClicks, TopicPostbacks}, 12)
	b := &CoPartitionBalancer{}

	// Three members; then b leaves: a and c keep everything they had.
	first := checkCoPartitioned(t, b.AssignGroups([]kafka.GroupMember{member("a"), member("b"), member("c")}, parts), 12)
	second := checkCoPartitioned(t, b.AssignGroups([]kafka.GroupMember{member("c", first["c"]...), member("a", first["a"]...)}, parts), 12)
	for _, m := range []string{"a", "c"} {
		for _, p := range first[m] {
			if !contains(second[m], p) {
				t.Fatalf("member %s lost partition %d it owned (%v -> %v)", m, p, first[m], second[m])
			}
		}
	}

	// A new member joins: the old ones only give up partitions, never swap.
	third := checkCoPartitioned(t, b.AssignGroups([]kafka.GroupMember{member("a", second["a"]...), member("c", second["c"]...), member("d")}, parts), 12)
	for _, m := range []string{"a", "c"} {
		for _, p := range third[m] {
			if !contains(second[m], p) {
				t.Fatalf("member %s gained partition %d on a join (%v -> %v)", m, p, second[m], third[m])
			}
		}
	}
	if len(third["d"]) != 4 {
		t.Fatalf("new member got %v, want 4 partitions", third["d"])
	}
}

func TestCoPartitionBalancerSkipsUnpairedPartitions(t *testing.T) {
	parts := []kafka.Partition{
		{Topic: TopicPostbacks, ID: 2}, {Topic: TopicClicks, ID: 0}, {Topic: TopicPostbacks, ID: 0},
		{Topic: TopicClicks, ID: 1}, {Topic: TopicPostbacks, ID: 1}, {Topic: TopicPostbacks, ID: 3},
	}
	got := (&CoPartitionBalancer{}).AssignGroups([]kafka.GroupMember{member("a"), member("b")}, parts)
	checkCoPartitioned(t, got, 2)
}

func contains(s []int, v int) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

func TestPartitionForIsStable(t *testing.T) {
	// Pinned values: changing the partitioner would split every live
	// click from its postbacks, so it must never change by accident.
	f := func(id string, n, want int) {
		t.Helper()
		if got := PartitionFor([]byte(id), n); got != want {
			t.Fatalf("PartitionFor(%q, %d) = %d, want %d", id, n, got, want)
		}
	}
	f("", 12, int(0xef46db3751d8e999%12))
	f("abc", 1, 0)
}
