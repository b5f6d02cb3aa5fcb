package planner

import (
	"container/heap"
	"fmt"
	"iter"
	"math"
	"math/rand/v2"
	"sort"
	"strconv"

	"github.com/hoardvm/hoard/chunkstore"
)

// Cluster policies SimulateCluster compares: PolicyNone reads every start's
// working set from the origin; the eviction policies cache on each node and
// fetch misses from peers first; PolicyHoard adds scatter hoarding (each
// node's hoarder, planner.Hoard) on top of sharing eviction, as the daemon
// does with hoard.budget set.
const (
	PolicyNone  = "none"
	PolicyHoard = "hoard"
)

// Placements SimulateCluster compares.
const (
	PlacementRandom = "random"
	PlacementCache  = "cache-aware"
)

// ClusterPolicies lists the policies hoard sim compares, in table order.
func ClusterPolicies() []string {
	return []string{PolicyNone, EvictionLRU, EvictionARC, EvictionSharing, PolicyHoard}
}

// ClusterSimConfig is the model SimulateCluster runs a trace under.
//
// # Model
//
// Each node has a store of Quota stored bytes (a SimCache evicting through
// the policy, watermarks 0.95/0.85) and a link of LinkRate bytes/s; the
// origin has OriginRate bytes/s shared by all nodes. A VM start on a node
// needs its image's working set: chunks held locally cost nothing; a chunk a
// live peer holds crosses the node's link; any other chunk comes from the
// origin, once cluster-wide: the node that fetches it (the designated
// fetcher) stores it and others then get it from that peer, no sooner than
// the origin fetch completes (so a storm's starts wait for its first
// fetch, not for the origin again). The origin and each node's link serve
// transfers in arrival order (FIFO queues); a start's delay is the time its
// last byte arrives: max(origin transfer done, link transfer done, chunks'
// origin fetches done) - start time. Peers' upload is not a bottleneck.
//
// After boot a VM reads its image's reads bytes beyond the working set (a
// run of chunks from a random offset), locally, from a peer or from the
// origin alike, unpinned: these reads fill the stores between boots, as a
// VM's reads do, and count in peer and origin bytes but not in start delays
// or the hit ratio, which are the boot's.
//
// A running VM pins its working set on its node (live chunks: never
// evicted) and takes a slot; it stops after its dur (unpinning). A failed
// node loses its cache and its VMs, which restart at once (placed anew,
// counted as starts); a joining node is up with an empty cache.
//
// With PolicyHoard, every HoardInterval seconds each up node runs
// planner.Hoard over the images started so far (Boots: cluster-wide starts)
// with budget HoardBudget and fetches up to HoardRate×HoardInterval bytes of
// the plan, from peers when one holds a chunk, else from the origin (once
// per chunk cluster-wide, as above); the plan's chunks stay pinned until the
// next round (unless HoardUnpinned). Hoarding is background traffic: it is
// counted in peer and origin bytes but not in start delays.
//
// Placement random picks uniformly among up nodes with a free slot (the same
// random sequence for every policy); cache-aware takes the first of
// PlaceWeighted with Weights. Policies that need working sets (sharing)
// learn those of the images started so far, refreshed every HoardInterval.
type ClusterSimConfig struct {
	// Policy is one of ClusterPolicies.
	Policy string
	// Placement is PlacementRandom or PlacementCache.
	Placement string
	Seed      uint64
	// Quota is each node's store quota in bytes (default 2 GiB: the
	// default trace puts a node's store under pressure then).
	Quota int64
	// LinkRate and OriginRate are bytes/s (default 1.25e9, a 10 Gbit/s
	// link, and 100e6, origin.rate's default).
	LinkRate, OriginRate float64
	// HoardBudget is each node's hoard budget (default Quota/2); HoardRate
	// bytes/s (default 50e6, hoard.rate's default); HoardInterval seconds
	// between hoard rounds (default 600).
	HoardBudget   int64
	HoardRate     float64
	HoardInterval float64
	// HoardUnpinned leaves hoarded chunks unpinned, as the daemon's
	// hoarder does today, so that eviction may take them (and the next
	// round fetch them again). By default a hoard round pins its whole
	// plan, releasing the previous round's pins.
	HoardUnpinned bool
	// Weights weigh cache-aware placement (zero: DefaultPlaceWeights).
	Weights PlaceWeights

	// check, when set (tests), is called after every event with the
	// nodes' state.
	check func(t float64, nodes []*simNode, vms []*simVM)
}

// DefaultClusterSimConfig returns the model's defaults for policy and
// placement.
func DefaultClusterSimConfig(policy, placement string) ClusterSimConfig {
	return ClusterSimConfig{Policy: policy, Placement: placement, Quota: 2 << 30, LinkRate: 1.25e9, OriginRate: 100e6,
		HoardRate: 50e6, HoardInterval: 600, Weights: DefaultPlaceWeights}
}

// ClusterSimResult is what SimulateCluster measured for one policy and
// placement. Bytes are raw bytes moved.
type ClusterSimResult struct {
	Policy    string `json:"policy"`
	Placement string `json:"placement"`
	// HitRatio is the fraction of the starts' working-set bytes held
	// locally on the start's node.
	HitRatio float64 `json:"hit_ratio"`
	// OriginBytes and PeerBytes are all bytes from the origin and between
	// peers, hoarding included; HoardOriginBytes and HoardPeerBytes the
	// hoarding's part.
	OriginBytes      int64 `json:"origin_bytes"`
	PeerBytes        int64 `json:"peer_bytes"`
	HoardOriginBytes int64 `json:"hoard_origin_bytes"`
	HoardPeerBytes   int64 `json:"hoard_peer_bytes"`
	// ReadOriginBytes and ReadPeerBytes are the part of VMs' reads after
	// boot.
	ReadOriginBytes int64 `json:"read_origin_bytes"`
	ReadPeerBytes   int64 `json:"read_peer_bytes"`
	// BytesPerStart is (OriginBytes+PeerBytes)/Starts.
	BytesPerStart float64 `json:"bytes_per_start"`
	// MeanStart and P99Start are start delays in seconds.
	MeanStart float64 `json:"mean_start_s"`
	P99Start  float64 `json:"p99_start_s"`
	// Imbalance is max/mean running VMs per up node, averaged over starts.
	Imbalance float64 `json:"imbalance"`
	// Starts counts VM starts (restarts included); Rejected the starts that
	// found no free slot.
	Starts   int `json:"starts"`
	Rejected int `json:"rejected"`
}

// simNode is one simulated node.
type simNode struct {
	name    string
	index   int32
	up      bool
	cache   *SimCache
	tracker *victimTracker
	// held mirrors the chunks cache holds, to keep the cluster's holder
	// counts.
	held     map[chunkstore.ID]struct{}
	running  int
	linkFree float64
	// ver counts changes to held; hoardVer and hoardKey are ver and the
	// hoard order at the node's last complete hoard round, when nothing
	// since can change its plan.
	ver, hoardVer int
	hoardKey      string
	// hoardPins are the chunks the last hoard round pinned.
	hoardPins []chunkstore.ID
}

// simVM is one VM.
type simVM struct {
	node, image int
	end         float64 // +Inf: runs to the end
	alive       bool
	pinned      bool
}

// victimTracker passes an eviction policy through and remembers the
// victims it named, so the simulator can keep the holder counts.
type victimTracker struct {
	Eviction
	victims []chunkstore.ID
}

func (v *victimTracker) Victims(need int64, candidates iter.Seq[chunkstore.Candidate]) []chunkstore.ID {
	ids := v.Eviction.Victims(need, candidates)
	v.victims = append(v.victims, ids...)
	return ids
}

// stopHeap orders running VMs by end time (then index, for determinism).
type stopHeap struct {
	at  []int
	vms []*simVM
}

func (h *stopHeap) Len() int { return len(h.at) }
func (h *stopHeap) Less(i, j int) bool {
	a, b := h.vms[h.at[i]], h.vms[h.at[j]]
	if a.end != b.end {
		return a.end < b.end
	}
	return h.at[i] < h.at[j]
}
func (h *stopHeap) Swap(i, j int) { h.at[i], h.at[j] = h.at[j], h.at[i] }
func (h *stopHeap) Push(x any)    { h.at = append(h.at, x.(int)) }
func (h *stopHeap) Pop() any {
	x := h.at[len(h.at)-1]
	h.at = h.at[:len(h.at)-1]
	return x
}

// clusterSim is one run's state.
type clusterSim struct {
	cfg    ClusterSimConfig
	tr     ClusterTrace
	images []Image
	boots  []int
	nodes  []*simNode
	vms    []*simVM
	stops  stopHeap
	// holders are the up nodes holding each chunk, for peer lookups and
	// to find the nodes cache-aware placement should score.
	holders map[chunkstore.ID][]int32
	// ready is when a chunk's origin fetch completes.
	ready      map[chunkstore.ID]float64
	originFree float64
	rng        *rand.Rand
	shared     Eviction // the one Sharing instance, shared by all nodes
	manifests  []string // the images' manifest IDs as strings, Hoard's tie-break
	chunkSize  int64
	// reads is each image's chunks read after boot; data its chunks
	// outside the working set (made on first use); rd draws the offsets.
	reads   []int
	data    [][]chunkstore.ID
	rd      *rand.Rand
	wsDirty bool
	slots   int

	res          ClusterSimResult
	delays       []float64
	wsBytes      int64
	localBytes   int64
	imbalanceSum float64
}

// SimulateCluster plays tr under cfg (see ClusterSimConfig) and measures it.
// The same trace and config give the same result.
func SimulateCluster(tr ClusterTrace, cfg ClusterSimConfig) (ClusterSimResult, error) {
	def := DefaultClusterSimConfig(cfg.Policy, cfg.Placement)
	if cfg.Quota <= 0 {
		cfg.Quota = def.Quota
	}
	if cfg.LinkRate <= 0 {
		cfg.LinkRate = def.LinkRate
	}
	if cfg.OriginRate <= 0 {
		cfg.OriginRate = def.OriginRate
	}
	if cfg.HoardBudget <= 0 {
		cfg.HoardBudget = cfg.Quota / 2
	}
	if cfg.HoardRate <= 0 {
		cfg.HoardRate = def.HoardRate
	}
	if cfg.HoardInterval <= 0 {
		cfg.HoardInterval = def.HoardInterval
	}
	switch cfg.Placement {
	case PlacementRandom, PlacementCache:
	default:
		return ClusterSimResult{}, fmt.Errorf("unknown placement %q: use %s or %s", cfg.Placement, PlacementRandom, PlacementCache)
	}
	switch cfg.Policy {
	case PolicyNone, PolicyHoard, EvictionLRU, EvictionARC, EvictionSharing:
	default:
		return ClusterSimResult{}, fmt.Errorf("unknown policy %q: use one of %v", cfg.Policy, ClusterPolicies())
	}
	if err := tr.Header.check(); err != nil {
		return ClusterSimResult{}, fmt.Errorf("trace header: %w", err)
	}
	s := &clusterSim{cfg: cfg, tr: tr, images: tr.Images(), holders: map[chunkstore.ID][]int32{}, ready: map[chunkstore.ID]float64{},
		rng: rand.New(rand.NewPCG(cfg.Seed, 0x706c616365)), slots: tr.Header.Slots} // "place"
	if s.slots <= 0 {
		s.slots = DefaultTraceSlots
	}
	s.boots = make([]int, len(s.images))
	s.chunkSize = tr.Header.ChunkSize
	if s.chunkSize <= 0 {
		s.chunkSize = DefaultTraceChunkSize
	}
	s.rd = rand.New(rand.NewPCG(cfg.Seed, 0x7265616473)) // "reads"
	s.data = make([][]chunkstore.ID, len(s.images))
	for i, img := range s.images {
		s.manifests = append(s.manifests, img.Manifest.String())
		ti := tr.Header.Images[i]
		rb := ti.Reads
		if rb == 0 {
			rb = int64(float64(ti.Size) * DefaultTraceReadFraction)
		}
		s.reads = append(s.reads, int(max(rb, 0)/s.chunkSize))
	}
	s.stops.vms = s.vms
	s.res.Policy, s.res.Placement = cfg.Policy, cfg.Placement
	if cfg.Policy == EvictionSharing || cfg.Policy == PolicyHoard {
		// Sharing's choices depend only on the working sets and the
		// candidates, so one instance serves every node.
		s.shared = NewSharing()
	}
	for i := range tr.Header.Nodes {
		s.nodeUp(i)
	}
	nextTick := cfg.HoardInterval
	for _, ev := range tr.Events {
		if err := ev.check(len(s.images)); err != nil {
			return ClusterSimResult{}, fmt.Errorf("trace event at t=%v: %w", ev.T, err)
		}
		for {
			// stops and hoard rounds due before ev, in time order
			stopAt := math.Inf(1)
			if s.stops.Len() > 0 {
				stopAt = s.vms[s.stops.at[0]].end
			}
			if stopAt <= ev.T && stopAt <= nextTick {
				s.stop(heap.Pop(&s.stops).(int))
				continue
			}
			if nextTick <= ev.T {
				s.tick(nextTick)
				nextTick += cfg.HoardInterval
				continue
			}
			break
		}
		switch ev.Type {
		case TraceStart:
			end := math.Inf(1)
			if ev.Dur > 0 {
				end = ev.T + ev.Dur
			}
			s.start(ev.T, ev.Image, end)
		case TraceFail:
			s.fail(ev.T, ev.Node)
		case TraceJoin:
			s.nodeUp(ev.Node)
		}
		if cfg.check != nil {
			cfg.check(ev.T, s.nodes, s.vms)
		}
	}
	return s.result(), nil
}

func (s *clusterSim) caching() bool { return s.cfg.Policy != PolicyNone }

// nodeUp brings node i up with an empty cache (a no-op if it is up).
func (s *clusterSim) nodeUp(i int) {
	for len(s.nodes) <= i {
		s.nodes = append(s.nodes, &simNode{name: "node" + strconv.Itoa(len(s.nodes)), index: int32(len(s.nodes))})
	}
	n := s.nodes[i]
	if n.up {
		return
	}
	n.up, n.running, n.held = true, 0, map[chunkstore.ID]struct{}{}
	if !s.caching() {
		return
	}
	var p Eviction = s.shared
	if p == nil {
		p, _ = NewEviction(s.cfg.Policy) // checked in SimulateCluster
	}
	n.tracker = &victimTracker{Eviction: p}
	n.cache = NewSimCache(s.cfg.Quota, n.tracker)
}

func (s *clusterSim) addHolder(id chunkstore.ID, node int32) {
	s.holders[id] = append(s.holders[id], node)
}

func (s *clusterSim) dropHolder(id chunkstore.ID, node int32) {
	h := s.holders[id]
	for k, x := range h {
		if x == node {
			h[k] = h[len(h)-1]
			h = h[:len(h)-1]
			break
		}
	}
	if len(h) == 0 {
		delete(s.holders, id)
		return
	}
	s.holders[id] = h
}

// access reads chunk c on node n, keeping the holder counts.
func (s *clusterSim) access(n *simNode, c Chunk) {
	was := n.cache.Has(c.ID)
	n.cache.Access(c.ID, c.stored())
	if !was && n.cache.Has(c.ID) {
		n.held[c.ID] = struct{}{}
		s.addHolder(c.ID, n.index)
		n.ver++
	}
	for _, v := range n.tracker.victims {
		if _, ok := n.held[v]; ok && !n.cache.Has(v) {
			delete(n.held, v)
			s.dropHolder(v, n.index)
			n.ver++
		}
	}
	n.tracker.victims = n.tracker.victims[:0]
}

// place picks a node for a start of image img, or -1.
func (s *clusterSim) place(img int) int {
	if s.cfg.Placement == PlacementCache {
		// PlaceWeighted over the nodes holding any of the working set and
		// the best of the others: those all score alike but for their
		// load, and rank by free slots then name, so the first is the
		// same as over every node. The holder index answers HeldBytes.
		ws := s.images[img].WorkingSet
		held := map[int32]int64{}
		for _, c := range ws {
			for _, h := range s.holders[c.ID] {
				held[h] += c.Size
			}
		}
		states := make([]NodeState, 0, len(held)+1)
		var cold *simNode
		for _, n := range s.nodes {
			switch {
			case !n.up || n.running >= s.slots:
			case held[n.index] > 0:
				b := held[n.index]
				states = append(states, NodeState{Name: n.name, FreeSlots: s.slots - n.running, Slots: s.slots,
					HeldBytes: func([]Chunk) int64 { return b }})
			case cold == nil || n.running < cold.running || (n.running == cold.running && n.name < cold.name):
				cold = n
			}
		}
		if cold != nil {
			states = append(states, NodeState{Name: cold.name, FreeSlots: s.slots - cold.running, Slots: s.slots,
				HeldBytes: func([]Chunk) int64 { return 0 }})
		}
		ps := PlaceWeighted(s.images[img], states, s.cfg.Weights)
		if len(ps) == 0 {
			return -1
		}
		i, _ := strconv.Atoi(ps[0].Node[len("node"):])
		return i
	}
	var free []int
	for i, n := range s.nodes {
		if n.up && n.running < s.slots {
			free = append(free, i)
		}
	}
	if len(free) == 0 {
		return -1
	}
	return free[s.rng.IntN(len(free))]
}

func (s *clusterSim) start(t float64, img int, end float64) {
	s.res.Starts++
	s.boots[img]++
	if s.boots[img] == 1 {
		s.wsDirty = true
	}
	at := s.place(img)
	if at < 0 {
		s.res.Rejected++
		return
	}
	n := s.nodes[at]
	ws := s.images[img].WorkingSet
	var local, peer, origin int64
	peerReady := t
	var fetched []chunkstore.ID
	if s.caching() {
		for _, c := range ws {
			n.cache.Pin(c.ID)
		}
		for _, c := range ws {
			switch {
			case n.cache.Has(c.ID):
				local += c.Size
			case len(s.holders[c.ID]) > 0:
				peer += c.Size
				peerReady = max(peerReady, s.ready[c.ID])
			default:
				origin += c.Size
				fetched = append(fetched, c.ID)
			}
			s.access(n, c)
		}
	} else {
		for _, c := range ws {
			origin += c.Size
		}
	}
	s.readAfterBoot(n, img)
	done := peerReady
	if origin > 0 {
		s.originFree = max(t, s.originFree) + float64(origin)/s.cfg.OriginRate
		done = max(done, s.originFree)
		for _, id := range fetched {
			s.ready[id] = s.originFree
		}
	}
	if peer+origin > 0 {
		n.linkFree = max(t, n.linkFree) + float64(peer+origin)/s.cfg.LinkRate
		done = max(done, n.linkFree)
	}
	s.delays = append(s.delays, done-t)
	s.wsBytes += local + peer + origin
	s.localBytes += local
	s.res.PeerBytes += peer
	s.res.OriginBytes += origin
	n.running++
	vm := &simVM{node: at, image: img, end: end, alive: true, pinned: s.caching()}
	s.vms = append(s.vms, vm)
	s.stops.vms = s.vms
	if !math.IsInf(end, 1) {
		heap.Push(&s.stops, len(s.vms)-1)
	}
	var most, sum, up int
	for _, m := range s.nodes {
		if m.up {
			most, sum, up = max(most, m.running), sum+m.running, up+1
		}
	}
	if sum > 0 {
		s.imbalanceSum += float64(most) / (float64(sum) / float64(up))
	}
}

// readAfterBoot plays the reads of a VM of image img on n after its boot.
func (s *clusterSim) readAfterBoot(n *simNode, img int) {
	k := s.reads[img]
	if k == 0 {
		return
	}
	if s.data[img] == nil {
		total := int((s.tr.Header.Images[img].Size + s.chunkSize - 1) / s.chunkSize)
		d := make([]chunkstore.ID, max(total-len(s.images[img].WorkingSet), k))
		for j := range d {
			d[j] = chunkstore.Sum(fmt.Appendf(nil, "image/%d/data/%d", img, j))
		}
		s.data[img] = d
	}
	d := s.data[img]
	off := s.rd.IntN(len(d) - k + 1)
	for _, id := range d[off : off+k] {
		switch {
		case !s.caching():
			s.res.OriginBytes += s.chunkSize
			s.res.ReadOriginBytes += s.chunkSize
			continue
		case n.cache.Has(id):
		case len(s.holders[id]) > 0:
			s.res.PeerBytes += s.chunkSize
			s.res.ReadPeerBytes += s.chunkSize
		default:
			s.res.OriginBytes += s.chunkSize
			s.res.ReadOriginBytes += s.chunkSize
		}
		s.access(n, Chunk{ID: id, Size: s.chunkSize})
	}
}

// stop ends VM i, if still alive.
func (s *clusterSim) stop(i int) {
	vm := s.vms[i]
	if !vm.alive {
		return
	}
	vm.alive = false
	n := s.nodes[vm.node]
	n.running--
	if vm.pinned {
		for _, c := range s.images[vm.image].WorkingSet {
			n.cache.Unpin(c.ID)
		}
	}
}

// fail takes node i down and restarts its VMs elsewhere.
func (s *clusterSim) fail(t float64, i int) {
	if i >= len(s.nodes) || !s.nodes[i].up {
		return
	}
	n := s.nodes[i]
	n.up, n.running, n.cache, n.tracker, n.linkFree = false, 0, nil, nil, 0
	for id := range n.held {
		s.dropHolder(id, int32(i))
	}
	n.held = nil
	var restart []*simVM
	for _, vm := range s.vms {
		if vm.alive && vm.node == i {
			vm.alive = false
			restart = append(restart, vm)
		}
	}
	for _, vm := range restart {
		s.start(t, vm.image, vm.end)
	}
}

// hoardImages returns the images started so far with their boots, in
// Hoard's order (most booted first, then by manifest), cut after the first
// image whose working set takes the distinct bytes past the hoard budget.
// Every chunk of a trace has the same size, so once a chunk does not fit
// none does, and Hoard over the cut list plans exactly what it would over
// them all, in a fraction of the time.
func (s *clusterSim) hoardImages() []Image {
	var known []Image
	var keys []string
	for i, img := range s.images {
		if s.boots[i] > 0 {
			img.Boots = s.boots[i]
			known = append(known, img)
			keys = append(keys, s.manifests[i])
		}
	}
	idx := make([]int, len(known))
	for i := range idx {
		idx[i] = i
	}
	sort.SliceStable(idx, func(a, b int) bool {
		x, y := known[idx[a]], known[idx[b]]
		if x.Boots != y.Boots {
			return x.Boots > y.Boots
		}
		return keys[idx[a]] < keys[idx[b]]
	})
	seen := map[chunkstore.ID]struct{}{}
	var distinct int64
	out := make([]Image, 0, len(known))
	for _, i := range idx {
		out = append(out, known[i])
		for _, c := range known[i].WorkingSet {
			if _, ok := seen[c.ID]; !ok {
				seen[c.ID] = struct{}{}
				distinct += c.stored()
			}
		}
		if distinct > s.cfg.HoardBudget {
			break
		}
	}
	return out
}

// tick refreshes the working sets policies know and, with PolicyHoard, runs
// a hoard round on every up node.
func (s *clusterSim) tick(t float64) {
	if s.wsDirty && s.shared != nil {
		ws := map[chunkstore.ID][]chunkstore.ID{}
		for i, img := range s.images {
			if s.boots[i] == 0 {
				continue
			}
			ids := make([]chunkstore.ID, len(img.WorkingSet))
			for k, c := range img.WorkingSet {
				ids[k] = c.ID
			}
			ws[img.Manifest] = ids
		}
		s.shared.SetWorkingSets(ws)
		s.wsDirty = false
	}
	if s.cfg.Policy != PolicyHoard {
		return
	}
	known := s.hoardImages()
	if len(known) == 0 {
		return
	}
	key := make([]byte, 0, 32*len(known))
	for _, img := range known {
		d := img.Manifest.Digest()
		key = append(key, d[:]...)
	}
	limit := int64(s.cfg.HoardRate * s.cfg.HoardInterval)
	for _, n := range s.nodes {
		if !n.up {
			continue
		}
		if n.hoardKey == string(key) && n.hoardVer == n.ver {
			continue // the plan would be empty: nothing changed since
		}
		plan := Hoard(known, n.cache.Has, s.cfg.HoardBudget)
		var pins []chunkstore.ID
		if !s.cfg.HoardUnpinned {
			// the whole plan, so that fetching it evicts none of it
			pins = make([]chunkstore.ID, 0, len(plan.Held)+len(plan.Chunks))
			pins = append(append(pins, plan.Held...), plan.Chunks...)
			for _, id := range pins {
				n.cache.Pin(id)
			}
			for _, id := range n.hoardPins {
				n.cache.Unpin(id)
			}
			n.hoardPins = pins
		}
		var moved int64
		complete := true
		for _, id := range plan.Chunks {
			sz := s.chunkSize
			if moved+sz > limit {
				complete = false
				break
			}
			moved += sz
			if len(s.holders[id]) > 0 {
				s.res.HoardPeerBytes += sz
				s.res.PeerBytes += sz
			} else {
				s.res.HoardOriginBytes += sz
				s.res.OriginBytes += sz
				s.ready[id] = t
			}
			s.access(n, Chunk{ID: id, Size: sz})
			if !n.cache.Has(id) {
				complete = false // no room: the rest is pinned
				break
			}
		}
		n.hoardKey, n.hoardVer = "", -1
		if complete {
			n.hoardKey, n.hoardVer = string(key), n.ver
		}
	}
}

func (s *clusterSim) result() ClusterSimResult {
	r := s.res
	if s.wsBytes > 0 {
		r.HitRatio = float64(s.localBytes) / float64(s.wsBytes)
	}
	if r.Starts > 0 {
		r.BytesPerStart = float64(r.OriginBytes+r.PeerBytes) / float64(r.Starts)
	}
	if len(s.delays) > 0 {
		var sum float64
		for _, d := range s.delays {
			sum += d
		}
		r.MeanStart = sum / float64(len(s.delays))
		sorted := append([]float64(nil), s.delays...)
		sort.Float64s(sorted)
		r.P99Start = sorted[min(len(sorted)-1, int(math.Ceil(0.99*float64(len(sorted))))-1)]
		r.Imbalance = s.imbalanceSum / float64(len(s.delays))
	}
	return r
}
