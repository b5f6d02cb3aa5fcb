package chunkstore

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/cockroachdb/pebble/v2"
	"github.com/klauspost/compress/s2"
)

// Has reports whether the chunk is stored.
func (s *Store) Has(ctx context.Context, id ID) (bool, error) {
	done, err := s.enter()
	defer done()
	if err != nil {
		return false, fmt.Errorf("has chunk %s: %w", id, err)
	}
	_, ok, err := s.getRecord(id.digest)
	return ok, err
}

// Get returns the chunk's bytes, verified against id. A chunk whose bytes do not
// match is dropped from the store and ErrCorrupt returned: it is never served.
func (s *Store) Get(ctx context.Context, id ID) ([]byte, error) {
	done, err := s.enter()
	defer done()
	if err != nil {
		return nil, fmt.Errorf("get chunk %s: %w", id, err)
	}
	_, raw, err := s.load(ctx, id)
	if err != nil {
		return nil, err
	}
	s.touch(id.digest)
	return raw, nil
}

// maxReadAttempts bounds how often a read looks a chunk up again because the
// entry it read had moved meanwhile (compaction copies an entry, commits its
// new place, and only then removes the old pack).
const maxReadAttempts = 4

// load reads a chunk and verifies it; it does not count as an access (Verify
// uses it too). A chunk is dropped only when its bytes were read and failed
// verification and its record still points where they were read (see
// dropIfAt); a read that fails (EIO, ENOMEM, a short read) keeps the chunk.
// The caller has entered.
func (s *Store) load(ctx context.Context, id ID) (Stored, []byte, error) {
	for attempt := 1; ; attempt++ {
		r, ok, err := s.getRecord(id.digest)
		if err != nil {
			return Stored{}, nil, fmt.Errorf("get chunk %s: %w", id, err)
		}
		if !ok {
			return Stored{}, nil, fmt.Errorf("get chunk %s: %w", id, ErrNotFound)
		}
		if h := s.packs.faults.afterLookup; h != nil {
			h(id.digest)
		}
		st, raw, err := s.readEntry(id, r)
		if err == nil {
			return st, raw, nil
		}
		var rerr *readError
		if errors.As(err, &rerr) || errors.Is(err, ErrClosed) {
			return Stored{}, nil, fmt.Errorf("get chunk %s: %w (the chunk is kept; retry, and check the disk if this persists)", id, err)
		}
		dropped, derr := s.dropIfAt(ctx, id, r, err)
		switch {
		case derr != nil:
			return Stored{}, nil, fmt.Errorf("get chunk %s: %v; dropping it: %w", id, err, derr)
		case dropped:
			return Stored{}, nil, fmt.Errorf("get chunk %s: %w: %v (dropped; it will be fetched again)", id, ErrCorrupt, err)
		case attempt == maxReadAttempts:
			return Stored{}, nil, fmt.Errorf("get chunk %s: it moved during each of %d reads (%v); retry", id, attempt, err)
		}
		// The record changed since it was looked up (compaction moved the
		// chunk, or it was deleted): look it up again.
	}
}

// readEntry reads the entry r points to and verifies its bytes against id.
func (s *Store) readEntry(id ID, r record) (Stored, []byte, error) {
	st, err := s.packs.read(r, id.digest)
	if err != nil {
		return Stored{}, nil, err
	}
	raw, err := s.verifyStored(id, st)
	if err != nil {
		return Stored{}, nil, err
	}
	return st, raw, nil
}

// dropIfAt drops chunk id, whose entry at r failed verification (cause),
// if its record still points at r: compare-and-delete under the lock that
// every move and delete takes, so the good copy that compaction has just
// committed elsewhere is never the one deleted. It reports whether it
// dropped the chunk; false means the record changed, and the caller looks
// again. A record pointing into a pack that is gone is dropped only when the
// pack's file is gone too (compaction removes a pack only once nothing in the
// index points into it, so that is a pack lost outside the store).
func (s *Store) dropIfAt(ctx context.Context, id ID, r record, cause error) (bool, error) {
	s.evictLock.Lock()
	defer s.evictLock.Unlock()
	cur, ok, err := s.getRecord(id.digest)
	if err != nil {
		return false, err
	}
	if !ok || cur.pack != r.pack || cur.off != r.off {
		return false, nil
	}
	if errors.Is(cause, errPackMissing) {
		if _, err := os.Stat(filepath.Join(s.packs.dir, packName(r.pack))); !errors.Is(err, fs.ErrNotExist) {
			return false, fmt.Errorf("pack %s is on disk but not open (%v); restart the daemon", packName(r.pack), err)
		}
	}
	s.opts.log.Warn("dropping corrupt chunk", "chunk_id", id.String(), "pack", packName(r.pack), "offset", r.off, "err", cause)
	if _, err := s.deleteLocked(ctx, []ID{id}, false); err != nil {
		return false, err
	}
	return true, nil
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
	done, err := s.enter()
	defer done()
	if err != nil {
		return Stored{}, fmt.Errorf("get chunk %s: %w", id, err)
	}
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
// them only makes eviction a little less exact). Its callers have entered,
// or are Close.
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
	return s.commitOpts(b, pebble.NoSync)
}
