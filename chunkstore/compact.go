package chunkstore

import (
	"context"
	"errors"
	"fmt"

	"github.com/cockroachdb/pebble/v2"
)

// compactThreshold: a sealed pack whose live bytes fall below this fraction of
// its size is rewritten, so dead bytes stay under about half of the disk used
// by sealed packs and usually far less.
const compactThreshold = 0.5

// Compact copies the live entries of mostly dead packs into the current pack
// (as stored: no recompression) and deletes the old packs. It returns the disk
// bytes reclaimed. On a nearly full disk it stops with ErrDiskFull before a
// copy would take the space the disk reserve keeps free (packs with nothing
// live are still removed).
func (s *Store) Compact(ctx context.Context) (int64, error) {
	done, err := s.enter()
	defer done()
	if err == nil {
		err = s.checkRemove()
	}
	if err != nil {
		return 0, fmt.Errorf("compact: %w", err)
	}
	return s.compact(ctx, compactThreshold)
}

// compact rewrites packs whose live fraction is below frac (1: any dead
// byte). Compactions are serialized (compactSem): one owner picks, copies
// and removes packs at a time; two compactions of one pack both committed a
// move (the live-byte accounting drifted) and one removed the pack under the
// other's reads. A pack with an entry that cannot be read now stays, and the
// others are still compacted; the first such error is returned. The caller
// has entered; waiting for another compaction, and between packs, it gives
// up when Close begins.
func (s *Store) compact(ctx context.Context, frac float64) (int64, error) {
	if err := s.acquire(ctx, s.compactSem); err != nil {
		return 0, err
	}
	defer func() { <-s.compactSem }()
	var reclaimed int64
	var first error
	for _, p := range s.packs.compactable(frac) {
		if err := ctx.Err(); err != nil {
			return reclaimed, err
		}
		if err := s.checkOpen(); err != nil {
			return reclaimed, err
		}
		err := s.compactPack(ctx, p)
		var rerr *readError
		if err != nil && !errors.As(err, &rerr) {
			return reclaimed, fmt.Errorf("compact pack %s: %w", packName(p.id), err)
		}
		if err != nil {
			if first == nil {
				first = fmt.Errorf("compact pack %s: %w (the pack is kept; check the disk)", packName(p.id), err)
			}
			continue
		}
		n, err := s.removePack(p)
		if err != nil {
			return reclaimed, err
		}
		reclaimed += n
	}
	return reclaimed, first
}

// compactFreed compacts after chunks were deleted (Delete, Evict, GC, RemoveName):
// the deletion stands, so a compaction refused on a nearly full disk is
// logged, not returned; the space comes back when a later one can run.
func (s *Store) compactFreed(ctx context.Context) (int64, error) {
	n, err := s.compact(ctx, compactThreshold)
	if errors.Is(err, ErrDiskFull) {
		s.opts.log.Warn("disk nearly full: compaction postponed; free space under the data dir", "dir", s.dir, "err", err)
		return n, nil
	}
	return n, err
}

// removePack deletes a compacted pack, once the index shows nothing in it:
// the per-pack live count is only a cache of that.
func (s *Store) removePack(p *pack) (int64, error) {
	// Shared: deletes change the index and the count under the exclusive lock.
	s.evictLock.RLock()
	defer s.evictLock.RUnlock()
	if used, err := s.hasPrefix(packIndexKey(p.id, [32]byte{})[:5]); err != nil {
		return 0, err
	} else if used {
		s.opts.log.Error("pack still holds indexed chunks after compaction; keeping it", "pack", packName(p.id))
		return 0, nil
	}
	p.mu.Lock()
	if p.live != 0 {
		// The count drifted from the index (a bug): the index is the truth.
		s.opts.log.Error("pack live bytes drifted from the index; correcting", "pack", packName(p.id), "live_bytes", p.live)
		p.live = 0
	}
	p.mu.Unlock()
	n, _ := s.packs.remove(p)
	return n, nil
}

type move struct {
	d    [32]byte
	from record
	to   *pack
	off  int64
}

// compactPack copies the live entries of p to the current pack and commits
// their new places. An entry whose bytes fail verification is dropped (as a
// read would); one that cannot be read stays, and its *readError is returned.
func (s *Store) compactPack(ctx context.Context, p *pack) error {
	p.mu.Lock()
	live := p.live
	p.mu.Unlock()
	if live > 0 {
		// The copies must fit above the disk reserve: compaction frees
		// space only once it has written them.
		if err := s.h.room(live); err != nil {
			return err
		}
	}
	prefix := packIndexKey(p.id, [32]byte{})[:5]
	it, err := s.db.NewIter(prefixIter(prefix...))
	if err != nil {
		return err
	}
	var digests [][32]byte
	for it.First(); it.Valid(); it.Next() {
		var d [32]byte
		copy(d[:], it.Key()[5:])
		digests = append(digests, d)
	}
	if err := it.Close(); err != nil {
		return err
	}
	var moves []move
	var unread error
	touched := map[*pack]struct{}{}
	release := func() {
		for _, m := range moves {
			m.to.done()
		}
	}
	defer release()
	for _, d := range digests {
		r, ok, err := s.getRecord(d)
		if err != nil {
			return err
		}
		if !ok || r.pack != p.id {
			continue
		}
		id := IDFromDigest(d)
		st, _, err := s.readEntry(id, r)
		var rerr *readError
		switch {
		case errors.As(err, &rerr):
			if unread == nil {
				unread = fmt.Errorf("chunk %s: %w", id, err)
			}
			continue
		case err != nil:
			if _, err := s.dropIfAt(ctx, id, r, err); err != nil {
				return err
			}
			continue
		}
		// Compaction is the one writer exempt from the quota: it frees more
		// than it writes, one pack at a time (see the slack in doc.go). It
		// is not exempt from the disk reserve (the disk may fill meanwhile).
		if err := s.h.room(r.stored); err != nil {
			return err
		}
		np, off, _, err := s.packs.append(d, st.Codec, st.RawLen, st.Payload, 0)
		if err != nil {
			return describeIOError(err)
		}
		touched[np] = struct{}{}
		moves = append(moves, move{d: d, from: r, to: np, off: off})
	}
	for np := range touched {
		if err := s.packs.sync(np); err != nil {
			return describeIOError(err)
		}
	}
	// Exclusive: flushAccess rewrites records under the shared lock, and a
	// record it read before this commit must not overwrite the move.
	s.evictLock.Lock()
	defer s.evictLock.Unlock()
	if err := s.checkOpen(); err != nil {
		return err
	}
	b := s.db.NewBatch()
	defer b.Close()
	var applied []move
	for _, m := range moves {
		cur, ok, err := s.getRecord(m.d)
		if err != nil {
			return err
		}
		if !ok || cur.pack != m.from.pack || cur.off != m.from.off {
			continue // deleted meanwhile: the copy is dead
		}
		cur.pack, cur.off = m.to.id, m.off
		b.Set(chunkKey(m.d), cur.encode(), nil)
		b.Delete(packIndexKey(m.from.pack, m.d), nil)
		b.Set(packIndexKey(m.to.id, m.d), nil, nil)
		applied = append(applied, m)
	}
	// Synced whatever WithSync says: the old pack is removed next.
	if err := s.commitOpts(b, pebble.Sync); err != nil {
		return err
	}
	for _, m := range applied {
		p.addLive(-m.from.stored)
		m.to.addLive(m.from.stored)
	}
	if unread != nil {
		return unread
	}
	return nil
}
