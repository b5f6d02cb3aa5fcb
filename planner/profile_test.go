package planner

import (
	"fmt"
	"math/rand/v2"
	"reflect"
	"testing"

	"github.com/hoardvm/hoard/chunkstore"
)

func TestMergeProfiles(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name     string
		in       map[string]chunkstore.Profile
		max      int
		want     []int
		boots    int
		contribs int
	}{
		{"one node keeps its order", map[string]chunkstore.Profile{"a": {Boots: 2, Chunks: []int{5, 1, 3}}}, 0, []int{5, 1, 3}, 2, 1},
		{"agreeing nodes", map[string]chunkstore.Profile{
			"a": {Boots: 1, Chunks: []int{5, 1, 3}},
			"b": {Boots: 1, Chunks: []int{5, 1, 3, 7}},
		}, 0, []int{5, 1, 3, 7}, 2, 2},
		{"boots weigh positions", map[string]chunkstore.Profile{
			"a": {Boots: 9, Chunks: []int{1, 2}},
			"b": {Boots: 1, Chunks: []int{2, 1}},
		}, 0, []int{1, 2}, 10, 2},
		{"bad indices dropped", map[string]chunkstore.Profile{
			"a": {Boots: 1, Chunks: []int{4, 100, -1, 4, 2}},
			"b": {Boots: 3, Chunks: []int{10, 11}}, // nothing valid: not a contributor
		}, 0, []int{4, 2}, 1, 1},
		{"bound keeps the most supported", map[string]chunkstore.Profile{
			"a": {Boots: 1, Chunks: []int{0, 1, 2}},
			"b": {Boots: 1, Chunks: []int{3, 1, 2}},
			"c": {Boots: 1, Chunks: []int{4, 2}},
		}, 2, []int{1, 2}, 3, 3},
		{"empty", nil, 5, []int{}, 0, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			got := MergeProfiles(tc.in, 10, tc.max)
			if !reflect.DeepEqual(got.Chunks, tc.want) || got.Boots != tc.boots || got.Contributors != tc.contribs {
				t.Fatalf("merged %+v, want chunks %v boots %d contributors %d", got, tc.want, tc.boots, tc.contribs)
			}
		})
	}
}

// TestMergeProfilesProperties: over random profiles, the merge is the same
// whatever order the map was built in and whatever the nodes are named,
// holds at most maxChunks distinct indices, all below entries, sums the
// boots, and keeps a single node's valid order.
func TestMergeProfilesProperties(t *testing.T) {
	t.Parallel()
	r := rand.New(rand.NewPCG(11, 12))
	for trial := range 500 {
		entries := 1 + r.IntN(200)
		maxChunks := r.IntN(150)
		var keys []string
		var profs []chunkstore.Profile
		boots := 0
		for n := range r.IntN(8) {
			p := chunkstore.Profile{Boots: r.IntN(20)}
			for range r.IntN(100) {
				p.Chunks = append(p.Chunks, r.IntN(entries+20)-5) // some out of range, some repeated
			}
			keys = append(keys, fmt.Sprint("node", n))
			profs = append(profs, p)
		}
		build := func(perm []int, prefix string) map[string]chunkstore.Profile {
			m := map[string]chunkstore.Profile{}
			for _, i := range perm {
				m[prefix+keys[i]] = profs[i]
			}
			return m
		}
		got := MergeProfiles(build(r.Perm(len(keys)), ""), entries, maxChunks)
		again := MergeProfiles(build(r.Perm(len(keys)), "other-"), entries, maxChunks)
		if !reflect.DeepEqual(got, again) {
			t.Fatalf("trial %d: merge depends on order or names:\n%+v\n%+v", trial, got, again)
		}
		if maxChunks > 0 && len(got.Chunks) > maxChunks {
			t.Fatalf("trial %d: %d chunks over the bound %d", trial, len(got.Chunks), maxChunks)
		}
		seen := map[int]bool{}
		for _, i := range got.Chunks {
			if i < 0 || i >= entries || seen[i] {
				t.Fatalf("trial %d: index %d out of range or repeated", trial, i)
			}
			seen[i] = true
		}
		contribs := 0
		for _, p := range profs {
			valid := false
			for _, i := range p.Chunks {
				valid = valid || (i >= 0 && i < entries)
			}
			if valid {
				contribs++
				boots += p.Boots
			}
		}
		if got.Boots != boots || got.Contributors != contribs {
			t.Fatalf("trial %d: boots %d contributors %d, want %d %d", trial, got.Boots, got.Contributors, boots, contribs)
		}
		if len(profs) > 0 && maxChunks == 0 {
			one := MergeProfiles(map[string]chunkstore.Profile{"x": profs[0]}, entries, 0)
			var want []int
			dup := map[int]bool{}
			for _, i := range profs[0].Chunks {
				if i >= 0 && i < entries && !dup[i] {
					dup[i] = true
					want = append(want, i)
				}
			}
			if len(want) > 0 && !reflect.DeepEqual(one.Chunks, want) {
				t.Fatalf("trial %d: a single profile's order changed: %v, want %v", trial, one.Chunks, want)
			}
		}
	}
}
