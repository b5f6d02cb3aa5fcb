package planner

import (
	"container/list"
	"fmt"
	"iter"
	"math/rand/v2"
	"time"

	"github.com/hoardvm/hoard/chunkstore"
)

// SimCache is a deterministic in-memory model of a node's chunk store for
// simulating eviction policies: a quota in stored bytes, chunks kept in
// least-recently-used order, pins, and eviction through a
// chunkstore.EvictionPolicy as the store drives it: when a new chunk would
// take the cache past the high watermark, the policy is asked to free down
// to the low watermark, and it sees the unpinned chunks, least recently used
// first. The watermarks default to the store's (0.95 and 0.85). Like the store, it refuses victims that are unknown,
// pinned or repeated, and counts them in SimStats.BadVictims. Time is a
// logical clock that ticks once per access. A SimCache is not safe for
// concurrent use.
type SimCache struct {
	quota   int64
	policy  chunkstore.EvictionPolicy
	touch   func(chunkstore.ID)
	entries map[chunkstore.ID]*list.Element // of *simEntry
	lru     list.List                       // front is most recent
	pins    map[chunkstore.ID]int
	used    int64
	clock   int64
	stats   SimStats
	// high and low are the watermarks, fractions of the quota.
	high, low float64
}

type simEntry struct {
	id   chunkstore.ID
	size int64
	last int64
}

// SimStats counts what a SimCache did.
type SimStats struct {
	Hits, Misses        int64
	HitBytes, MissBytes int64
	// Evictions and EvictedBytes count the chunks evicted and their bytes.
	Evictions, EvictedBytes int64
	// Bypassed counts misses not stored: even after eviction there was no
	// room (the rest is pinned, or the chunk is larger than the quota).
	Bypassed int64
	// BadVictims counts IDs the policy returned that were not candidates
	// (not held, pinned, or repeated); a correct policy leaves it at 0.
	BadVictims int64
}

// HitRatio returns the fraction of accesses that hit (0 with no access).
func (s SimStats) HitRatio() float64 {
	if s.Hits+s.Misses == 0 {
		return 0
	}
	return float64(s.Hits) / float64(s.Hits+s.Misses)
}

// NewSimCache returns an empty cache of quota stored bytes evicting through
// policy. If the policy has a Touch(chunkstore.ID) method (every Eviction
// does), the cache calls it once per access, before it makes room, as the
// daemon's read path does.
func NewSimCache(quota int64, policy chunkstore.EvictionPolicy) *SimCache {
	c := &SimCache{quota: quota, policy: policy, entries: make(map[chunkstore.ID]*list.Element), pins: make(map[chunkstore.ID]int),
		high: 0.95, low: 0.85}
	if t, ok := policy.(interface{ Touch(chunkstore.ID) }); ok {
		c.touch = t.Touch
	}
	return c
}

// Access reads chunk id of size stored bytes and reports whether it was held
// (a hit). A miss stores the chunk, evicting as the policy chooses to make
// room; if there still is none, the chunk is not stored (Bypassed).
func (c *SimCache) Access(id chunkstore.ID, size int64) bool {
	c.clock++
	if c.touch != nil {
		c.touch(id)
	}
	if e, ok := c.entries[id]; ok {
		en := e.Value.(*simEntry)
		en.last = c.clock
		c.lru.MoveToFront(e)
		c.stats.Hits++
		c.stats.HitBytes += en.size
		return true
	}
	c.stats.Misses++
	c.stats.MissBytes += size
	if c.used+size > int64(c.high*float64(c.quota)) && size <= c.quota {
		c.evict(c.used + size - int64(c.low*float64(c.quota)))
	}
	if c.used+size > c.quota {
		c.stats.Bypassed++
		return false
	}
	c.entries[id] = c.lru.PushFront(&simEntry{id: id, size: size, last: c.clock})
	c.used += size
	return false
}

// SetWatermarks sets the high and low watermarks, fractions of the quota
// (0 < low <= high <= 1); out-of-range values are ignored. SetWatermarks(1,
// 1) evicts only what each new chunk needs.
func (c *SimCache) SetWatermarks(high, low float64) {
	if 0 < low && low <= high && high <= 1 {
		c.high, c.low = high, low
	}
}

// Evict frees at least need bytes, if the unpinned chunks allow, through the
// policy, and returns the bytes freed.
func (c *SimCache) Evict(need int64) int64 {
	before := c.used
	c.evict(need)
	return before - c.used
}

func (c *SimCache) evict(need int64) {
	victims := c.policy.Victims(need, c.candidates())
	done := make(map[chunkstore.ID]bool, len(victims))
	for _, id := range victims {
		e, ok := c.entries[id]
		if !ok || done[id] || c.pins[id] > 0 {
			c.stats.BadVictims++
			continue
		}
		done[id] = true
		en := e.Value.(*simEntry)
		c.lru.Remove(e)
		delete(c.entries, id)
		c.used -= en.size
		c.stats.Evictions++
		c.stats.EvictedBytes += en.size
	}
}

// candidates yields the unpinned chunks, least recently used first.
func (c *SimCache) candidates() iter.Seq[chunkstore.Candidate] {
	return func(yield func(chunkstore.Candidate) bool) {
		for e := c.lru.Back(); e != nil; e = e.Prev() {
			en := e.Value.(*simEntry)
			if c.pins[en.id] > 0 {
				continue
			}
			if !yield(chunkstore.Candidate{ID: en.id, Size: en.size, LastAccess: time.Unix(0, en.last)}) {
				return
			}
		}
	}
}

// Pin protects id from eviction (whether held yet or not) until as many
// Unpin calls; pinned chunks still count against the quota.
func (c *SimCache) Pin(id chunkstore.ID) { c.pins[id]++ }

// Unpin undoes one Pin.
func (c *SimCache) Unpin(id chunkstore.ID) {
	if c.pins[id] <= 1 {
		delete(c.pins, id)
		return
	}
	c.pins[id]--
}

// Pinned reports whether id is pinned.
func (c *SimCache) Pinned(id chunkstore.ID) bool { return c.pins[id] > 0 }

// Has reports whether id is held.
func (c *SimCache) Has(id chunkstore.ID) bool { _, ok := c.entries[id]; return ok }

// Used returns the stored bytes held.
func (c *SimCache) Used() int64 { return c.used }

// Quota returns the cache's quota in stored bytes.
func (c *SimCache) Quota() int64 { return c.quota }

// Stats returns the counts so far.
func (c *SimCache) Stats() SimStats { return c.stats }

// WorkloadConfig describes a synthetic cluster workload: images in OS
// families whose images share most of a family base working set, booted with
// Zipf popularity, interleaved with scans (sequential reads of chunks outside
// every working set, as a VM reading its disk does).
type WorkloadConfig struct {
	Seed     uint64
	Images   int // images, spread round-robin over the families
	Families int
	// BaseChunks is the size of a family's base working set; each image
	// reads a random SharedFraction of it, in base order.
	BaseChunks     int
	SharedFraction float64
	// UniqueChunks is the number of working-set chunks of each image's own.
	UniqueChunks int
	// DataChunks is the number of chunks of each image outside its working
	// set, which scans read.
	DataChunks int
	// Boots is the number of boots; ZipfS (> 1) skews which images boot.
	Boots int
	ZipfS float64
	// ScansPerBoot is the mean number of scans between two boots;
	// ScanChunks the length of one scan, from a random image and offset.
	ScansPerBoot float64
	ScanChunks   int
}

// DefaultWorkload is the workload of the policy comparison: 40 images in 4
// families, 120 base chunks (each image reads 85%), 30 chunks of its own,
// 1,500 boots with Zipf(1.1) popularity and 2 scans of 200 chunks per boot.
func DefaultWorkload(seed uint64) WorkloadConfig {
	return WorkloadConfig{Seed: seed, Images: 40, Families: 4, BaseChunks: 120, SharedFraction: 0.85,
		UniqueChunks: 30, DataChunks: 2000, Boots: 1500, ZipfS: 1.1, ScansPerBoot: 2, ScanChunks: 200}
}

// Workload is a generated sequence of reads.
type Workload struct {
	// Images are the images with their working sets (Stored = Size).
	Images []Image
	// Events are the reads, in order.
	Events []SimEvent
}

// SimEvent is a boot (an image's working set read in boot order) or a scan.
type SimEvent struct {
	Image  int // index into Workload.Images
	Boot   bool
	Chunks []Chunk
}

// NewWorkload generates the workload cfg describes; the same cfg gives the
// same workload.
func NewWorkload(cfg WorkloadConfig) Workload {
	r := rand.New(rand.NewPCG(cfg.Seed, 0x686f617264))        // "hoard"
	size := func() int64 { return 16<<10 + r.Int64N(96<<10) } // 16..112 KiB, mean 64 KiB
	chunk := func(name string) Chunk {
		s := size()
		return Chunk{ID: chunkstore.Sum([]byte(name)), Size: s, Stored: s}
	}
	fams := max(cfg.Families, 1)
	bases := make([][]Chunk, fams)
	for f := range bases {
		for i := range cfg.BaseChunks {
			bases[f] = append(bases[f], chunk(fmt.Sprintf("seed%d/family%d/base%d", cfg.Seed, f, i)))
		}
	}
	var w Workload
	data := make([][]Chunk, cfg.Images)
	for n := range cfg.Images {
		f := n % fams
		img := Image{Manifest: chunkstore.Sum([]byte(fmt.Sprintf("seed%d/image%d", cfg.Seed, n)))}
		for _, c := range bases[f] {
			if r.Float64() < cfg.SharedFraction {
				img.WorkingSet = append(img.WorkingSet, c)
			}
		}
		for i := range cfg.UniqueChunks {
			// an image's own chunks are read among the base ones
			c := chunk(fmt.Sprintf("seed%d/image%d/own%d", cfg.Seed, n, i))
			at := r.IntN(len(img.WorkingSet) + 1)
			img.WorkingSet = append(img.WorkingSet[:at], append([]Chunk{c}, img.WorkingSet[at:]...)...)
		}
		for i := range cfg.DataChunks {
			data[n] = append(data[n], chunk(fmt.Sprintf("seed%d/image%d/data%d", cfg.Seed, n, i)))
		}
		w.Images = append(w.Images, img)
	}
	if cfg.Images == 0 {
		return w
	}
	zipf := rand.NewZipf(r, max(cfg.ZipfS, 1.0001), 1, uint64(cfg.Images-1))
	// popularity rank -> image, shuffled so that no family is favoured
	rank := r.Perm(cfg.Images)
	for range cfg.Boots {
		for r.Float64() < cfg.ScansPerBoot/(1+cfg.ScansPerBoot) {
			n := r.IntN(cfg.Images)
			if len(data[n]) == 0 {
				break
			}
			from := r.IntN(len(data[n]))
			to := min(from+cfg.ScanChunks, len(data[n]))
			w.Events = append(w.Events, SimEvent{Image: n, Chunks: data[n][from:to]})
		}
		n := rank[zipf.Uint64()]
		w.Events = append(w.Events, SimEvent{Image: n, Boot: true, Chunks: w.Images[n].WorkingSet})
	}
	return w
}

// WorkingSets returns the images' working sets as Eviction.SetWorkingSets
// takes them.
func (w Workload) WorkingSets() map[chunkstore.ID][]chunkstore.ID {
	m := make(map[chunkstore.ID][]chunkstore.ID, len(w.Images))
	for _, img := range w.Images {
		ids := make([]chunkstore.ID, len(img.WorkingSet))
		for i, c := range img.WorkingSet {
			ids[i] = c.ID
		}
		m[img.Manifest] = ids
	}
	return m
}

// UnionBytes returns the stored bytes of the union of the working sets.
func (w Workload) UnionBytes() int64 {
	seen := make(map[chunkstore.ID]bool)
	var n int64
	for _, img := range w.Images {
		for _, c := range img.WorkingSet {
			if !seen[c.ID] {
				seen[c.ID] = true
				n += c.stored()
			}
		}
	}
	return n
}

// SimResult is what one simulation measured.
type SimResult struct {
	Policy string
	SimStats
	// BootHits and BootMisses count the chunk reads of boots only.
	BootHits, BootMisses int64
	// LocalBoots counts boots whose every read hit.
	LocalBoots, Boots int
	// WholeAtEnd is the number of images whose whole working set is held
	// at the end; WholeMean the mean of that count sampled after every
	// fifth boot of the second half of the run.
	WholeAtEnd int
	WholeMean  float64
}

// BootHitRatio returns the fraction of boot reads that hit.
func (r SimResult) BootHitRatio() float64 {
	if r.BootHits+r.BootMisses == 0 {
		return 0
	}
	return float64(r.BootHits) / float64(r.BootHits+r.BootMisses)
}

// String formats the result for logs.
func (r SimResult) String() string {
	return fmt.Sprintf("%-8s whole_at_end=%2d whole_mean=%5.2f local_boots=%4d/%d boot_hit=%.3f hit=%.3f evicted_bytes=%d",
		r.Policy, r.WholeAtEnd, r.WholeMean, r.LocalBoots, r.Boots, r.BootHitRatio(), r.HitRatio(), r.EvictedBytes)
}

// RunSim plays w on a fresh SimCache of quota bytes evicting through policy,
// after telling the policy the working sets.
func RunSim(w Workload, quota int64, policy Eviction) SimResult {
	policy.SetWorkingSets(w.WorkingSets())
	c := NewSimCache(quota, policy)
	res := SimResult{Policy: policy.Name()}
	whole := func() int {
		n := 0
		for _, img := range w.Images {
			ok := true
			for _, ch := range img.WorkingSet {
				if !c.Has(ch.ID) {
					ok = false
					break
				}
			}
			if ok {
				n++
			}
		}
		return n
	}
	bootsTotal := 0
	for _, ev := range w.Events {
		if ev.Boot {
			bootsTotal++
		}
	}
	var samples, sum int
	for _, ev := range w.Events {
		local := true
		for _, ch := range ev.Chunks {
			hit := c.Access(ch.ID, ch.stored())
			if ev.Boot {
				if hit {
					res.BootHits++
				} else {
					res.BootMisses++
					local = false
				}
			}
		}
		if ev.Boot {
			res.Boots++
			if local {
				res.LocalBoots++
			}
			if res.Boots > bootsTotal/2 && res.Boots%5 == 0 {
				sum += whole()
				samples++
			}
		}
	}
	res.SimStats = c.Stats()
	res.WholeAtEnd = whole()
	if samples > 0 {
		res.WholeMean = float64(sum) / float64(samples)
	}
	return res
}
