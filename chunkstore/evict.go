package chunkstore

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"iter"
	"time"
)

// makeRoom keeps the packs under the high watermark with room for incoming
// more bytes: it evicts live bytes down to the low watermark (least recently
// used first, never pinned or held chunks) and compacts packs to give dead
// bytes back; if entries of batches in flight still leave no room, it evicts
// further. It fails with ErrFull when incoming bytes still do not fit in the
// quota. One makeRoom runs at a time: two at once evicted twice as much.
func (s *Store) makeRoom(ctx context.Context, incoming int64) error {
	q := s.opts.quota
	if q == 0 {
		return nil
	}
	high, low := int64(s.opts.high*float64(q)), int64(s.opts.low*float64(q))
	if s.Usage().DiskBytes+incoming <= high {
		return nil
	}
	if err := s.acquire(ctx, s.roomSem); err != nil {
		return err
	}
	defer func() { <-s.roomSem }()
	if s.Usage().DiskBytes+incoming <= high {
		return nil // another writer made room meanwhile
	}
	if need := s.Usage().StoredBytes - low; need > 0 {
		if _, err := s.evict(ctx, need); s.unreadable(err) != nil {
			return err
		}
	}
	if s.Usage().DiskBytes+incoming > high {
		if _, err := s.compact(ctx, 1); s.unreadable(err) != nil {
			return err
		}
	}
	if u := s.Usage(); u.DiskBytes+incoming > q {
		// Entries of batches in flight hold the room: evict for them too.
		if _, err := s.evict(ctx, u.DiskBytes+incoming-low); s.unreadable(err) != nil {
			return err
		}
		if _, err := s.compact(ctx, 1); s.unreadable(err) != nil {
			return err
		}
	}
	if s.Usage().DiskBytes+incoming > q {
		return s.fullError(incoming)
	}
	return nil
}

// unreadable logs and swallows a compaction error that only means a pack
// could not be read whole (that pack is kept; the others were compacted), so
// that making room goes on; it returns any other error.
func (s *Store) unreadable(err error) error {
	var rerr *readError
	if errors.As(err, &rerr) {
		s.opts.log.Warn("compaction kept a pack it could not read", "err", err)
		return nil
	}
	return err
}

// fullError says why n more bytes do not fit and what to do.
func (s *Store) fullError(n int64) error {
	u := s.Usage()
	return fmt.Errorf("store %d bytes: %w: %d of %d bytes used (%d by stored chunks) and nothing more can be evicted: the rest is pinned or in use by imports in flight; raise store.quota or remove images (hoard image rm)",
		n, ErrFull, u.DiskBytes, s.opts.quota, u.StoredBytes)
}

// diskSlack is how far compaction may take the packs past the quota: the live
// bytes of the one pack it rewrites before removing it, so at most the pack
// size (or one entry, when a single chunk's entry is larger than that).
func (s *Store) diskSlack() int64 { return max(s.packs.target, maxEntrySize) }

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

// Forgetter is implemented by an EvictionPolicy that keeps state per chunk.
// The store calls Forget, once per chunk, after it removes chunks outside
// eviction: Delete, the garbage RemoveName and GC free, and corrupt chunks
// dropped on read. It does not call it for the chunks the policy itself
// chose in Victims. Forget is called after the removal is committed, without
// the store's own locks held except the one that serializes eviction, so it
// must not call back into the store; it must be safe for concurrent use with
// the policy's other methods.
type Forgetter interface {
	Forget(id ID)
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
	done, err := s.enter()
	defer done()
	if err == nil {
		err = s.checkRemove()
	}
	if err != nil {
		return 0, fmt.Errorf("evict: %w", err)
	}
	return s.evict(ctx, need)
}

// evict is Evict for a caller that has entered.
func (s *Store) evict(ctx context.Context, need int64) (int64, error) {
	if err := s.flushAccess(); err != nil {
		return 0, err
	}
	freed, victims, err := s.evictLocked(ctx, need)
	if err != nil {
		return freed, err
	}
	reclaimed, err := s.compactFreed(ctx)
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
			if err != nil || pinned || s.held(d) {
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

// held reports whether an open batch holds the chunk (see holdIfStored).
func (s *Store) held(d [32]byte) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.holds[d] > 0
}

// Delete removes chunks from the store whether pinned or not (it is used to
// drop corrupt chunks and by garbage collection), then compacts mostly dead
// packs so the space goes back to the disk.
func (s *Store) Delete(ctx context.Context, ids ...ID) error {
	done, err := s.enter()
	defer done()
	if err == nil {
		err = s.checkRemove()
	}
	if err != nil {
		return fmt.Errorf("delete %d chunks: %w", len(ids), err)
	}
	s.evictLock.Lock()
	_, err = s.deleteLocked(ctx, ids, false)
	s.evictLock.Unlock()
	if err != nil || len(ids) == 0 {
		return err
	}
	_, err = s.compactFreed(ctx)
	return err
}

// deleteLocked removes ids and returns the stored bytes freed. evicting says
// the ids are eviction's victims: pinned and held chunks are skipped and the
// policy is not told (it chose them); otherwise every chunk is removed and a
// Forgetter policy is told of each. The caller holds evictLock.
func (s *Store) deleteLocked(ctx context.Context, ids []ID, evicting bool) (int64, error) {
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
	var goneIDs []ID
	seen := make(map[[32]byte]struct{}, len(ids))
	for _, id := range ids {
		if _, dup := seen[id.digest]; dup {
			continue // counted once: a repeated ID made usage drift below the index
		}
		seen[id.digest] = struct{}{}
		r, ok, err := s.getRecord(id.digest)
		if err != nil {
			return 0, err
		}
		if !ok {
			continue
		}
		if evicting {
			if pinned, err := s.hasPrefix(append([]byte{pfxPin}, id.digest[:]...)); err != nil || pinned || s.held(id.digest) {
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
		goneIDs = append(goneIDs, id)
	}
	if err := s.commit(pb); err != nil {
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
	if f, ok := s.opts.policy.(Forgetter); ok && !evicting {
		for _, id := range goneIDs {
			f.Forget(id)
		}
	}
	return delta.StoredBytes, nil
}
