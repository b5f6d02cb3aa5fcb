package planner

import (
	"container/list"
	"fmt"
	"iter"
	"slices"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/hoardvm/hoard/chunkstore"
)

// Eviction is a chunkstore.EvictionPolicy the daemon can feed: every policy
// takes the same observations, and one that has no use for one ignores it,
// so the daemon wires them all the same way. All methods are safe for
// concurrent use: the store calls Victims from its evictor while the read
// path calls Touch and the profile code calls SetWorkingSets. Victims does
// not hold the policy's lock while it ranges over candidates (the store reads
// its index then), so Touch never waits on the store.
type Eviction interface {
	chunkstore.EvictionPolicy
	// Name is the policy's name, as store.eviction spells it.
	Name() string
	// Touch records a read of a chunk. The read path calls it once per
	// chunk read, hit or miss (not again when it stores the missed chunk);
	// the hoarder calls it once for a chunk it stores without a read.
	Touch(id chunkstore.ID)
	// Forget drops what the policy knows of a chunk the store removed
	// outside eviction (Delete, garbage collection). Chunks the policy
	// chose in Victims need no Forget.
	Forget(id chunkstore.ID)
	// SetWorkingSets replaces the boot working sets the policy knows: the
	// chunk IDs of each image (by manifest ID). The daemon calls it when
	// profiles change. The policy keeps no reference to the map or slices.
	SetWorkingSets(ws map[chunkstore.ID][]chunkstore.ID)
}

// Names of the eviction policies, as the config key store.eviction takes them.
const (
	EvictionLRU     = "lru"
	EvictionARC     = "arc"
	EvictionSharing = "sharing"
)

// DefaultEviction is the policy store.eviction defaults to: sharing, the best
// measured.
//
// On the simulated workload of TestComparePolicies (DefaultWorkload: 40
// images in 4 OS families whose images share 85% of a family base working
// set, Zipf(1.1) popularity, 2 scans of 200 chunks per boot, a quota of 60%
// of the union of the working sets), sharing keeps about 12 of the 40
// working sets whole (mean over the second half of the run), arc about 5.5
// and lru about 2.5, and serves 92% of boot reads locally against 85% (arc)
// and 34% (lru). Sharing evicts the scan chunks first and spends the quota on
// the family bases every image of a family reads; lru lets each scan flush
// the working sets; arc resists scans but, knowing nothing of working sets,
// keeps chunks read twice whether or not their sets stay whole. Without
// scans the three are within a few percent of one another; at a quota of
// only 40% of the union, arc and sharing keep as many sets whole (about 3)
// and arc serves more boots wholly locally, because sharing keeps every
// family's base, popular or not.
const DefaultEviction = EvictionSharing

// EvictionNames lists the valid store.eviction values.
func EvictionNames() []string { return []string{EvictionLRU, EvictionARC, EvictionSharing} }

// NewEviction returns a fresh policy by its store.eviction name; "" is
// DefaultEviction.
func NewEviction(name string) (Eviction, error) {
	switch strings.ToLower(strings.TrimSpace(name)) {
	case "":
		return NewEviction(DefaultEviction)
	case EvictionLRU:
		return LRU{}, nil
	case EvictionARC:
		return NewARC(0), nil
	case EvictionSharing:
		return NewSharing(), nil
	}
	return nil, fmt.Errorf("unknown eviction policy %q: set store.eviction to one of %s", name, strings.Join(EvictionNames(), ", "))
}

// take appends c to ids and counts its bytes.
func take(ids []chunkstore.ID, freed *int64, c chunkstore.Candidate) []chunkstore.ID {
	*freed += c.Size
	return append(ids, c.ID)
}

// LRU evicts the least recently used chunks first: the candidates' order. It
// keeps no state.
type LRU struct{}

// Name implements Eviction.
func (LRU) Name() string { return EvictionLRU }

// Touch implements Eviction; LRU learns recency from the store.
func (LRU) Touch(chunkstore.ID) {}

// Forget implements Eviction.
func (LRU) Forget(chunkstore.ID) {}

// SetWorkingSets implements Eviction; LRU ignores working sets.
func (LRU) SetWorkingSets(map[chunkstore.ID][]chunkstore.ID) {}

// Victims implements chunkstore.EvictionPolicy.
func (LRU) Victims(need int64, candidates iter.Seq[chunkstore.Candidate]) []chunkstore.ID {
	var ids []chunkstore.ID
	var freed int64
	for c := range candidates {
		if freed >= need {
			break
		}
		ids = take(ids, &freed, c)
	}
	return ids
}

// Sharing is CoCache's layer-aware idea applied to boot working sets: a chunk
// in many images' working sets is worth more. It evicts chunks in no working
// set first (least recently used first), then working-set chunks by
// ascending number of working sets that hold them, least recently used first
// among equals. It learns the working sets from SetWorkingSets; until then it
// is LRU.
type Sharing struct {
	shares atomic.Pointer[map[chunkstore.ID]int]
}

// NewSharing returns a Sharing policy that knows no working set yet.
func NewSharing() *Sharing { return &Sharing{} }

// Name implements Eviction.
func (*Sharing) Name() string { return EvictionSharing }

// Touch implements Eviction; Sharing learns recency from the store.
func (*Sharing) Touch(chunkstore.ID) {}

// Forget implements Eviction.
func (*Sharing) Forget(chunkstore.ID) {}

// SetWorkingSets implements Eviction: a chunk's share is the number of
// distinct images whose working set holds it.
func (p *Sharing) SetWorkingSets(ws map[chunkstore.ID][]chunkstore.ID) {
	shares := make(map[chunkstore.ID]int)
	last := make(map[chunkstore.ID]chunkstore.ID) // chunk -> last image counted, for repeats within a set
	for img, ids := range ws {
		for _, id := range ids {
			if l, ok := last[id]; ok && l == img {
				continue
			}
			last[id] = img
			shares[id]++
		}
	}
	p.shares.Store(&shares)
}

// Shares returns how many working sets hold id (0 for none).
func (p *Sharing) Shares(id chunkstore.ID) int {
	if m := p.shares.Load(); m != nil {
		return (*m)[id]
	}
	return 0
}

// Victims implements chunkstore.EvictionPolicy. It ranges over candidates
// once, and stops early when the chunks in no working set are enough; it
// runs in time linear in the candidates (plus sorting the distinct share
// counts).
func (p *Sharing) Victims(need int64, candidates iter.Seq[chunkstore.Candidate]) []chunkstore.ID {
	var shares map[chunkstore.ID]int
	if m := p.shares.Load(); m != nil {
		shares = *m
	}
	var ids []chunkstore.ID
	byShares := make(map[int][]chunkstore.Candidate) // working-set candidates, LRU first within each
	var freed int64
	for c := range candidates {
		if freed >= need {
			return ids
		}
		if n := shares[c.ID]; n > 0 {
			byShares[n] = append(byShares[n], c)
			continue
		}
		ids = take(ids, &freed, c)
	}
	levels := make([]int, 0, len(byShares))
	for n := range byShares {
		levels = append(levels, n)
	}
	slices.Sort(levels)
	for _, n := range levels {
		for _, c := range byShares[n] {
			if freed >= need {
				return ids
			}
			ids = take(ids, &freed, c)
		}
	}
	return ids
}

// DefaultARCTracked bounds what an ARC policy remembers: resident chunks
// tracked plus ghosts, about 100 bytes each (1<<20 entries is ~100 MiB, the
// index of a 64 GiB store of 64 KiB chunks).
const DefaultARCTracked = 1 << 20

// ARC is the adaptive replacement cache (Megiddo and Modha, FAST'03) as an
// eviction policy: T1 holds chunks read once recently, T2 chunks read at
// least twice; the ghost lists B1 and B2 remember chunks recently evicted
// from each, and a hit on a ghost moves the target size p of T1 toward the
// list that would have kept it. A scan reads its chunks once, so they stay
// in T1 and go first, while chunks read by boot after boot live in T2.
//
// ARC learns only from Touch. Chunks it has never seen touched (stored
// before the daemon started, or hoarded and not read yet) are evicted first,
// in the candidates' LRU order; the daemon should Touch a chunk when it
// stores it. Memory is bounded: at most maxTracked resident entries and as
// many ghosts as resident entries (ARC's 2c bound, c being the number of
// resident chunks tracked).
type ARC struct {
	mu             sync.Mutex
	t1, t2, b1, b2 idList
	p              int // target length of t1
	maxTracked     int
}

// NewARC returns an empty ARC policy that tracks at most maxTracked chunks
// (resident and ghosts each); <= 0 means DefaultARCTracked.
func NewARC(maxTracked int) *ARC {
	if maxTracked <= 0 {
		maxTracked = DefaultARCTracked
	}
	return &ARC{maxTracked: maxTracked}
}

// Name implements Eviction.
func (*ARC) Name() string { return EvictionARC }

// SetWorkingSets implements Eviction; ARC ignores working sets.
func (*ARC) SetWorkingSets(map[chunkstore.ID][]chunkstore.ID) {}

// Touch implements Eviction.
func (a *ARC) Touch(id chunkstore.ID) {
	a.mu.Lock()
	defer a.mu.Unlock()
	switch {
	case a.t1.has(id):
		a.t1.remove(id)
		a.t2.pushFront(id)
	case a.t2.has(id):
		a.t2.moveToFront(id)
	case a.b1.has(id):
		// A chunk evicted after one read is read again: T1 was too small.
		a.p = min(a.p+max(1, a.b2.len()/a.b1.len()), a.t1.len()+a.t2.len()+1)
		a.b1.remove(id)
		a.t2.pushFront(id)
	case a.b2.has(id):
		a.p = max(a.p-max(1, a.b1.len()/a.b2.len()), 0)
		a.b2.remove(id)
		a.t2.pushFront(id)
	default:
		a.t1.pushFront(id)
	}
	a.trim()
}

// Forget implements Eviction.
func (a *ARC) Forget(id chunkstore.ID) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.t1.remove(id)
	a.t2.remove(id)
	a.b1.remove(id)
	a.b2.remove(id)
}

// Tracked returns the lengths of T1, T2, B1 and B2 and the target p (for
// tests and metrics).
func (a *ARC) Tracked() (t1, t2, b1, b2, p int) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.t1.len(), a.t2.len(), a.b1.len(), a.b2.len(), a.p
}

// trim keeps the lists within their bounds. The caller holds a.mu.
func (a *ARC) trim() {
	for a.t1.len()+a.t2.len() > a.maxTracked {
		if a.t1.len() > 0 {
			a.b1.pushFront(a.t1.popBack())
		} else {
			a.b2.pushFront(a.t2.popBack())
		}
	}
	c := max(a.t1.len()+a.t2.len(), 64)
	c = min(c, a.maxTracked)
	for a.t1.len()+a.b1.len() > c && a.b1.len() > 0 {
		a.b1.popBack()
	}
	for a.b1.len()+a.b2.len() > c {
		if a.b2.len() > 0 {
			a.b2.popBack()
		} else {
			a.b1.popBack()
		}
	}
	a.p = min(a.p, max(a.t1.len()+a.t2.len(), 0))
}

// Victims implements chunkstore.EvictionPolicy: untracked candidates first
// (LRU order), then ARC's replacement rule, from the LRU end of T1 while T1
// is longer than its target p (or T2 has no candidate left), else from the
// LRU end of T2. Chunks tracked but not among the candidates (pinned, in use)
// are skipped, never returned. Victims go to the ghost lists.
func (a *ARC) Victims(need int64, candidates iter.Seq[chunkstore.Candidate]) []chunkstore.ID {
	if need <= 0 {
		return nil
	}
	var order []chunkstore.Candidate
	size := make(map[chunkstore.ID]int64)
	for c := range candidates {
		if _, dup := size[c.ID]; dup {
			continue
		}
		size[c.ID] = c.Size
		order = append(order, c)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	var ids []chunkstore.ID
	var freed int64
	for _, c := range order {
		if freed >= need {
			break
		}
		if !a.t1.has(c.ID) && !a.t2.has(c.ID) {
			ids = take(ids, &freed, c)
			a.b1.pushFront(c.ID)
		}
	}
	// next returns the first candidate at or before e (toward the MRU end).
	next := func(e *list.Element) *list.Element {
		for ; e != nil; e = e.Prev() {
			if _, ok := size[e.Value.(chunkstore.ID)]; ok {
				return e
			}
		}
		return nil
	}
	e1, e2 := next(a.t1.l.Back()), next(a.t2.l.Back())
	for freed < need && (e1 != nil || e2 != nil) {
		from, ghost, e := &a.t2, &a.b2, e2
		if e1 != nil && (a.t1.len() > a.p || e2 == nil) {
			from, ghost, e = &a.t1, &a.b1, e1
		}
		id := e.Value.(chunkstore.ID)
		prev := next(e.Prev())
		from.remove(id)
		ghost.pushFront(id)
		ids = append(ids, id)
		freed += size[id]
		if from == &a.t1 {
			e1 = prev
		} else {
			e2 = prev
		}
	}
	a.trim()
	return ids
}

// idList is an ordered set of chunk IDs, most recent at the front.
type idList struct {
	l list.List
	m map[chunkstore.ID]*list.Element
}

func (s *idList) len() int { return len(s.m) }

func (s *idList) has(id chunkstore.ID) bool { _, ok := s.m[id]; return ok }

func (s *idList) pushFront(id chunkstore.ID) {
	if s.m == nil {
		s.m = make(map[chunkstore.ID]*list.Element)
	}
	if e, ok := s.m[id]; ok {
		s.l.MoveToFront(e)
		return
	}
	s.m[id] = s.l.PushFront(id)
}

func (s *idList) moveToFront(id chunkstore.ID) {
	if e, ok := s.m[id]; ok {
		s.l.MoveToFront(e)
	}
}

func (s *idList) remove(id chunkstore.ID) {
	if e, ok := s.m[id]; ok {
		s.l.Remove(e)
		delete(s.m, id)
	}
}

func (s *idList) popBack() chunkstore.ID {
	e := s.l.Back()
	id := e.Value.(chunkstore.ID)
	s.l.Remove(e)
	delete(s.m, id)
	return id
}
