package chunkstore

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
)

// Profile is an image's boot working set: the indices of the manifest entries
// that boots read, in first-read order, merged over Boots boots.
type Profile struct {
	Boots  int   `json:"boots"`
	Chunks []int `json:"chunks"`
}

// ErrBadProfile is wrapped by every profile decoding error.
var ErrBadProfile = errors.New("bad profile")

const (
	profileMagic   = "HOARDPF"
	profileVersion = 1
)

// Merge appends the indices of a later boot that p does not hold yet, keeping the
// first boot's order, and counts the boot.
func (p *Profile) Merge(order []int) {
	seen := make(map[int]struct{}, len(p.Chunks))
	for _, i := range p.Chunks {
		seen[i] = struct{}{}
	}
	for _, i := range order {
		if _, ok := seen[i]; !ok {
			seen[i] = struct{}{}
			p.Chunks = append(p.Chunks, i)
		}
	}
	p.Boots++
}

// Encode returns "HOARDPF" version(1) uvarint(boots) uvarint(n) n × uvarint(index).
func (p *Profile) Encode() []byte {
	b := make([]byte, 0, 16+len(p.Chunks)*3)
	b = append(b, profileMagic...)
	b = append(b, profileVersion)
	b = binary.AppendUvarint(b, uint64(p.Boots))
	b = binary.AppendUvarint(b, uint64(len(p.Chunks)))
	for _, i := range p.Chunks {
		b = binary.AppendUvarint(b, uint64(i))
	}
	return b
}

// DecodeProfile parses an encoded profile strictly; entries must be distinct
// indices below entries (the manifest's entry count).
func DecodeProfile(b []byte, entries int) (*Profile, error) {
	bad := func(format string, a ...any) (*Profile, error) {
		return nil, fmt.Errorf("%w: %s", ErrBadProfile, fmt.Sprintf(format, a...))
	}
	d := &decoder{b: b}
	if string(d.bytes(len(profileMagic), "magic")) != profileMagic {
		return bad("not a hoard profile")
	}
	if v := d.bytes(1, "version"); d.err != nil || v[0] != profileVersion {
		return bad("unsupported version")
	}
	p := &Profile{Boots: int(d.uvarint("boots"))}
	n := d.uvarint("count")
	if d.err != nil {
		return bad("%v", d.err)
	}
	if n > uint64(len(d.b)) {
		return bad("count %d larger than the data", n)
	}
	seen := make(map[int]struct{}, n)
	p.Chunks = make([]int, 0, n)
	for k := uint64(0); k < n; k++ {
		i := d.uvarint("index")
		if d.err != nil {
			return bad("%v", d.err)
		}
		if i >= uint64(entries) {
			return bad("index %d out of range (%d entries)", i, entries)
		}
		if _, dup := seen[int(i)]; dup {
			return bad("index %d repeated", i)
		}
		seen[int(i)] = struct{}{}
		p.Chunks = append(p.Chunks, int(i))
	}
	if len(d.b) != 0 {
		return bad("%d trailing bytes", len(d.b))
	}
	if !bytes.Equal(p.Encode(), b) {
		return bad("not in canonical form")
	}
	return p, nil
}
