package planner

import (
	"fmt"
	"math/rand/v2"
	"reflect"
	"slices"
	"strings"
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
		{"held chunks are not fetched", []string{"libc", "rare-app"}, 100, []string{"kernel", "popular-app", "rare-data"}},
		{"held chunks count against the budget", []string{"libc", "rare-app"}, 40, []string{"kernel", "popular-app"}},
		{"held chunks past the budget are not hoarded", []string{"rare-data"}, 30, []string{"kernel", "libc", "popular-app"}},
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

func TestHoardStoredBytes(t *testing.T) {
	t.Parallel()
	// Raw 10 each; stored: a compressible kernel (2), an estimate for libc
	// (5), app with Stored 0 (its raw 10).
	img := Image{Manifest: id("img"), Boots: 1, WorkingSet: []Chunk{
		{ID: id("kernel"), Size: 10, Stored: 2},
		{ID: id("libc"), Size: 10, Stored: 5},
		{ID: id("app"), Size: 10},
	}}
	plan := Hoard([]Image{img}, nil, 17)
	if len(plan.Chunks) != 3 || plan.Bytes != 17 || plan.RawBytes != 30 {
		t.Fatalf("plan %+v: want all three chunks, 17 stored bytes, 30 raw", plan)
	}
	held := func(c chunkstore.ID) bool { return c == id("libc") }
	plan = Hoard([]Image{img}, held, 16)
	if len(plan.Chunks) != 1 || plan.Chunks[0] != id("kernel") || plan.HeldBytes != 5 || plan.Bytes != 2 {
		t.Fatalf("plan %+v: want kernel fetched, libc held (5 stored bytes), app over the budget", plan)
	}
	ip := plan.Images[0]
	if ip.WorkingSetBytes != 30 || ip.HeldBytes != 10 || ip.PlannedBytes != 10 || ip.Complete || ip.Chunks != 3 {
		t.Fatalf("accounting %+v", ip)
	}
}

func TestHoardAccounting(t *testing.T) {
	t.Parallel()
	a := Image{Manifest: id("a"), Boots: 5, WorkingSet: ws("k", "l", "a1", "k")} // k repeated
	b := Image{Manifest: id("b"), Boots: 2, WorkingSet: ws("k", "l", "b1", "b2")}
	c := Image{Manifest: id("c"), Boots: 2, WorkingSet: ws("c1")}
	held := func(x chunkstore.ID) bool { return x == id("l") || x == id("b2") }
	plan := Hoard([]Image{c, b, a}, held, 40)
	// a: k(plan) l(held) a1(plan) = 30; b: b1(plan) = 40, b2 held but over.
	want := []ImagePlan{
		{Manifest: id("a"), Boots: 5, Chunks: 3, WorkingSetBytes: 30, HeldBytes: 10, PlannedBytes: 20, Complete: true},
		{Manifest: id("b"), Boots: 2, Chunks: 4, WorkingSetBytes: 40, HeldBytes: 20, PlannedBytes: 20, Complete: true},
		{Manifest: id("c"), Boots: 2, Chunks: 1, WorkingSetBytes: 10},
	}
	if id("b").String() > id("c").String() {
		want[1], want[2] = want[2], want[1]
		want[1].PlannedBytes, want[1].Complete = 10, true // c1 now fits
		want[2].PlannedBytes, want[2].Complete = 10, false
	}
	if fmt.Sprint(plan.Images) != fmt.Sprint(want) {
		t.Fatalf("accounting\n got %+v\nwant %+v", plan.Images, want)
	}
	if plan.HeldBytes+plan.Bytes > 40 || fmt.Sprint(plan.Held) != fmt.Sprint([]chunkstore.ID{id("l")}) {
		t.Fatalf("plan %+v", plan)
	}
}

// TestHoardProperties: over random inputs the hoard (held chunks it counts
// plus chunks to fetch) never exceeds the budget, never repeats a chunk, never
// fetches a held one, accounts every image consistently, and is the same
// plan for the same snapshot in any input order.
func TestHoardProperties(t *testing.T) {
	t.Parallel()
	r := rand.New(rand.NewPCG(1, 2))
	for trial := 0; trial < 500; trial++ {
		var images []Image
		size := map[chunkstore.ID]int64{}
		for i := 0; i < 1+r.IntN(8); i++ {
			img := Image{Manifest: id(fmt.Sprint("img", trial, i)), Boots: r.IntN(5)}
			for j := 0; j < r.IntN(30); j++ {
				c := id(fmt.Sprint("c", r.IntN(60)))
				if _, ok := size[c]; !ok {
					size[c] = int64(1 + r.IntN(100))
				}
				stored := int64(0)
				if r.IntN(2) == 0 {
					stored = 1 + size[c]/2
				}
				img.WorkingSet = append(img.WorkingSet, Chunk{ID: c, Size: size[c], Stored: stored})
			}
			images = append(images, img)
		}
		held := map[chunkstore.ID]bool{}
		for j := 0; j < 15; j++ {
			held[id(fmt.Sprint("c", r.IntN(60)))] = true
		}
		have := func(c chunkstore.ID) bool { return held[c] }
		budget := int64(r.IntN(2000))
		plan := Hoard(images, have, budget)
		if plan.Bytes+plan.HeldBytes > budget {
			t.Fatalf("trial %d: hoard of %d+%d bytes over budget %d", trial, plan.Bytes, plan.HeldBytes, budget)
		}
		in := map[chunkstore.ID]bool{}
		for _, c := range plan.Chunks {
			if in[c] || held[c] {
				t.Fatalf("trial %d: chunk repeated or already held", trial)
			}
			in[c] = true
		}
		for _, c := range plan.Held {
			if in[c] || !held[c] {
				t.Fatalf("trial %d: held chunk repeated or not held", trial)
			}
			in[c] = true
		}
		for k, ip := range plan.Images {
			var img Image
			for _, i := range images {
				if i.Manifest == ip.Manifest {
					img = i
				}
			}
			if k > 0 && plan.Images[k-1].Boots < ip.Boots {
				t.Fatalf("trial %d: image %d booted more than the one before it", trial, k)
			}
			var total, local, planned int64
			seen := map[chunkstore.ID]bool{}
			for _, c := range img.WorkingSet {
				if seen[c.ID] {
					continue
				}
				seen[c.ID] = true
				total += c.Size
				switch {
				case held[c.ID]:
					local += c.Size
				case in[c.ID]:
					planned += c.Size
				}
			}
			if ip.WorkingSetBytes != total || ip.HeldBytes != local || ip.PlannedBytes != planned || ip.Complete != (local+planned == total) {
				t.Fatalf("trial %d: accounting %+v, want %d/%d/%d", trial, ip, total, local, planned)
			}
		}
		shuffled := slices.Clone(images)
		r.Shuffle(len(shuffled), func(i, j int) { shuffled[i], shuffled[j] = shuffled[j], shuffled[i] })
		again := Hoard(shuffled, have, budget)
		if fmt.Sprint(again) != fmt.Sprint(plan) {
			t.Fatalf("trial %d: not deterministic", trial)
		}
	}
}

// TestHoardLinear: a large snapshot plans quickly (the plan is linear in the
// working-set chunks).
func TestHoardLinear(t *testing.T) {
	t.Parallel()
	var images []Image
	for i := range 200 {
		img := Image{Manifest: id(fmt.Sprint("big", i)), Boots: i % 7}
		for j := range 2000 {
			img.WorkingSet = append(img.WorkingSet, Chunk{ID: id(fmt.Sprint("bc", (i%4)*1500+j)), Size: 65536, Stored: 30000})
		}
		images = append(images, img)
	}
	start := time.Now()
	plan := Hoard(images, func(chunkstore.ID) bool { return false }, 1<<40)
	if d := time.Since(start); d > 10*time.Second {
		t.Fatalf("planning 400,000 working-set chunks took %s", d)
	}
	if len(plan.Chunks) != 4*1500+500 {
		t.Fatalf("plan has %d chunks, want the %d distinct ones", len(plan.Chunks), 4*1500+500)
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
	nodes := []NodeState{
		{Name: "cold", Has: holds(), FreeSlots: 16, Slots: 16},
		{Name: "warm", Has: holds("k", "l", "m"), FreeSlots: 1, Slots: 16},
		{Name: "full", Has: holds("k", "l", "m", "n"), FreeSlots: 0, Slots: 16},
		{Name: "warm2", Has: holds("k", "l", "n"), FreeSlots: 14, Slots: 16},
		{Name: "hot", Has: holds("k", "l", "m", "n"), FreeSlots: 10, Slots: 16},
	}
	for _, tc := range []struct {
		name string
		w    PlaceWeights
		want []string
	}{
		// working set only: the most held first, then free slots
		{"working set", PlaceWeights{WorkingSet: 1}, []string{"hot", "warm2", "warm", "cold"}},
		// load only: the freest first
		{"load", PlaceWeights{Load: 1}, []string{"cold", "warm2", "hot", "warm"}},
		// defaults: a warm node lightly loaded beats an idle cold one; a
		// node holding all but 6/16 loaded does not
		{"defaults", DefaultPlaceWeights, []string{"warm2", "cold", "hot", "warm"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			got := PlaceWeighted(img, nodes, tc.w)
			if len(got) != len(tc.want) {
				t.Fatalf("placements %+v", got)
			}
			for i, w := range tc.want {
				if got[i].Node != w {
					t.Fatalf("rank %d is %s, want %s (%+v)", i, got[i].Node, w, got)
				}
				if got[i].Score < 0 || got[i].Score > 1 || got[i].Reason() == "" {
					t.Fatalf("placement %+v: want a score in [0, 1] and a reason", got[i])
				}
				if i > 0 && got[i].Score > got[i-1].Score {
					t.Fatalf("rank %d scores more than rank %d: %+v", i, i-1, got)
				}
			}
		})
	}
	got := Place(img, nodes)
	byName := map[string]Placement{}
	for _, p := range got {
		byName[p.Node] = p
	}
	if w := byName["warm"]; w.Cached != 0.75 || w.MissBytes != 10 || w.Load != 15.0/16 || !strings.Contains(w.Reason(), "75%") {
		t.Fatalf("warm %+v", w)
	}
	if c := byName["cold"]; c.MissBytes != 40 || c.Score != DefaultPlaceWeights.Load/(DefaultPlaceWeights.WorkingSet+DefaultPlaceWeights.Image+DefaultPlaceWeights.Load) {
		t.Fatalf("cold %+v", c)
	}
	// HeldBytes answers in bulk what Has answers per chunk.
	bulk := make([]NodeState, len(nodes))
	for i, n := range nodes {
		bulk[i] = n
		has := n.Has
		bulk[i].Has = nil
		bulk[i].HeldBytes = func(cs []Chunk) (b int64) {
			for _, c := range cs {
				if has(c.ID) {
					b += c.Size
				}
			}
			return b
		}
	}
	if b := Place(img, bulk); !reflect.DeepEqual(b, got) {
		t.Fatalf("with HeldBytes %+v, with Has %+v", b, got)
	}
	// The whole image's share counts when its chunks are known.
	whole := img
	whole.Chunks = append(ws("k", "l", "m", "n"), ws("d1", "d2", "d3", "d4")...)
	ps := PlaceWeighted(whole, []NodeState{
		{Name: "a", Has: holds("k", "l"), FreeSlots: 4, Slots: 4},
		{Name: "b", Has: holds("k", "l", "d1", "d2", "d3"), FreeSlots: 4, Slots: 4},
	}, PlaceWeights{WorkingSet: 1, Image: 1})
	if ps[0].Node != "b" || ps[0].ImageCached != 5.0/8 || ps[1].ImageCached != 2.0/8 {
		t.Fatalf("placements %+v: want b first, holding 5/8 of the image", ps)
	}
}
