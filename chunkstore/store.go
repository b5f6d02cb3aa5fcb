package chunkstore

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
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
	committing map[[32]byte]chan struct{}
	atimes     map[[32]byte]int64
	closed     bool
	unclean    bool

	// committing (above): chunks a commit is indexing, each closed when it
	// ends; holds: dedup hits of open batches, not evictable (both batch.go);
	// roomMu: one makeRoom at a time (evict.go).
	holds  map[[32]byte]int
	roomMu sync.Mutex

	packs packSet
}

// Usage is what the store holds. DiskBytes stays within the quota plus a
// slack of one pack (see "Quota and eviction" in doc.go): writes are admitted
// only while they fit in the quota, and only compaction, which frees more than
// it writes, may pass it, by at most the live bytes of the one pack it is
// rewriting.
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
		committing: make(map[[32]byte]chan struct{}), atimes: make(map[[32]byte]int64)}
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

func (s *Store) checkOpen() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return ErrClosed
	}
	return nil
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

type quietLogger struct{ log *slog.Logger }

func (l quietLogger) Infof(string, ...any) {}
func (l quietLogger) Errorf(format string, args ...any) {
	l.log.Error(fmt.Sprintf(format, args...), "component", "pebble")
}
func (l quietLogger) Fatalf(format string, args ...any) {
	l.log.Error(fmt.Sprintf(format, args...), "component", "pebble")
	os.Exit(1)
}
