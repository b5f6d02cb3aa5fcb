package chunkstore

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
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

// Two batches that both wrote a new chunk commit at once, and the first to
// claim it fails: the second must index its own copy (it used to skip the
// chunk as "being indexed by another batch" and report success without it).
func TestConcurrentCommitsOfOneChunkWhenOneFails(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	s := openT(t, t.TempDir())
	d := make([]byte, 16<<10)
	fillRandom(rand.New(rand.NewPCG(31, 32)), d)
	id := Sum(d)
	a, b := s.NewBatch("image:a"), s.NewBatch("image:b")
	for _, x := range []*Batch{a, b} {
		if n, err := x.Put(ctx, id, d); err != nil || n == 0 {
			t.Fatalf("put of a new chunk: %d, %v", n, err)
		}
	}
	bWaiting := make(chan struct{}, 1)
	s.packs.faults.claimWait = func([32]byte) {
		select {
		case bWaiting <- struct{}{}:
		default:
		}
	}
	bDone := make(chan error, 1)
	var calls atomic.Int32
	s.packs.faults.commit = func() error {
		if calls.Add(1) != 1 {
			return nil
		}
		// a is about to write the index: commit b now, then fail a.
		go func() { bDone <- b.Commit(ctx) }()
		select {
		case <-bWaiting:
		case err := <-bDone:
			bDone <- err
		case <-time.After(10 * time.Second):
			t.Error("b's commit neither waited for a's nor finished")
		}
		return syscall.EIO
	}
	if err := a.Commit(ctx); !errors.Is(err, syscall.EIO) {
		t.Fatalf("a's commit: %v, want the injected EIO", err)
	}
	select {
	case err := <-bDone:
		if err != nil {
			t.Fatalf("b's commit: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("b's commit never ended")
	}
	if got, err := s.Get(ctx, id); err != nil || !bytes.Equal(got, d) {
		t.Fatalf("b committed but its chunk is not stored: %v", err)
	}
	if pinned, _ := s.Pinned(ctx, id); !pinned {
		t.Fatal("b's chunk is not pinned")
	}
	assertAccounting(t, s)
}
