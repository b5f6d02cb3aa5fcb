package chunkstore

import (
	"iter"
	"math/rand/v2"
	"slices"
	"sync"
	"testing"
)

// forgetPolicy is LRU that records what the store makes it forget and what it
// chose to evict.
type forgetPolicy struct {
	mu        sync.Mutex
	forgotten []ID
	victims   []ID
}

func (p *forgetPolicy) Victims(need int64, candidates iter.Seq[Candidate]) []ID {
	ids := LRU{}.Victims(need, candidates)
	p.mu.Lock()
	p.victims = append(p.victims, ids...)
	p.mu.Unlock()
	return ids
}

func (p *forgetPolicy) Forget(id ID) {
	p.mu.Lock()
	p.forgotten = append(p.forgotten, id)
	p.mu.Unlock()
}

// take returns and clears what was forgotten and evicted.
func (p *forgetPolicy) take() (forgotten, victims []ID) {
	p.mu.Lock()
	defer p.mu.Unlock()
	forgotten, victims = p.forgotten, p.victims
	p.forgotten, p.victims = nil, nil
	return forgotten, victims
}

// TestForgetterToldOfRemovals: a policy that implements Forgetter hears of
// every chunk Delete, RemoveName and GC remove (once each, not of chunks that
// were not stored or that stay), and not of the chunks it evicted itself.
func TestForgetterToldOfRemovals(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	p := &forgetPolicy{}
	s := openT(t, t.TempDir(), WithQuota(100_000), WithWatermarks(0.9, 0.5), WithEvictionPolicy(p), WithSync(false))
	r := rand.New(rand.NewPCG(11, 12))
	put := func(n int) ID {
		t.Helper()
		d := make([]byte, n)
		fillRandom(r, d)
		id := Sum(d)
		if err := s.Put(ctx, id, d); err != nil {
			t.Fatal(err)
		}
		return id
	}
	want := func(step string, ids ...ID) {
		t.Helper()
		got, victims := p.take()
		if len(victims) != 0 {
			t.Fatalf("%s: evicted %d chunks; the test expects no eviction here", step, len(victims))
		}
		sortIDs(got)
		sortIDs(ids)
		if !slices.Equal(got, ids) {
			t.Fatalf("%s: forgot %v, want %v", step, got, ids)
		}
	}

	// Delete: each stored chunk once, a repeated or absent one not at all.
	a, b := put(1000), put(1000)
	absent := Sum([]byte("never stored"))
	if err := s.Delete(ctx, a, a, absent); err != nil {
		t.Fatal(err)
	}
	want("delete", a)

	// RemoveName: the image's own chunk, not the one another image shares.
	shared, own := put(1000), put(1000)
	mk := func(name string, ids ...ID) {
		t.Helper()
		mb := NewBuilder(DefaultCDC, FormatRaw, Source{Kind: "file", Location: "/x"})
		for _, id := range ids {
			mb.Add(1000, id, false)
		}
		if _, err := s.PutNamedManifest(ctx, name, mb.Manifest()); err != nil {
			t.Fatal(err)
		}
	}
	mk("one", shared, own)
	mk("two", shared, b)
	if _, err := s.RemoveName(ctx, "one"); err != nil {
		t.Fatal(err)
	}
	want("remove name", own)

	// GC: the unreferenced chunk only.
	loose := put(1000)
	if res, err := s.GC(ctx); err != nil || res.Chunks != 1 {
		t.Fatalf("gc: %+v, %v; want 1 chunk removed", res, err)
	}
	want("gc", loose)

	// Eviction: the policy's own victims are not forgotten.
	for range 12 {
		put(10_000)
	}
	forgotten, victims := p.take()
	if len(victims) == 0 {
		t.Fatal("no eviction under a 100 kB quota after 120 kB of puts")
	}
	if len(forgotten) != 0 {
		t.Fatalf("forgot %d chunks the policy evicted itself", len(forgotten))
	}
}

func sortIDs(ids []ID) {
	slices.SortFunc(ids, func(x, y ID) int { return slices.Compare(x.digest[:], y.digest[:]) })
}
