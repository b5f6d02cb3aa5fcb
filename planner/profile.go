package planner

import (
	"math"
	"sort"

	"github.com/hoardvm/hoard/chunkstore"
)

// MergedProfile is the cluster profile of one image.
type MergedProfile struct {
	chunkstore.Profile
	// Contributors is the number of nodes whose profile gave at least one
	// valid index.
	Contributors int
}

// posScale is the fixed-point scale of a normalized position (rank/length):
// integers keep the merge bit-for-bit the same on every node and platform.
// With 1<<30, positions in profiles of up to a billion indices stay distinct.
const posScale = 1 << 30

// maxWeight caps one node's weight (its boots), so that sums cannot overflow
// (weight × position < 2^46: over 250,000 nodes of the heaviest weight).
const maxWeight = 1 << 16

// MergeProfiles merges the profiles that nodes learned of one image (keyed by
// node) into the cluster profile, deterministically: the same set of profiles
// gives the same result, however the map was built.
//
// A profile is a hint, never data: indices >= entries (the manifest's entry
// count) and indices repeated within one profile (after the first) are
// dropped; a profile left with no index does not contribute. Each node's
// weight is its Boots (at least 1, at most 1<<16); Boots of the result is
// the sum of the contributors' Boots (negative counts as 0, saturating).
//
// Which indices: when more than maxChunks distinct indices remain (maxChunks
// <= 0 means no bound), the ones with the most support are kept: support is
// the summed weight of the nodes that read the index; ties go to the better
// position (below), then the lower index.
//
// Order: each node's profile gives each of its indices a normalized position
// rank/length in [0, 1), so that a node that merged many boots (a long
// profile) and one that saw a single boot weigh positions alike. An index's
// position is the weight-averaged normalized position over the nodes that
// read it, in fixed point; the result lists indices by ascending position,
// then descending support, then ascending index. An index every node reads
// early stays early; one that a single node reads first but most read late
// lands in between, as boot order across nodes does.
//
// It runs in time O(n log n) in the total length of the profiles.
func MergeProfiles(profiles map[string]chunkstore.Profile, entries, maxChunks int) MergedProfile {
	type stat struct {
		index   int
		support uint64 // summed weight
		posSum  uint64 // summed weight × fixed-point position
	}
	stats := make(map[int]*stat)
	var out MergedProfile
	boots := 0
	seen := make(map[int]struct{})
	valid := make([]int, 0)
	for _, p := range profiles { // order does not matter: only sums below
		clear(seen)
		valid = valid[:0]
		for _, i := range p.Chunks {
			if i < 0 || i >= entries {
				continue
			}
			if _, dup := seen[i]; dup {
				continue
			}
			seen[i] = struct{}{}
			valid = append(valid, i)
		}
		if len(valid) == 0 {
			continue
		}
		out.Contributors++
		if p.Boots > 0 {
			if boots > math.MaxInt-p.Boots {
				boots = math.MaxInt
			} else {
				boots += p.Boots
			}
		}
		w := uint64(min(max(p.Boots, 1), maxWeight))
		for r, i := range valid {
			s := stats[i]
			if s == nil {
				s = &stat{index: i}
				stats[i] = s
			}
			s.support += w
			s.posSum += w * (uint64(r) * posScale / uint64(len(valid)))
		}
	}
	out.Boots = boots
	all := make([]*stat, 0, len(stats))
	for _, s := range stats {
		all = append(all, s)
	}
	pos := func(s *stat) uint64 { return s.posSum / s.support }
	if maxChunks > 0 && len(all) > maxChunks {
		sort.Slice(all, func(i, j int) bool {
			a, b := all[i], all[j]
			if a.support != b.support {
				return a.support > b.support
			}
			if pa, pb := pos(a), pos(b); pa != pb {
				return pa < pb
			}
			return a.index < b.index
		})
		all = all[:maxChunks]
	}
	sort.Slice(all, func(i, j int) bool {
		a, b := all[i], all[j]
		if pa, pb := pos(a), pos(b); pa != pb {
			return pa < pb
		}
		if a.support != b.support {
			return a.support > b.support
		}
		return a.index < b.index
	})
	out.Chunks = make([]int, len(all))
	for k, s := range all {
		out.Chunks[k] = s.index
	}
	return out
}
