package hot

import (
	"bytes"
	"log/slog"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hoardvm/hoard/chunkstore"
)

// hotManifest cuts data into entries of uneven, unaligned lengths, with a
// zero entry, as content-defined chunking does.
func hotManifest(t *testing.T, data []byte, seed uint64) *chunkstore.Manifest {
	t.Helper()
	r := rand.New(rand.NewPCG(seed, 1))
	m := &chunkstore.Manifest{Size: int64(len(data))}
	for off := 0; off < len(data); {
		n := min(len(data)-off, 1000+r.IntN(20000))
		e := chunkstore.Entry{Offset: int64(off), Length: int64(n)}
		if chunkstore.IsZero(data[off : off+n]) {
			e.Zero = true
		} else {
			e.ID = chunkstore.Sum(data[off : off+n])
		}
		m.Entries = append(m.Entries, e)
		off += n
	}
	return m
}

func hotData(n int, seed uint64) []byte {
	r := rand.New(rand.NewPCG(seed, 2))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	clear(b[n/3 : n/3+30000]) // a zero run
	return b
}

func newTestHot(t *testing.T, max int64) *Tier {
	t.Helper()
	h, err := New(filepath.Join(t.TempDir(), "hot"), max, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Close)
	return h
}

func TestHotTierReadsBackEveryRange(t *testing.T) {
	data := hotData(300_000, 1)
	m := hotManifest(t, data, 1)
	id := chunkstore.Sum([]byte("manifest 1"))
	h := newTestHot(t, 1<<30)
	for i, e := range m.Entries {
		if e.Zero {
			continue
		}
		if h.Read(id, i, make([]byte, 1), 0) {
			t.Fatalf("entry %d read before it was put", i)
		}
		h.Put(id, m, i, data[e.Offset:e.End()])
	}
	r := rand.New(rand.NewPCG(3, 4))
	for range 2000 {
		i := r.IntN(len(m.Entries))
		e := m.Entries[i]
		if e.Zero {
			if h.Has(id, i) {
				t.Fatalf("zero entry %d in the tier", i)
			}
			continue
		}
		lo := r.Int64N(e.Length)
		hi := lo + 1 + r.Int64N(e.Length-lo)
		dst := make([]byte, hi-lo)
		if !h.Read(id, i, dst, lo) {
			t.Fatalf("entry %d [%d, %d) not served", i, lo, hi)
		}
		if !bytes.Equal(dst, data[e.Offset+lo:e.Offset+hi]) {
			t.Fatalf("entry %d [%d, %d): wrong bytes", i, lo, hi)
		}
	}
	if st := h.Stats(); st.Images != 1 || st.Corrupt != 0 {
		t.Fatalf("stats %+v", st)
	}
}

// A block changed on disk is never served: the read falls back, the entry is
// dropped, and putting it again heals it.
func TestHotTierDetectsCorruption(t *testing.T) {
	data := hotData(200_000, 5)
	m := hotManifest(t, data, 5)
	id := chunkstore.Sum([]byte("manifest 2"))
	h := newTestHot(t, 1<<30)
	i := 0
	for m.Entries[i].Zero || m.Entries[i].Length < 3*hotBlock {
		i++
	}
	e := m.Entries[i]
	h.Put(id, m, i, data[e.Offset:e.End()])
	f, err := os.OpenFile(h.file(id, nil, false).f.Name(), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte{^data[e.Offset+hotBlock+7]}, e.Offset+hotBlock+7); err != nil {
		t.Fatal(err)
	}
	f.Close()
	// A read of the first block only still checks out.
	if !h.Read(id, i, make([]byte, 100), 10) {
		t.Fatal("an intact block was not served")
	}
	if h.Read(id, i, make([]byte, 100), hotBlock) {
		t.Fatal("a corrupt block was served")
	}
	if h.Has(id, i) || h.Stats().Corrupt != 1 || h.Stats().Bytes != 0 {
		t.Fatalf("after corruption: has %v, stats %+v", h.Has(id, i), h.Stats())
	}
	h.Put(id, m, i, data[e.Offset:e.End()])
	dst := make([]byte, e.Length)
	if !h.Read(id, i, dst, 0) || !bytes.Equal(dst, data[e.Offset:e.End()]) {
		t.Fatal("the entry did not heal after a new put")
	}
}

// Over its size, the tier drops the least recently read image's file.
func TestHotTierEvictsLeastRecentlyRead(t *testing.T) {
	data := hotData(100_000, 7)
	m := hotManifest(t, data, 7)
	var nonZero int64
	for _, e := range m.Entries {
		if !e.Zero {
			nonZero += e.Length
		}
	}
	h := newTestHot(t, nonZero*2+nonZero/2) // room for two images and a half
	ids := []chunkstore.ID{chunkstore.Sum([]byte("a")), chunkstore.Sum([]byte("b")), chunkstore.Sum([]byte("c"))}
	fill := func(id chunkstore.ID) {
		for i, e := range m.Entries {
			if !e.Zero {
				h.Put(id, m, i, data[e.Offset:e.End()])
			}
		}
	}
	first := 0
	for m.Entries[first].Zero {
		first++
	}
	fill(ids[0])
	fill(ids[1])
	h.Read(ids[0], first, make([]byte, 10), 0) // a is now more recent than b
	fill(ids[2])
	if h.Has(ids[1], first) {
		t.Error("b, the least recently read, is still in the tier")
	}
	if !h.Has(ids[0], first) || !h.Has(ids[2], first) {
		t.Error("a or c is missing")
	}
	if files, _ := filepath.Glob(filepath.Join(h.dir, ids[1].String()+".*")); len(files) != 0 {
		t.Errorf("b's file is still on disk: %v", files)
	}
	st := h.Stats()
	if st.Bytes > h.max || st.Evictions != 1 || st.Images != 2 {
		t.Fatalf("stats %+v, max %d", st, h.max)
	}
	h.Remove(ids[0])
	if h.Stats().Bytes != nonZero || h.Stats().Images != 1 {
		t.Fatalf("after remove: %+v", h.Stats())
	}
}

// Concurrent puts, reads and evictions (run with -race): reads that hit
// return the right bytes, and some do hit (a tier that never served a read
// would pass the byte check), while evictions happen.
func TestHotTierConcurrent(t *testing.T) {
	data := hotData(200_000, 9)
	m := hotManifest(t, data, 9)
	h := newTestHot(t, 150_000)
	ids := []chunkstore.ID{chunkstore.Sum([]byte("x")), chunkstore.Sum([]byte("y"))}
	var hits, reads atomic.Int64
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Go(func() {
			r := rand.New(rand.NewPCG(uint64(w), 9))
			for range 3000 {
				id := ids[r.IntN(2)]
				i := r.IntN(len(m.Entries))
				e := m.Entries[i]
				if e.Zero {
					continue
				}
				if r.IntN(2) == 0 {
					h.Put(id, m, i, data[e.Offset:e.End()])
					continue
				}
				dst := make([]byte, e.Length)
				reads.Add(1)
				if !h.Read(id, i, dst, 0) {
					continue
				}
				hits.Add(1)
				if !bytes.Equal(dst, data[e.Offset:e.End()]) {
					t.Errorf("entry %d: wrong bytes", i)
					return
				}
			}
		})
	}
	wg.Wait()
	st := h.Stats()
	if st.Bytes > h.max || st.Bytes < 0 || st.Corrupt != 0 {
		t.Fatalf("stats %+v", st)
	}
	if hits.Load() == 0 || st.Hits != hits.Load() {
		t.Fatalf("%d of %d reads hit, the tier counts %d hits; want some, and the same count", hits.Load(), reads.Load(), st.Hits)
	}
	if st.Evictions == 0 {
		t.Fatalf("no eviction while 2 x 200 kB went through a 150 kB tier: %+v", st)
	}
	t.Logf("%d of %d reads hit; %+v", hits.Load(), reads.Load(), st)
}

// A full disk pauses filling; what is in the tier still reads back, and
// nothing is counted that was not written.
func TestHotTierDiskFull(t *testing.T) {
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", dir).CombinedOutput(); err != nil {
		t.Skipf("cannot mount a small tmpfs to fill (needs root): %v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", "-l", dir).Run() })
	h, err := New(filepath.Join(dir, "hot"), 1<<30, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	data := hotData(2<<20, 11)
	m := hotManifest(t, data, 11)
	id := chunkstore.Sum([]byte("full"))
	var filled []int
	for i, e := range m.Entries {
		if e.Zero {
			continue
		}
		h.Put(id, m, i, data[e.Offset:e.End()])
		if h.Has(id, i) {
			filled = append(filled, i)
		}
	}
	if !h.paused() {
		t.Fatal("2 MiB went into a 256 KiB file system without an error")
	}
	if len(filled) == 0 {
		t.Fatal("nothing was filled before the disk was full")
	}
	var sum int64
	for _, i := range filled {
		e := m.Entries[i]
		sum += e.Length
		dst := make([]byte, e.Length)
		if !h.Read(id, i, dst, 0) || !bytes.Equal(dst, data[e.Offset:e.End()]) {
			t.Fatalf("entry %d filled before the disk was full does not read back", i)
		}
	}
	if st := h.Stats(); st.Bytes != sum {
		t.Fatalf("tier counts %d bytes, %d were written", st.Bytes, sum)
	}
}

// The tier reopened on the same directory (a daemon restart) serves what the
// last one filled; a block whose bytes never reached the disk (a crash: the
// sidecar says filled, the data is zeros) fails its CRC and is not served;
// a file whose image is gone is removed.
func TestHotTierReopen(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "hot")
	log := slog.New(slog.DiscardHandler)
	data := hotData(300_000, 9)
	m := hotManifest(t, data, 9)
	id := chunkstore.Sum([]byte("manifest reopen"))
	gone := chunkstore.Sum([]byte("manifest removed"))
	h, err := New(dir, 1<<30, log)
	if err != nil {
		t.Fatal(err)
	}
	h.Adopt(func(chunkstore.ID) (*chunkstore.Manifest, error) { return nil, chunkstore.ErrNotFound })
	var filled int64
	lost := -1
	for i, e := range m.Entries {
		if e.Zero {
			continue
		}
		h.Put(id, m, i, data[e.Offset:e.End()])
		h.Put(gone, m, i, data[e.Offset:e.End()])
		filled += e.Length
		if lost < 0 && e.Length > hotBlock {
			lost = i
		}
	}
	name := h.file(id, nil, false).f.Name()
	h.Close()
	// The crash: entry lost's first block never reached the disk.
	f, err := os.OpenFile(name, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(make([]byte, hotBlock), m.Entries[lost].Offset); err != nil {
		t.Fatal(err)
	}
	f.Close()

	h2, err := New(dir, 1<<30, log)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h2.Close)
	h2.Adopt(func(got chunkstore.ID) (*chunkstore.Manifest, error) {
		if got == id {
			return m, nil
		}
		return nil, chunkstore.ErrNotFound
	})
	if st := h2.Stats(); st.Images != 1 || st.Bytes != filled {
		t.Fatalf("reopened tier: %+v, want 1 image of %d bytes", st, filled)
	}
	if left, _ := filepath.Glob(filepath.Join(dir, gone.String()+".*")); len(left) != 0 {
		t.Fatalf("files of a removed image kept: %v", left)
	}
	for i, e := range m.Entries {
		if e.Zero {
			continue
		}
		dst := make([]byte, e.Length)
		ok := h2.Read(id, i, dst, 0)
		if i == lost {
			if ok {
				t.Fatalf("entry %d, whose bytes never reached the disk, was served", i)
			}
			continue
		}
		if !ok || !bytes.Equal(dst, data[e.Offset:e.End()]) {
			t.Fatalf("entry %d not served right after the reopen (served %v)", i, ok)
		}
	}
	if st := h2.Stats(); st.Corrupt != 1 {
		t.Fatalf("stats %+v, want the lost entry counted corrupt", st)
	}
	// Refetched and put again, it is served.
	e := m.Entries[lost]
	h2.Put(id, m, lost, data[e.Offset:e.End()])
	dst := make([]byte, e.Length)
	if !h2.Read(id, lost, dst, 0) || !bytes.Equal(dst, data[e.Offset:e.End()]) {
		t.Fatal("the lost entry did not heal after a new put")
	}
}

// A tier reopened smaller drops the least recently written files to fit.
func TestHotTierReopenSmaller(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "hot")
	log := slog.New(slog.DiscardHandler)
	data := hotData(200_000, 11)
	m := hotManifest(t, data, 11)
	h, err := New(dir, 1<<30, log)
	if err != nil {
		t.Fatal(err)
	}
	var ids []chunkstore.ID
	for k := range 3 {
		id := chunkstore.Sum([]byte{byte(k)})
		ids = append(ids, id)
		for i, e := range m.Entries {
			if !e.Zero {
				h.Put(id, m, i, data[e.Offset:e.End()])
			}
		}
		time.Sleep(20 * time.Millisecond) // distinct sidecar mtimes: the write order
	}
	per := h.Stats().Bytes / 3
	h.Close()
	h2, err := New(dir, 2*per, log)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h2.Close)
	h2.Adopt(func(chunkstore.ID) (*chunkstore.Manifest, error) { return m, nil })
	if st := h2.Stats(); st.Images != 2 || st.Bytes != 2*per {
		t.Fatalf("reopened at 2/3 the size: %+v", st)
	}
	nz := 0
	for m.Entries[nz].Zero {
		nz++
	}
	if h2.Has(ids[0], nz) || !h2.Has(ids[2], nz) {
		t.Fatal("the oldest file was not the one dropped")
	}
}
