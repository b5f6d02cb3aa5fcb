package node

import (
	"errors"
	"fmt"
	"hash/crc32"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hoardvm/hoard/chunkstore"
	"golang.org/x/sys/unix"
)

// The hot tier keeps the decoded chunks of the images being read in one sparse
// raw file per image (DataDir/hot/<manifest CID>.<n>.raw, at the chunks' own
// offsets), so that a warm read is what qemu-nbd does for a raw file: a pread
// served from the page cache. The chunk store behind it keeps everything
// compressed and deduplicated, and every Get there decompresses and re-hashes
// (sha256) the whole chunk: at 64 KiB per chunk that is ~50 us of CPU, 16 times
// the size of a 4 KiB read, which is why reading from the store alone reached
// only 0.26-0.54x of qemu-nbd.
//
// Only bytes already verified against their chunk ID enter the tier. Each
// 4 KiB block of an entry (counted from the entry's start) carries a CRC-32C
// kept in memory and checked on every read: a block that fails is dropped and
// the read falls back to the store, so a disk error never serves bad bytes.
// The files are a cache of this process: they are removed when the daemon
// starts and when their image is removed, and the least recently read image's
// file goes first when the tier is over its size (Config.HotCache). The page
// cache, not the daemon, holds the bytes in memory, so the kernel reclaims
// them when the VMs need the RAM.

const hotBlock = 4096

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// entry states
const (
	hotEmpty uint32 = iota
	hotFilling
	hotFilled
)

type hotTier struct {
	dir string
	max int64
	log *slog.Logger

	mu    sync.RWMutex
	files map[chunkstore.ID]*hotFile
	used  atomic.Int64 // bytes filled, all files
	tick  atomic.Int64 // logical clock for LRU

	hits, fills, corrupt, evictions atomic.Int64
	pausedUntil                     atomic.Int64 // unix nanos: a write failed, no filling until then (or an eviction)
}

type hotFile struct {
	t  *hotTier
	m  *chunkstore.Manifest
	id chunkstore.ID

	mu     sync.RWMutex // readers and fillers hold it shared; eviction exclusive
	f      *os.File     // nil once evicted
	base   []uint32     // first block of each entry; zero entries have none
	state  []atomic.Uint32
	crc    []atomic.Pointer[[hotPage]atomic.Uint32] // per block, allocated a page at a time
	filled atomic.Int64
	used   atomic.Int64 // tick of the last read
}

const hotPage = 1024 // blocks per CRC page (4 MiB of image, 4 KiB of memory)

// newHotTier removes what an earlier run left in dir and returns the tier; max
// <= 0 returns nil (no tier).
func newHotTier(dir string, max int64, log *slog.Logger) (*hotTier, error) {
	if max <= 0 {
		return nil, nil
	}
	if err := os.RemoveAll(dir); err != nil {
		return nil, fmt.Errorf("clear hot cache %s: %w", dir, err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create hot cache %s: %w (set cache.hot to 0 to run without it)", dir, err)
	}
	return &hotTier{dir: dir, max: max, log: log, files: map[chunkstore.ID]*hotFile{}}, nil
}

// minHotCache is the smallest hot tier worth keeping: below it, the default
// size turns the tier off.
const minHotCache = 32 << 20

// autoHotSize is the hot tier's size when none is configured: DefaultHotCache,
// or a quarter of the disk space free under dir when that is less, so that
// the tier never takes the space the chunk store needs; 0 (off) when that is
// under minHotCache or the free space cannot be learned.
func autoHotSize(dir string, log *slog.Logger) int64 {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		log.Warn("cannot learn the free disk space; hot cache off (set cache.hot to turn it on)", "path", dir, "err", err)
		return 0
	}
	free := int64(st.Bavail) * int64(st.Bsize)
	size := min(int64(DefaultHotCache), free/4)
	if size < minHotCache {
		log.Info("little free disk space: hot cache off (set cache.hot to turn it on)", "path", dir, "free_bytes", free)
		return 0
	}
	if size < DefaultHotCache {
		log.Info("hot cache smaller than its default: a quarter of the free disk space", "path", dir, "free_bytes", free, "hot_bytes", size)
	}
	return size
}

// hotPause is how long the tier stops filling after a failed write.
const hotPause = time.Minute

func (t *hotTier) paused() bool { return time.Now().UnixNano() < t.pausedUntil.Load() }

// file returns img's hot file, creating it when create is set.
func (t *hotTier) file(id chunkstore.ID, m *chunkstore.Manifest, create bool) *hotFile {
	t.mu.RLock()
	hf := t.files[id]
	t.mu.RUnlock()
	if hf != nil || !create {
		return hf
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if hf := t.files[id]; hf != nil {
		return hf
	}
	if t.paused() {
		return nil
	}
	// A name of its own: an evicted file of the same image may not be
	// unlinked yet, and its readers must not see this one truncate it.
	name := filepath.Join(t.dir, fmt.Sprintf("%s.%d.raw", id, t.tick.Add(1)))
	f, err := os.OpenFile(name, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err == nil {
		err = f.Truncate(m.Size)
		if err != nil {
			f.Close()
		}
	}
	if err != nil {
		t.fail(fmt.Errorf("create hot file for image %s: %w", id, err))
		return nil
	}
	hf = &hotFile{t: t, m: m, id: id, f: f}
	hf.base = make([]uint32, len(m.Entries))
	var blocks uint32
	for i, e := range m.Entries {
		hf.base[i] = blocks
		if !e.Zero {
			blocks += uint32((e.Length + hotBlock - 1) / hotBlock)
		}
	}
	hf.state = make([]atomic.Uint32, len(m.Entries))
	hf.crc = make([]atomic.Pointer[[hotPage]atomic.Uint32], int(blocks)/hotPage+1)
	hf.used.Store(t.tick.Add(1))
	t.files[id] = hf
	return hf
}

func (t *hotTier) fail(err error) {
	if !t.paused() {
		t.log.Warn("hot cache stops filling for a minute; reads are served from the chunk store meanwhile (free disk space under the data dir or lower cache.hot)", "err", err)
	}
	t.pausedUntil.Store(time.Now().Add(hotPause).UnixNano())
}

// read copies entry idx's bytes [lo, hi) (offsets within the entry) into dst
// if the entry is in the tier and its blocks check out.
func (t *hotTier) read(id chunkstore.ID, idx int, dst []byte, lo int64) bool {
	hf := t.file(id, nil, false)
	if hf == nil || hf.state[idx].Load() != hotFilled {
		return false
	}
	ok := hf.read(idx, dst, lo)
	if ok {
		t.hits.Add(1)
	}
	return ok
}

var hotBufs = sync.Pool{New: func() any { b := make([]byte, 0, 64<<10); return &b }}

func (hf *hotFile) read(idx int, dst []byte, lo int64) bool {
	hf.mu.RLock()
	defer hf.mu.RUnlock()
	if hf.f == nil {
		return false
	}
	e := hf.m.Entries[idx]
	hi := lo + int64(len(dst))
	kb, ke := lo/hotBlock, (hi+hotBlock-1)/hotBlock
	from, to := kb*hotBlock, min(ke*hotBlock, e.Length)
	buf := dst
	var pooled *[]byte
	if from != lo || to != hi {
		pooled = hotBufs.Get().(*[]byte)
		defer hotBufs.Put(pooled)
		if int64(cap(*pooled)) < to-from {
			*pooled = make([]byte, 0, to-from)
		}
		buf = (*pooled)[:to-from]
	}
	if n, err := hf.f.ReadAt(buf, e.Offset+from); err != nil || int64(n) != to-from {
		hf.drop(idx, fmt.Errorf("read: %v", err))
		return false
	}
	for k := kb; k < ke; k++ {
		b := buf[(k-kb)*hotBlock : min((k-kb+1)*hotBlock, to-from)]
		if crc32.Checksum(b, castagnoli) != hf.blockCRC(hf.base[idx]+uint32(k)) {
			hf.drop(idx, fmt.Errorf("block %d of the entry fails its CRC-32C", k))
			return false
		}
	}
	if pooled != nil {
		copy(dst, buf[lo-from:])
	}
	hf.used.Store(hf.t.tick.Add(1))
	return true
}

func (hf *hotFile) blockCRC(blk uint32) uint32 {
	p := hf.crc[blk/hotPage].Load()
	if p == nil {
		return 0
	}
	return p[blk%hotPage].Load()
}

// has reports whether entry idx of image id is in the tier.
func (t *hotTier) has(id chunkstore.ID, idx int) bool {
	hf := t.file(id, nil, false)
	return hf != nil && hf.state[idx].Load() == hotFilled
}

// drop forgets a filled entry that failed to read back.
func (hf *hotFile) drop(idx int, why error) {
	if hf.state[idx].CompareAndSwap(hotFilled, hotEmpty) {
		hf.t.corrupt.Add(1)
		n := hf.m.Entries[idx].Length
		hf.filled.Add(-n)
		hf.t.used.Add(-n)
		hf.t.log.Warn("hot cache entry failed to read back; serving it from the chunk store", "image", hf.id.String(), "entry", idx, "err", why)
	}
}

// put writes entry idx's verified bytes b into the tier.
func (t *hotTier) put(id chunkstore.ID, m *chunkstore.Manifest, idx int, b []byte) {
	if t.paused() {
		return
	}
	hf := t.file(id, m, true)
	if hf == nil || !hf.state[idx].CompareAndSwap(hotEmpty, hotFilling) {
		return
	}
	e := m.Entries[idx]
	if int64(len(b)) != e.Length {
		hf.state[idx].Store(hotEmpty)
		return
	}
	if !t.reserve(hf, e.Length) {
		hf.state[idx].Store(hotEmpty)
		return
	}
	hf.mu.RLock()
	ok := hf.f != nil
	if ok {
		if _, err := hf.f.WriteAt(b, e.Offset); err != nil {
			t.fail(fmt.Errorf("write image %s: %w", id, err))
			ok = false
		}
	}
	if ok {
		blk := hf.base[idx]
		for k := 0; k*hotBlock < len(b); k++ {
			c := crc32.Checksum(b[k*hotBlock:min((k+1)*hotBlock, len(b))], castagnoli)
			pg := &hf.crc[(blk+uint32(k))/hotPage]
			p := pg.Load()
			if p == nil {
				pg.CompareAndSwap(nil, new([hotPage]atomic.Uint32))
				p = pg.Load()
			}
			p[(blk+uint32(k))%hotPage].Store(c)
		}
		hf.filled.Add(e.Length)
		hf.state[idx].Store(hotFilled)
		t.fills.Add(1)
	}
	hf.mu.RUnlock()
	if !ok {
		hf.state[idx].Store(hotEmpty)
		t.used.Add(-e.Length)
	}
}

// reserve accounts n more bytes for hf, evicting the least recently read
// other files while the tier would be over its size. It fails when hf alone
// fills the tier.
func (t *hotTier) reserve(hf *hotFile, n int64) bool {
	for t.used.Add(n) > t.max {
		t.used.Add(-n)
		t.mu.Lock()
		var victim *hotFile
		for _, o := range t.files {
			if o != hf && (victim == nil || o.used.Load() < victim.used.Load()) {
				victim = o
			}
		}
		if victim != nil {
			delete(t.files, victim.id)
		}
		t.mu.Unlock()
		if victim == nil {
			return false
		}
		victim.evict()
		t.evictions.Add(1)
	}
	return true
}

// evict closes and removes the file; its bytes leave the tier.
func (hf *hotFile) evict() {
	hf.mu.Lock()
	defer hf.mu.Unlock()
	if hf.f == nil {
		return
	}
	name := hf.f.Name()
	hf.f.Close()
	hf.f = nil
	if err := os.Remove(name); err != nil && !errors.Is(err, os.ErrNotExist) {
		hf.t.log.Warn("remove hot cache file", "file", name, "err", err)
	}
	hf.t.used.Add(-hf.filled.Swap(0))
	hf.t.pausedUntil.Store(0) // there is room again
}

// remove drops an image's file (image removed).
func (t *hotTier) remove(id chunkstore.ID) {
	t.mu.Lock()
	hf := t.files[id]
	delete(t.files, id)
	t.mu.Unlock()
	if hf != nil {
		hf.evict()
	}
}

// close removes every file (daemon stopping).
func (t *hotTier) close() {
	t.mu.Lock()
	files := t.files
	t.files = map[chunkstore.ID]*hotFile{}
	t.mu.Unlock()
	for _, hf := range files {
		hf.evict()
	}
}

// HotStats is the hot tier's state for status and metrics.
type HotStats struct {
	MaxBytes  int64 `json:"max_bytes"`
	Bytes     int64 `json:"bytes"`
	Images    int   `json:"images"`
	Hits      int64 `json:"hits"`
	Fills     int64 `json:"fills"`
	Corrupt   int64 `json:"corrupt"`
	Evictions int64 `json:"evictions"`
}

func (t *hotTier) stats() HotStats {
	if t == nil {
		return HotStats{}
	}
	t.mu.RLock()
	k := len(t.files)
	t.mu.RUnlock()
	return HotStats{MaxBytes: t.max, Bytes: t.used.Load(), Images: k, Hits: t.hits.Load(),
		Fills: t.fills.Load(), Corrupt: t.corrupt.Load(), Evictions: t.evictions.Load()}
}
