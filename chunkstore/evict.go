package chunkstore

import (
	"context"
	"encoding/binary"
	"fmt"
	"iter"
	"time"
)

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
	if err := s.checkOpen(); err != nil {
		return 0, err
	}
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
