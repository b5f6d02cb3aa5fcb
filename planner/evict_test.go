package planner

import (
	"context"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hoardvm/hoard/chunkstore"
)

func TestNewEviction(t *testing.T) {
	t.Parallel()
	for _, name := range append(EvictionNames(), "", " ARC ") {
		p, err := NewEviction(name)
		if err != nil {
			t.Fatalf("NewEviction(%q): %v", name, err)
		}
		want := strings.ToLower(strings.TrimSpace(name))
		if want == "" {
			want = DefaultEviction
		}
		if p.Name() != want {
			t.Fatalf("NewEviction(%q) is %s", name, p.Name())
		}
	}
	_, err := NewEviction("lfu")
	if err == nil || !strings.Contains(err.Error(), "store.eviction") || !strings.Contains(err.Error(), "lru, arc, sharing") {
		t.Fatalf("error %v: want it to name store.eviction and the valid values", err)
	}
}

// TestEvictionProperties: for every policy, over random candidates, touches
// and working sets, the victims free at least need bytes when the candidates
// hold that much (and no more victims than that takes), are all candidates
// (so chunks the store never offers, pinned or backing a live export, are
// never evicted), and never repeat.
func TestEvictionProperties(t *testing.T) {
	t.Parallel()
	for _, name := range EvictionNames() {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			r := rand.New(rand.NewPCG(3, uint64(len(name))))
			p, err := NewEviction(name)
			if err != nil {
				t.Fatal(err)
			}
			universe := make([]chunkstore.ID, 300)
			for i := range universe {
				universe[i] = id(fmt.Sprint("u", i))
			}
			for round := range 1000 {
				for range r.IntN(50) {
					p.Touch(universe[r.IntN(len(universe))])
				}
				if r.IntN(10) == 0 {
					p.Forget(universe[r.IntN(len(universe))])
				}
				if r.IntN(20) == 0 {
					ws := map[chunkstore.ID][]chunkstore.ID{}
					for range r.IntN(100) {
						m := id(fmt.Sprint("m", r.IntN(6)))
						ws[m] = append(ws[m], universe[r.IntN(len(universe))])
					}
					p.SetWorkingSets(ws)
				}
				// candidates: a random subset, in a random LRU order
				perm := r.Perm(len(universe))[:r.IntN(len(universe))]
				var cs []chunkstore.Candidate
				var total int64
				isCand := map[chunkstore.ID]int64{}
				for k, i := range perm {
					c := chunkstore.Candidate{ID: universe[i], Size: 1 + r.Int64N(100), LastAccess: time.Unix(int64(k), 0)}
					cs = append(cs, c)
					isCand[c.ID] = c.Size
					total += c.Size
				}
				need := r.Int64N(total + 100)
				got := p.Victims(need, cands(cs...))
				var freed, last int64
				seen := map[chunkstore.ID]bool{}
				for _, v := range got {
					size, ok := isCand[v]
					if !ok {
						t.Fatalf("round %d: victim %s is not a candidate", round, v)
					}
					if seen[v] {
						t.Fatalf("round %d: victim %s repeated", round, v)
					}
					seen[v] = true
					freed += size
					last = size
				}
				if freed < min(need, total) {
					t.Fatalf("round %d: freed %d of %d needed (%d available)", round, freed, need, total)
				}
				if len(got) > 0 && freed-last >= need {
					t.Fatalf("round %d: freed %d for %d needed: the last victim was not needed", round, freed, need)
				}
			}
		})
	}
}

func TestSharingOrder(t *testing.T) {
	t.Parallel()
	p := NewSharing()
	p.SetWorkingSets(map[chunkstore.ID][]chunkstore.ID{
		id("ubuntu"):  {id("kernel"), id("libc"), id("ubuntu-app"), id("kernel")}, // repeat counts once
		id("ubuntu2"): {id("kernel"), id("libc"), id("ubuntu2-app")},
		id("debian"):  {id("kernel"), id("debian-app")},
	})
	if p.Shares(id("kernel")) != 3 || p.Shares(id("libc")) != 2 || p.Shares(id("cold")) != 0 {
		t.Fatalf("shares kernel %d libc %d cold %d", p.Shares(id("kernel")), p.Shares(id("libc")), p.Shares(id("cold")))
	}
	var cs []chunkstore.Candidate
	for _, n := range []string{"kernel", "ubuntu-app", "libc", "cold1", "debian-app", "cold2"} { // LRU first
		cs = append(cs, chunkstore.Candidate{ID: id(n), Size: 10})
	}
	got := p.Victims(1000, cands(cs...))
	want := []string{"cold1", "cold2", "ubuntu-app", "debian-app", "libc", "kernel"}
	if len(got) != len(want) {
		t.Fatalf("victims %v", got)
	}
	for i, w := range want {
		if got[i] != id(w) {
			t.Fatalf("victim %d is %s, want %s", i, got[i], w)
		}
	}
	if got := p.Victims(15, cands(cs...)); len(got) != 2 || got[0] != id("cold1") || got[1] != id("cold2") {
		t.Fatalf("victims %v: want the chunks in no working set, and no more", got)
	}
}

// TestARCScanResistance: chunks read twice (a working set booted twice)
// outlive a scan of chunks read once, though the scan is more recent.
func TestARCScanResistance(t *testing.T) {
	t.Parallel()
	a := NewARC(0)
	var cs []chunkstore.Candidate
	for boot := range 2 {
		for i := range 10 {
			a.Touch(id(fmt.Sprint("ws", i)))
			if boot == 0 {
				cs = append(cs, chunkstore.Candidate{ID: id(fmt.Sprint("ws", i)), Size: 1})
			}
		}
	}
	for i := range 30 {
		a.Touch(id(fmt.Sprint("scan", i)))
		cs = append(cs, chunkstore.Candidate{ID: id(fmt.Sprint("scan", i)), Size: 1})
	}
	got := a.Victims(20, cands(cs...))
	if len(got) != 20 {
		t.Fatalf("%d victims", len(got))
	}
	for i, v := range got {
		if v != id(fmt.Sprint("scan", i)) {
			t.Fatalf("victim %d is not scan%d: the scan should go first, oldest first", i, i)
		}
	}
	// A scan chunk read again after its eviction (a ghost hit) grows T1's
	// target.
	_, _, _, _, p0 := a.Tracked()
	a.Touch(id("scan0"))
	if _, _, _, _, p1 := a.Tracked(); p1 <= p0 {
		t.Fatalf("target p %d -> %d after a hit in B1: want it to grow", p0, p1)
	}
}

// TestARCBounded: however many chunks are touched and evicted, ARC tracks at
// most maxTracked resident chunks and as many ghosts.
func TestARCBounded(t *testing.T) {
	t.Parallel()
	const limit = 100
	a := NewARC(limit)
	r := rand.New(rand.NewPCG(5, 6))
	for round := range 200 {
		var cs []chunkstore.Candidate
		for i := range 50 {
			n := id(fmt.Sprint("b", r.IntN(5000)))
			a.Touch(n)
			if i%2 == 0 {
				cs = append(cs, chunkstore.Candidate{ID: n, Size: 1})
			}
		}
		a.Victims(int64(r.IntN(30)), cands(cs...))
		t1, t2, b1, b2, p := a.Tracked()
		if t1+t2 > limit || b1+b2 > limit || p > t1+t2 || p < 0 {
			t.Fatalf("round %d: t1 %d t2 %d b1 %d b2 %d p %d over the bound %d", round, t1, t2, b1, b2, p, limit)
		}
	}
	a.Forget(id("b1"))
}

// TestEvictionConcurrent: the store's evictor calls Victims while the read
// path touches and the profile code sets working sets (run with -race).
func TestEvictionConcurrent(t *testing.T) {
	t.Parallel()
	for _, name := range EvictionNames() {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			p, err := NewEviction(name)
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(t.Context(), 300*time.Millisecond)
			defer cancel()
			var cs []chunkstore.Candidate
			for i := range 200 {
				cs = append(cs, chunkstore.Candidate{ID: id(fmt.Sprint("cc", i)), Size: 1})
			}
			var wg sync.WaitGroup
			for g := range 4 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := 0; ctx.Err() == nil; i++ {
						c := cs[(i*7+g)%len(cs)].ID
						switch g {
						case 0:
							p.Victims(50, cands(cs...))
						case 1:
							p.SetWorkingSets(map[chunkstore.ID][]chunkstore.ID{id("m"): {c}})
						case 2:
							p.Forget(c)
						default:
							p.Touch(c)
						}
					}
				}()
			}
			wg.Wait()
		})
	}
}
