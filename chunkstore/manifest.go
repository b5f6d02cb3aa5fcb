package chunkstore

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"sort"
)

// Image formats recorded in a manifest: the format of the bytes the manifest
// describes, which is what an export serves.
const (
	FormatRaw   = "raw"
	FormatQcow2 = "qcow2"
)

// Containers recorded in a manifest (Manifest.Container): the origin holds a
// disk image in this format and the manifest describes its guest view (Format
// is then FormatRaw), so an origin read of [off, off+n) reads that guest range
// through the container's reader.
const (
	ContainerQcow2 = "qcow2"
)

// Source says where an image's bytes came from, so a node can fetch a chunk's
// span again from the origin.
type Source struct {
	Kind     string `json:"kind"`               // "file", "http", "glance"
	Location string `json:"location"`           // path, URL or Glance image ID
	Checksum string `json:"checksum,omitempty"` // "sha256:…", "sha512:…", "md5:…" as the origin announced it
}

// Entry is one extent of an image: a chunk, or a run of zero bytes.
type Entry struct {
	Offset int64 `json:"offset"`
	Length int64 `json:"length"`
	ID     ID    `json:"id,omitempty"` // undefined for zero runs
	Zero   bool  `json:"zero,omitempty"`
}

// End is the offset just past e.
func (e Entry) End() int64 { return e.Offset + e.Length }

// Manifest is an image's recipe: its size, how it was cut, and the ordered
// extents that make it up. Its encoding is deterministic and its CID (ID) is the
// image's identity.
type Manifest struct {
	Size     int64    `json:"size"`
	Chunking Chunking `json:"chunking"`
	Format   string   `json:"format"`
	Source   Source   `json:"source"`
	// Container is empty when the entries are the origin's bytes as they are;
	// otherwise (ContainerQcow2) the origin holds a container and the entries
	// are its guest content.
	Container string  `json:"container,omitempty"`
	Entries   []Entry `json:"entries"`
}

// ErrBadManifest is wrapped by every manifest decoding error.
var ErrBadManifest = errors.New("bad manifest")

const (
	manifestMagic = "HOARDMF"
	// manifestVersion is written for manifests without a container, so that
	// their encoding (and so their CID) is what it always was; version 2
	// adds str(container) and is written only when Container is set.
	manifestVersion          = 1
	manifestVersionContainer = 2
	maxStringLen             = 4096
	tagData                  = 0
	tagZero                  = 1
)

// Builder accumulates entries in order, merging adjacent zero runs, so that the
// same bytes always give the same manifest.
type Builder struct {
	m Manifest
}

// NewBuilder starts a manifest.
func NewBuilder(c Chunking, format string, src Source) *Builder {
	return &Builder{m: Manifest{Chunking: c, Format: format, Source: src}}
}

// Add appends the next extent: a data chunk with the given id, or (when zero) a
// zero run.
func (b *Builder) Add(length int64, id ID, zero bool) {
	if zero {
		if n := len(b.m.Entries); n > 0 && b.m.Entries[n-1].Zero {
			b.m.Entries[n-1].Length += length
			b.m.Size += length
			return
		}
		id = ID{}
	}
	b.m.Entries = append(b.m.Entries, Entry{Offset: b.m.Size, Length: length, ID: id, Zero: zero})
	b.m.Size += length
}

// SetContainer records that the entries are the guest view of a container
// in the origin (ContainerQcow2); "" (the default) means the origin's bytes.
func (b *Builder) SetContainer(container string) { b.m.Container = container }

// Manifest returns the finished manifest.
func (b *Builder) Manifest() *Manifest { return &b.m }

// Encode returns the canonical encoding:
//
//	"HOARDMF" version(1 or 2) uvarint(size) chunking-kind(1: cdc, 2: fixed) uvarint(min avg max)
//	str(format) str(source kind) str(source location) str(source checksum)
//	[str(container), version 2 only: not empty]
//	uvarint(n) n × { uvarint(length) tag(0: data, 1: zero) [32-byte sha2-256 digest if data] }
//
// where str is uvarint(len) followed by the bytes. Offsets are implied by the
// running sum of lengths.
func (m *Manifest) Encode() []byte {
	b := make([]byte, 0, 64+len(m.Entries)*36)
	b = append(b, manifestMagic...)
	if m.Container != "" {
		b = append(b, manifestVersionContainer)
	} else {
		b = append(b, manifestVersion)
	}
	b = binary.AppendUvarint(b, uint64(m.Size))
	kind := byte(1)
	if m.Chunking.Kind == ChunkingFixed {
		kind = 2
	}
	b = append(b, kind)
	b = binary.AppendUvarint(b, uint64(m.Chunking.Min))
	b = binary.AppendUvarint(b, uint64(m.Chunking.Avg))
	b = binary.AppendUvarint(b, uint64(m.Chunking.Max))
	for _, s := range []string{m.Format, m.Source.Kind, m.Source.Location, m.Source.Checksum} {
		b = binary.AppendUvarint(b, uint64(len(s)))
		b = append(b, s...)
	}
	if m.Container != "" {
		b = binary.AppendUvarint(b, uint64(len(m.Container)))
		b = append(b, m.Container...)
	}
	b = binary.AppendUvarint(b, uint64(len(m.Entries)))
	for _, e := range m.Entries {
		b = binary.AppendUvarint(b, uint64(e.Length))
		if e.Zero {
			b = append(b, tagZero)
			continue
		}
		b = append(b, tagData)
		d := e.ID.Digest()
		b = append(b, d[:]...)
	}
	return b
}

// ID is the manifest's CID: the image identity.
func (m *Manifest) ID() ID { return Sum(m.Encode()) }

// DecodeManifest parses an encoded manifest strictly: a truncated, extended,
// non-canonical or inconsistent encoding is an error wrapping ErrBadManifest.
func DecodeManifest(b []byte) (*Manifest, error) {
	m, err := decodeManifest(b)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadManifest, err)
	}
	if !bytes.Equal(m.Encode(), b) {
		return nil, fmt.Errorf("%w: not in canonical form", ErrBadManifest)
	}
	return m, nil
}

type decoder struct {
	b   []byte
	err error
}

func (d *decoder) uvarint(what string) uint64 {
	if d.err != nil {
		return 0
	}
	v, n := binary.Uvarint(d.b)
	if n <= 0 {
		d.err = fmt.Errorf("truncated or overlong %s", what)
		return 0
	}
	d.b = d.b[n:]
	return v
}

func (d *decoder) bytes(n int, what string) []byte {
	if d.err != nil {
		return nil
	}
	if n < 0 || len(d.b) < n {
		d.err = fmt.Errorf("truncated %s", what)
		return nil
	}
	v := d.b[:n]
	d.b = d.b[n:]
	return v
}

func (d *decoder) str(what string) string {
	n := d.uvarint(what)
	if d.err == nil && n > maxStringLen {
		d.err = fmt.Errorf("%s too long (%d bytes)", what, n)
		return ""
	}
	return string(d.bytes(int(n), what))
}

func decodeManifest(b []byte) (*Manifest, error) {
	d := &decoder{b: b}
	if string(d.bytes(len(manifestMagic), "magic")) != manifestMagic {
		if d.err != nil {
			return nil, d.err
		}
		return nil, errors.New("not a hoard manifest (bad magic)")
	}
	v := d.bytes(1, "version")
	if d.err != nil {
		return nil, d.err
	}
	version := v[0]
	if version != manifestVersion && version != manifestVersionContainer {
		return nil, fmt.Errorf("manifest version %d not supported by this hoard (want %d or %d): upgrade hoard", version, manifestVersion, manifestVersionContainer)
	}
	m := &Manifest{}
	size := d.uvarint("size")
	if size > 1<<62 {
		return nil, fmt.Errorf("size %d out of range", size)
	}
	m.Size = int64(size)
	kind := d.bytes(1, "chunking kind")
	if d.err != nil {
		return nil, d.err
	}
	switch kind[0] {
	case 1:
		m.Chunking.Kind = ChunkingCDC
	case 2:
		m.Chunking.Kind = ChunkingFixed
	default:
		return nil, fmt.Errorf("unknown chunking kind %d", kind[0])
	}
	for _, p := range []*uint32{&m.Chunking.Min, &m.Chunking.Avg, &m.Chunking.Max} {
		v := d.uvarint("chunking parameter")
		if v > MaxChunkSize {
			return nil, fmt.Errorf("chunking parameter %d too large", v)
		}
		*p = uint32(v)
	}
	if d.err != nil {
		return nil, d.err
	}
	if err := m.Chunking.validate(); err != nil {
		return nil, err
	}
	m.Format = d.str("format")
	m.Source.Kind = d.str("source kind")
	m.Source.Location = d.str("source location")
	m.Source.Checksum = d.str("source checksum")
	if version == manifestVersionContainer {
		m.Container = d.str("container")
		if d.err == nil && m.Container == "" {
			return nil, errors.New("version 2 manifest with an empty container")
		}
	}
	n := d.uvarint("entry count")
	if d.err != nil {
		return nil, d.err
	}
	// Every entry takes at least two bytes: bound the allocation by the input.
	if n > uint64(len(d.b))/2 {
		return nil, fmt.Errorf("entry count %d larger than the data", n)
	}
	m.Entries = make([]Entry, 0, n)
	var off int64
	for i := uint64(0); i < n; i++ {
		l := d.uvarint("entry length")
		tag := d.bytes(1, "entry tag")
		if d.err != nil {
			return nil, d.err
		}
		e := Entry{Offset: off, Length: int64(l)}
		switch tag[0] {
		case tagZero:
			e.Zero = true
			if i > 0 && m.Entries[i-1].Zero {
				return nil, fmt.Errorf("entry %d: adjacent zero runs", i)
			}
			if l == 0 || l > uint64(m.Size) {
				return nil, fmt.Errorf("entry %d: zero run length %d out of range", i, l)
			}
		case tagData:
			if l == 0 || l > uint64(m.Chunking.Max) {
				return nil, fmt.Errorf("entry %d: chunk length %d out of range (max %d)", i, l, m.Chunking.Max)
			}
			var dg [32]byte
			copy(dg[:], d.bytes(32, "chunk digest"))
			if d.err != nil {
				return nil, d.err
			}
			e.ID = IDFromDigest(dg)
		default:
			return nil, fmt.Errorf("entry %d: unknown tag %d", i, tag[0])
		}
		off += e.Length
		if off > m.Size || off < 0 {
			return nil, fmt.Errorf("entries run past the size %d", m.Size)
		}
		m.Entries = append(m.Entries, e)
	}
	if off != m.Size {
		return nil, fmt.Errorf("entries cover %d bytes, size says %d", off, m.Size)
	}
	if len(d.b) != 0 {
		return nil, fmt.Errorf("%d trailing bytes", len(d.b))
	}
	return m, nil
}

// Find returns the index of the entry that holds offset off, or -1 when off is
// outside the image. It is a binary search.
func (m *Manifest) Find(off int64) int {
	if off < 0 || off >= m.Size {
		return -1
	}
	return sort.Search(len(m.Entries), func(i int) bool { return m.Entries[i].End() > off })
}

// Summary is what a listing shows of an image.
type Summary struct {
	Size         int64 `json:"size"`
	NonZeroBytes int64 `json:"non_zero_bytes"`
	Chunks       int   `json:"chunks"`        // data chunks, with repeats
	UniqueChunks int   `json:"unique_chunks"` // distinct data chunks
}

// Summarize counts m's chunks and bytes.
func (m *Manifest) Summarize() Summary {
	s := Summary{Size: m.Size}
	seen := make(map[ID]struct{}, len(m.Entries))
	for _, e := range m.Entries {
		if e.Zero {
			continue
		}
		s.NonZeroBytes += e.Length
		s.Chunks++
		if _, ok := seen[e.ID]; !ok {
			seen[e.ID] = struct{}{}
		}
	}
	s.UniqueChunks = len(seen)
	return s
}

// ChunkIDs returns the distinct data chunk IDs of m, in first-use order.
func (m *Manifest) ChunkIDs() []ID {
	seen := make(map[ID]struct{}, len(m.Entries))
	ids := make([]ID, 0, len(m.Entries))
	for _, e := range m.Entries {
		if e.Zero {
			continue
		}
		if _, ok := seen[e.ID]; ok {
			continue
		}
		seen[e.ID] = struct{}{}
		ids = append(ids, e.ID)
	}
	return ids
}
