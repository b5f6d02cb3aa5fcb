package planner

import (
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/hoardvm/hoard/chunkstore"
)

// TestSimCacheProperties: under random workloads of reads, pins and unpins,
// for every policy, the cache never holds more than its quota, a pinned chunk
// held is never evicted, and the policy never names a chunk that was not a
// candidate.
func TestSimCacheProperties(t *testing.T) {
	t.Parallel()
	for _, name := range EvictionNames() {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			r := rand.New(rand.NewPCG(7, uint64(len(name))))
			for round := range 40 {
				p, err := NewEviction(name)
				if err != nil {
					t.Fatal(err)
				}
				ids := make([]chunkstore.ID, 50+r.IntN(200))
				sizes := make([]int64, len(ids))
				for i := range ids {
					ids[i] = id(fmt.Sprint("sim", round, i))
					sizes[i] = 1 + r.Int64N(100)
				}
				ws := map[chunkstore.ID][]chunkstore.ID{}
				for k := range 1 + r.IntN(5) {
					for range r.IntN(40) {
						m := id(fmt.Sprint("ws", k))
						ws[m] = append(ws[m], ids[r.IntN(len(ids))])
					}
				}
				p.SetWorkingSets(ws)
				quota := 100 + r.Int64N(3000)
				c := NewSimCache(quota, p)
				if r.IntN(2) == 0 {
					c.SetWatermarks(1, 1)
				}
				pinned := map[chunkstore.ID]bool{}
				for op := range 2000 {
					i := r.IntN(len(ids))
					switch k := r.IntN(20); {
					case k == 0:
						c.Pin(ids[i])
						pinned[ids[i]] = true
					case k == 1 && pinned[ids[i]]:
						c.Unpin(ids[i])
						delete(pinned, ids[i])
					default:
						heldPinned := map[chunkstore.ID]bool{}
						for pid := range pinned {
							if c.Has(pid) {
								heldPinned[pid] = true
							}
						}
						c.Access(ids[i], sizes[i])
						for pid := range heldPinned {
							if !c.Has(pid) {
								t.Fatalf("round %d op %d: pinned chunk evicted", round, op)
							}
						}
					}
					if c.Used() > quota {
						t.Fatalf("round %d op %d: %d bytes held, over the quota %d", round, op, c.Used(), quota)
					}
				}
				if s := c.Stats(); s.BadVictims != 0 {
					t.Fatalf("round %d: the policy named %d chunks that were not candidates", round, s.BadVictims)
				}
			}
		})
	}
}

// TestComparePolicies runs the policy comparison workload (DefaultWorkload:
// 40 images, 4 OS families, Zipf popularity, scans between boots, a quota of
// 60% of the union of the working sets) for every policy over a few seeds,
// logs what each measured, and checks that DefaultEviction keeps the most
// working sets whole, as its doc comment claims.
func TestComparePolicies(t *testing.T) {
	t.Parallel()
	type total struct {
		whole      int
		wholeMean  float64
		bootHit    float64
		hit        float64
		localBoots int
	}
	totals := map[string]*total{}
	seeds := []uint64{1, 2}
	for _, seed := range seeds {
		cfg := DefaultWorkload(seed)
		cfg.Boots = 500 // the full 1,500 take too long under -race
		w := NewWorkload(cfg)
		quota := w.UnionBytes() * 6 / 10
		for _, name := range EvictionNames() {
			p, err := NewEviction(name)
			if err != nil {
				t.Fatal(err)
			}
			res := RunSim(w, quota, p)
			t.Logf("seed %d quota %d (union %d): %s", seed, quota, w.UnionBytes(), res)
			if res.BadVictims != 0 {
				t.Fatalf("%s named %d chunks that were not candidates", name, res.BadVictims)
			}
			tt := totals[name]
			if tt == nil {
				tt = &total{}
				totals[name] = tt
			}
			tt.whole += res.WholeAtEnd
			tt.wholeMean += res.WholeMean / float64(len(seeds))
			tt.bootHit += res.BootHitRatio() / float64(len(seeds))
			tt.hit += res.HitRatio() / float64(len(seeds))
			tt.localBoots += res.LocalBoots
		}
	}
	best := ""
	for _, name := range EvictionNames() {
		tt := totals[name]
		t.Logf("%-8s over %d seeds: whole_at_end=%d whole_mean=%.2f local_boots=%d boot_hit=%.3f hit=%.3f",
			name, len(seeds), tt.whole, tt.wholeMean, tt.localBoots, tt.bootHit, tt.hit)
		if best == "" || tt.wholeMean > totals[best].wholeMean {
			best = name
		}
	}
	if best != DefaultEviction {
		t.Errorf("%s keeps the most working sets whole, not DefaultEviction %s: change DefaultEviction and its comment", best, DefaultEviction)
	}
}

func TestSimCache(t *testing.T) {
	t.Parallel()
	c := NewSimCache(100, LRU{})
	c.SetWatermarks(0.9, 0.5)
	for i := range 9 {
		if c.Access(id(fmt.Sprint("s", i)), 10) {
			t.Fatalf("s%d hit on first access", i)
		}
	}
	c.Pin(id("s0"))
	if !c.Access(id("s1"), 10) { // s1 becomes the most recent
		t.Fatal("s1 missed")
	}
	c.Access(id("s9"), 10) // 100 > 90: evict down to 50 - 10
	// LRU order now s0 (pinned) s2 .. s8 s1: s2..s6 go.
	for i, want := range []bool{true, true, false, false, false, false, false, true, true, true} {
		if c.Has(id(fmt.Sprint("s", i))) != want {
			t.Fatalf("after eviction s%d held = %v", i, !want)
		}
	}
	if s := c.Stats(); c.Used() != 50 || s.Evictions != 5 || s.EvictedBytes != 50 || s.Hits != 1 || s.Misses != 10 {
		t.Fatalf("used %d stats %+v", c.Used(), s)
	}
	// A chunk larger than the quota, or with everything pinned, is not stored.
	if c.Access(id("huge"), 101); c.Has(id("huge")) || c.Stats().Bypassed != 1 {
		t.Fatal("a chunk larger than the quota was stored")
	}
	all := NewSimCache(20, LRU{})
	all.Pin(id("p1"))
	all.Pin(id("p2"))
	all.Access(id("p1"), 10)
	all.Access(id("p2"), 10)
	if all.Access(id("x"), 10); all.Has(id("x")) || !all.Has(id("p1")) || all.Stats().Bypassed != 1 {
		t.Fatal("with everything pinned a miss must be bypassed, not evict a pinned chunk")
	}
	all.Unpin(id("p1"))
	if all.Access(id("x"), 10); !all.Has(id("x")) || all.Has(id("p1")) {
		t.Fatal("an unpinned chunk should make room")
	}
}

// TestRunSimDeterministic: the same workload, quota and policy give the same
// result, and another seed gives another workload.
func TestRunSimDeterministic(t *testing.T) {
	t.Parallel()
	cfg := DefaultWorkload(9)
	cfg.Images, cfg.Boots, cfg.DataChunks = 12, 150, 300
	for _, name := range EvictionNames() {
		var got []SimResult
		for range 2 {
			p, _ := NewEviction(name)
			w := NewWorkload(cfg)
			got = append(got, RunSim(w, w.UnionBytes()/2, p))
		}
		if got[0] != got[1] {
			t.Fatalf("%s: %v then %v", name, got[0], got[1])
		}
		if got[0].Boots != cfg.Boots || got[0].Hits+got[0].Misses == 0 {
			t.Fatalf("%s: %v", name, got[0])
		}
	}
	a, b := NewWorkload(cfg), NewWorkload(DefaultWorkload(10))
	if a.UnionBytes() == b.UnionBytes() {
		t.Fatal("two seeds gave the same working sets")
	}
}
