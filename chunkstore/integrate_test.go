package chunkstore

import (
	"errors"
	"log/slog"
	"math/rand/v2"
	"testing"
)

// fatal does what pebble does on a failed WAL write: it calls the logger's
// Fatalf, and the commit that hit it still returns nil.
func fatal(s *Store) { quietLogger{s.h}.Fatalf("pebble: fatal commit error: injected") }

// A fatal index error (pebble's Fatalf, after which its Commit returns nil)
// fails every write that comes after it or runs into it: each index write
// goes through commit, and removals check the store's state first. Before,
// these returned nil and the caller went on as if the write had been made.
func TestFatalIndexErrorFailsEveryWrite(t *testing.T) {
	t.Parallel()
	cases := map[string]func(t *testing.T, s *Store, ids []ID) error{
		"Batch.Commit": func(t *testing.T, s *Store, ids []ID) error {
			s.packs.faults.commit = func() error { fatal(s); return nil } // inside the commit
			d := randChunk(rand.New(rand.NewPCG(1, 1)), 9000)
			return s.Put(t.Context(), Sum(d), d)
		},
		"Compact": func(t *testing.T, s *Store, ids []ID) error {
			s.evictLock.Lock()
			_, err := s.deleteLocked(t.Context(), ids[1:], false) // leaves the pack mostly dead
			s.evictLock.Unlock()
			if err != nil {
				t.Fatal(err)
			}
			s.packs.faults.sync = func(uint32) error { fatal(s); return nil } // after the copies
			_, err = s.Compact(t.Context())
			return err
		},
		"Delete": func(t *testing.T, s *Store, ids []ID) error {
			fatal(s)
			return s.Delete(t.Context(), ids[0])
		},
		"Evict": func(t *testing.T, s *Store, ids []ID) error {
			fatal(s)
			_, err := s.Evict(t.Context(), 1)
			return err
		},
		"dropping a corrupt chunk": func(t *testing.T, s *Store, ids []ID) error {
			if err := patchFile(entryLocOf(t, s, ids[0])); err != nil {
				t.Fatal(err)
			}
			fatal(s)
			_, err := s.Get(t.Context(), ids[0])
			return err
		},
		"Close (access times)": func(t *testing.T, s *Store, ids []ID) error {
			if _, err := s.Get(t.Context(), ids[0]); err != nil {
				t.Fatal(err)
			}
			fatal(s)
			return s.Close()
		},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			s := openT(t, dir, WithLogger(discard()))
			ids := putRandom(t, s, rand.New(rand.NewPCG(2, 2)), 4, 9000)
			if err := c(t, s, ids); !errors.Is(err, ErrFailed) {
				t.Fatalf("%s after a fatal index error: %v, want ErrFailed", name, err)
			}
			if name == "Close (access times)" {
				s2 := openT(t, dir)
				if !s2.Unclean() {
					t.Fatal("a store that failed was closed as if clean")
				}
			}
		})
	}
}

// entryLocOf is entryLoc with a payload byte to flip, as patchFile takes it.
func entryLocOf(t *testing.T, s *Store, id ID) (string, int64, byte) {
	p, off, n := entryLoc(t, s, id)
	return p, off + n - 1, 0xff
}

func discard() *slog.Logger { return slog.New(slog.DiscardHandler) }

// A dedup hit of an open batch (an import that found the chunk stored and
// will pin it on commit) is not garbage: GC running before the commit keeps
// it, and the commit succeeds (before, GC deleted it and the commit failed
// with "retry").
func TestGCKeepsHeldChunks(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	s := openT(t, t.TempDir())
	r := rand.New(rand.NewPCG(3, 3))
	ids := putRandom(t, s, r, 2, 9000) // unreferenced, unpinned: garbage
	b := s.NewBatch("image:x")
	if n, err := b.Put(ctx, ids[0], mustGet(t, s, ids[0])); err != nil || n != 0 {
		t.Fatalf("put of a stored chunk: %d, %v", n, err)
	}
	res, err := s.GC(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if res.Chunks != 1 {
		t.Fatalf("gc deleted %d chunks, want 1 (the one no batch holds)", res.Chunks)
	}
	if err := b.Commit(ctx); err != nil {
		t.Fatalf("commit after gc: %v", err)
	}
	if got, err := s.Get(ctx, ids[0]); err != nil || !ids[0].Verify(got) {
		t.Fatalf("the held chunk after gc and commit: %v", err)
	}
	if pinned, _ := s.Pinned(ctx, ids[0]); !pinned {
		t.Fatal("the commit did not pin its chunk")
	}
	if ok, _ := s.Has(ctx, ids[1]); ok {
		t.Fatal("gc kept a chunk nothing holds")
	}

	// Removing an image keeps its chunks that an open batch holds, too.
	x := putRandom(t, s, r, 1, 9000)[0]
	if _, err := s.PutNamedManifest(ctx, "img", testManifest(t, s, "/img", mustGet(t, s, x))); err != nil {
		t.Fatal(err)
	}
	b = s.NewBatch("image:y")
	if _, err := b.Put(ctx, x, mustGet(t, s, x)); err != nil {
		t.Fatal(err)
	}
	if res, err := s.RemoveName(ctx, "img"); err != nil || res.Chunks != 0 {
		t.Fatalf("remove image: %+v, %v; want its held chunk kept", res, err)
	}
	if err := b.Commit(ctx); err != nil {
		t.Fatalf("commit after the image was removed: %v", err)
	}
	if ok, _ := s.Has(ctx, x); !ok {
		t.Fatal("the held chunk was removed with the image")
	}
}
