package chunkstore

import (
	"bytes"
	"errors"
	"fmt"
	"io"

	chunkers "github.com/PlakarKorp/go-cdc-chunkers"
	_ "github.com/PlakarKorp/go-cdc-chunkers/chunkers/fastcdc" // registers "fastcdc"
)

// Chunking kinds.
const (
	ChunkingCDC   = "cdc"   // FastCDC, content-defined boundaries
	ChunkingFixed = "fixed" // aligned fixed-size chunks
)

// Chunking is how an image was cut into chunks. It is part of the manifest: the
// same bytes cut with the same Chunking give the same manifest.
type Chunking struct {
	Kind string `json:"kind"`
	Min  uint32 `json:"min"`
	Avg  uint32 `json:"avg"`
	Max  uint32 `json:"max"`
}

// DefaultCDC is content-defined chunking with a 64 KiB target, 16 KiB minimum and
// 256 KiB maximum (DESIGN.md: 1.7x less storage than fixed chunks across
// separately built images).
var DefaultCDC = Chunking{Kind: ChunkingCDC, Min: 16 << 10, Avg: 64 << 10, Max: 256 << 10}

// Fixed64K is aligned 64 KiB chunks, the qcow2 cluster size.
var Fixed64K = Chunking{Kind: ChunkingFixed, Min: 64 << 10, Avg: 64 << 10, Max: 64 << 10}

// ParseChunking maps a user's word ("cdc", "fixed") to its parameters; an
// unknown word is an error wrapping ErrInvalid.
func ParseChunking(s string) (Chunking, error) {
	switch s {
	case "", ChunkingCDC:
		return DefaultCDC, nil
	case ChunkingFixed:
		return Fixed64K, nil
	}
	return Chunking{}, fmt.Errorf("%w chunking %q: use cdc or fixed", ErrInvalid, s)
}

func (c Chunking) validate() error {
	switch c.Kind {
	case ChunkingCDC:
		if c.Min == 0 || c.Min > c.Avg || c.Avg > c.Max || c.Max > MaxChunkSize {
			return fmt.Errorf("cdc chunking %d/%d/%d: want 0 < min <= avg <= max <= %d", c.Min, c.Avg, c.Max, MaxChunkSize)
		}
	case ChunkingFixed:
		if c.Avg == 0 || c.Min != c.Avg || c.Max != c.Avg || c.Max > MaxChunkSize {
			return fmt.Errorf("fixed chunking %d: want min = avg = max <= %d", c.Avg, MaxChunkSize)
		}
	default:
		return fmt.Errorf("unknown chunking kind %q", c.Kind)
	}
	return nil
}

// MaxChunkSize bounds every chunk: decoders and peers refuse anything larger.
const MaxChunkSize = 4 << 20

// Splitter cuts a stream into chunks. Next returns the next chunk, which is valid
// only until the following call, and io.EOF after the last one. Not safe for
// concurrent use.
type Splitter interface {
	Next() ([]byte, error)
}

// NewSplitter returns a Splitter that cuts r as c says.
func NewSplitter(r io.Reader, c Chunking) (Splitter, error) {
	if err := c.validate(); err != nil {
		return nil, err
	}
	if c.Kind == ChunkingFixed {
		return &fixedSplitter{r: r, buf: make([]byte, c.Avg)}, nil
	}
	ch, err := chunkers.NewChunker("fastcdc", r, &chunkers.ChunkerOpts{
		MinSize: int(c.Min), NormalSize: int(c.Avg), MaxSize: int(c.Max),
	})
	if err != nil {
		return nil, fmt.Errorf("cdc chunker: %w", err)
	}
	return &cdcSplitter{c: ch}, nil
}

type cdcSplitter struct {
	c    *chunkers.Chunker
	done bool
}

func (s *cdcSplitter) Next() ([]byte, error) {
	if s.done {
		return nil, io.EOF
	}
	b, err := s.c.Next()
	if errors.Is(err, io.EOF) {
		// The library returns the final (short) chunk together with io.EOF.
		s.done = true
		if len(b) > 0 {
			return b, nil
		}
		return nil, io.EOF
	}
	return b, err
}

type fixedSplitter struct {
	r   io.Reader
	buf []byte
	eof bool
}

func (s *fixedSplitter) Next() ([]byte, error) {
	if s.eof {
		return nil, io.EOF
	}
	n, err := io.ReadFull(s.r, s.buf)
	switch {
	case err == nil:
		return s.buf, nil
	case errors.Is(err, io.ErrUnexpectedEOF):
		s.eof = true
		return s.buf[:n], nil
	case errors.Is(err, io.EOF):
		s.eof = true
		return nil, io.EOF
	}
	return nil, err
}

// IsZero reports whether b is all zero bytes.
func IsZero(b []byte) bool {
	// b[0] == 0 and b equal to itself shifted by one byte: every byte is zero.
	// bytes.Equal is a vectorised memcmp, far faster than a byte loop.
	return len(b) == 0 || (b[0] == 0 && bytes.Equal(b[1:], b[:len(b)-1]))
}
