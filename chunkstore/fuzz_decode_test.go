package chunkstore

import (
	"bytes"
	"testing"
)

// FuzzDecodeRecord: decodeRecord never panics, accepts only values a record
// can hold, and what it accepts survives an encode/decode round trip.
func FuzzDecodeRecord(f *testing.F) {
	f.Add(record{stored: 1000, raw: 4000, codec: CodecZstd, atime: 1 << 60, pack: 7, off: 1 << 30}.encode())
	f.Add(record{atime: -5}.encode())
	f.Add([]byte{0x80, 0x80})
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := decodeRecord(b)
		if err != nil {
			return
		}
		if r.stored < 0 || r.raw < 0 || r.off < 0 {
			t.Fatalf("accepted an out-of-range record %+v", r)
		}
		again, err := decodeRecord(r.encode())
		if err != nil || again != r {
			t.Fatalf("round trip of %+v: %+v, %v", r, again, err)
		}
	})
}

// FuzzDecodeEntry: a pack entry is accepted only when it is exactly the entry
// its record describes (re-encoding it gives the same bytes), and decoding an
// accepted payload never panics and never returns a length other than the
// record's.
func FuzzDecodeEntry(f *testing.F) {
	s, err := Open(f.TempDir())
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { s.Close() })
	data := bytes.Repeat([]byte("hoard chunk "), 300)
	id := Sum(data)
	for _, codec := range []byte{CodecRaw, CodecZstd, CodecS2} {
		s.opts.codec = codec
		e, c := s.encodeEntry(nil, id.digest, data)
		f.Add(e, c, uint32(len(data)))
	}
	f.Add([]byte("HP\x01"), byte(0), uint32(0))
	f.Fuzz(func(t *testing.T, buf []byte, codec byte, rawLen uint32) {
		r := record{stored: int64(len(buf)), raw: int64(rawLen), codec: codec}
		var digest [32]byte
		if len(buf) >= packHeaderSize {
			copy(digest[:], buf[12:packHeaderSize])
		}
		st, err := decodeEntry(buf, r, digest)
		if err != nil {
			return
		}
		again := make([]byte, packHeaderSize, packHeaderSize+len(st.Payload))
		putEntryHeader(again, digest, st.Codec, st.RawLen, len(st.Payload))
		if again = append(again, st.Payload...); !bytes.Equal(again, buf) {
			t.Fatalf("accepted an entry that does not re-encode to itself")
		}
		if raw, err := s.decode(st); err == nil && len(raw) != st.RawLen {
			t.Fatalf("decoded %d bytes of a %d-byte chunk", len(raw), st.RawLen)
		}
	})
}
