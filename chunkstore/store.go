package chunkstore

import (
	"bytes"
	"context"
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
	// ErrDiskFull: the disk holding the store is full. Writes fail with it
	// until space is freed; reads go on.
	ErrDiskFull = errors.New("chunk store disk full")
	// ErrFailed: the store cannot write any more (its index failed, or a
	// directory of it was deleted) until it is reopened; reads go on.
	ErrFailed = errors.New("chunk store failed")
	// ErrExists: the name is taken (by another manifest).
	ErrExists = errors.New("already exists")
	// ErrInvalid: the caller's input is malformed (an image name, a chunking
	// word); retrying it unchanged cannot succeed.
	ErrInvalid = errors.New("invalid")
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

// Store is a content-addressed chunk store on local disk: chunk payloads in
// append-only pack files, an index in pebble (see doc.go). All methods are safe for concurrent use.
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
	closing    bool          // Close has begun: new calls fail with ErrClosed
	closingCh  chan struct{} // closed when Close begins: waits give up on it
	closed     bool          // the index is closed
	unclean    bool

	// committing (above): chunks a commit is indexing, each closed when it
	// ends; holds: dedup hits of open batches, not evictable (both batch.go);
	// roomSem: one makeRoom at a time (evict.go); compactSem: one compaction
	// at a time (compact.go). Both are one-slot semaphores rather than
	// mutexes so that a call waiting for one gives up when Close begins.
	holds      map[[32]byte]int
	roomSem    chan struct{}
	compactSem chan struct{}

	inflight sync.WaitGroup // calls that entered; Close waits for them
	h        *health
	nameMu   sync.Mutex // serializes name changes (check, then write)

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

// WithEvictionPolicy replaces the least-recently-used policy. A policy that
// also implements Forgetter is told of chunks removed outside eviction.
func WithEvictionPolicy(p EvictionPolicy) Option { return func(o *options) { o.policy = p } }

// WithLogger sets the logger.
func WithLogger(l *slog.Logger) Option { return func(o *options) { o.log = l } }

// WithIndexCache sets the index block cache size in bytes (default 8 MiB).
func WithIndexCache(bytes int64) Option { return func(o *options) { o.cacheSize = bytes } }

// WithClock sets the clock used for access times (tests).
func WithClock(now func() time.Time) Option { return func(o *options) { o.now = now } }

// Open opens (creating if needed) the store in dir. Only one process may open a
// store at a time. It is OpenContext without a way to give up.
func Open(dir string, opts ...Option) (*Store, error) {
	return OpenContext(context.Background(), dir, opts...)
}

// OpenContext opens the store like Open, and gives up when ctx is done or when
// the index cannot open for lack of disk space (it returns ErrDiskFull then,
// instead of retrying for ever). The index may still be opening in the
// background when it gives up; it is closed as soon as it opens.
func OpenContext(ctx context.Context, dir string, opts ...Option) (*Store, error) {
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
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("open chunk store %s: %w", dir, err)
	}
	if err := os.MkdirAll(filepath.Join(dir, "packs"), 0o750); err != nil {
		return nil, fmt.Errorf("open chunk store: %w", describeIOError(err))
	}
	h := newHealth(dir, o.log)
	h.ensureBallast()
	const memTable = 4 << 20
	popts := &pebble.Options{
		// pebble reserves room for its memtables (the mutable one and one
		// being flushed) in the block cache; without adding it, an 8 MiB
		// cache held no blocks at all and every lookup read the disk.
		CacheSize:    o.cacheSize + 2*memTable,
		MemTableSize: memTable,
	}
	h.pebbleHooks(popts)
	// Bloom filters let a lookup of a chunk that is not stored (nearly every
	// chunk of an import into a fresh store) skip reading index and data
	// blocks of each table. Tables written without one stay readable.
	for i := range popts.Levels {
		popts.Levels[i].FilterPolicy = bloom.FilterPolicy(10)
	}
	db, err := openIndex(ctx, h, filepath.Join(dir, "index"), popts)
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
		enc.Close()
		db.Close()
		return nil, err
	}
	s := &Store{dir: dir, db: db, opts: o, enc: enc, dec: dec, h: h,
		committing: make(map[[32]byte]chan struct{}), atimes: make(map[[32]byte]int64),
		closingCh: make(chan struct{}), roomSem: make(chan struct{}, 1), compactSem: make(chan struct{}, 1)}
	s.packs.dir = filepath.Join(dir, "packs")
	s.packs.target = maxPackSize
	if o.quota > 0 {
		s.packs.target = min(maxPackSize, max(minPackSize, o.quota/32))
	}
	if err := s.finishOpen(ctx); err != nil {
		// Leave the unclean-shutdown marker as it was: the next Open must
		// still recover what this one could not.
		s.abandon()
		return nil, err
	}
	return s, nil
}

// openIndex opens pebble, giving up when ctx is done or when the index hits
// ENOSPC with no reserve left (pebble then retries its flush for ever and
// Open never returns). The abandoned open closes the index if it ever opens.
func openIndex(ctx context.Context, h *health, dir string, popts *pebble.Options) (*pebble.DB, error) {
	type result struct {
		db  *pebble.DB
		err error
	}
	done := make(chan result, 1)
	go func() {
		db, err := pebble.Open(dir, popts)
		done <- result{db, err}
	}()
	var why error
	select {
	case r := <-done:
		return r.db, r.err
	case <-ctx.Done():
		why = ctx.Err()
	case <-h.opening:
		why = h.fullError()
	}
	go func() {
		if r := <-done; r.err == nil {
			r.db.Close()
		}
	}()
	return nil, fmt.Errorf("open index: %w", why)
}

// finishOpen recovers after an unclean shutdown, derives usage, clears pins
// of imports that died with the last process, and sets the open marker.
func (s *Store) finishOpen(ctx context.Context) error {
	empty, err := s.indexEmpty()
	if err != nil {
		return fmt.Errorf("open chunk store: %w", err)
	}
	if _, c, err := s.db.Get(keyRebuild); err == nil {
		c.Close()
		empty = true // an interrupted rebuild: carry on
	}
	if _, c, err := s.db.Get(keyOpen); err == nil {
		c.Close()
		s.unclean = true
	}
	for _, p := range []string{filepath.Join(s.dir, "index"), s.packs.dir} {
		id, err := statDir(p)
		if err != nil {
			return fmt.Errorf("open chunk store: %w", err)
		}
		s.h.dirs = append(s.h.dirs, id)
	}
	if err := s.packs.open(); err != nil {
		return fmt.Errorf("open chunk store: %w", err)
	}
	if err := s.recount(); err != nil {
		return fmt.Errorf("open chunk store: %w", err)
	}
	if empty && s.packs.diskBytes() > 0 {
		n, err := s.rebuildFromPacks(ctx)
		if err != nil {
			return fmt.Errorf("open chunk store: %w", err)
		}
		s.opts.log.Warn("the index was empty but the packs hold data (was index/ deleted?): rebuilt the chunk records from the packs; register the images again (hoard image add or pull)",
			"chunks", n)
	}
	if s.unclean {
		// Entries written after the last commit before the crash are dead bytes
		// in their packs; packs with nothing live go now, the rest on compaction.
		n := s.packs.removeEmpty()
		s.opts.log.Info("recovered chunk store after unclean shutdown", "empty_packs_removed", n)
	}
	if n, err := s.clearImportPins(); err != nil {
		return fmt.Errorf("open chunk store: clear pins of interrupted imports: %w", err)
	} else if n > 0 {
		s.opts.log.Info("cleared pins of interrupted imports", "pins", n)
	}
	if err := s.commitSet(keyOpen, nil); err != nil {
		return fmt.Errorf("open chunk store: %w", err)
	}
	return nil
}

// abandon closes what a failed Open opened, without touching the index.
func (s *Store) abandon() {
	s.mu.Lock()
	if !s.closing {
		close(s.closingCh)
	}
	s.closing, s.closed = true, true
	s.mu.Unlock()
	s.enc.Close()
	s.dec.Close()
	s.db.Close()
	s.packs.close()
}

// PinOwnerImportPrefix starts the pin owner of an import in progress
// ("import:<nonce>"). No import survives a restart, so Open drops such pins.
const PinOwnerImportPrefix = "import:"

// clearImportPins drops every pin whose owner starts with
// PinOwnerImportPrefix, in one batch, and returns how many it dropped.
func (s *Store) clearImportPins() (int, error) {
	p := append([]byte{pfxPinOwner}, PinOwnerImportPrefix...)
	it, err := s.db.NewIter(prefixIter(p...))
	if err != nil {
		return 0, err
	}
	defer it.Close()
	b := s.db.NewBatch()
	defer b.Close()
	n := 0
	for it.First(); it.Valid(); it.Next() {
		k := it.Key()
		i := bytes.IndexByte(k, 0)
		if i < 0 || len(k)-i-1 != 32 {
			continue
		}
		var d [32]byte
		copy(d[:], k[i+1:])
		b.Delete(pinKey(d, string(k[1:i])), nil)
		b.Delete(k, nil)
		n++
	}
	if err := it.Error(); err != nil || n == 0 {
		return 0, err
	}
	return n, s.commit(b)
}

// Unclean reports whether the store was not closed cleanly last time (and was
// recovered by Open).
func (s *Store) Unclean() bool { return s.unclean }

// Close waits for the calls in flight, flushes access times and closes the
// index. Every call after Close (or racing it) fails with ErrClosed; a second
// Close returns nil.
func (s *Store) Close() error {
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		return nil
	}
	s.closing = true
	close(s.closingCh)
	s.mu.Unlock()
	s.inflight.Wait()
	err := s.flushAccess()
	s.evictLock.Lock()
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
	if err == nil {
		// Through commit: a store that failed keeps its unclean marker.
		b := s.db.NewBatch()
		b.Delete(keyOpen, nil)
		err = s.commitOpts(b, pebble.Sync)
		b.Close()
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

// enter registers a call in flight, which Close waits for; it fails with
// ErrClosed once Close has begun. Call the returned func when done. A call
// that enters may call others that enter: they fail with ErrClosed rather
// than wait, so Close cannot deadlock. A call that entered and then waits
// for something other calls hold for long (roomSem, compactSem, another
// commit's claim) must give up when Close begins (acquire, closingCh), so
// that Close waits only for work that is running.
func (s *Store) enter() (func(), error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closing {
		return func() {}, ErrClosed
	}
	s.inflight.Add(1)
	return s.inflight.Done, nil
}

// checkWrite returns the error a write that adds data must fail with:
// ErrClosed, a failed index, a lost directory, or ErrDiskFull.
func (s *Store) checkWrite() error {
	if err := s.checkOpen(); err != nil {
		return err
	}
	return s.h.writable(true)
}

// checkRemove is checkWrite for writes that free space (deletes, unpins):
// they go on when the disk is full.
func (s *Store) checkRemove() error {
	if err := s.checkOpen(); err != nil {
		return err
	}
	return s.h.writable(false)
}

// acquire takes the one-slot semaphore sem (roomSem, compactSem), giving
// up when ctx ends or Close begins: a call waiting here must not hold up
// Close, which waits for the calls that entered.
func (s *Store) acquire(ctx context.Context, sem chan struct{}) error {
	select {
	case sem <- struct{}{}:
		return nil
	case <-s.closingCh:
		return ErrClosed
	case <-ctx.Done():
		return ctx.Err()
	}
}

// commit commits an index batch with the store's durability (WithSync).
// Every index write goes through it or commitOpts.
func (s *Store) commit(b *pebble.Batch) error { return s.commitOpts(b, s.writeOpts()) }

// commitOpts commits an index batch. pebble reports some failures (a WAL
// write that failed) only through Logger.Fatalf, after which Commit returns
// nil: the failed state catches those. A store that failed commits nothing
// more (what pebble does after a fatal error is not to be trusted).
func (s *Store) commitOpts(b *pebble.Batch, o *pebble.WriteOptions) error {
	if err := s.failure(); err != nil {
		return err
	}
	if err := b.Commit(o); err != nil {
		return describeIOError(err)
	}
	return s.failure()
}

// failure is the store's failed state (nil while it has not failed).
func (s *Store) failure() error {
	s.h.mu.Lock()
	defer s.h.mu.Unlock()
	return s.h.failed
}

func (s *Store) commitSet(k, v []byte) error {
	b := s.db.NewBatch()
	defer b.Close()
	b.Set(k, v, nil)
	return s.commit(b)
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

// checkOpen fails with ErrClosed once Close has begun. Calls that use the
// index without holding evictLock must enter instead, so that Close waits for
// them.
func (s *Store) checkOpen() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closing || s.closed {
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
