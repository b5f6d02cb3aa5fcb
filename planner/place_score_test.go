package planner

import (
	"fmt"
	"math/rand/v2"
	"testing"
)

func hasSet(idx ...int) func(int) bool {
	m := map[int]bool{}
	for _, i := range idx {
		m[i] = true
	}
	return func(i int) bool { return m[i] }
}

// TestPlaceScores: the working-set share ranks first, then the image share,
// then load; unknown hosts come last with 0; scores stay in [0, 1].
func TestPlaceScores(t *testing.T) {
	t.Parallel()
	img := PlaceImage{Sizes: []int64{100, 100, 0, 100, 100, 100}, WorkingSet: []int{0, 1}}
	got := PlaceScores(img, []HostLoad{
		{Name: "empty", Known: true, FreeQuota: 1000},
		{Name: "ws-all", Known: true, Has: hasSet(0, 1), OpenExports: 9, FreeQuota: 0},
		{Name: "ws-half-img-all", Known: true, Has: hasSet(0, 3, 4, 5), FreeQuota: 1000},
		{Name: "ws-half", Known: true, Has: hasSet(1), FreeQuota: 1000},
		{Name: "gone", Known: false, Note: "not live"},
		{Name: "empty-busy", Known: true, OpenExports: 3, FreeQuota: 1000},
	})
	order := []string{"ws-all", "ws-half-img-all", "ws-half", "empty", "empty-busy", "gone"}
	for i, s := range got {
		if s.Host != order[i] {
			t.Fatalf("rank %d: %s, want %s (all: %+v)", i, s.Host, order[i], got)
		}
		if s.Score < 0 || s.Score > 1 {
			t.Errorf("%s: score %v out of [0,1]", s.Host, s.Score)
		}
		if s.Reason == "" {
			t.Errorf("%s: no reason", s.Host)
		}
	}
	if got[0].WorkingSetShare != 1 || got[0].WorkingSetHeld != 200 || got[0].ImageHeld != 200 || got[0].ImageBytes != 500 {
		t.Errorf("ws-all: %+v", got[0])
	}
	if got[5].Score != 0 || got[5].Reason != "not live" {
		t.Errorf("gone: %+v", got[5])
	}
	// Everything held, idle, most free: score 1.
	full := PlaceScores(img, []HostLoad{{Name: "a", Known: true, Has: func(int) bool { return true }, FreeQuota: -1}})
	if full[0].Score != 1 {
		t.Errorf("a host holding all, idle, without quota scores %v, want 1", full[0].Score)
	}
	// Bits give the same answer as Has.
	byBits := PlaceScores(img, []HostLoad{{Name: "b", Known: true, Bits: []byte{0b00011001}}})
	byHas := PlaceScores(img, []HostLoad{{Name: "b", Known: true, Has: hasSet(0, 3, 4)}})
	if byBits[0].Score != byHas[0].Score || byBits[0].ImageHeld != 300 || byBits[0].WorkingSetHeld != 100 {
		t.Errorf("bits %+v, has %+v", byBits[0], byHas[0])
	}
	// No working set known: the image share stands in.
	now := PlaceScores(PlaceImage{Sizes: img.Sizes}, []HostLoad{
		{Name: "few", Known: true, Has: hasSet(0)}, {Name: "many", Known: true, Has: hasSet(0, 1, 3)}})
	if now[0].Host != "many" || now[0].WorkingSetShare != 0.6 {
		t.Errorf("without a working set: %+v", now)
	}
}

// TestPlaceScoresLexicographic: over random hosts, the order is the
// lexicographic order of (working-set percent, image percent, load).
func TestPlaceScoresLexicographic(t *testing.T) {
	t.Parallel()
	r := rand.New(rand.NewPCG(1, 2))
	sizes := make([]int64, 300)
	for i := range sizes {
		sizes[i] = int64(r.IntN(1000))
	}
	ws := r.Perm(300)[:40]
	var hosts []HostLoad
	for h := range 60 {
		held := map[int]bool{}
		for range r.IntN(300) {
			held[r.IntN(300)] = true
		}
		hosts = append(hosts, HostLoad{Name: fmt.Sprint(h), Known: true, Has: func(i int) bool { return held[i] },
			OpenExports: r.IntN(5), FreeQuota: int64(r.IntN(10)) - 1})
	}
	got := PlaceScores(PlaceImage{Sizes: sizes, WorkingSet: ws}, hosts)
	pct := func(x float64) int { return int(x * 100) }
	for i := 1; i < len(got); i++ {
		a, b := got[i-1], got[i]
		ka := [3]float64{float64(pct(a.WorkingSetShare)), float64(pct(a.ImageShare)), a.LoadScore}
		kb := [3]float64{float64(pct(b.WorkingSetShare)), float64(pct(b.ImageShare)), b.LoadScore}
		for j := range 3 {
			if ka[j] != kb[j] {
				if ka[j] < kb[j] {
					t.Fatalf("rank %d %+v before %+v", i, a, b)
				}
				break
			}
		}
	}
}

// BenchmarkPlaceScores100Hosts: 100 hosts, a 2 GiB image of 64 KiB chunks
// (32768 entries) with a 1600-chunk working set.
func BenchmarkPlaceScores100Hosts(b *testing.B) {
	const entries = 32768
	sizes := make([]int64, entries)
	for i := range sizes {
		sizes[i] = 64 << 10
	}
	r := rand.New(rand.NewPCG(3, 4))
	ws := r.Perm(entries)[:1600]
	hosts := make([]HostLoad, 100)
	for h := range hosts {
		bm := make([]byte, entries/8)
		for i := range bm {
			bm[i] = byte(r.Uint32())
		}
		hosts[h] = HostLoad{Name: fmt.Sprint(h), Known: true, Bits: bm, FreeQuota: 1 << 30}
	}
	b.ResetTimer()
	for b.Loop() {
		PlaceScores(PlaceImage{Sizes: sizes, WorkingSet: ws}, hosts)
	}
}
