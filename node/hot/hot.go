package hot

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
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
// The CRCs and the entries' filled marks are also written to a sidecar file
// (<manifest CID>.<n>.crc, format below), so the tier survives a restart or a
// crash of the daemon: at start, adopt takes back every file whose image is
// still in the store, and its blocks are checked against those CRCs on use
// as before. Data, CRCs and marks are written in that order and never synced:
// after a crash any of them may be stale, and a stale block fails its CRC
// and is refetched (a block of zeros where the CRC of real data was written
// fails it too). The files are removed when their image is removed, and the
// least recently read image's file goes first when the tier is over its size
// (Config.HotCache). The page
// cache, not the daemon, holds the bytes in memory, so the kernel reclaims
// them when the VMs need the RAM.

// DefaultSize is the hot tier's default size (node.Config.HotCache).
const DefaultSize = 4 << 30

const hotBlock = 4096

// Sidecar format: a header of hotMagic, the image's entry count and block
// count (uint32 little-endian each); then one byte per entry (1: filled);
// then the CRC-32C of every block (uint32 little-endian), blocks numbered as
// in hotFile.base.
const (
	hotMagic     = "HOARDHOT1\n\x00\x00\x00\x00\x00\x00"
	hotHeaderLen = len(hotMagic) + 8
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// entry states
const (
	hotEmpty uint32 = iota
	hotFilling
	hotFilled
)

type Tier struct {
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
	t  *Tier
	m  *chunkstore.Manifest
	id chunkstore.ID

	mu     sync.RWMutex // readers and fillers hold it shared; eviction exclusive
	f      *os.File     // nil once evicted
	side   *os.File     // the sidecar: CRCs and filled marks
	base   []uint32     // first block of each entry; zero entries have none
	state  []atomic.Uint32
	crc    []atomic.Pointer[[hotPage]atomic.Uint32] // per block, allocated a page at a time
	filled atomic.Int64
	used   atomic.Int64 // tick of the last read
}

const hotPage = 1024 // blocks per CRC page (4 MiB of image, 4 KiB of memory)

// New returns the tier in dir; call adopt to take back what an earlier
// run left there. max <= 0 removes dir and returns nil (no tier).
func New(dir string, max int64, log *slog.Logger) (*Tier, error) {
	if max <= 0 {
		if err := os.RemoveAll(dir); err != nil {
			return nil, fmt.Errorf("clear hot cache %s: %w", dir, err)
		}
		return nil, nil
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create hot cache %s: %w (set cache.hot to 0 to run without it)", dir, err)
	}
	return &Tier{dir: dir, max: max, log: log, files: map[chunkstore.ID]*hotFile{}}, nil
}

// MinSize is the smallest hot tier worth keeping: below it, the default
// size turns the tier off.
const MinSize = 32 << 20

// AutoSize is the hot tier's size when none is configured: DefaultSize,
// or a quarter of the disk space free under dir when that is less, so that
// the tier never takes the space the chunk store needs; 0 (off) when that is
// under MinSize or the free space cannot be learned.
func AutoSize(dir string, log *slog.Logger) int64 {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		log.Warn("cannot learn the free disk space; hot cache off (set cache.hot to turn it on)", "path", dir, "err", err)
		return 0
	}
	// The hot files an earlier run left are this tier's space, not used space.
	free := int64(st.Bavail)*int64(st.Bsize) + dirBytes(filepath.Join(dir, "hot"))
	size := min(int64(DefaultSize), free/4)
	if size < MinSize {
		log.Info("little free disk space: hot cache off (set cache.hot to turn it on)", "path", dir, "free_bytes", free)
		return 0
	}
	if size < DefaultSize {
		log.Info("hot cache smaller than its default: a quarter of the free disk space", "path", dir, "free_bytes", free, "hot_bytes", size)
	}
	return size
}

// hotPause is how long the tier stops filling after a failed write.
const hotPause = time.Minute

func (t *Tier) paused() bool { return time.Now().UnixNano() < t.pausedUntil.Load() }

// file returns img's hot file, creating it when create is set.
func (t *Tier) file(id chunkstore.ID, m *chunkstore.Manifest, create bool) *hotFile {
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
	hf = newHotFile(t, id, m, f, nil)
	var side *os.File
	if err == nil {
		side, err = os.OpenFile(strings.TrimSuffix(name, ".raw")+".crc", os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
		if err == nil {
			hf.side = side
			err = hf.writeHeader()
		}
		if err != nil {
			f.Close()
			if side != nil {
				side.Close()
			}
			os.Remove(name)
			os.Remove(strings.TrimSuffix(name, ".raw") + ".crc")
		}
	}
	if err != nil {
		t.fail(fmt.Errorf("create hot file for image %s: %w", id, err))
		return nil
	}
	hf.used.Store(t.tick.Add(1))
	t.files[id] = hf
	return hf
}

func newHotFile(t *Tier, id chunkstore.ID, m *chunkstore.Manifest, f, side *os.File) *hotFile {
	hf := &hotFile{t: t, m: m, id: id, f: f, side: side}
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
	return hf
}

func (hf *hotFile) blocks() uint32 {
	n := len(hf.m.Entries)
	if n == 0 {
		return 0
	}
	e := hf.m.Entries[n-1]
	b := hf.base[n-1]
	if !e.Zero {
		b += uint32((e.Length + hotBlock - 1) / hotBlock)
	}
	return b
}

func (hf *hotFile) header() []byte {
	h := make([]byte, 0, hotHeaderLen)
	h = append(h, hotMagic...)
	h = binary.LittleEndian.AppendUint32(h, uint32(len(hf.m.Entries)))
	return binary.LittleEndian.AppendUint32(h, hf.blocks())
}

func (hf *hotFile) writeHeader() error {
	_, err := hf.side.WriteAt(hf.header(), 0)
	return err
}

// markOff and crcOff are where entry idx's filled mark and block blk's CRC
// are in the sidecar.
func (hf *hotFile) markOff(idx int) int64 { return int64(hotHeaderLen + idx) }
func (hf *hotFile) crcOff(blk uint32) int64 {
	return int64(hotHeaderLen+len(hf.m.Entries)) + 4*int64(blk)
}

func (t *Tier) fail(err error) {
	if !t.paused() {
		t.log.Warn("hot cache stops filling for a minute; reads are served from the chunk store meanwhile (free disk space under the data dir or lower cache.hot)", "err", err)
	}
	t.pausedUntil.Store(time.Now().Add(hotPause).UnixNano())
}

// read copies entry idx's bytes [lo, hi) (offsets within the entry) into dst
// if the entry is in the tier and its blocks check out.
func (t *Tier) Read(id chunkstore.ID, idx int, dst []byte, lo int64) bool {
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

func (hf *hotFile) setCRC(blk, c uint32) {
	pg := &hf.crc[blk/hotPage]
	p := pg.Load()
	if p == nil {
		pg.CompareAndSwap(nil, new([hotPage]atomic.Uint32))
		p = pg.Load()
	}
	p[blk%hotPage].Store(c)
}

func (hf *hotFile) blockCRC(blk uint32) uint32 {
	p := hf.crc[blk/hotPage].Load()
	if p == nil {
		return 0
	}
	return p[blk%hotPage].Load()
}

// has reports whether entry idx of image id is in the tier.
func (t *Tier) Has(id chunkstore.ID, idx int) bool {
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
		if hf.side != nil {
			_, _ = hf.side.WriteAt([]byte{0}, hf.markOff(idx)) // best effort: the CRCs catch it anyway
		}
	}
}

// put writes entry idx's verified bytes b into the tier.
func (t *Tier) Put(id chunkstore.ID, m *chunkstore.Manifest, idx int, b []byte) {
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
		crcs := make([]byte, 0, 4*((len(b)+hotBlock-1)/hotBlock))
		for k := 0; k*hotBlock < len(b); k++ {
			c := crc32.Checksum(b[k*hotBlock:min((k+1)*hotBlock, len(b))], castagnoli)
			hf.setCRC(blk+uint32(k), c)
			crcs = binary.LittleEndian.AppendUint32(crcs, c)
		}
		if _, err := hf.side.WriteAt(crcs, hf.crcOff(blk)); err != nil {
			t.fail(fmt.Errorf("write image %s: %w", id, err))
			ok = false
		} else if _, err := hf.side.WriteAt([]byte{1}, hf.markOff(idx)); err != nil {
			t.fail(fmt.Errorf("write image %s: %w", id, err))
			ok = false
		}
	}
	if ok {
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
func (t *Tier) reserve(hf *hotFile, n int64) bool {
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
	hf.side.Close()
	for _, n := range []string{name, hf.side.Name()} {
		if err := os.Remove(n); err != nil && !errors.Is(err, os.ErrNotExist) {
			hf.t.log.Warn("remove hot cache file", "file", n, "err", err)
		}
	}
	hf.t.used.Add(-hf.filled.Swap(0))
	hf.t.pausedUntil.Store(0) // there is room again
}

// remove drops an image's file (image removed).
func (t *Tier) Remove(id chunkstore.ID) {
	t.mu.Lock()
	hf := t.files[id]
	delete(t.files, id)
	t.mu.Unlock()
	if hf != nil {
		hf.evict()
	}
}

// close closes every file and keeps it for the next run (daemon stopping).
func (t *Tier) Close() {
	t.mu.Lock()
	files := t.files
	t.files = map[chunkstore.ID]*hotFile{}
	t.mu.Unlock()
	for _, hf := range files {
		hf.mu.Lock()
		if hf.f != nil {
			hf.f.Close()
			hf.side.Close()
			hf.f = nil
		}
		hf.mu.Unlock()
	}
}

// adopt takes back the files an earlier run left in the tier's directory:
// each whose image load still returns, with its sidecar's filled entries and
// CRCs (checked on use as ever). It removes the rest, and the least recently
// written files while the tier is over its size. Call it once, before use.
func (t *Tier) Adopt(load func(chunkstore.ID) (*chunkstore.Manifest, error)) {
	if t == nil {
		return
	}
	raws, _ := filepath.Glob(filepath.Join(t.dir, "*.raw"))
	type found struct {
		raw   string
		id    chunkstore.ID
		n     int64
		mtime time.Time
	}
	newest := map[chunkstore.ID]found{}
	var drop []string
	for _, raw := range raws {
		base := strings.TrimSuffix(filepath.Base(raw), ".raw")
		idStr, nStr, ok := strings.Cut(base, ".")
		id, err := chunkstore.ParseID(idStr)
		n, nerr := strconv.ParseInt(nStr, 10, 64)
		side, serr := os.Stat(strings.TrimSuffix(raw, ".raw") + ".crc")
		if !ok || err != nil || nerr != nil || serr != nil {
			drop = append(drop, raw)
			continue
		}
		if old, dup := newest[id]; dup {
			if old.n > n {
				drop = append(drop, raw)
				continue
			}
			drop = append(drop, old.raw)
		}
		newest[id] = found{raw: raw, id: id, n: n, mtime: side.ModTime()}
		t.tick.Store(max(t.tick.Load(), n))
	}
	list := make([]found, 0, len(newest))
	for _, f := range newest {
		list = append(list, f)
	}
	sort.Slice(list, func(i, j int) bool { return list[i].mtime.Before(list[j].mtime) })
	var kept []*hotFile
	for _, f := range list {
		hf, err := t.open(f.raw, f.id, load)
		if err != nil {
			t.log.Info("hot cache file of an earlier run not kept", "file", f.raw, "err", err)
			drop = append(drop, f.raw)
			continue
		}
		hf.used.Store(t.tick.Add(1))
		kept = append(kept, hf)
		t.used.Add(hf.filled.Load())
	}
	for _, raw := range drop {
		os.Remove(raw)
		os.Remove(strings.TrimSuffix(raw, ".raw") + ".crc")
	}
	// Oldest first out while over the size (it may have shrunk).
	for len(kept) > 0 && t.used.Load() > t.max {
		kept[0].evict()
		kept = kept[1:]
	}
	t.mu.Lock()
	for _, hf := range kept {
		t.files[hf.id] = hf
	}
	t.mu.Unlock()
	if len(kept) > 0 {
		t.log.Info("hot cache kept from the last run", "images", len(kept), "bytes", t.used.Load())
	}
}

// open reopens one hot file and its sidecar.
func (t *Tier) open(raw string, id chunkstore.ID, load func(chunkstore.ID) (*chunkstore.Manifest, error)) (*hotFile, error) {
	m, err := load(id)
	if err != nil {
		return nil, err
	}
	f, err := os.OpenFile(raw, os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	side, err := os.OpenFile(strings.TrimSuffix(raw, ".raw")+".crc", os.O_RDWR, 0)
	if err != nil {
		f.Close()
		return nil, err
	}
	hf := newHotFile(t, id, m, f, side)
	if err := hf.load(); err != nil {
		f.Close()
		side.Close()
		return nil, err
	}
	return hf, nil
}

// load reads the sidecar into hf's marks and CRCs.
func (hf *hotFile) load() error {
	fi, err := hf.f.Stat()
	if err != nil {
		return err
	}
	if fi.Size() != hf.m.Size {
		return fmt.Errorf("size %d, image %d", fi.Size(), hf.m.Size)
	}
	want := hf.header()
	blocks := hf.blocks()
	b := make([]byte, hf.crcOff(blocks))
	if _, err := hf.side.ReadAt(b, 0); err != nil && !errors.Is(err, io.EOF) {
		return err
	}
	if !bytes.Equal(b[:hotHeaderLen], want) {
		return errors.New("sidecar header does not match the image")
	}
	for i, e := range hf.m.Entries {
		if e.Zero || b[hf.markOff(i)] != 1 {
			continue
		}
		blk := hf.base[i]
		nb := uint32((e.Length + hotBlock - 1) / hotBlock)
		for k := uint32(0); k < nb; k++ {
			off := hf.crcOff(blk + k)
			hf.setCRC(blk+k, binary.LittleEndian.Uint32(b[off:off+4]))
		}
		hf.state[i].Store(hotFilled)
		hf.filled.Add(e.Length)
	}
	return nil
}

// dirBytes is the disk space the files in dir take.
func dirBytes(dir string) int64 {
	ents, _ := os.ReadDir(dir)
	var n int64
	for _, e := range ents {
		if fi, err := e.Info(); err == nil {
			if st, ok := fi.Sys().(*syscall.Stat_t); ok {
				n += st.Blocks * 512
			}
		}
	}
	return n
}

// Stats is the hot tier's state for status and metrics.
type Stats struct {
	MaxBytes  int64 `json:"max_bytes"`
	Bytes     int64 `json:"bytes"`
	Images    int   `json:"images"`
	Hits      int64 `json:"hits"`
	Fills     int64 `json:"fills"`
	Corrupt   int64 `json:"corrupt"`
	Evictions int64 `json:"evictions"`
}

func (t *Tier) Stats() Stats {
	if t == nil {
		return Stats{}
	}
	t.mu.RLock()
	k := len(t.files)
	t.mu.RUnlock()
	return Stats{MaxBytes: t.max, Bytes: t.used.Load(), Images: k, Hits: t.hits.Load(),
		Fills: t.fills.Load(), Corrupt: t.corrupt.Load(), Evictions: t.evictions.Load()}
}

// Max is the tier's size limit in bytes.
func (t *Tier) Max() int64 { return t.max }
