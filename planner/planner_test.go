package planner

import (
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/hoardvm/hoard/chunkstore"
)

func id(s string) chunkstore.ID { return chunkstore.Sum([]byte(s)) }

func ws(names ...string) []Chunk {
	var cs []Chunk
	for _, n := range names {
		cs = append(cs, Chunk{ID: id(n), Size: 10})
	}
	return cs
}

func TestHoardOrderAndBudget(t *testing.T) {
	t.Parallel()
	popular := Image{Manifest: id("popular"), Boots: 9, WorkingSet: ws("kernel", "libc", "popular-app")}
	rare := Image{Manifest: id("rare"), Boots: 1, WorkingSet: ws("kernel", "libc", "rare-app", "rare-data")}
	for _, tc := range []struct {
		name   string
		have   []string
		budget int64
		want   []string
	}{
		{"all fits, shared chunks once", nil, 100, []string{"kernel", "libc", "popular-app", "rare-app", "rare-data"}},
		{"budget cuts the rare image in boot order", nil, 40, []string{"kernel", "libc", "popular-app", "rare-app"}},
		{"held chunks are skipped", []string{"libc", "rare-app"}, 100, []string{"kernel", "popular-app", "rare-data"}},
		{"nothing fits", nil, 5, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			held := map[chunkstore.ID]bool{}
			for _, h := range tc.have {
				held[id(h)] = true
			}
			plan := Hoard([]Image{rare, popular}, func(c chunkstore.ID) bool { return held[c] }, tc.budget)
			if len(plan.Chunks) != len(tc.want) {
				t.Fatalf("plan has %d chunks, want %d", len(plan.Chunks), len(tc.want))
			}
			for i, w := range tc.want {
				if plan.Chunks[i] != id(w) {
					t.Fatalf("chunk %d is not %s", i, w)
				}
			}
			if plan.Bytes != int64(10*len(tc.want)) {
				t.Fatalf("plan bytes %d", plan.Bytes)
			}
		})
	}
}

// TestHoardProperties: over random inputs the plan never exceeds the budget,
// never repeats or includes a held chunk, and is deterministic.
func TestHoardProperties(t *testing.T) {
	t.Parallel()
	r := rand.New(rand.NewPCG(1, 2))
	for trial := 0; trial < 300; trial++ {
		var images []Image
		for i := 0; i < 1+r.IntN(8); i++ {
			img := Image{Manifest: id(fmt.Sprint("img", trial, i)), Boots: r.IntN(5)}
			for j := 0; j < r.IntN(30); j++ {
				img.WorkingSet = append(img.WorkingSet, Chunk{ID: id(fmt.Sprint("c", r.IntN(60))), Size: int64(1 + r.IntN(100))})
			}
			images = append(images, img)
		}
		held := map[chunkstore.ID]bool{}
		for j := 0; j < 10; j++ {
			held[id(fmt.Sprint("c", r.IntN(60)))] = true
		}
		have := func(c chunkstore.ID) bool { return held[c] }
		budget := int64(r.IntN(2000))
		plan := Hoard(images, have, budget)
		if plan.Bytes > budget {
			t.Fatalf("trial %d: plan %d bytes over budget %d", trial, plan.Bytes, budget)
		}
		seen := map[chunkstore.ID]bool{}
		for _, c := range plan.Chunks {
			if seen[c] || held[c] {
				t.Fatalf("trial %d: chunk repeated or already held", trial)
			}
			seen[c] = true
		}
		again := Hoard(images, have, budget)
		if fmt.Sprint(again.Chunks) != fmt.Sprint(plan.Chunks) {
			t.Fatalf("trial %d: not deterministic", trial)
		}
	}
}

func cands(cs ...chunkstore.Candidate) func(func(chunkstore.Candidate) bool) {
	return func(yield func(chunkstore.Candidate) bool) {
		for _, c := range cs {
			if !yield(c) {
				return
			}
		}
	}
}

func TestWorkingSetFirst(t *testing.T) {
	t.Parallel()
	now := time.Now()
	a := chunkstore.Candidate{ID: id("a"), Size: 10, LastAccess: now.Add(-3 * time.Hour)} // oldest, hot
	b := chunkstore.Candidate{ID: id("b"), Size: 10, LastAccess: now.Add(-2 * time.Hour)}
	c := chunkstore.Candidate{ID: id("c"), Size: 10, LastAccess: now.Add(-1 * time.Hour)}
	p := WorkingSetFirst{Hot: map[chunkstore.ID]bool{id("a"): true}}
	got := p.Victims(15, cands(a, b, c))
	if len(got) != 2 || got[0] != id("b") || got[1] != id("c") {
		t.Fatalf("victims %v: want the cold chunks b, c before the hot, older a", got)
	}
	got = p.Victims(25, cands(a, b, c))
	if len(got) != 3 || got[2] != id("a") {
		t.Fatalf("victims %v: the hot chunk goes last, when needed", got)
	}
	if got := (WorkingSetFirst{}).Victims(10, cands(a, b, c)); len(got) != 1 || got[0] != id("a") {
		t.Fatalf("without a hot set it is LRU: %v", got)
	}
}

func TestPlace(t *testing.T) {
	t.Parallel()
	img := Image{Manifest: id("img"), WorkingSet: ws("k", "l", "m", "n")}
	holds := func(names ...string) func(chunkstore.ID) bool {
		m := map[chunkstore.ID]bool{}
		for _, n := range names {
			m[id(n)] = true
		}
		return func(c chunkstore.ID) bool { return m[c] }
	}
	got := Place(img, []NodeState{
		{Name: "cold", Has: holds(), FreeSlots: 10},
		{Name: "warm", Has: holds("k", "l", "m"), FreeSlots: 1},
		{Name: "full", Has: holds("k", "l", "m", "n"), FreeSlots: 0},
		{Name: "warm2", Has: holds("k", "l", "n"), FreeSlots: 3},
	})
	want := []string{"warm2", "warm", "cold"}
	if len(got) != len(want) {
		t.Fatalf("placements %+v", got)
	}
	for i, w := range want {
		if got[i].Node != w {
			t.Fatalf("rank %d is %s, want %s (%+v)", i, got[i].Node, w, got)
		}
	}
	if got[0].Cached != 0.75 || got[2].MissBytes != 40 {
		t.Fatalf("scores %+v", got)
	}
}
