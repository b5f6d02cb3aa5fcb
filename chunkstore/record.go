package chunkstore

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math"

	"github.com/cockroachdb/pebble/v2"
)

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

// decodeRecord decodes a chunk record, rejecting values that would wrap
// around when converted (lengths a read cannot accept are left to the read,
// which drops the chunk, so that such a record never keeps the store from
// opening). Bytes after the last field are ignored: room for fields a later
// version adds.
func decodeRecord(b []byte) (record, error) {
	d := &decoder{b: b}
	stored, raw := d.uvarint("stored"), d.uvarint("raw")
	c := d.bytes(1, "codec")
	if d.err != nil {
		return record{}, d.err
	}
	r := record{stored: int64(stored), raw: int64(raw), codec: c[0]}
	v, n := binary.Varint(d.b)
	if n <= 0 {
		return record{}, errors.New("bad access time")
	}
	r.atime = v
	d.b = d.b[n:]
	pack, off := d.uvarint("pack"), d.uvarint("offset")
	if d.err != nil {
		return record{}, d.err
	}
	if stored > math.MaxInt64 || raw > math.MaxInt64 || pack > math.MaxUint32 || off > math.MaxInt64 {
		return record{}, fmt.Errorf("record out of range: entry %d, raw %d, pack %d, offset %d", stored, raw, pack, off)
	}
	r.pack, r.off = uint32(pack), int64(off)
	return r, nil
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

func (s *Store) hasPrefix(p []byte) (bool, error) {
	it, err := s.db.NewIter(prefixIter(p...))
	if err != nil {
		return false, err
	}
	defer it.Close()
	return it.First(), it.Error()
}

// countIndex derives usage (without DiskBytes) and the live bytes of each
// pack from the chunk records: what the in-memory accounting must equal.
func (s *Store) countIndex() (Usage, map[uint32]int64, error) {
	var u Usage
	live := map[uint32]int64{}
	it, err := s.db.NewIter(prefixIter(pfxChunk))
	if err != nil {
		return u, nil, err
	}
	defer it.Close()
	for it.First(); it.Valid(); it.Next() {
		r, err := decodeRecord(it.Value())
		if err != nil {
			return u, nil, fmt.Errorf("index record %x: %w", it.Key()[1:], err)
		}
		u.Chunks++
		u.StoredBytes += r.stored
		u.RawBytes += r.raw
		live[r.pack] += r.stored
	}
	return u, live, it.Error()
}
