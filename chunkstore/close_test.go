package chunkstore

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sort"
	"sync"
	"testing"
	"time"
)

// closeFixture is what the calls of storeCalls work on.
type closeFixture struct {
	chunk    ID
	data     []byte
	stored   Stored
	manifest *Manifest
	mid      ID
}

func newCloseFixture(t *testing.T, s *Store) closeFixture {
	t.Helper()
	ctx := t.Context()
	d := randChunk(rand.New(rand.NewPCG(7, 7)), 5000)
	id := Sum(d)
	if err := s.Put(ctx, id, d); err != nil {
		t.Fatal(err)
	}
	st, err := s.GetStored(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	b := NewBuilder(DefaultCDC, FormatRaw, Source{Kind: "file", Location: "/x"})
	b.Add(int64(len(d)), id, false)
	m := b.Manifest()
	mid, err := s.PutNamedManifest(ctx, "img", m)
	if err != nil {
		t.Fatal(err)
	}
	return closeFixture{chunk: id, data: d, stored: st, manifest: m, mid: mid}
}

// storeCalls returns every exported call of Store and Batch that can fail,
// by name. All of them register with Close (enter), so they may race it.
func storeCalls(s *Store, f closeFixture) map[string]func(ctx context.Context) error {
	other := randChunk(rand.New(rand.NewPCG(8, 8)), 3000)
	return map[string]func(ctx context.Context) error{
		"Has":       func(ctx context.Context) error { _, err := s.Has(ctx, f.chunk); return err },
		"Get":       func(ctx context.Context) error { _, err := s.Get(ctx, f.chunk); return err },
		"GetStored": func(ctx context.Context) error { _, err := s.GetStored(ctx, f.chunk); return err },
		"Put":       func(ctx context.Context) error { return s.Put(ctx, Sum(other), other) },
		"PutStored": func(ctx context.Context) error { return s.PutStored(ctx, f.chunk, f.stored) },
		"Batch.Put": func(ctx context.Context) error {
			b := s.NewBatch("")
			defer b.Abort()
			_, err := b.Put(ctx, Sum(other), other)
			return err
		},
		"Batch.Add": func(ctx context.Context) error {
			b := s.NewBatch("")
			defer b.Abort()
			_, _, err := b.Add(ctx, other)
			return err
		},
		"Batch.PutHashed": func(ctx context.Context) error {
			b := s.NewBatch("")
			defer b.Abort()
			_, err := b.PutHashed(ctx, Sum(other), other)
			return err
		},
		"Batch.Commit": func(ctx context.Context) error {
			b := s.NewBatch("import:c")
			if _, err := b.Put(ctx, f.chunk, f.data); err != nil {
				b.Abort()
				return err
			}
			return b.Commit(ctx)
		},
		"Delete":           func(ctx context.Context) error { return s.Delete(ctx, Sum(other)) },
		"Evict":            func(ctx context.Context) error { _, err := s.Evict(ctx, 1); return err },
		"Compact":          func(ctx context.Context) error { _, err := s.Compact(ctx); return err },
		"GC":               func(ctx context.Context) error { _, err := s.GC(ctx); return err },
		"Verify":           func(ctx context.Context) error { _, err := s.Verify(ctx, nil); return err },
		"Pin":              func(ctx context.Context) error { return s.Pin(ctx, "o", []ID{f.chunk}) },
		"Unpin":            func(ctx context.Context) error { return s.Unpin(ctx, "o") },
		"Pinned":           func(ctx context.Context) error { _, err := s.Pinned(ctx, f.chunk); return err },
		"Referenced":       func(ctx context.Context) error { _, err := s.Referenced(ctx, f.chunk); return err },
		"PutManifest":      func(ctx context.Context) error { _, err := s.PutManifest(ctx, f.manifest); return err },
		"PutNamedManifest": func(ctx context.Context) error { _, err := s.PutNamedManifest(ctx, "img", f.manifest); return err },
		"GetManifest":      func(ctx context.Context) error { _, err := s.GetManifest(ctx, f.mid); return err },
		"GetManifestBytes": func(ctx context.Context) error { _, err := s.GetManifestBytes(ctx, f.mid); return err },
		"Manifests":        func(ctx context.Context) error { _, err := s.Manifests(ctx); return err },
		"RemoveManifest":   func(ctx context.Context) error { return s.RemoveManifest(ctx, Sum(other)) },
		"RemoveName":       func(ctx context.Context) error { _, err := s.RemoveName(ctx, "nosuch"); return err },
		"SetName":          func(ctx context.Context) error { return s.SetName(ctx, "img2", f.mid) },
		"DeleteName":       func(ctx context.Context) error { return s.DeleteName(ctx, "img2") },
		"Resolve":          func(ctx context.Context) error { _, err := s.Resolve(ctx, "img"); return err },
		"Names":            func(ctx context.Context) error { _, err := s.Names(ctx); return err },
		"PutProfile": func(ctx context.Context) error {
			return s.PutProfile(ctx, f.mid, &Profile{})
		},
		"GetProfile": func(ctx context.Context) error { _, err := s.GetProfile(ctx, f.mid, 10); return err },
		"Stats":      func(ctx context.Context) error { _, err := s.Stats(ctx); return err },
	}
}

func safeCall(f func() error) (err error, panicked any) {
	defer func() { panicked = recover() }()
	return f(), nil
}

// TestEveryCallAfterClose: every exported call after Close fails with
// ErrClosed; none panics (before: Unpin panicked with "pebble: closed", as in
// the daemon when an import outlived the store).
func TestEveryCallAfterClose(t *testing.T) {
	t.Parallel()
	s, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	f := newCloseFixture(t, s)
	calls := storeCalls(s, f)
	// Batches begun before Close, committed after: one with a new chunk,
	// one with only a pin of a stored chunk (no pack write).
	other := randChunk(rand.New(rand.NewPCG(9, 9)), 4000)
	b1 := s.NewBatch("")
	if _, err := b1.Put(t.Context(), Sum(other), other); err != nil {
		t.Fatal(err)
	}
	b2 := s.NewBatch("import:x")
	if _, err := b2.Put(t.Context(), f.chunk, f.data); err != nil {
		t.Fatal(err)
	}
	calls["Batch.Commit (begun before Close)"] = func(ctx context.Context) error { return b1.Commit(ctx) }
	calls["Batch.Commit (pin only, begun before Close)"] = func(ctx context.Context) error { return b2.Commit(ctx) }
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("second close: %v", err)
	}
	names := make([]string, 0, len(calls))
	for n := range calls {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		err, p := safeCall(func() error { return calls[n](t.Context()) })
		if p != nil {
			t.Errorf("%s after Close panicked: %v", n, p)
			continue
		}
		if !errors.Is(err, ErrClosed) {
			t.Errorf("%s after Close: %v, want ErrClosed", n, err)
		}
	}
	_ = s.Usage()
	_, _ = s.Decode(f.stored)
}

// TestCallsRacingClose runs every call in a loop while Close runs (under
// -race in CI): no panic, no hang, and every error is ErrClosed (or one the
// calls give each other: a chunk another deleted). Before, the calls of
// read.go, batch.go, evict.go and compact.go only checked that the store was
// open when they started, and used the index and packs as Close closed them.
func TestCallsRacingClose(t *testing.T) {
	t.Parallel()
	for round := range 5 {
		t.Run(fmt.Sprint(round), func(t *testing.T) {
			s, err := Open(t.TempDir())
			if err != nil {
				t.Fatal(err)
			}
			f := newCloseFixture(t, s)
			calls := storeCalls(s, f)
			var wg sync.WaitGroup
			start := make(chan struct{})
			errs := make(chan error, 1000)
			for n, c := range calls {
				wg.Add(1)
				go func() {
					defer wg.Done()
					<-start
					for {
						err, p := safeCall(func() error { return c(t.Context()) })
						if p != nil {
							errs <- fmt.Errorf("%s racing Close panicked: %v", n, p)
							return
						}
						if errors.Is(err, ErrClosed) {
							return
						}
						if err != nil && !errors.Is(err, ErrNotFound) && !errors.Is(err, ErrExists) && !errors.Is(err, errVanished) {
							errs <- fmt.Errorf("%s racing Close: %w", n, err)
							return
						}
					}
				}()
			}
			close(start)
			within(t, time.Minute, "close racing every call", func() {
				if err := s.Close(); err != nil {
					t.Errorf("close: %v", err)
				}
				wg.Wait()
			})
			close(errs)
			for err := range errs {
				t.Error(err)
			}
		})
	}
}
