package chunkstore

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sort"
)

// Rebuilding a lost index from the packs: every pack entry carries its
// digest, codec and lengths, so the chunk records can be recreated by reading
// the packs and verifying each entry. Manifests, names, pins and profiles
// live only in the index and cannot be; the rebuilt chunks are unreferenced
// until their images are registered again (re-import or pull from peers),
// and GC or eviction may drop them before that.

// keyRebuild is present while a rebuild is under way.
var keyRebuild = []byte("xrebuild")

// indexEmpty reports whether the index holds no key at all: a new store, or
// one whose index directory was lost (a store that was ever opened holds at
// least its open marker or a chunk).
func (s *Store) indexEmpty() (bool, error) {
	it, err := s.db.NewIter(nil)
	if err != nil {
		return false, err
	}
	defer it.Close()
	return !it.First(), it.Error()
}

// rebuildFromPacks indexes every verified entry of every pack and returns how
// many chunks it indexed, giving up between packs when ctx is done (keyRebuild
// stays until it finishes, so the next Open carries on). A pack's scan stops at the first entry whose header
// is not one (a torn tail); an entry whose payload fails verification is
// skipped.
func (s *Store) rebuildFromPacks(ctx context.Context) (int, error) {
	s.packs.mu.RLock()
	packs := make([]*pack, 0, len(s.packs.packs))
	for _, p := range s.packs.packs {
		packs = append(packs, p)
	}
	s.packs.mu.RUnlock()
	sort.Slice(packs, func(i, j int) bool { return packs[i].id < packs[j].id })
	now := s.opts.now().UnixNano()
	n := 0
	seen := map[[32]byte]bool{}
	var u Usage
	if err := s.commitSet(keyRebuild, nil); err != nil {
		return 0, fmt.Errorf("rebuild index: %w", err)
	}
	for _, p := range packs {
		if err := ctx.Err(); err != nil {
			return n, fmt.Errorf("rebuild index: %w", err)
		}
		b := s.db.NewBatch()
		var live int64
		var hdr [packHeaderSize]byte
		for off := int64(0); off+packHeaderSize <= p.size; {
			if _, err := p.f.ReadAt(hdr[:], off); err != nil {
				break
			}
			codec := hdr[3]
			raw := int(binary.LittleEndian.Uint32(hdr[4:]))
			plen := int64(binary.LittleEndian.Uint32(hdr[8:]))
			if string(hdr[:3]) != packMagic || raw > MaxChunkSize || plen > MaxChunkSize+MaxChunkSize/8 || off+packHeaderSize+plen > p.size {
				break
			}
			var d [32]byte
			copy(d[:], hdr[12:])
			payload := make([]byte, plen)
			if _, err := p.f.ReadAt(payload, off+packHeaderSize); err != nil && !errors.Is(err, io.EOF) {
				break
			}
			r := record{stored: packHeaderSize + plen, raw: int64(raw), codec: codec, atime: now, pack: p.id, off: off}
			off += r.stored
			if _, err := s.verifyStored(IDFromDigest(d), Stored{Codec: codec, RawLen: raw, Payload: payload}); err != nil {
				continue
			}
			if seen[d] {
				continue // an older copy is indexed already
			}
			seen[d] = true
			if _, ok, err := s.getRecord(d); err != nil {
				b.Close()
				return n, err
			} else if ok {
				continue // indexed by an interrupted rebuild
			}
			b.Set(chunkKey(d), r.encode(), nil)
			b.Set(accessKey(now, d), binary.AppendUvarint(nil, uint64(r.stored)), nil)
			b.Set(packIndexKey(p.id, d), nil, nil)
			live += r.stored
			u.Chunks++
			u.StoredBytes += r.stored
			u.RawBytes += r.raw
			n++
			if b.Len() > 4<<20 {
				// Commit as we go, so a large pack does not build one huge batch.
				if err := s.commit(b); err != nil {
					b.Close()
					return n, fmt.Errorf("rebuild index from %s: %w", packName(p.id), err)
				}
				b.Close()
				b = s.db.NewBatch()
			}
		}
		err := s.commit(b)
		b.Close()
		if err != nil {
			return n, fmt.Errorf("rebuild index from %s: %w", packName(p.id), err)
		}
		p.addLive(live)
	}
	b := s.db.NewBatch()
	defer b.Close()
	b.Delete(keyRebuild, nil)
	if err := s.commit(b); err != nil {
		return n, fmt.Errorf("rebuild index: %w", err)
	}
	s.mu.Lock()
	s.usage.Chunks += u.Chunks
	s.usage.StoredBytes += u.StoredBytes
	s.usage.RawBytes += u.RawBytes
	s.mu.Unlock()
	return n, nil
}
