package chunkstore

import (
	"crypto/sha256"
	"errors"
	"fmt"

	"github.com/ipfs/go-cid"
	mh "github.com/multiformats/go-multihash"
)

// ID names a chunk (or a manifest) by its content: a CIDv1 with codec raw and a
// sha2-256 multihash of the uncompressed bytes, the same CID IPFS gives that block.
// The zero value is the undefined ID.
type ID struct {
	digest [sha256.Size]byte
	ok     bool
}

// Sum returns the ID of b.
func Sum(b []byte) ID {
	return ID{digest: sha256.Sum256(b), ok: true}
}

// IDFromDigest returns the ID whose sha2-256 digest is d.
func IDFromDigest(d [sha256.Size]byte) ID { return ID{digest: d, ok: true} }

// ParseID parses a CID string (any multibase) into an ID. Only CIDv1, codec raw,
// sha2-256 are chunk IDs; anything else is an error.
func ParseID(s string) (ID, error) {
	c, err := cid.Decode(s)
	if err != nil {
		return ID{}, fmt.Errorf("parse id %q: %w", s, err)
	}
	return FromCID(c)
}

// FromCID converts c to an ID, refusing CIDs that are not v1/raw/sha2-256.
func FromCID(c cid.Cid) (ID, error) {
	if !c.Defined() {
		return ID{}, errors.New("undefined cid")
	}
	if c.Version() != 1 || c.Type() != cid.Raw {
		return ID{}, fmt.Errorf("cid %s: want CIDv1 with codec raw", c)
	}
	dec, err := mh.Decode(c.Hash())
	if err != nil {
		return ID{}, fmt.Errorf("cid %s: %w", c, err)
	}
	if dec.Code != mh.SHA2_256 || len(dec.Digest) != sha256.Size {
		return ID{}, fmt.Errorf("cid %s: want a sha2-256 multihash", c)
	}
	var id ID
	copy(id.digest[:], dec.Digest)
	id.ok = true
	return id, nil
}

// CID returns the ID as a go-cid value.
func (id ID) CID() cid.Cid {
	if !id.ok {
		return cid.Undef
	}
	h, err := mh.Encode(id.digest[:], mh.SHA2_256)
	if err != nil { // cannot happen: the digest length is right
		panic(err)
	}
	return cid.NewCidV1(cid.Raw, h)
}

// Defined reports whether id names something.
func (id ID) Defined() bool { return id.ok }

// Digest returns the sha2-256 digest.
func (id ID) Digest() [sha256.Size]byte { return id.digest }

// String returns the base32 CID string ("bafkrei…").
func (id ID) String() string {
	if !id.ok {
		return "<undefined>"
	}
	return id.CID().String()
}

// Verify reports whether b hashes to id.
func (id ID) Verify(b []byte) bool { return id.ok && sha256.Sum256(b) == id.digest }

// MarshalText implements encoding.TextMarshaler (JSON output uses the CID string).
func (id ID) MarshalText() ([]byte, error) {
	if !id.ok {
		return []byte(""), nil
	}
	return []byte(id.String()), nil
}

// UnmarshalText implements encoding.TextUnmarshaler.
func (id *ID) UnmarshalText(b []byte) error {
	if len(b) == 0 {
		*id = ID{}
		return nil
	}
	v, err := ParseID(string(b))
	if err != nil {
		return err
	}
	*id = v
	return nil
}
