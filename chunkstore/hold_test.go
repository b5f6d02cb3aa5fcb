package chunkstore

import (
	"errors"
	"math/rand/v2"
	"testing"
)

// A chunk a batch found already stored (a dedup hit) is held from eviction
// until the batch commits and pins it, so a commit never reports an image
// complete while one of its chunks was evicted meanwhile; one that something
// else deleted meanwhile makes the commit fail. Abort releases the hold.
func TestBatchHoldsDedupHits(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	s := openT(t, t.TempDir(), WithQuota(1<<20), WithWatermarks(0.9, 0.5))
	r := rand.New(rand.NewPCG(21, 22))
	old := putRandom(t, s, r, 2, 32<<10) // the least recently used chunks
	b := s.NewBatch("image:x")
	for _, id := range old {
		if n, err := b.Put(ctx, id, mustGet(t, s, id)); err != nil || n != 0 {
			t.Fatalf("put of a stored chunk: %d, %v", n, err)
		}
	}
	// Enough new data to evict everything that is not pinned or held.
	for range 12 {
		putRandom(t, s, r, 4, 32<<10)
	}
	if _, err := s.Evict(ctx, 1<<30); err != nil {
		t.Fatal(err)
	}
	for _, id := range old {
		if ok, _ := s.Has(ctx, id); !ok {
			t.Fatal("a dedup hit of an open batch was evicted")
		}
	}
	if err := b.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	for _, id := range old {
		if pinned, _ := s.Pinned(ctx, id); !pinned {
			t.Fatal("commit did not pin its dedup hit")
		}
	}

	// Deleted (by GC, say) between Put and Commit: the commit fails.
	x := putRandom(t, s, r, 1, 16<<10)[0]
	data := mustGet(t, s, x)
	b = s.NewBatch("image:y")
	if _, err := b.Put(ctx, x, data); err != nil {
		t.Fatal(err)
	}
	if err := s.Delete(ctx, x); err != nil {
		t.Fatal(err)
	}
	if err := b.Commit(ctx); !errors.Is(err, errVanished) {
		t.Fatalf("commit of a batch whose dedup hit was deleted: %v, want an error", err)
	}
	if pinned, _ := s.Pinned(ctx, x); pinned {
		t.Fatal("a failed commit pinned a chunk")
	}

	// Abort releases the hold: the chunk is evictable again.
	y := putRandom(t, s, r, 1, 16<<10)[0]
	b = s.NewBatch("image:z")
	if _, err := b.Put(ctx, y, mustGet(t, s, y)); err != nil {
		t.Fatal(err)
	}
	b.Abort()
	if _, err := s.Evict(ctx, 1<<30); err != nil {
		t.Fatal(err)
	}
	if ok, _ := s.Has(ctx, y); ok {
		t.Fatal("an aborted batch still holds its dedup hit")
	}
	if len(s.holds) != 0 {
		t.Fatalf("holds left after every batch ended: %v", s.holds)
	}
}

func mustGet(t *testing.T, s *Store, id ID) []byte {
	t.Helper()
	b, err := s.Get(t.Context(), id)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
