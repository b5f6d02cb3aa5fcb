package chunkstore

import (
	"context"
	"fmt"

	"github.com/cockroachdb/pebble/v2"
)

// compactThreshold: a sealed pack whose live bytes fall below this fraction of
// its size is rewritten, so dead bytes stay under about half of the disk used
// by sealed packs and usually far less.
const compactThreshold = 0.5

// Compact copies the live entries of mostly dead packs into the current pack
// (as stored: no recompression) and deletes the old packs. It returns the disk
// bytes reclaimed.
func (s *Store) Compact(ctx context.Context) (int64, error) {
	if err := s.checkOpen(); err != nil {
		return 0, err
	}
	return s.compact(ctx, compactThreshold)
}

// compact rewrites packs whose live fraction is below frac (1: any dead byte).
func (s *Store) compact(ctx context.Context, frac float64) (int64, error) {
	var reclaimed int64
	for _, p := range s.packs.compactable(frac) {
		if err := ctx.Err(); err != nil {
			return reclaimed, err
		}
		if err := s.compactPack(ctx, p); err != nil {
			return reclaimed, fmt.Errorf("compact pack %s: %w", packName(p.id), err)
		}
		if n, ok := s.packs.remove(p); ok {
			reclaimed += n
		}
	}
	return reclaimed, nil
}

type move struct {
	d    [32]byte
	from record
	to   *pack
	off  int64
}

func (s *Store) compactPack(ctx context.Context, p *pack) error {
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
		st, err := s.packs.read(r, d)
		if err == nil {
			_, err = s.verifyStored(IDFromDigest(d), st)
		}
		if err != nil {
			s.corrupt(ctx, IDFromDigest(d), err)
			continue
		}
		np, off, _, err := s.packs.append(d, st.Codec, st.RawLen, st.Payload)
		if err != nil {
			return describeIOError(err)
		}
		touched[np] = struct{}{}
		moves = append(moves, move{d: d, from: r, to: np, off: off})
	}
	for np := range touched {
		if err := np.sync(); err != nil {
			return describeIOError(err)
		}
	}
	s.evictLock.RLock()
	defer s.evictLock.RUnlock()
	b := s.db.NewBatch()
	defer b.Close()
	var applied []move
	for _, m := range moves {
		cur, ok, err := s.getRecord(m.d)
		if err != nil {
			return err
		}
		if !ok || cur.pack != m.from.pack || cur.off != m.from.off {
			continue // deleted or moved meanwhile: the copy is dead
		}
		cur.pack, cur.off = m.to.id, m.off
		b.Set(chunkKey(m.d), cur.encode(), nil)
		b.Delete(packIndexKey(m.from.pack, m.d), nil)
		b.Set(packIndexKey(m.to.id, m.d), nil, nil)
		applied = append(applied, m)
	}
	if err := b.Commit(pebble.Sync); err != nil {
		return err
	}
	for _, m := range applied {
		p.addLive(-m.from.stored)
		m.to.addLive(m.from.stored)
	}
	return nil
}
