// Package planner makes hoard's decisions — which working-set chunks a node
// should hoard ahead of time, what to evict first, and where a VM should boot —
// as deterministic functions over a snapshot of state: no goroutines, no I/O,
// so that the daemon, tests and a simulator all drive the same code. It imports
// only chunkstore's types.
package planner

import (
	"iter"
	"sort"

	"github.com/hoardvm/hoard/chunkstore"
)

// Chunk is one chunk of an image's boot working set.
type Chunk struct {
	ID   chunkstore.ID
	Size int64 // raw bytes (what it costs to fetch; stored size is smaller)
}

// Image is what the planner knows of one image.
type Image struct {
	Manifest chunkstore.ID
	// Boots is how often the image was booted (recently); it ranks images.
	Boots int
	// WorkingSet is the image's boot profile, in first-read order.
	WorkingSet []Chunk
}

// HoardPlan is the chunks to prefetch, in order, and what they cost.
type HoardPlan struct {
	Chunks []chunkstore.ID
	Bytes  int64
}

// Hoard chooses the working-set chunks a node should fetch ahead of time so
// that every image's boot is served locally, within budget bytes: the most
// booted images first (ties by manifest ID, for determinism), each image's
// working set in boot order, a chunk shared by several images counted once,
// chunks already held (have) skipped. An image whose remaining working set
// does not fit is taken partially, in boot order: the first reads of a boot
// matter most. The plan never exceeds budget.
func Hoard(images []Image, have func(chunkstore.ID) bool, budget int64) HoardPlan {
	order := make([]Image, len(images))
	copy(order, images)
	sort.SliceStable(order, func(i, j int) bool {
		if order[i].Boots != order[j].Boots {
			return order[i].Boots > order[j].Boots
		}
		return order[i].Manifest.String() < order[j].Manifest.String()
	})
	var plan HoardPlan
	seen := make(map[chunkstore.ID]bool)
	for _, img := range order {
		for _, c := range img.WorkingSet {
			if seen[c.ID] || (have != nil && have(c.ID)) {
				continue
			}
			if plan.Bytes+c.Size > budget {
				break // keep this image's boot order: no skipping ahead
			}
			seen[c.ID] = true
			plan.Chunks = append(plan.Chunks, c.ID)
			plan.Bytes += c.Size
		}
	}
	return plan
}

// WorkingSetFirst is a chunkstore.EvictionPolicy that protects boot working
// sets: it evicts chunks outside every working set first (least recently used
// first), and working-set chunks only when that is not enough. Hot holds the
// working-set chunk IDs; a nil map protects nothing (plain LRU).
type WorkingSetFirst struct {
	Hot map[chunkstore.ID]bool
}

// Victims implements chunkstore.EvictionPolicy. It ranges over candidates at
// most twice.
func (p WorkingSetFirst) Victims(need int64, candidates iter.Seq[chunkstore.Candidate]) []chunkstore.ID {
	var ids []chunkstore.ID
	var freed int64
	for c := range candidates {
		if freed >= need {
			return ids
		}
		if !p.Hot[c.ID] {
			ids = append(ids, c.ID)
			freed += c.Size
		}
	}
	for c := range candidates {
		if freed >= need {
			break
		}
		if p.Hot[c.ID] {
			ids = append(ids, c.ID)
			freed += c.Size
		}
	}
	return ids
}

// NodeState is what the planner knows of one compute node for placement.
type NodeState struct {
	Name string
	// Has reports whether the node holds a chunk locally.
	Has func(chunkstore.ID) bool
	// FreeSlots is how many more VMs the node can take; <= 0 excludes it.
	FreeSlots int
}

// Placement ranks one node for booting an image.
type Placement struct {
	Node string
	// Cached is the fraction of the image's working-set bytes held locally.
	Cached float64
	// MissBytes is what the boot would still have to fetch.
	MissBytes int64
}

// Place ranks nodes for booting img: the most working-set bytes already
// cached first (the boot reads locally and spares the network), then the most
// free slots, then by name. Nodes without a free slot are left out.
func Place(img Image, nodes []NodeState) []Placement {
	var total int64
	for _, c := range img.WorkingSet {
		total += c.Size
	}
	type ranked struct {
		Placement
		slots int
	}
	var rs []ranked
	for _, n := range nodes {
		if n.FreeSlots <= 0 {
			continue
		}
		var miss int64
		for _, c := range img.WorkingSet {
			if n.Has == nil || !n.Has(c.ID) {
				miss += c.Size
			}
		}
		cached := 1.0
		if total > 0 {
			cached = float64(total-miss) / float64(total)
		}
		rs = append(rs, ranked{Placement{Node: n.Name, Cached: cached, MissBytes: miss}, n.FreeSlots})
	}
	sort.SliceStable(rs, func(i, j int) bool {
		a, b := rs[i], rs[j]
		if a.MissBytes != b.MissBytes {
			return a.MissBytes < b.MissBytes
		}
		if a.slots != b.slots {
			return a.slots > b.slots
		}
		return a.Node < b.Node
	})
	out := make([]Placement, len(rs))
	for i, r := range rs {
		out[i] = r.Placement
	}
	return out
}
