package chunkstore

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/klauspost/compress/zstd"
)

// randChunk returns n bytes that compress like real image data: runs of words
// drawn from a small vocabulary, so chunks differ but repeat internally.
func randChunk(r *rand.Rand, n int) []byte {
	words := []string{"kernel ", "module ", "libc.so.6 ", "\x00\x00\x00\x00", "usr/lib/", "ELF ", "python3 ", "#!/bin/sh\n"}
	b := make([]byte, 0, n+16)
	for len(b) < n {
		if r.IntN(8) == 0 {
			b = append(b, byte(r.Uint32()))
			continue
		}
		b = append(b, words[r.IntN(len(words))]...)
	}
	return b[:n]
}

func fillRandom(r *rand.Rand, b []byte) {
	for i := range b {
		b[i] = byte(r.Uint32())
	}
}

// entryLoc returns the pack file, offset and length of a chunk's entry.
func entryLoc(t *testing.T, s *Store, id ID) (string, int64, int64) {
	t.Helper()
	r, ok, err := s.getRecord(id.digest)
	if err != nil || !ok {
		t.Fatalf("no record for %s: %v", id, err)
	}
	return filepath.Join(s.dir, "packs", packName(r.pack)), r.off, r.stored
}

// patchFile XORs the byte at off with x.
func patchFile(p string, off int64, x byte) error {
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	b := make([]byte, 1)
	if _, err := f.ReadAt(b, off); err != nil {
		return err
	}
	b[0] ^= x
	_, err = f.WriteAt(b, off)
	return err
}

func openT(t *testing.T, dir string, opts ...Option) *Store {
	t.Helper()
	s, err := Open(dir, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func TestPutGetDedup(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	s := openT(t, t.TempDir())
	r := rand.New(rand.NewPCG(1, 2))
	a, b := randChunk(r, 70000), make([]byte, 5000)
	fillRandom(r, b) // incompressible: stored raw
	for _, data := range [][]byte{a, b} {
		id := Sum(data)
		if err := s.Put(ctx, id, data); err != nil {
			t.Fatal(err)
		}
		if err := s.Put(ctx, id, data); err != nil { // dedup: second put is a no-op
			t.Fatal(err)
		}
		got, err := s.Get(ctx, id)
		if err != nil || !bytes.Equal(got, data) {
			t.Fatalf("get %s: err %v, equal %v", id, err, bytes.Equal(got, data))
		}
	}
	u := s.Usage()
	if u.Chunks != 2 || u.RawBytes != 75000 {
		t.Fatalf("usage %+v: want 2 chunks, 75000 raw bytes", u)
	}
	if u.StoredBytes >= u.RawBytes {
		t.Fatalf("usage %+v: compressible chunk not compressed", u)
	}
	if err := s.Put(ctx, Sum(a), b); !errors.Is(err, ErrMismatch) {
		t.Fatalf("put with wrong id: %v, want ErrMismatch", err)
	}
	if _, err := s.Get(ctx, Sum([]byte("nope"))); !errors.Is(err, ErrNotFound) {
		t.Fatalf("get missing: %v, want ErrNotFound", err)
	}
}

func TestBatchAdd(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	s := openT(t, t.TempDir())
	r := rand.New(rand.NewPCG(3, 4))
	a := randChunk(r, 70000)
	b := s.NewBatch("")
	id, n, err := b.Add(ctx, a)
	if err != nil || id != Sum(a) || n <= 0 {
		t.Fatalf("add: id %s (want %s), %d bytes, %v", id, Sum(a), n, err)
	}
	if id2, n, err := b.Add(ctx, a); err != nil || id2 != id || n != 0 {
		t.Fatalf("add again in the batch: id %s, %d bytes, %v; want the same id and 0 bytes", id2, n, err)
	}
	if _, _, err := b.Add(ctx, make([]byte, MaxChunkSize+1)); err == nil {
		t.Fatal("oversized chunk added")
	}
	if err := b.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	if got, err := s.Get(ctx, id); err != nil || !bytes.Equal(got, a) {
		t.Fatalf("get %s: %v", id, err)
	}
	if _, n, err := s.NewBatch("").Add(ctx, a); err != nil || n != 0 {
		t.Fatalf("add of a stored chunk: %d bytes, %v; want 0", n, err)
	}
	if _, err := s.NewBatch("").Put(ctx, id, randChunk(r, 100)); !errors.Is(err, ErrMismatch) {
		t.Fatalf("batch put with wrong id: %v, want ErrMismatch", err)
	}
}

func TestCodecs(t *testing.T) {
	t.Parallel()
	r := rand.New(rand.NewPCG(13, 14))
	data := randChunk(r, 100000)
	dir := t.TempDir()
	for _, c := range []string{"s2", "none", "zstd"} {
		s, err := Open(dir, WithCodec(c))
		if err != nil {
			t.Fatal(err)
		}
		d := append([]byte(c), data...)
		if err := s.Put(t.Context(), Sum(d), d); err != nil {
			t.Fatal(err)
		}
		s.Close()
	}
	// Every chunk reads back whatever codec the store now writes.
	s := openT(t, dir, WithCodec("zstd"))
	for _, c := range []string{"s2", "none", "zstd"} {
		d := append([]byte(c), data...)
		got, err := s.Get(t.Context(), Sum(d))
		if err != nil || !bytes.Equal(got, d) {
			t.Fatalf("%s chunk: %v", c, err)
		}
		st, _ := s.GetStored(t.Context(), Sum(d))
		want := map[string]byte{"s2": CodecS2, "none": CodecRaw, "zstd": CodecZstd}[c]
		if st.Codec != want {
			t.Fatalf("%s chunk stored with codec %d", c, st.Codec)
		}
	}
	if _, err := Open(t.TempDir(), WithCodec("lzma")); err == nil {
		t.Fatal("unknown codec accepted")
	}
}

func TestUsageSurvivesReopen(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	r := rand.New(rand.NewPCG(3, 4))
	for i := 0; i < 10; i++ {
		d := randChunk(r, 1000+i)
		if err := s.Put(t.Context(), Sum(d), d); err != nil {
			t.Fatal(err)
		}
	}
	want := s.Usage()
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s2 := openT(t, dir)
	if got := s2.Usage(); got != want {
		t.Fatalf("usage after reopen %+v, want %+v", got, want)
	}
	if s2.Unclean() {
		t.Fatal("clean close reported as unclean")
	}
}

func TestCorruptChunkIsDropped(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	s := openT(t, t.TempDir())
	for _, mangle := range []func(p string, off, n int64) error{
		func(p string, off, n int64) error { // flip a payload byte
			return patchFile(p, off+n-1, 0xff)
		},
		func(p string, off, n int64) error { // flip a header byte
			return patchFile(p, off+5, 0x01)
		},
		func(p string, off, n int64) error { return os.Truncate(p, off+n/2) }, // torn
	} {
		d := randChunk(rand.New(rand.NewPCG(5, uint64(len(s.dir)))), 40000)
		d[0] = byte(rand.IntN(256))
		id := Sum(d)
		if err := s.Put(ctx, id, d); err != nil {
			t.Fatal(err)
		}
		if err := mangle(entryLoc(t, s, id)); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Get(ctx, id); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("get of mangled chunk: %v, want ErrCorrupt", err)
		}
		if ok, _ := s.Has(ctx, id); ok {
			t.Fatal("corrupt chunk still in the store")
		}
		if err := s.Put(ctx, id, d); err != nil { // it can be stored again
			t.Fatal(err)
		}
		if _, err := s.Get(ctx, id); err != nil {
			t.Fatal(err)
		}
		s.Delete(ctx, id)
	}
	if u := s.Usage(); u.Chunks != 0 {
		t.Fatalf("usage %+v after deleting all", u)
	}
}

func TestQuotaEvictsLRUAndHonoursPins(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	r := rand.New(rand.NewPCG(7, 8))
	s := openT(t, t.TempDir(), WithQuota(100_000), WithWatermarks(0.9, 0.5))
	var ids []ID
	put := func() ID {
		d := make([]byte, 10_000)
		fillRandom(r, d) // incompressible: 10 KB stored each
		id := Sum(d)
		if err := s.Put(ctx, id, d); err != nil {
			t.Fatal(err)
		}
		ids = append(ids, id)
		return id
	}
	pinned := put()
	if err := s.Pin(ctx, "image:x", []ID{pinned}); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 7; i++ {
		put()
	}
	// Touch the second chunk so it is the most recently used of the old ones.
	if _, err := s.Get(ctx, ids[1]); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 2; i++ { // the first of these goes past the high watermark
		put()
		if u := s.Usage(); u.DiskBytes > s.Quota() {
			t.Fatalf("usage %d over quota %d", u.StoredBytes, s.Quota())
		}
	}
	if ok, _ := s.Has(ctx, pinned); !ok {
		t.Fatal("pinned chunk was evicted")
	}
	if ok, _ := s.Has(ctx, ids[2]); ok {
		t.Fatal("least recently used chunk survived eviction")
	}
	if ok, _ := s.Has(ctx, ids[1]); !ok {
		t.Fatal("recently used chunk evicted before older ones")
	}
	if ok, _ := s.Has(ctx, ids[len(ids)-1]); !ok {
		t.Fatal("newest chunk evicted")
	}
	// Everything pinned: a put that cannot fit fails with ErrFull.
	if err := s.Pin(ctx, "all", ids); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 20; i++ {
		d := make([]byte, 10_000)
		fillRandom(r, d)
		err := s.Put(ctx, Sum(d), d)
		if errors.Is(err, ErrFull) {
			if ok, _ := s.Has(ctx, Sum(d)); ok {
				t.Fatal("chunk stored although put failed")
			}
			return
		}
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, Sum(d))
		s.Pin(ctx, "all", []ID{Sum(d)})
	}
	t.Fatal("store never reported ErrFull with everything pinned")
}

func TestRefsAndGC(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	s := openT(t, t.TempDir())
	r := rand.New(rand.NewPCG(9, 10))
	shared, onlyA, onlyB := randChunk(r, 3000), randChunk(r, 3001), randChunk(r, 3002)
	for _, d := range [][]byte{shared, onlyA, onlyB} {
		if err := s.Put(ctx, Sum(d), d); err != nil {
			t.Fatal(err)
		}
	}
	mk := func(chunks ...[]byte) ID {
		b := NewBuilder(DefaultCDC, FormatRaw, Source{Kind: "file", Location: "/x"})
		for _, c := range chunks {
			b.Add(int64(len(c)), Sum(c), false)
		}
		id, err := s.PutManifest(ctx, b.Manifest())
		if err != nil {
			t.Fatal(err)
		}
		return id
	}
	a, b := mk(shared, onlyA), mk(shared, onlyB)
	if err := s.RemoveManifest(ctx, a); err != nil {
		t.Fatal(err)
	}
	res, err := s.GC(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if res.Chunks != 1 {
		t.Fatalf("gc removed %d chunks, want 1 (only A's own chunk)", res.Chunks)
	}
	for _, d := range [][]byte{shared, onlyB} {
		if _, err := s.Get(ctx, Sum(d)); err != nil {
			t.Fatalf("chunk of remaining image lost: %v", err)
		}
	}
	if err := s.RemoveManifest(ctx, b); err != nil {
		t.Fatal(err)
	}
	if res, _ := s.GC(ctx); res.Chunks != 2 {
		t.Fatalf("gc removed %d chunks, want 2", res.Chunks)
	}
}

func TestUncommittedEntriesReclaimedAfterUncleanOpen(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	d := []byte("uncommitted chunk")
	id := Sum(d)
	b := s.NewBatch("")
	if _, err := b.Put(t.Context(), id, d); err != nil {
		t.Fatal(err)
	}
	// Simulate a crash: the entry was written, the batch never committed, the
	// store never closed.
	s.db.Close()
	s.packs.close()
	s2 := openT(t, dir)
	if !s2.Unclean() {
		t.Fatal("unclean shutdown not detected")
	}
	if ok, _ := s2.Has(t.Context(), id); ok {
		t.Fatal("uncommitted chunk visible after crash")
	}
	if u := s2.Usage(); u.DiskBytes != 0 {
		t.Fatalf("pack holding only an uncommitted entry kept: %+v", u)
	}
}

func TestCompactionReclaimsDeletedChunks(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	s := openT(t, t.TempDir())
	r := rand.New(rand.NewPCG(11, 12))
	var keep, drop []ID
	// Enough data for several sealed packs.
	for i := 0; i < 60; i++ {
		b := s.NewBatch("")
		for j := 0; j < 10; j++ {
			d := make([]byte, 256<<10)
			fillRandom(r, d)
			if _, err := b.Put(ctx, Sum(d), d); err != nil {
				t.Fatal(err)
			}
			if j%5 == 0 {
				keep = append(keep, Sum(d))
			} else {
				drop = append(drop, Sum(d))
			}
		}
		if err := b.Commit(ctx); err != nil {
			t.Fatal(err)
		}
	}
	before := s.Usage()
	if err := s.Delete(ctx, drop...); err != nil { // Delete compacts
		t.Fatal(err)
	}
	after := s.Usage()
	reclaimed := before.DiskBytes - after.DiskBytes
	// Every pack was 80% dead, the current one included: all are rewritten.
	if reclaimed < before.DiskBytes/2 || after.DiskBytes != after.StoredBytes {
		t.Fatalf("compaction reclaimed %d bytes: disk %d for %d live (before: %+v)", reclaimed, after.DiskBytes, after.StoredBytes, before)
	}
	for _, id := range keep {
		if _, err := s.Get(ctx, id); err != nil {
			t.Fatalf("live chunk lost by compaction: %v", err)
		}
	}
	t.Logf("disk %d -> %d bytes, live %d", before.DiskBytes, after.DiskBytes, after.StoredBytes)
}

func TestVerify(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	s := openT(t, t.TempDir())
	var ids []ID
	for i := 0; i < 5; i++ {
		d := bytes.Repeat([]byte{byte(i + 1)}, 5000)
		ids = append(ids, Sum(d))
		s.Put(ctx, Sum(d), d)
	}
	p, off, n := entryLoc(t, s, ids[3])
	patchFile(p, off+n-2, 1)
	res, err := s.Verify(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	if res.Chunks != 5 || len(res.Corrupt) != 1 || res.Corrupt[0] != ids[3] {
		t.Fatalf("verify %+v: want 5 checked, 1 corrupt (%s)", res, ids[3])
	}
}

// TestIndexCacheHoldsBlocks checks that the index lookups of an import (one
// per chunk, interleaved with commits) are served from the block cache.
// pebble reserves room for its memtables in that cache; when the store did
// not add that room on top, the cache held no blocks at all while an import
// was writing, and every lookup read the disk.
func TestIndexCacheHoldsBlocks(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	s := openT(t, t.TempDir(), WithSync(false), WithCodec("none"))
	data := make([]byte, 64)
	b := s.NewBatch("import:t")
	for i := range 40000 {
		binary.LittleEndian.PutUint64(data, uint64(i))
		if _, _, err := b.Add(ctx, data); err != nil {
			t.Fatal(err)
		}
		if b.Len() == 1000 {
			if err := b.Commit(ctx); err != nil {
				t.Fatal(err)
			}
			b = s.NewBatch("import:t")
		}
	}
	m := s.db.Metrics().BlockCache
	if rate := float64(m.Hits) / float64(m.Hits+m.Misses); rate < 0.9 {
		t.Fatalf("block cache hit rate %.2f (%d hits, %d misses, %d bytes cached); want >= 0.9", rate, m.Hits, m.Misses, m.Size)
	}
}

// TestEntrySizesAndCodecs round-trips chunks of every codec, compressible or
// not, smaller and larger than the pooled entry buffers.
func TestEntrySizesAndCodecs(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	r := rand.New(rand.NewPCG(5, 6))
	for _, codec := range []string{"zstd", "s2", "none"} {
		s := openT(t, t.TempDir(), WithCodec(codec), WithSync(false))
		for _, n := range []int{0, 1, 5000, 256 << 10, 1 << 20, MaxChunkSize} {
			rnd := make([]byte, n)
			fillRandom(r, rnd)
			for _, data := range [][]byte{randChunk(r, n), rnd} {
				b := s.NewBatch("")
				id, _, err := b.Add(ctx, data)
				if err != nil {
					t.Fatalf("%s %d bytes: %v", codec, n, err)
				}
				if err := b.Commit(ctx); err != nil {
					t.Fatal(err)
				}
				got, err := s.Get(ctx, id)
				if err != nil || !bytes.Equal(got, data) {
					t.Fatalf("%s %d bytes: get: %v, equal %v", codec, n, err, bytes.Equal(got, data))
				}
				st, err := s.GetStored(ctx, id)
				if err != nil {
					t.Fatal(err)
				}
				if compressed := st.Codec != CodecRaw; compressed && len(st.Payload) >= n-n/32 {
					t.Fatalf("%s %d bytes: stored with codec %d in %d bytes, saving less than 1/32", codec, n, st.Codec, len(st.Payload))
				}
			}
		}
	}
}

// TestDecodesZstdWithChecksum: chunks written before the store dropped the
// zstd frame checksum still decode.
func TestDecodesZstdWithChecksum(t *testing.T) {
	t.Parallel()
	data := randChunk(rand.New(rand.NewPCG(7, 8)), 100000)
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithZeroFrames(true), zstd.WithEncoderCRC(true))
	if err != nil {
		t.Fatal(err)
	}
	s := openT(t, t.TempDir())
	got, err := s.Decode(Stored{Codec: CodecZstd, RawLen: len(data), Payload: enc.EncodeAll(data, nil)})
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("decode: %v, equal %v", err, bytes.Equal(got, data))
	}
}
