package planner

import (
	"iter"
	"sort"

	"github.com/hoardvm/hoard/chunkstore"
)

// Chunk is one chunk of an image's boot working set.
type Chunk struct {
	ID chunkstore.ID
	// Size is the chunk's raw bytes: what a boot reads and what it costs to
	// fetch.
	Size int64
	// Stored is the chunk's stored bytes, the unit the store quota and the
	// hoard budget count: the real value for a chunk held, else the caller's
	// estimate (for instance Size times the store's compression ratio). 0
	// means Size.
	Stored int64
}

// stored returns the bytes c costs against a budget.
func (c Chunk) stored() int64 {
	if c.Stored > 0 {
		return c.Stored
	}
	return c.Size
}

// Image is what the planner knows of one image.
type Image struct {
	Manifest chunkstore.ID
	// Boots is how often the image was booted (recently); it ranks images.
	Boots int
	// WorkingSet is the image's boot profile, in first-read order.
	WorkingSet []Chunk
}

// HoardPlan is the chunks to prefetch, in order, what they cost, and how
// each image's working set stands once they are fetched.
type HoardPlan struct {
	// Chunks are the chunks to fetch, in order; none is held already.
	Chunks []chunkstore.ID
	// Bytes is the stored bytes of Chunks (the budget they take).
	Bytes int64
	// RawBytes is the raw bytes of Chunks (what fetching them moves).
	RawBytes int64
	// Held are the working-set chunks already held that the hoard keeps,
	// counted against the budget (in plan order). Held chunks that the
	// budget leaves out are not listed: to the hoard they are plain cache.
	Held []chunkstore.ID
	// HeldBytes is the stored bytes of Held.
	HeldBytes int64
	// Images is the accounting of every image, in plan order (most booted
	// first).
	Images []ImagePlan
}

// ImagePlan is one image's working set as the plan sees it, in raw bytes
// (what a boot reads), each distinct chunk counted once.
type ImagePlan struct {
	Manifest chunkstore.ID
	Boots    int
	// Chunks is the number of distinct chunks of the working set.
	Chunks int
	// WorkingSetBytes is the raw bytes of the whole working set: what the
	// daemon shows as working_set_bytes.
	WorkingSetBytes int64
	// HeldBytes is the raw bytes of the working set held now, in the hoard
	// or not: working_set_local_bytes.
	HeldBytes int64
	// PlannedBytes is the raw bytes of the working set the plan fetches
	// (for this image or, for a shared chunk, for another).
	PlannedBytes int64
	// Complete reports whether the working set is wholly local once the
	// plan is fetched (HeldBytes+PlannedBytes == WorkingSetBytes).
	Complete bool
}

// Hoard chooses the working-set chunks a node should fetch ahead of time so
// that every image's boot is served locally, within budget stored bytes.
//
// The budget covers the whole hoard: working-set chunks already held (have)
// count against it as the plan reaches them, exactly as chunks to fetch do,
// so HeldBytes+Bytes never exceeds budget. Images go most booted first (ties
// by manifest ID, for determinism); each image's working set in boot order;
// a chunk shared by several images is counted (and fetched) once, for the
// first image that reaches it. When the next chunk of an image does not fit,
// the rest of that image is left out (a partial working set is a prefix in
// boot order: the first reads of a boot matter most) and the plan goes on
// with the next image, whose smaller chunks may still fit.
//
// Hoard runs in time linear in the total number of working-set chunks (plus
// sorting the images) and calls have at most once per distinct chunk.
func Hoard(images []Image, have func(chunkstore.ID) bool, budget int64) HoardPlan {
	type ranked struct {
		img *Image
		key string
	}
	order := make([]ranked, len(images))
	for i := range images {
		order[i] = ranked{&images[i], images[i].Manifest.String()}
	}
	sort.SliceStable(order, func(i, j int) bool {
		if order[i].img.Boots != order[j].img.Boots {
			return order[i].img.Boots > order[j].img.Boots
		}
		return order[i].key < order[j].key
	})
	// state of a distinct chunk over the whole plan.
	type state struct {
		lastImage int  // ordinal of the last image that accounted for it
		held      bool // have said so
		hoarded   bool // counted against the budget (held or planned)
	}
	states := make(map[chunkstore.ID]*state)
	plan := HoardPlan{Images: make([]ImagePlan, len(order))}
	var used int64
	for n, r := range order { // decide
		for _, c := range r.img.WorkingSet {
			st, ok := states[c.ID]
			if !ok {
				st = &state{lastImage: -1, held: have != nil && have(c.ID)}
				states[c.ID] = st
			}
			if st.hoarded {
				continue
			}
			if used+c.stored() > budget {
				break // keep this image's boot order: no skipping ahead
			}
			st.hoarded = true
			used += c.stored()
			if st.held {
				plan.Held = append(plan.Held, c.ID)
				plan.HeldBytes += c.stored()
			} else {
				plan.Chunks = append(plan.Chunks, c.ID)
				plan.Bytes += c.stored()
				plan.RawBytes += c.Size
			}
		}
		plan.Images[n] = ImagePlan{Manifest: r.img.Manifest, Boots: r.img.Boots}
	}
	for n, r := range order { // account, once every chunk's fate is known
		ip := &plan.Images[n]
		for _, c := range r.img.WorkingSet {
			st := states[c.ID]
			if st == nil {
				// after the cut of its image: not hoarded; have not asked yet
				st = &state{lastImage: -1, held: have != nil && have(c.ID)}
				states[c.ID] = st
			}
			if st.lastImage == n {
				continue // repeated within this working set
			}
			st.lastImage = n
			ip.Chunks++
			ip.WorkingSetBytes += c.Size
			switch {
			case st.held:
				ip.HeldBytes += c.Size
			case st.hoarded:
				ip.PlannedBytes += c.Size
			}
		}
		ip.Complete = ip.HeldBytes+ip.PlannedBytes == ip.WorkingSetBytes
	}
	return plan
}

// WorkingSetFirst is a chunkstore.EvictionPolicy that protects boot working
// sets: it evicts chunks outside every working set first (least recently used
// first), and working-set chunks only when that is not enough. Hot holds the
// working-set chunk IDs; a nil map protects nothing (plain LRU). Sharing
// refines it (working-set chunks by how many sets share them) and is what
// store.eviction offers; WorkingSetFirst stays for callers that hold a plain
// set.
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
