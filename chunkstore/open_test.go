package chunkstore

import (
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// crashClose closes s as a crash would leave it: the open marker stays.
func crashClose(t *testing.T, s *Store) {
	t.Helper()
	s.mu.Lock()
	s.closing, s.closed = true, true
	s.mu.Unlock()
	s.enc.Close()
	s.dec.Close()
	if err := s.db.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.packs.close(); err != nil {
		t.Fatal(err)
	}
}

// TestStaleImportPinsClearedAtOpen: pins of an import that died with the
// process (kill -9 mid-import) used to stay for ever, so GC freed nothing.
// Open drops every import: pin, and keeps the others.
func TestStaleImportPinsClearedAtOpen(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	for _, crash := range []bool{true, false} {
		dir := t.TempDir()
		s, err := Open(dir)
		if err != nil {
			t.Fatal(err)
		}
		r := rand.New(rand.NewPCG(5, 5))
		a, b := randChunk(r, 3000), randChunk(r, 3000)
		batch := s.NewBatch("import:x")
		for _, d := range [][]byte{a, b} {
			if _, err := batch.Put(ctx, Sum(d), d); err != nil {
				t.Fatal(err)
			}
		}
		if err := batch.Commit(ctx); err != nil {
			t.Fatal(err)
		}
		if err := s.Pin(ctx, "image:keep", []ID{Sum(b)}); err != nil {
			t.Fatal(err)
		}
		if crash {
			crashClose(t, s)
		} else if err := s.Close(); err != nil {
			t.Fatal(err)
		}

		s = openT(t, dir)
		if pinned, err := s.Pinned(ctx, Sum(a)); err != nil || pinned {
			t.Fatalf("crash=%v: chunk pinned only by a dead import is still pinned after open (%v)", crash, err)
		}
		if pinned, err := s.Pinned(ctx, Sum(b)); err != nil || !pinned {
			t.Fatalf("crash=%v: another owner's pin was dropped (%v)", crash, err)
		}
		res, err := s.GC(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if res.Chunks != 1 {
			t.Fatalf("crash=%v: gc freed %d chunks, want 1 (the dead import's)", crash, res.Chunks)
		}
		if ok, _ := s.Has(ctx, Sum(b)); !ok {
			t.Fatalf("crash=%v: gc freed a pinned chunk", crash)
		}
	}
}

// TestFailedOpenKeepsUncleanMarker: an Open that fails after reading the
// marker used to close the store normally, erasing the marker, so the next
// Open skipped recovery.
func TestFailedOpenKeepsUncleanMarker(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	d := randChunk(rand.New(rand.NewPCG(6, 6)), 3000)
	if err := s.Put(t.Context(), Sum(d), d); err != nil {
		t.Fatal(err)
	}
	crashClose(t, s)
	// A pack that cannot be opened makes Open fail after it read the marker.
	bad := filepath.Join(dir, "packs", packName(0xfffffff0))
	if err := os.Mkdir(bad, 0o700); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(dir); err == nil {
		t.Fatal("open with a bad pack succeeded")
	}
	if err := os.Remove(bad); err != nil {
		t.Fatal(err)
	}
	s = openT(t, dir)
	if !s.Unclean() {
		t.Fatal("after a failed open, the store no longer knows the last shutdown was unclean")
	}
	if got, err := s.Get(t.Context(), Sum(d)); err != nil || string(got) != string(d) {
		t.Fatalf("chunk after recovery: %v", err)
	}
}

// TestLostDirectoryFailsWrites: deleting the index (or packs) directory of a
// running store used to let writes "succeed" into unlinked files, all gone
// at restart. Writes now fail loudly, telling the user to restart; reads of
// what is open go on.
func TestLostDirectoryFailsWrites(t *testing.T) {
	t.Parallel()
	for _, sub := range []string{"index", "packs"} {
		t.Run(sub, func(t *testing.T) {
			t.Parallel()
			ctx := t.Context()
			dir := t.TempDir()
			s := openT(t, dir)
			r := rand.New(rand.NewPCG(7, 1))
			d := randChunk(r, 3000)
			if err := s.Put(ctx, Sum(d), d); err != nil {
				t.Fatal(err)
			}
			if err := os.RemoveAll(filepath.Join(dir, sub)); err != nil {
				t.Fatal(err)
			}
			check := func(what string, err error) {
				t.Helper()
				if !errors.Is(err, ErrFailed) || !strings.Contains(err.Error(), "restart") {
					t.Fatalf("%s after %s was deleted: %v, want ErrFailed telling to restart", what, sub, err)
				}
			}
			// The check runs at most every 100 ms: poll for it.
			e := randChunk(r, 3000)
			var err error
			for range 100 {
				if err = s.Put(ctx, Sum(e), e); err != nil {
					break
				}
				sleepBriefly()
			}
			check("put", err)
			_, err = s.PutManifest(ctx, &Manifest{Chunking: DefaultCDC, Format: FormatRaw})
			check("put manifest", err)
			check("pin", s.Pin(ctx, "o", []ID{Sum(d)}))
			if got, err := s.Get(ctx, Sum(d)); err != nil || string(got) != string(d) {
				t.Fatalf("read after %s was deleted: %v", sub, err)
			}
		})
	}
}

func sleepBriefly() { time.Sleep(20 * time.Millisecond) }

// TestRebuildIndexFromPacks: a lost index directory used to cost every chunk
// (an empty index counted the packs as dead bytes). Open now rebuilds the
// chunk records from the packs' entry headers, verifying each entry; a
// corrupt entry is skipped and a torn tail ends a pack's scan.
func TestRebuildIndexFromPacks(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	r := rand.New(rand.NewPCG(8, 1))
	var chunks [][]byte
	b := s.NewBatch("")
	for i := range 50 {
		d := randChunk(r, 1000+r.IntN(20000))
		if i%5 == 0 {
			d = make([]byte, 3000) // incompressible-looking: stored raw
			fillRandom(r, d)
		}
		chunks = append(chunks, d)
		if _, err := b.Put(ctx, Sum(d), d); err != nil {
			t.Fatal(err)
		}
	}
	if err := b.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	// The same chunk twice in the packs (after a delete and a re-put).
	if err := s.Delete(ctx, Sum(chunks[1])); err != nil {
		t.Fatal(err)
	}
	if err := s.Put(ctx, Sum(chunks[1]), chunks[1]); err != nil {
		t.Fatal(err)
	}
	bad := Sum(chunks[7])
	pack, off, _ := entryLoc(t, s, bad)
	want := s.Usage()
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := patchFile(pack, off+packHeaderSize+10, 0xff); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(pack, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.Write([]byte("HP\x01 torn"))
	f.Close()
	if err := os.RemoveAll(filepath.Join(dir, "index")); err != nil {
		t.Fatal(err)
	}

	s = openT(t, dir)
	for i, d := range chunks {
		got, err := s.Get(ctx, Sum(d))
		if Sum(d) == bad {
			if err == nil {
				t.Fatal("a corrupt entry was indexed")
			}
			continue
		}
		if err != nil || string(got) != string(d) {
			t.Fatalf("chunk %d after rebuilding the index: %v", i, err)
		}
	}
	got := s.Usage()
	if got.Chunks != want.Chunks-1 || got.StoredBytes >= want.StoredBytes || got.RawBytes != want.RawBytes-int64(len(chunks[7])) {
		t.Fatalf("usage after rebuild %+v, want %+v less one chunk", got, want)
	}
	if res, err := s.Verify(ctx, nil); err != nil || len(res.Corrupt) != 0 {
		t.Fatalf("verify after rebuild: %+v, %v", res, err)
	}

	// A rebuild interrupted (here: at its very end) carries on at the next
	// Open without counting anything twice.
	if err := s.commitSet(keyRebuild, nil); err != nil {
		t.Fatal(err)
	}
	crashClose(t, s)
	s = openT(t, dir)
	if again := s.Usage(); again.Chunks != got.Chunks || again.StoredBytes != got.StoredBytes || again.RawBytes != got.RawBytes {
		t.Fatalf("usage after a resumed rebuild %+v, want %+v", again, got)
	}
	if _, c, err := s.db.Get(keyRebuild); err == nil {
		c.Close()
		t.Fatal("rebuild marker left after the rebuild finished")
	}
}
