package chunkstore

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"sync"

	"github.com/cockroachdb/pebble/v2"
	"github.com/klauspost/compress/s2"
	"golang.org/x/sys/unix"
)

// Put stores one chunk, verifying data against id. Storing a chunk that is
// already there only refreshes its access time.
func (s *Store) Put(ctx context.Context, id ID, data []byte) error {
	done, err := s.enter()
	defer done()
	if err != nil {
		return fmt.Errorf("put chunk %s: %w", id, err)
	}
	for attempt := 0; ; attempt++ {
		b := s.NewBatch("")
		if _, err := b.Put(ctx, id, data); err != nil {
			b.Abort()
			return err
		}
		err := b.Commit(ctx)
		if !errors.Is(err, errVanished) || attempt > 0 {
			return err
		}
		// The stored copy was deleted before the commit: write this one.
	}
}

// Batch writes many chunks with one durable commit: Put appends entries to packs,
// Commit makes them durable and indexes them together. Put is safe for
// concurrent use; Commit must be called after all Puts return, and a Batch
// must not be reused after Commit or Abort. Every batch must end in Commit or
// Abort: until then its new entries keep their packs from being compacted and
// the chunks it found stored are held from eviction.
type Batch struct {
	s     *Store
	owner string

	mu    sync.Mutex
	items map[[32]byte]pendingChunk
	packs map[*pack]struct{} // packs written to, synced on Commit
}

type pendingChunk struct {
	rec     record
	written bool // false: already stored (a dedup hit, held until Commit or Abort), only pin it
	p       *pack
}

// errVanished: a chunk a batch found stored (and so did not write) was
// deleted before the batch committed.
var errVanished = errors.New("was deleted before the batch committed")

// holdIfStored reports whether the chunk is stored and, if it is, holds it:
// eviction skips held chunks, so a dedup hit stays until its batch commits
// (and pins it) or aborts. The lookup and the hold are one step under the
// shared eviction lock, so no eviction falls between them.
func (s *Store) holdIfStored(d [32]byte) (bool, error) {
	s.evictLock.RLock()
	defer s.evictLock.RUnlock()
	_, ok, err := s.getRecord(d)
	if err != nil || !ok {
		return false, err
	}
	s.mu.Lock()
	if s.holds == nil {
		s.holds = make(map[[32]byte]int)
	}
	s.holds[d]++
	s.mu.Unlock()
	return true, nil
}

func (s *Store) unhold(d [32]byte) {
	s.mu.Lock()
	if s.holds[d]--; s.holds[d] <= 0 {
		delete(s.holds, d)
	}
	s.mu.Unlock()
}

// NewBatch starts a batch. When pinOwner is not empty, every chunk put in the
// batch (new or already stored) is pinned for that owner in the same commit, so
// it cannot be evicted before, say, the image that needs it is registered.
func (s *Store) NewBatch(pinOwner string) *Batch {
	return &Batch{s: s, owner: pinOwner, items: make(map[[32]byte]pendingChunk), packs: make(map[*pack]struct{})}
}

// Put verifies data against id, compresses it and writes its file if the
// chunk is not stored yet. It returns the stored (compressed) size of a new
// chunk, and 0 for one that is already stored (then held from eviction until
// Commit or Abort) or already in the batch. It fails with ErrFull when the new
// entry does not fit in the quota even after eviction and compaction. Use it
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
	if packHeaderSize+len(st.Payload) > maxEntrySize {
		return fmt.Errorf("put chunk %s: a %d-byte payload is more than a chunk can take", id, len(st.Payload))
	}
	done, err := s.enter()
	defer done()
	if err != nil {
		return fmt.Errorf("put chunk %s: %w", id, err)
	}
	b := s.NewBatch("")
	_, err = b.write(ctx, id, st.RawLen, func(buf []byte) ([]byte, byte) {
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
// encode builds its pack entry in the buffer it is given. Every Batch.Put,
// Add and PutHashed comes here, and enters here.
func (b *Batch) write(ctx context.Context, id ID, rawLen int, encode func(buf []byte) ([]byte, byte)) (int64, error) {
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	if rawLen > MaxChunkSize || rawLen < 0 {
		return 0, fmt.Errorf("put chunk %s: %d bytes is more than the %d-byte limit", id, rawLen, MaxChunkSize)
	}
	s := b.s
	done, err := s.enter()
	defer done()
	if err == nil {
		err = s.checkWrite()
	}
	if err != nil {
		return 0, fmt.Errorf("put chunk %s: %w", id, err)
	}
	b.mu.Lock()
	_, dup := b.items[id.digest]
	b.mu.Unlock()
	if dup {
		return 0, nil
	}
	if ok, err := s.holdIfStored(id.digest); err != nil {
		return 0, fmt.Errorf("put chunk %s: %w", id, err)
	} else if ok {
		b.mu.Lock()
		if _, dup := b.items[id.digest]; !dup {
			b.items[id.digest] = pendingChunk{}
		} else {
			s.unhold(id.digest)
		}
		b.mu.Unlock()
		return 0, nil
	}
	bp := entryBufs.Get().(*[]byte)
	entry, codec := encode((*bp)[:0])
	rec := record{raw: int64(rawLen), codec: codec, atime: s.opts.now().UnixNano()}
	p, off, err := s.appendAdmitted(ctx, entry)
	n := int64(len(entry))
	if cap(entry) <= maxPooledEntry {
		*bp = entry
		entryBufs.Put(bp)
	}
	if errors.Is(err, ErrFull) {
		return 0, fmt.Errorf("put chunk %s: %w", id, err)
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

// appendAdmitted appends a new entry to the packs, within the quota: when
// it does not fit, room is made (eviction, compaction) and it is tried once
// more; ErrFull when it still does not fit. Reserving the room and appending
// are one step (appendEntry), so concurrent writers cannot overshoot.
func (s *Store) appendAdmitted(ctx context.Context, entry []byte) (*pack, int64, error) {
	q := s.opts.quota
	p, off, err := s.packs.appendEntry(entry, q)
	if !errors.Is(err, errNoRoom) {
		return p, off, err
	}
	n := int64(len(entry))
	if err := s.makeRoom(ctx, n); err != nil {
		return nil, 0, err
	}
	p, off, err = s.packs.appendEntry(entry, q)
	if errors.Is(err, errNoRoom) {
		return nil, 0, s.fullError(n)
	}
	return p, off, err
}

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

// Abort gives the batch up: the entries it wrote become dead bytes, which
// compaction reclaims, and the chunks it found stored are no longer held.
func (b *Batch) Abort() {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.release()
}

// release ends the batch's claim on the packs it wrote to; entries that were
// not indexed are dead bytes there, reclaimed by compaction.
func (b *Batch) release() {
	for d, it := range b.items {
		if it.written {
			it.p.done()
		} else {
			b.s.unhold(d)
		}
	}
	b.items = map[[32]byte]pendingChunk{}
}

// Commit makes the batch's new entries durable and indexes them, with the
// pins of all its chunks, in one atomic, synced index write. On error nothing
// of the batch is indexed; its new entries are dead bytes that compaction
// reclaims. A chunk the batch found already stored is held from eviction
// until then; if something else deleted it meanwhile (garbage collection, a
// corrupt copy dropped) Commit fails (errVanished): put it again.
func (b *Batch) Commit(ctx context.Context) error {
	s := b.s
	b.mu.Lock()
	defer b.mu.Unlock()
	done, err := s.enter()
	defer done()
	if err != nil {
		b.release()
		return fmt.Errorf("commit chunks: %w", err)
	}
	if len(b.items) == 0 {
		return nil
	}
	// The new entries are within the quota already (appendAdmitted); this
	// keeps live bytes under the high watermark for the next writers. On a
	// nearly full disk compaction refuses to run; the entries are written
	// already, and their index records fit in the index's reserve.
	if err := s.makeRoom(ctx, 0); err != nil && !errors.Is(err, ErrFull) && !errors.Is(err, ErrDiskFull) {
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
			close(s.committing[d])
			delete(s.committing, d)
		}
		s.mu.Unlock()
	}()
	pb := s.db.NewBatch()
	defer pb.Close()
	// In digest order: commits claim chunks in one order, so two never wait
	// for each other.
	digests := make([][32]byte, 0, len(b.items))
	for d := range b.items {
		digests = append(digests, d)
	}
	slices.SortFunc(digests, func(x, y [32]byte) int { return bytes.Compare(x[:], y[:]) })
	for _, d := range digests {
		it := b.items[d]
		if b.owner != "" {
			if err := setPin(pb, d, b.owner); err != nil {
				return err
			}
		}
		if !it.written {
			// Held since Put, so not evicted; but Delete ignores holds.
			if _, ok, err := s.getRecord(d); err != nil {
				return err
			} else if !ok {
				return fmt.Errorf("commit chunks: chunk %s %w; retry", IDFromDigest(d), errVanished)
			}
			continue
		}
		if err := s.claim(ctx, d); err != nil {
			return err
		}
		claimed = append(claimed, d)
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
	if h := s.packs.faults.commit; h != nil {
		if err := h(); err != nil {
			return fmt.Errorf("commit chunks: %w", err)
		}
	}
	if err := s.commit(pb); err != nil {
		return fmt.Errorf("commit chunks: %w", err)
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

// claim makes this commit the one indexing new chunk d. Another commit that
// is indexing it now may yet fail, so claim waits for it to end (the caller
// then looks the chunk up again) instead of counting on it; it gives up when
// ctx ends or Close begins.
func (s *Store) claim(ctx context.Context, d [32]byte) error {
	for {
		s.mu.Lock()
		closed := s.closed
		wait, busy := s.committing[d]
		if !busy && !closed {
			s.committing[d] = make(chan struct{})
		}
		s.mu.Unlock()
		switch {
		case closed:
			return ErrClosed
		case !busy:
			return nil
		}
		if h := s.packs.faults.claimWait; h != nil {
			h(d)
		}
		select {
		case <-wait:
		case <-s.closingCh:
			return fmt.Errorf("commit chunks: %w", ErrClosed)
		case <-ctx.Done():
			return fmt.Errorf("commit chunks: %w", ctx.Err())
		}
	}
}

// syncFiles makes the batch's pack entries durable: one fdatasync per pack.
func (b *Batch) syncFiles() error {
	for p := range b.packs {
		if err := b.s.packs.sync(p); err != nil {
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
