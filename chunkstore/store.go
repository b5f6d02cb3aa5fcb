package chunkstore

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"iter"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/bloom"
	"github.com/klauspost/compress/s2"
	"github.com/klauspost/compress/zstd"
	"golang.org/x/sys/unix"
)

// Sentinel errors, wrapped once per boundary; check them with errors.Is.
var (
	ErrNotFound = errors.New("not found")
	ErrCorrupt  = errors.New("corrupt chunk")
	ErrFull     = errors.New("chunk store full")
	ErrClosed   = errors.New("chunk store closed")
	ErrMismatch = errors.New("bytes do not match id")
)

// Codecs of stored chunk payloads.
const (
	CodecRaw  byte = 0
	CodecZstd byte = 1
	CodecS2   byte = 2
)

// key prefixes of the index; see doc.go.
const (
	pfxChunk     = 'c'
	pfxAccess    = 'a'
	pfxRef       = 'r'
	pfxPin       = 'p'
	pfxPinOwner  = 'P'
	pfxManifest  = 'm'
	pfxName      = 'n'
	pfxProfile   = 'f'
	pfxPackIndex = 'k'
)

var keyOpen = []byte("xopen")

const fileMagic = "HC\x01"

// Store is a content-addressed chunk store on local disk: chunk payloads in
// files, an index in pebble. All methods are safe for concurrent use.
type Store struct {
	dir  string
	db   *pebble.DB
	opts options
	enc  *zstd.Encoder
	dec  *zstd.Decoder

	// evictLock: commits hold it shared, eviction and deletion exclusively, so a
	// chunk is never evicted between a commit's existence check and its write.
	evictLock sync.RWMutex

	mu         sync.Mutex
	usage      Usage
	committing map[[32]byte]struct{}
	atimes     map[[32]byte]int64
	closed     bool
	unclean    bool

	packs packSet
}

// Usage is what the store holds.
type Usage struct {
	Chunks      int64 `json:"chunks"`
	StoredBytes int64 `json:"stored_bytes"` // live payload bytes (compressed), with their entry headers
	RawBytes    int64 `json:"raw_bytes"`    // the same chunks uncompressed
	DiskBytes   int64 `json:"disk_bytes"`   // pack files on disk, live and dead entries
}

type options struct {
	quota     int64
	high, low float64
	level     zstd.EncoderLevel
	codec     byte
	sync      bool
	policy    EvictionPolicy
	log       *slog.Logger
	cacheSize int64
	now       func() time.Time
}

// Option configures Open.
type Option func(*options)

// WithQuota limits stored bytes; 0 means unlimited. When a commit takes the store
// above high*quota, unpinned chunks are evicted down to low*quota.
func WithQuota(bytes int64) Option { return func(o *options) { o.quota = bytes } }

// WithWatermarks sets the eviction watermarks as fractions of the quota
// (defaults 0.95 and 0.85).
func WithWatermarks(high, low float64) Option {
	return func(o *options) { o.high, o.low = high, low }
}

// WithCompression sets the zstd level (default zstd.SpeedFastest).
func WithCompression(l zstd.EncoderLevel) Option { return func(o *options) { o.level = l } }

// WithCodec chooses how new chunks are compressed: "zstd" (default: the best
// ratio), "s2" (about 3x cheaper in CPU, ~15% larger) or "none". Stored chunks
// of any codec are always readable.
func WithCodec(name string) Option {
	return func(o *options) {
		switch name {
		case "", "zstd":
			o.codec = CodecZstd
		case "s2":
			o.codec = CodecS2
		case "none":
			o.codec = CodecRaw
		default:
			o.codec = 0xff
		}
	}
}

// WithSync sets whether commits are made durable (fsync) before they return
// (default true). Without it a power loss may lose recent chunks, never return
// torn ones.
func WithSync(sync bool) Option { return func(o *options) { o.sync = sync } }

// WithEvictionPolicy replaces the least-recently-used policy.
func WithEvictionPolicy(p EvictionPolicy) Option { return func(o *options) { o.policy = p } }

// WithLogger sets the logger.
func WithLogger(l *slog.Logger) Option { return func(o *options) { o.log = l } }

// WithIndexCache sets the index block cache size in bytes (default 8 MiB).
func WithIndexCache(bytes int64) Option { return func(o *options) { o.cacheSize = bytes } }

// WithClock sets the clock used for access times (tests).
func WithClock(now func() time.Time) Option { return func(o *options) { o.now = now } }

// Open opens (creating if needed) the store in dir. Only one process may open a
// store at a time.
func Open(dir string, opts ...Option) (*Store, error) {
	o := options{high: 0.95, low: 0.85, level: zstd.SpeedFastest, codec: CodecZstd, sync: true, policy: LRU{},
		log: slog.New(slog.DiscardHandler), cacheSize: 8 << 20, now: time.Now}
	for _, f := range opts {
		f(&o)
	}
	if o.codec == 0xff {
		return nil, errors.New("open chunk store: unknown compression; use zstd, s2 or none")
	}
	if o.quota < 0 || o.low <= 0 || o.low > o.high || o.high > 1 {
		return nil, fmt.Errorf("open chunk store: bad quota %d or watermarks %.2f/%.2f", o.quota, o.high, o.low)
	}
	if err := os.MkdirAll(filepath.Join(dir, "packs"), 0o750); err != nil {
		return nil, fmt.Errorf("open chunk store: %w", describeIOError(err))
	}
	const memTable = 4 << 20
	popts := &pebble.Options{
		// pebble reserves room for its memtables (the mutable one and one
		// being flushed) in the block cache; without adding it, an 8 MiB
		// cache held no blocks at all and every lookup read the disk.
		CacheSize:    o.cacheSize + 2*memTable,
		MemTableSize: memTable,
		Logger:       quietLogger{o.log},
	}
	// Bloom filters let a lookup of a chunk that is not stored (nearly every
	// chunk of an import into a fresh store) skip reading index and data
	// blocks of each table. Tables written without one stay readable.
	for i := range popts.Levels {
		popts.Levels[i].FilterPolicy = bloom.FilterPolicy(10)
	}
	db, err := pebble.Open(filepath.Join(dir, "index"), popts)
	if err != nil {
		if errors.Is(err, unix.EAGAIN) || strings.Contains(err.Error(), "lock") {
			return nil, fmt.Errorf("open chunk store %s: %w (the data dir is in use: is a hoard daemon running on it? use its API (HOARD_API), or stop it)", dir, err)
		}
		return nil, fmt.Errorf("open chunk store %s: %w", dir, err)
	}
	// No zstd frame checksum: every chunk is checked against its sha2-256 ID
	// when read, so the CRC only cost time (chunks written with one still
	// decode; the decoder skips checking it).
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(o.level), zstd.WithEncoderConcurrency(runtime.GOMAXPROCS(0)),
		zstd.WithZeroFrames(true), zstd.WithEncoderCRC(false))
	if err != nil {
		db.Close()
		return nil, err
	}
	dec, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(0), zstd.WithDecoderMaxMemory(MaxChunkSize), zstd.IgnoreChecksum(true))
	if err != nil {
		db.Close()
		return nil, err
	}
	s := &Store{dir: dir, db: db, opts: o, enc: enc, dec: dec,
		committing: make(map[[32]byte]struct{}), atimes: make(map[[32]byte]int64)}
	s.packs.dir = filepath.Join(dir, "packs")
	s.packs.target = maxPackSize
	if o.quota > 0 {
		s.packs.target = min(maxPackSize, max(minPackSize, o.quota/32))
	}
	if _, c, err := db.Get(keyOpen); err == nil {
		c.Close()
		s.unclean = true
	}
	if err := s.packs.open(); err != nil {
		s.Close()
		return nil, fmt.Errorf("open chunk store: %w", err)
	}
	if err := s.recount(); err != nil {
		s.Close()
		return nil, err
	}
	if s.unclean {
		// Entries written after the last commit before the crash are dead bytes
		// in their packs; packs with nothing live go now, the rest on compaction.
		n := s.packs.removeEmpty()
		o.log.Info("recovered chunk store after unclean shutdown", "empty_packs_removed", n)
	}
	if err := db.Set(keyOpen, nil, pebble.Sync); err != nil {
		s.Close()
		return nil, fmt.Errorf("open chunk store: %w", err)
	}
	return s, nil
}

// Unclean reports whether the store was not closed cleanly last time (and was
// recovered by Open).
func (s *Store) Unclean() bool { return s.unclean }

// Close flushes access times and closes the index. The store must not be used
// afterwards.
func (s *Store) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.mu.Unlock()
	err := s.flushAccess()
	s.evictLock.Lock()
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
	if err == nil {
		err = s.db.Delete(keyOpen, pebble.Sync)
	}
	s.enc.Close()
	s.dec.Close()
	if cerr := s.db.Close(); err == nil {
		err = cerr
	}
	if cerr := s.packs.close(); err == nil {
		err = cerr
	}
	s.evictLock.Unlock()
	return err
}

// Dir is the store's directory.
func (s *Store) Dir() string { return s.dir }

// recount derives usage from the index (it is not stored, so it can never drift).
func (s *Store) recount() error {
	it, err := s.db.NewIter(prefixIter(pfxChunk))
	if err != nil {
		return err
	}
	defer it.Close()
	var u Usage
	for it.First(); it.Valid(); it.Next() {
		r, err := decodeRecord(it.Value())
		if err != nil {
			return fmt.Errorf("index record %x: %w", it.Key()[1:], err)
		}
		u.Chunks++
		u.StoredBytes += r.stored
		u.RawBytes += r.raw
		s.packs.addLive(r.pack, r.stored)
	}
	s.mu.Lock()
	s.usage = u
	s.mu.Unlock()
	return it.Error()
}

// Usage returns what the store holds now.
func (s *Store) Usage() Usage {
	s.mu.Lock()
	u := s.usage
	s.mu.Unlock()
	u.DiskBytes = s.packs.diskBytes()
	return u
}

// Quota returns the configured quota (0: unlimited).
func (s *Store) Quota() int64 { return s.opts.quota }

// record is a chunk's index entry: where its pack entry is and how big.
type record struct {
	stored, raw int64 // stored: the whole pack entry, header included
	codec       byte
	atime       int64
	pack        uint32
	off         int64
}

func (r record) encode() []byte {
	b := make([]byte, 0, 32)
	b = binary.AppendUvarint(b, uint64(r.stored))
	b = binary.AppendUvarint(b, uint64(r.raw))
	b = append(b, r.codec)
	b = binary.AppendVarint(b, r.atime)
	b = binary.AppendUvarint(b, uint64(r.pack))
	return binary.AppendUvarint(b, uint64(r.off))
}

func decodeRecord(b []byte) (record, error) {
	d := &decoder{b: b}
	r := record{stored: int64(d.uvarint("stored")), raw: int64(d.uvarint("raw"))}
	c := d.bytes(1, "codec")
	if d.err != nil {
		return r, d.err
	}
	r.codec = c[0]
	v, n := binary.Varint(d.b)
	if n <= 0 {
		return r, errors.New("bad access time")
	}
	r.atime = v
	d.b = d.b[n:]
	r.pack = uint32(d.uvarint("pack"))
	r.off = int64(d.uvarint("offset"))
	return r, d.err
}

func chunkKey(d [32]byte) []byte { return append([]byte{pfxChunk}, d[:]...) }

func accessKey(t int64, d [32]byte) []byte {
	k := make([]byte, 0, 41)
	k = append(k, pfxAccess)
	k = binary.BigEndian.AppendUint64(k, uint64(t))
	return append(k, d[:]...)
}

func prefixIter(p ...byte) *pebble.IterOptions {
	return &pebble.IterOptions{LowerBound: p, UpperBound: prefixEnd(p)}
}

func prefixEnd(p []byte) []byte {
	end := bytes.Clone(p)
	for i := len(end) - 1; i >= 0; i-- {
		end[i]++
		if end[i] != 0 {
			return end[:i+1]
		}
	}
	return nil
}

func (s *Store) getRecord(d [32]byte) (record, bool, error) {
	v, c, err := s.db.Get(chunkKey(d))
	if errors.Is(err, pebble.ErrNotFound) {
		return record{}, false, nil
	}
	if err != nil {
		return record{}, false, err
	}
	defer c.Close()
	r, err := decodeRecord(v)
	return r, err == nil, err
}

// Has reports whether the chunk is stored.
func (s *Store) Has(ctx context.Context, id ID) (bool, error) {
	if err := s.checkOpen(); err != nil {
		return false, err
	}
	_, ok, err := s.getRecord(id.digest)
	return ok, err
}

func (s *Store) checkOpen() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return ErrClosed
	}
	return nil
}

// Get returns the chunk's bytes, verified against id. A chunk whose bytes do not
// match is dropped from the store and ErrCorrupt returned: it is never served.
func (s *Store) Get(ctx context.Context, id ID) ([]byte, error) {
	_, raw, err := s.load(ctx, id)
	if err != nil {
		return nil, err
	}
	s.touch(id.digest)
	return raw, nil
}

// load reads a chunk and verifies it, dropping it when it fails; it does not
// count as an access (Verify and compaction use it too).
func (s *Store) load(ctx context.Context, id ID) (Stored, []byte, error) {
	st, err := s.readStored(id)
	if err != nil {
		return Stored{}, nil, err
	}
	raw, err := s.verifyStored(id, st)
	if err != nil {
		return Stored{}, nil, s.corrupt(ctx, id, err)
	}
	return st, raw, nil
}

// verifyStored decodes st and checks the bytes against id.
func (s *Store) verifyStored(id ID, st Stored) ([]byte, error) {
	raw, err := s.decode(st)
	if err == nil && !id.Verify(raw) {
		err = ErrMismatch
	}
	return raw, err
}

// Stored is a chunk in its stored form: what peers are sent.
type Stored struct {
	Codec   byte
	RawLen  int
	Payload []byte
}

// GetStored returns the chunk as stored (compressed), after verifying it.
func (s *Store) GetStored(ctx context.Context, id ID) (Stored, error) {
	st, _, err := s.load(ctx, id)
	if err != nil {
		return Stored{}, err
	}
	s.touch(id.digest)
	return st, nil
}

// Decode returns the uncompressed bytes of a stored chunk (for instance one a
// peer sent). The caller verifies them against the ID.
func (s *Store) Decode(st Stored) ([]byte, error) { return s.decode(st) }

func (s *Store) decode(st Stored) ([]byte, error) {
	switch st.Codec {
	case CodecRaw:
		if len(st.Payload) != st.RawLen {
			return nil, fmt.Errorf("raw payload %d bytes, want %d", len(st.Payload), st.RawLen)
		}
		return st.Payload, nil
	case CodecS2:
		if n, err := s2.DecodedLen(st.Payload); err != nil || n != st.RawLen {
			return nil, fmt.Errorf("s2 payload decodes to %d bytes, want %d (%v)", n, st.RawLen, err)
		}
		return s2.Decode(make([]byte, st.RawLen), st.Payload)
	case CodecZstd:
		if st.RawLen > MaxChunkSize || st.RawLen < 0 {
			return nil, fmt.Errorf("chunk length %d out of range", st.RawLen)
		}
		out, err := s.dec.DecodeAll(st.Payload, make([]byte, 0, st.RawLen))
		if err != nil {
			return nil, err
		}
		if len(out) != st.RawLen {
			return nil, fmt.Errorf("decompressed %d bytes, want %d", len(out), st.RawLen)
		}
		return out, nil
	}
	return nil, fmt.Errorf("unknown codec %d", st.Codec)
}

func (s *Store) readStored(id ID) (Stored, error) {
	if err := s.checkOpen(); err != nil {
		return Stored{}, err
	}
	r, ok, err := s.getRecord(id.digest)
	if err != nil {
		return Stored{}, fmt.Errorf("get chunk %s: %w", id, err)
	}
	if !ok {
		return Stored{}, fmt.Errorf("get chunk %s: %w", id, ErrNotFound)
	}
	st, err := s.packs.read(r, id.digest)
	if err != nil {
		return Stored{}, s.corrupt(context.Background(), id, err)
	}
	return st, nil
}

// corrupt drops a chunk that failed verification and returns the error to report.
func (s *Store) corrupt(ctx context.Context, id ID, cause error) error {
	s.opts.log.Warn("dropping corrupt chunk", "chunk_id", id.String(), "cause", cause)
	s.evictLock.Lock()
	_, err := s.deleteLocked(ctx, []ID{id}, false)
	s.evictLock.Unlock()
	if err != nil && !errors.Is(err, ErrNotFound) {
		s.opts.log.Error("drop corrupt chunk", "chunk_id", id.String(), "err", err)
	}
	return fmt.Errorf("get chunk %s: %w: %v (dropped; it will be fetched again)", id, ErrCorrupt, cause)
}

// touch records an access for LRU, in memory; flushAccess writes them.
func (s *Store) touch(d [32]byte) {
	s.mu.Lock()
	s.atimes[d] = s.opts.now().UnixNano()
	n := len(s.atimes)
	s.mu.Unlock()
	if n >= 4096 {
		if err := s.flushAccess(); err != nil {
			s.opts.log.Warn("flush access times", "err", err)
		}
	}
}

// flushAccess moves pending access times into the index (not synced: losing
// them only makes eviction a little less exact).
func (s *Store) flushAccess() error {
	s.evictLock.RLock()
	defer s.evictLock.RUnlock()
	s.mu.Lock()
	pending := s.atimes
	s.atimes = make(map[[32]byte]int64)
	closed := s.closed
	s.mu.Unlock()
	if len(pending) == 0 || closed {
		return nil
	}
	b := s.db.NewBatch()
	defer b.Close()
	for d, t := range pending {
		r, ok, err := s.getRecord(d)
		if err != nil {
			return err
		}
		if !ok || r.atime >= t {
			continue
		}
		if err := b.Delete(accessKey(r.atime, d), nil); err != nil {
			return err
		}
		r.atime = t
		if err := b.Set(accessKey(t, d), binary.AppendUvarint(nil, uint64(r.stored)), nil); err != nil {
			return err
		}
		if err := b.Set(chunkKey(d), r.encode(), nil); err != nil {
			return err
		}
	}
	return b.Commit(pebble.NoSync)
}

// Put stores one chunk, verifying data against id. Storing a chunk that is
// already there only refreshes its access time.
func (s *Store) Put(ctx context.Context, id ID, data []byte) error {
	b := s.NewBatch("")
	if _, err := b.Put(ctx, id, data); err != nil {
		return err
	}
	return b.Commit(ctx)
}

// Batch writes many chunks with one durable commit: Put writes payload files,
// Commit makes them durable and indexes them together. Put is safe for
// concurrent use; Commit must be called after all Puts return, and a Batch
// must not be reused after Commit or Abort.
type Batch struct {
	s     *Store
	owner string

	mu    sync.Mutex
	items map[[32]byte]pendingChunk
	packs map[*pack]struct{} // packs written to, synced on Commit
}

type pendingChunk struct {
	rec     record
	written bool // false: already stored, only pin/touch it
	p       *pack
}

// NewBatch starts a batch. When pinOwner is not empty, every chunk put in the
// batch (new or already stored) is pinned for that owner in the same commit, so
// it cannot be evicted before, say, the image that needs it is registered.
func (s *Store) NewBatch(pinOwner string) *Batch {
	return &Batch{s: s, owner: pinOwner, items: make(map[[32]byte]pendingChunk), packs: make(map[*pack]struct{})}
}

// Put verifies data against id, compresses it and writes its file if the
// chunk is not stored yet. It returns the stored (compressed) size of a new
// chunk, and 0 for one that is already stored or already in the batch. Use it
// for bytes whose ID came from elsewhere (a peer, a manifest); for bytes of
// your own, Add hashes them once instead of twice.
func (b *Batch) Put(ctx context.Context, id ID, data []byte) (int64, error) {
	if len(data) <= MaxChunkSize && !id.Verify(data) {
		return 0, fmt.Errorf("put chunk %s: %w", id, ErrMismatch)
	}
	return b.put(ctx, id, data)
}

// Add stores data as Put does and returns its ID, hashing it only once:
// there is no ID to check it against. data is not retained.
func (b *Batch) Add(ctx context.Context, data []byte) (ID, int64, error) {
	if len(data) > MaxChunkSize {
		return ID{}, 0, fmt.Errorf("add chunk: %d bytes is more than the %d-byte limit", len(data), MaxChunkSize)
	}
	id := Sum(data)
	n, err := b.put(ctx, id, data)
	return id, n, err
}

// PutHashed stores data under id, which the caller has just computed with
// Sum(data): it skips Put's second hash. A wrong id is never served: every
// read verifies, and drops the chunk as corrupt.
func (b *Batch) PutHashed(ctx context.Context, id ID, data []byte) (int64, error) {
	return b.put(ctx, id, data)
}

// put stores data, which the caller has checked hashes to id.
func (b *Batch) put(ctx context.Context, id ID, data []byte) (int64, error) {
	return b.write(ctx, id, len(data), func(buf []byte) ([]byte, byte) { return b.s.encodeEntry(buf, id.digest, data) })
}

// PutStored stores a chunk in the stored form st, as is: no compression. The
// caller must have checked that st decodes to bytes that hash to id, as the
// p2p layer does with every chunk a peer sends; every later read verifies
// again, and drops the chunk if it does not.
func (s *Store) PutStored(ctx context.Context, id ID, st Stored) error {
	switch st.Codec {
	case CodecRaw, CodecZstd, CodecS2:
	default:
		return fmt.Errorf("put chunk %s: unknown codec %d", id, st.Codec)
	}
	if st.Codec == CodecRaw && len(st.Payload) != st.RawLen {
		return fmt.Errorf("put chunk %s: raw payload of %d bytes for a %d-byte chunk", id, len(st.Payload), st.RawLen)
	}
	b := s.NewBatch("")
	_, err := b.write(ctx, id, st.RawLen, func(buf []byte) ([]byte, byte) {
		buf = append(slices.Grow(buf[:0], packHeaderSize+len(st.Payload))[:packHeaderSize], st.Payload...)
		putEntryHeader(buf, id.digest, st.Codec, st.RawLen, len(st.Payload))
		return buf, st.Codec
	})
	if err != nil {
		b.Abort()
		return err
	}
	return b.Commit(ctx)
}

// write stores the chunk id of rawLen bytes unless it is stored already;
// encode builds its pack entry in the buffer it is given.
func (b *Batch) write(ctx context.Context, id ID, rawLen int, encode func(buf []byte) ([]byte, byte)) (int64, error) {
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	if rawLen > MaxChunkSize || rawLen < 0 {
		return 0, fmt.Errorf("put chunk %s: %d bytes is more than the %d-byte limit", id, rawLen, MaxChunkSize)
	}
	s := b.s
	if err := s.checkOpen(); err != nil {
		return 0, err
	}
	b.mu.Lock()
	_, dup := b.items[id.digest]
	b.mu.Unlock()
	if dup {
		return 0, nil
	}
	if _, ok, err := s.getRecord(id.digest); err != nil {
		return 0, fmt.Errorf("put chunk %s: %w", id, err)
	} else if ok {
		b.mu.Lock()
		if _, dup := b.items[id.digest]; !dup {
			b.items[id.digest] = pendingChunk{}
		}
		b.mu.Unlock()
		return 0, nil
	}
	bp := entryBufs.Get().(*[]byte)
	entry, codec := encode((*bp)[:0])
	rec := record{raw: int64(rawLen), codec: codec, atime: s.opts.now().UnixNano()}
	p, off, err := s.packs.appendEntry(entry)
	n := int64(len(entry))
	if cap(entry) <= maxPooledEntry {
		*bp = entry
		entryBufs.Put(bp)
	}
	if err != nil {
		return 0, fmt.Errorf("put chunk %s: %w", id, describeIOError(err))
	}
	rec.pack, rec.off, rec.stored = p.id, off, n
	b.mu.Lock()
	defer b.mu.Unlock()
	b.packs[p] = struct{}{}
	if _, dup := b.items[id.digest]; dup {
		p.done()
		return 0, nil
	}
	b.items[id.digest] = pendingChunk{rec: rec, written: true, p: p}
	return n, nil
}

// entryBufs recycles pack entry buffers (Put used to allocate two per chunk,
// the compressed payload and the entry, ~0.5 CPU-s of allocation and GC per
// 2 GiB import). A new one fits the entry of a chunk of the default maximum
// size in any codec.
var entryBufs = sync.Pool{New: func() any {
	b := make([]byte, 0, packHeaderSize+s2.MaxEncodedLen(int(DefaultCDC.Max)))
	return &b
}}

// maxPooledEntry bounds the buffers kept in entryBufs.
const maxPooledEntry = 1 << 20

// encodeEntry builds data's pack entry in buf (reusing its capacity): the
// header, then data compressed with the store's codec, or raw when that
// saves less than 1/32. It returns the entry and the codec used.
func (s *Store) encodeEntry(buf []byte, digest [32]byte, data []byte) ([]byte, byte) {
	codec := s.opts.codec
	buf = slices.Grow(buf[:0], packHeaderSize+len(data))[:packHeaderSize]
	switch codec {
	case CodecZstd:
		buf = s.enc.EncodeAll(data, buf)
	case CodecS2:
		end := packHeaderSize + s2.MaxEncodedLen(len(data))
		buf = slices.Grow(buf, end-len(buf))
		buf = buf[:packHeaderSize+len(s2.Encode(buf[packHeaderSize:end], data))]
	}
	if codec == CodecRaw || len(buf)-packHeaderSize >= len(data)-len(data)/32 {
		codec = CodecRaw
		buf = append(buf[:packHeaderSize], data...)
	}
	putEntryHeader(buf, digest, codec, len(data), len(buf)-packHeaderSize)
	return buf, codec
}

// Len is the number of chunks in the batch.
func (b *Batch) Len() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.items)
}

func describeIOError(err error) error {
	if errors.Is(err, unix.ENOSPC) {
		return fmt.Errorf("%w: the disk holding the data dir is full; free space or lower store.quota", err)
	}
	return err
}

// Abort removes the files of chunks that the batch wrote and did not commit.
func (b *Batch) Abort() {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.release()
}

// release ends the batch's claim on the packs it wrote to; entries that were
// not indexed are dead bytes there, reclaimed by compaction.
func (b *Batch) release() {
	for _, it := range b.items {
		if it.written {
			it.p.done()
		}
	}
	b.items = map[[32]byte]pendingChunk{}
}

// Commit makes the batch's files durable and indexes them in one atomic,
// synced index write. On error nothing of the batch is indexed and its new
// files are removed.
func (b *Batch) Commit(ctx context.Context) error {
	s := b.s
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.items) == 0 {
		return nil
	}
	var newBytes int64
	for _, it := range b.items {
		newBytes += it.rec.stored
	}
	if err := s.makeRoom(ctx, newBytes); err != nil {
		b.release()
		return err
	}
	if s.opts.sync {
		if err := b.syncFiles(); err != nil {
			b.release()
			return fmt.Errorf("commit chunks: %w", describeIOError(err))
		}
	}

	s.evictLock.RLock()
	defer s.evictLock.RUnlock()
	defer b.release()
	var delta Usage
	var claimed, indexed [][32]byte
	defer func() {
		s.mu.Lock()
		for _, d := range claimed {
			delete(s.committing, d)
		}
		s.mu.Unlock()
	}()
	pb := s.db.NewBatch()
	defer pb.Close()
	for d, it := range b.items {
		if b.owner != "" {
			if err := setPin(pb, d, b.owner); err != nil {
				return err
			}
		}
		if !it.written {
			continue
		}
		s.mu.Lock()
		_, busy := s.committing[d]
		if !busy {
			s.committing[d] = struct{}{}
			claimed = append(claimed, d)
		}
		closed := s.closed
		s.mu.Unlock()
		if closed {
			return ErrClosed
		}
		if busy {
			// another batch is indexing the same chunk right now
			continue
		}
		if _, ok, err := s.getRecord(d); err != nil {
			return err
		} else if ok {
			continue
		}
		if err := pb.Set(chunkKey(d), it.rec.encode(), nil); err != nil {
			return err
		}
		if err := pb.Set(accessKey(it.rec.atime, d), binary.AppendUvarint(nil, uint64(it.rec.stored)), nil); err != nil {
			return err
		}
		if err := pb.Set(packIndexKey(it.rec.pack, d), nil, nil); err != nil {
			return err
		}
		delta.Chunks++
		delta.StoredBytes += it.rec.stored
		delta.RawBytes += it.rec.raw
		indexed = append(indexed, d)
	}
	if err := pb.Commit(s.writeOpts()); err != nil {
		return fmt.Errorf("commit chunks: %w", describeIOError(err))
	}
	s.mu.Lock()
	s.usage.Chunks += delta.Chunks
	s.usage.StoredBytes += delta.StoredBytes
	s.usage.RawBytes += delta.RawBytes
	s.mu.Unlock()
	for _, d := range indexed {
		it := b.items[d]
		it.p.addLive(it.rec.stored)
	}
	return nil
}

// syncFiles makes the batch's pack entries durable: one fdatasync per pack.
func (b *Batch) syncFiles() error {
	for p := range b.packs {
		if err := p.sync(); err != nil {
			return err
		}
	}
	return nil
}

func (s *Store) writeOpts() *pebble.WriteOptions {
	if s.opts.sync {
		return pebble.Sync
	}
	return pebble.NoSync
}

// makeRoom evicts when the pack files are past the high watermark, and fails
// with ErrFull when it cannot get under the quota. The n bytes of the batch
// being committed are already in the packs (and so in DiskBytes); n only
// names them in the error.
func (s *Store) makeRoom(ctx context.Context, n int64) error {
	q := s.opts.quota
	if q == 0 {
		return nil
	}
	if float64(s.Usage().DiskBytes) <= s.opts.high*float64(q) {
		return nil
	}
	// Evict live bytes down to the low watermark (Evict compacts mostly dead
	// packs), then, if dead bytes still hold the disk above the high
	// watermark, rewrite every pack that has any.
	target := int64(s.opts.low * float64(q))
	if need := s.Usage().StoredBytes - target; need > 0 {
		if _, err := s.Evict(ctx, need); err != nil {
			return err
		}
	}
	if float64(s.Usage().DiskBytes) > s.opts.high*float64(q) {
		if _, err := s.compact(ctx, 1); err != nil {
			return err
		}
	}
	if u := s.Usage(); u.DiskBytes > q {
		return fmt.Errorf("store %d bytes: %w: %d of %d bytes used and the rest is pinned; raise store.quota or remove images (hoard image rm)",
			n, ErrFull, u.DiskBytes, q)
	}
	return nil
}

// Candidate is a chunk that may be evicted.
type Candidate struct {
	ID         ID
	Size       int64 // stored bytes
	LastAccess time.Time
}

// EvictionPolicy chooses what to evict. The planner may supply its own.
type EvictionPolicy interface {
	// Victims returns chunks to evict so that at least need bytes are freed
	// (fewer if candidates run out). candidates yields the unpinned chunks, least
	// recently used first; a policy may stop consuming early.
	Victims(need int64, candidates iter.Seq[Candidate]) []ID
}

// LRU evicts least recently used chunks first.
type LRU struct{}

// Victims implements EvictionPolicy.
func (LRU) Victims(need int64, candidates iter.Seq[Candidate]) []ID {
	var ids []ID
	var freed int64
	for c := range candidates {
		if freed >= need {
			break
		}
		ids = append(ids, c.ID)
		freed += c.Size
	}
	return ids
}

// Evict frees at least need stored bytes by evicting unpinned chunks as the
// policy chooses, compacts packs to return the space to the disk, and returns
// the stored bytes freed.
func (s *Store) Evict(ctx context.Context, need int64) (int64, error) {
	if err := s.flushAccess(); err != nil {
		return 0, err
	}
	freed, victims, err := s.evictLocked(ctx, need)
	if err != nil {
		return freed, err
	}
	reclaimed, err := s.Compact(ctx)
	if victims > 0 {
		s.opts.log.Info("evicted chunks", "chunks", victims, "bytes", freed, "disk_bytes_reclaimed", reclaimed)
	}
	return freed, err
}

func (s *Store) evictLocked(ctx context.Context, need int64) (int64, int, error) {
	s.evictLock.Lock()
	defer s.evictLock.Unlock()
	it, err := s.db.NewIter(prefixIter(pfxAccess))
	if err != nil {
		return 0, 0, err
	}
	cands := func(yield func(Candidate) bool) {
		for it.First(); it.Valid(); it.Next() {
			k := it.Key()
			if len(k) != 41 {
				continue
			}
			var d [32]byte
			copy(d[:], k[9:])
			pinned, err := s.hasPrefix(append([]byte{pfxPin}, d[:]...))
			if err != nil || pinned {
				continue
			}
			size, _ := binary.Uvarint(it.Value())
			c := Candidate{ID: IDFromDigest(d), Size: int64(size), LastAccess: time.Unix(0, int64(binary.BigEndian.Uint64(k[1:9])))}
			if !yield(c) {
				return
			}
		}
	}
	victims := s.opts.policy.Victims(need, cands)
	it.Close()
	freed, err := s.deleteLocked(ctx, victims, true)
	return freed, len(victims), err
}

func (s *Store) hasPrefix(p []byte) (bool, error) {
	it, err := s.db.NewIter(prefixIter(p...))
	if err != nil {
		return false, err
	}
	defer it.Close()
	return it.First(), it.Error()
}

// Delete removes chunks from the store whether pinned or not (it is used to
// drop corrupt chunks and by garbage collection), then compacts mostly dead
// packs so the space goes back to the disk.
func (s *Store) Delete(ctx context.Context, ids ...ID) error {
	s.evictLock.Lock()
	_, err := s.deleteLocked(ctx, ids, false)
	s.evictLock.Unlock()
	if err != nil || len(ids) == 0 {
		return err
	}
	_, err = s.Compact(ctx)
	return err
}

func (s *Store) deleteLocked(ctx context.Context, ids []ID, skipPinned bool) (int64, error) {
	if len(ids) == 0 {
		return 0, nil
	}
	s.mu.Lock()
	closed := s.closed
	s.mu.Unlock()
	if closed {
		return 0, ErrClosed
	}
	pb := s.db.NewBatch()
	defer pb.Close()
	var delta Usage
	var gone []record
	for _, id := range ids {
		r, ok, err := s.getRecord(id.digest)
		if err != nil {
			return 0, err
		}
		if !ok {
			continue
		}
		if skipPinned {
			if pinned, err := s.hasPrefix(append([]byte{pfxPin}, id.digest[:]...)); err != nil || pinned {
				continue
			}
		}
		pb.Delete(chunkKey(id.digest), nil)
		pb.Delete(accessKey(r.atime, id.digest), nil)
		pb.Delete(packIndexKey(r.pack, id.digest), nil)
		delta.Chunks++
		delta.StoredBytes += r.stored
		delta.RawBytes += r.raw
		gone = append(gone, r)
	}
	if err := pb.Commit(s.writeOpts()); err != nil {
		return 0, err
	}
	s.mu.Lock()
	s.usage.Chunks -= delta.Chunks
	s.usage.StoredBytes -= delta.StoredBytes
	s.usage.RawBytes -= delta.RawBytes
	for _, id := range ids {
		delete(s.atimes, id.digest)
	}
	s.mu.Unlock()
	for _, r := range gone {
		s.packs.moveLiveToDead(r.pack, r.stored)
	}
	return delta.StoredBytes, nil
}

type quietLogger struct{ log *slog.Logger }

func (l quietLogger) Infof(string, ...any) {}
func (l quietLogger) Errorf(format string, args ...any) {
	l.log.Error(fmt.Sprintf(format, args...), "component", "pebble")
}
func (l quietLogger) Fatalf(format string, args ...any) {
	l.log.Error(fmt.Sprintf(format, args...), "component", "pebble")
	os.Exit(1)
}
