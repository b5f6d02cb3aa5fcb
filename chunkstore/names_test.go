package chunkstore

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"
)

// testManifest stores chunks and returns a manifest of them (not stored).
func testManifest(t *testing.T, s *Store, loc string, chunks ...[]byte) *Manifest {
	t.Helper()
	b := NewBuilder(DefaultCDC, FormatRaw, Source{Kind: "file", Location: loc})
	batch := s.NewBatch("")
	for _, d := range chunks {
		if _, err := batch.Put(t.Context(), Sum(d), d); err != nil {
			t.Fatal(err)
		}
		b.Add(int64(len(d)), Sum(d), false)
	}
	if err := batch.Commit(t.Context()); err != nil {
		t.Fatal(err)
	}
	return b.Manifest()
}

// TestSetNameConflict: concurrent adds under one name all "succeeded" and
// the last one won. Now exactly one SetName wins; the others get ErrExists
// and the name keeps pointing at the winner.
func TestSetNameConflict(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	s := openT(t, t.TempDir())
	r := rand.New(rand.NewPCG(1, 9))
	const n = 8
	ids := make([]ID, n)
	for i := range ids {
		id, err := s.PutManifest(ctx, testManifest(t, s, fmt.Sprint("/img", i), randChunk(r, 2000)))
		if err != nil {
			t.Fatal(err)
		}
		ids[i] = id
	}
	var wg sync.WaitGroup
	errs := make([]error, n)
	for i := range ids {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = s.SetName(ctx, "img", ids[i])
		}()
	}
	wg.Wait()
	winner := -1
	for i, err := range errs {
		switch {
		case err == nil:
			if winner >= 0 {
				t.Fatalf("two SetName calls for one name both succeeded (%d and %d)", winner, i)
			}
			winner = i
		case !errors.Is(err, ErrExists):
			t.Fatalf("SetName %d: %v, want ErrExists", i, err)
		}
	}
	if winner < 0 {
		t.Fatal("no SetName succeeded")
	}
	if got, err := s.Resolve(ctx, "img"); err != nil || got != ids[winner] {
		t.Fatalf("name points at %s (%v), want the winner %s", got, err, ids[winner])
	}
	if err := s.SetName(ctx, "img", ids[winner]); err != nil {
		t.Fatalf("setting a name to its own manifest again: %v", err)
	}
	if err := s.SetName(ctx, "other", Sum([]byte("not a manifest"))); !errors.Is(err, ErrNotFound) {
		t.Fatalf("naming a manifest that is not stored: %v, want ErrNotFound", err)
	}
}

// TestPutNamedManifestAtomic: concurrent adds of different images under one
// name: one wins, the others get ErrExists, and no orphan manifest stays
// (before, each add stored its manifest, then set the name).
func TestPutNamedManifestAtomic(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	s := openT(t, t.TempDir())
	r := rand.New(rand.NewPCG(2, 9))
	const n = 8
	ms := make([]*Manifest, n)
	for i := range ms {
		ms[i] = testManifest(t, s, fmt.Sprint("/img", i), randChunk(r, 2000))
	}
	var wg sync.WaitGroup
	errs := make([]error, n)
	ids := make([]ID, n)
	for i := range ms {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ids[i], errs[i] = s.PutNamedManifest(ctx, "img", ms[i])
		}()
	}
	wg.Wait()
	won := 0
	for i, err := range errs {
		if err == nil {
			won++
			if got, _ := s.Resolve(ctx, "img"); got != ids[i] {
				t.Fatalf("the name points at %s, not at the add that succeeded (%s)", got, ids[i])
			}
		} else if !errors.Is(err, ErrExists) {
			t.Fatalf("add %d: %v, want ErrExists", i, err)
		}
	}
	if won != 1 {
		t.Fatalf("%d adds succeeded, want 1", won)
	}
	if all, _ := s.Manifests(ctx); len(all) != 1 {
		t.Fatalf("%d manifests stored, want 1 (no orphans)", len(all))
	}
	for _, m := range ms {
		for _, c := range m.ChunkIDs() {
			if ref, _ := s.Referenced(ctx, c); ref != won1(errs, ids, m.ID()) {
				t.Fatalf("chunk %s: referenced=%v, want it only for the winner", c, ref)
			}
		}
	}
}

func won1(errs []error, ids []ID, id ID) bool {
	for i, err := range errs {
		if err == nil && ids[i] == id {
			return true
		}
	}
	return false
}

// TestRemoveNameKeepsSharedChunks races removing an image against adding
// another one that shares a chunk with it (pin, then manifest). Removing
// decided what was garbage without the lock, then deleted it ignoring refs
// and pins: a chunk the new image had pinned and referenced, and had seen
// stored, could vanish afterwards. Now once the adder has seen the chunk
// stored after its pin and manifest, it stays; and the removed image's own
// chunk goes.
func TestRemoveNameKeepsSharedChunks(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	s := openT(t, t.TempDir())
	r := rand.New(rand.NewPCG(3, 9))
	kept := 0
	for round := range 200 {
		own := randChunk(r, 2000)
		shared := make([][]byte, 30)
		for i := range shared {
			shared[i] = randChunk(r, 1000)
		}
		a := testManifest(t, s, fmt.Sprint("/a", round), append([][]byte{own}, shared...)...)
		if _, err := s.PutNamedManifest(ctx, "a", a); err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		var rmErr, addErr error
		var res Removed
		var seen bool
		start := make(chan struct{})
		wg.Add(2)
		go func() {
			defer wg.Done()
			<-start
			res, rmErr = s.RemoveName(ctx, "a")
		}()
		go func() {
			defer wg.Done()
			<-start
			seen, addErr = addImage(ctx, s, fmt.Sprint("b", round), fmt.Sprint("/b", round), shared...)
		}()
		close(start)
		wg.Wait()
		if rmErr != nil || addErr != nil {
			t.Fatalf("round %d: remove: %v, add: %v", round, rmErr, addErr)
		}
		if !res.ManifestRemoved {
			t.Fatalf("round %d: manifest of a not removed", round)
		}
		for _, d := range shared {
			if ok, _ := s.Has(ctx, Sum(d)); seen && !ok {
				t.Fatalf("round %d: a chunk the new image pinned, referenced and saw stored was deleted by the removal", round)
			} else if ok {
				kept++
			}
		}
		if ok, _ := s.Has(ctx, Sum(own)); ok {
			t.Fatalf("round %d: the removed image's own chunk stayed", round)
		}
		if _, err := s.Resolve(ctx, "a"); !errors.Is(err, ErrNotFound) {
			t.Fatalf("round %d: name still resolves: %v", round, err)
		}
	}
	t.Logf("%d of %d shared chunks kept", kept, 200*30)
}

// addImage registers an image of stored chunks as the node does: pin them
// for the image, store the named manifest; it reports whether every chunk was
// stored once both were done.
func addImage(ctx context.Context, s *Store, name, loc string, chunks ...[]byte) (bool, error) {
	mb := NewBuilder(DefaultCDC, FormatRaw, Source{Kind: "file", Location: loc})
	for _, d := range chunks {
		mb.Add(int64(len(d)), Sum(d), false)
	}
	m := mb.Manifest()
	if err := s.Pin(ctx, PinOwnerImage(m.ID()), m.ChunkIDs()); err != nil {
		return false, err
	}
	if _, err := s.PutNamedManifest(ctx, name, m); err != nil {
		return false, err
	}
	for _, c := range m.ChunkIDs() {
		if ok, err := s.Has(ctx, c); err != nil || !ok {
			return false, err
		}
	}
	return true, nil
}

// TestRemoveNameSharedManifest: a manifest under two names stays until the
// last name goes; a manifest CID removes the manifest without a name.
func TestRemoveNameSharedManifest(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	s := openT(t, t.TempDir())
	d := randChunk(rand.New(rand.NewPCG(4, 9)), 2000)
	m := testManifest(t, s, "/x", d)
	id, err := s.PutNamedManifest(ctx, "x", m)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.SetName(ctx, "y", id); err != nil {
		t.Fatal(err)
	}
	res, err := s.RemoveName(ctx, "x")
	if err != nil || res.ManifestRemoved || res.Chunks != 0 {
		t.Fatalf("removing one of two names: %+v, %v", res, err)
	}
	if _, err := s.RemoveName(ctx, "x"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("removing a removed name: %v, want ErrNotFound", err)
	}
	res, err = s.RemoveName(ctx, "y")
	if err != nil || !res.ManifestRemoved || res.Chunks != 1 || res.StoredBytes == 0 {
		t.Fatalf("removing the last name: %+v, %v", res, err)
	}
	id2, err := s.PutManifest(ctx, testManifest(t, s, "/z", d))
	if err != nil {
		t.Fatal(err)
	}
	if res, err := s.RemoveName(ctx, id2.String()); err != nil || !res.ManifestRemoved || res.Chunks != 1 {
		t.Fatalf("removing by manifest CID: %+v, %v", res, err)
	}
}
