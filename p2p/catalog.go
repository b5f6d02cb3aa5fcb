package p2p

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/hoardvm/hoard/chunkstore"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	mh "github.com/multiformats/go-multihash"
)

// CatalogEntry is one image of the cluster-wide catalog as one node last
// changed it: the names that map to a manifest, or a tombstone (Removed) left
// by image rm --cluster. Per manifest, the entry that Supersedes the others
// wins (see Supersedes); a node keeps tombstones so that a node that was
// offline learns of the removal.
type CatalogEntry struct {
	Manifest chunkstore.ID
	// Names are the names that map to Manifest: distinct, non-empty, valid
	// UTF-8, at most MaxCatalogNames of at most MaxCatalogNameLen bytes.
	Names []string
	// Removed marks a tombstone: the image was removed from the cluster.
	Removed bool
	// Pin asks every node to fetch the image's boot working set (with Full,
	// all of it) and pin it (hoard image prefetch --cluster).
	Pin, Full bool
	// Version orders changes to one manifest: a hybrid logical clock (see
	// NextVersion); greater wins.
	Version uint64
	// Publisher is the peer that made the change. Over pubsub it is checked
	// against the message's signer; PublishCatalog fills it in when empty.
	Publisher peer.ID
	// Sig is Publisher's signature of the entry (SignCatalogEntry), checked
	// on every path it arrives by (VerifyCatalogEntry): whoever relays or
	// serves an entry cannot change it.
	Sig []byte `json:",omitempty"`
	// Key is Publisher's public key (libp2p's marshalled form) when its peer
	// ID does not embed it (ed25519 IDs do: then Key is empty); an entry
	// whose publisher's key cannot be had is refused.
	Key []byte `json:",omitempty"`
}

// ProfileEntry is one node's boot profile (working set) of an image. Per
// (Manifest, Node) the greater Version wins; the node merges profiles of
// different nodes itself.
type ProfileEntry struct {
	Manifest chunkstore.ID
	// Node is the peer whose boots the profile was learned from; over pubsub it
	// is checked against the message's signer.
	Node peer.ID
	// Profile holds at most MaxProfileChunks distinct chunk indices.
	Profile chunkstore.Profile
	Version uint64
	// Sig is Node's signature of the entry and Key its public key when its
	// peer ID does not embed it, as in CatalogEntry.
	Sig []byte `json:",omitempty"`
	Key []byte `json:",omitempty"`
}

// CatalogBackend is the optional half of a Backend that keeps the catalog and
// the profiles; New detects it with a type assertion on the WithBackend value.
// Without it a node neither gossips nor syncs the catalog.
type CatalogBackend interface {
	// Catalog returns every entry this node knows, live and tombstones: what
	// a peer that syncs with this node receives. Called concurrently, with a
	// context cancelled when the requester goes away; the result is not
	// retained.
	Catalog(ctx context.Context) ([]CatalogEntry, error)
	// Profiles returns every profile entry this node knows, as Catalog.
	Profiles(ctx context.Context) ([]ProfileEntry, error)
	// LearnCatalog is called with each entry received from a peer, live by
	// pubsub or by sync, once its signature checked (VerifyCatalogEntry: the
	// change is e.Publisher's); from is the peer it came from (for pubsub
	// the relay). Entries may be old, repeated,
	// or this node's own: keep the one that Supersedes. Calls of LearnCatalog
	// and LearnProfile are serialized (one goroutine) and should return
	// quickly: pubsub entries arriving while the queue is full are dropped
	// (hoard_p2p_catalog_dropped_total) and come back by sync.
	LearnCatalog(from peer.ID, e CatalogEntry)
	// LearnProfile is LearnCatalog for profiles.
	LearnProfile(from peer.ID, e ProfileEntry)
}

// Catalog bounds; see doc.go.
const (
	// MaxCatalogNames is the most names one CatalogEntry may carry.
	MaxCatalogNames = 64
	// MaxCatalogNameLen bounds each name, in bytes.
	MaxCatalogNameLen = 1024
	// MaxProfileChunks is the most chunk indices one ProfileEntry may carry
	// (8 GiB of 64 KiB chunks, far more than a boot reads).
	MaxProfileChunks = 1 << 17
	// maxProfileIndex bounds a chunk index in a profile (2^32 entries).
	maxProfileIndex = 1 << 32
	// MaxCatalogEntrySize bounds one encoded entry: a pubsub message or a sync
	// frame body.
	MaxCatalogEntrySize = 1 << 20
	maxPeerIDLen        = 128
	// maxSigLen bounds a signature (ed25519: 64 bytes; RSA-4096: 512) and
	// maxKeyLen a public key carried in an entry.
	maxSigLen = 512
	maxKeyLen = 1024
)

// Signing domains: what a publisher signs is the domain, then the entry's
// encoding without its signature.
const (
	catalogSigDomain = "hoard catalog entry v1\x00"
	profileSigDomain = "hoard profile entry v1\x00"
)

// Catalog entry encodings: the first byte of a pubsub message or a sync frame.
const (
	entryCatalog byte = 0x01
	entryProfile byte = 0x02
)

// ErrBadCatalogEntry is wrapped by every catalog or profile decoding error.
var ErrBadCatalogEntry = errors.New("bad catalog entry")

func badEntry(format string, a ...any) error {
	return fmt.Errorf("%w: %s", ErrBadCatalogEntry, fmt.Sprintf(format, a...))
}

// Supersedes reports whether e wins over old, an entry for the same manifest:
// a greater Version wins; at the same Version a tombstone wins over a live
// entry, then the greater Publisher (as bytes), then the greater encoding, so
// that every node picks the same winner whatever the order it learns them in.
// An entry does not supersede itself.
func (e CatalogEntry) Supersedes(old CatalogEntry) bool {
	if e.Version != old.Version {
		return e.Version > old.Version
	}
	if e.Removed != old.Removed {
		return e.Removed
	}
	if e.Publisher != old.Publisher {
		return e.Publisher > old.Publisher
	}
	a, _ := appendCatalogBody(nil, e)
	b, _ := appendCatalogBody(nil, old)
	return bytes.Compare(a, b) > 0
}

// Supersedes reports whether e wins over old, an entry for the same manifest
// and node: a greater Version wins, then the greater encoding (signatures
// left out: an entry and its signed copy are the same change).
func (e ProfileEntry) Supersedes(old ProfileEntry) bool {
	if e.Version != old.Version {
		return e.Version > old.Version
	}
	a, _ := appendProfileBody(nil, e)
	b, _ := appendProfileBody(nil, old)
	return bytes.Compare(a, b) > 0
}

// SameChange reports whether e and o are the same change, signatures left
// out.
func (e CatalogEntry) SameChange(o CatalogEntry) bool {
	a, errA := appendCatalogBody(nil, e)
	b, errB := appendCatalogBody(nil, o)
	return errA == nil && errB == nil && bytes.Equal(a, b)
}

// SameChange reports whether e and o are the same profile, signatures left
// out.
func (e ProfileEntry) SameChange(o ProfileEntry) bool {
	a, errA := appendProfileBody(nil, e)
	b, errB := appendProfileBody(nil, o)
	return errA == nil && errB == nil && bytes.Equal(a, b)
}

// NextVersion returns the version for a new change to an entry whose greatest
// known version is known: a hybrid logical clock, now in milliseconds shifted
// left 16 bits (room for 65536 changes per millisecond), or known+1 when the
// clock is behind, so a change always supersedes what its node has seen.
func NextVersion(known uint64, now time.Time) uint64 {
	v := uint64(max(now.UnixMilli(), 0)) << 16
	if v <= known {
		v = known + 1
	}
	return v
}

// AppendCatalogEntry appends e's encoding (see doc.go) to b, or returns an
// error, without appending, when e is out of bounds or not signed.
func AppendCatalogEntry(b []byte, e CatalogEntry) ([]byte, error) {
	if err := checkSigned(e.Publisher, e.Sig, e.Key); err != nil {
		return b, err
	}
	start := len(b)
	b, err := appendCatalogBody(b, e)
	if err != nil {
		return b[:start], err
	}
	return appendSig(b, e.Sig, e.Key), nil
}

// checkSigned checks the bounds of a signature and of the key that goes
// with it: present exactly when id does not embed its key.
func checkSigned(id peer.ID, sig, key []byte) error {
	if len(sig) == 0 || len(sig) > maxSigLen {
		return badEntry("signature of %d bytes: want 1 to %d (sign the entry: SignCatalogEntry)", len(sig), maxSigLen)
	}
	if len(key) > maxKeyLen {
		return badEntry("public key of %d bytes (max %d)", len(key), maxKeyLen)
	}
	if len(key) > 0 && embedsKey(id) {
		return badEntry("public key given while the peer ID %s embeds it", id)
	}
	return nil
}

// embedsKey reports whether id is an identity multihash of its public key
// (ed25519 and secp256k1 IDs), whose key ExtractPublicKey returns.
func embedsKey(id peer.ID) bool {
	d, err := mh.Decode([]byte(id))
	return err == nil && d.Code == mh.IDENTITY
}

func appendSig(b, sig, key []byte) []byte {
	b = binary.AppendUvarint(b, uint64(len(sig)))
	b = append(b, sig...)
	b = binary.AppendUvarint(b, uint64(len(key)))
	return append(b, key...)
}

// appendCatalogBody appends e's encoding without its signature.
func appendCatalogBody(b []byte, e CatalogEntry) ([]byte, error) {
	if err := checkCatalogEntry(e); err != nil {
		return b, err
	}
	b = append(b, entryCatalog)
	d := e.Manifest.Digest()
	b = append(b, d[:]...)
	var flags byte
	if e.Removed {
		flags |= 1
	}
	if e.Pin {
		flags |= 2
	}
	if e.Full {
		flags |= 4
	}
	b = append(b, flags)
	b = binary.AppendUvarint(b, e.Version)
	b = binary.AppendUvarint(b, uint64(len(e.Publisher)))
	b = append(b, e.Publisher...)
	b = binary.AppendUvarint(b, uint64(len(e.Names)))
	for _, n := range e.Names {
		b = binary.AppendUvarint(b, uint64(len(n)))
		b = append(b, n...)
	}
	return b, nil
}

func checkCatalogEntry(e CatalogEntry) error {
	if !e.Manifest.Defined() {
		return badEntry("no manifest")
	}
	if err := checkPeerID(e.Publisher, "publisher"); err != nil {
		return err
	}
	if e.Full && !e.Pin || e.Removed && e.Pin {
		return badEntry("flags: full without pin, or a pinned tombstone")
	}
	if len(e.Names) > MaxCatalogNames {
		return badEntry("%d names (max %d)", len(e.Names), MaxCatalogNames)
	}
	for i, n := range e.Names {
		if n == "" || len(n) > MaxCatalogNameLen || !utf8.ValidString(n) {
			return badEntry("name %q: want 1 to %d bytes of UTF-8", trimName(n), MaxCatalogNameLen)
		}
		if slices.Contains(e.Names[:i], n) {
			return badEntry("name %q repeated", trimName(n))
		}
	}
	return nil
}

func trimName(n string) string {
	if len(n) > 64 {
		return strings.ToValidUTF8(n[:64], "?") + "..."
	}
	return n
}

func checkPeerID(id peer.ID, what string) error {
	if id == "" || len(id) > maxPeerIDLen {
		return badEntry("%s peer ID of %d bytes", what, len(id))
	}
	if _, err := peer.IDFromBytes([]byte(id)); err != nil {
		return badEntry("%s: %v", what, err)
	}
	return nil
}

// AppendProfileEntry appends e's encoding (see doc.go) to b, or returns an
// error, without appending, when e is out of bounds or not signed.
func AppendProfileEntry(b []byte, e ProfileEntry) ([]byte, error) {
	if err := checkSigned(e.Node, e.Sig, e.Key); err != nil {
		return b, err
	}
	return appendProfile(b, e, true)
}

// appendProfileBody appends e's encoding without its signature.
func appendProfileBody(b []byte, e ProfileEntry) ([]byte, error) {
	return appendProfile(b, e, false)
}

func appendProfile(b []byte, e ProfileEntry, signed bool) ([]byte, error) {
	if !e.Manifest.Defined() {
		return b, badEntry("no manifest")
	}
	if err := checkPeerID(e.Node, "node"); err != nil {
		return b, err
	}
	if len(e.Profile.Chunks) > MaxProfileChunks {
		return b, badEntry("profile of %d chunks (max %d)", len(e.Profile.Chunks), MaxProfileChunks)
	}
	if e.Profile.Boots < 0 {
		return b, badEntry("negative boot count")
	}
	seen := make(map[int]struct{}, len(e.Profile.Chunks))
	for _, i := range e.Profile.Chunks {
		if i < 0 || i >= maxProfileIndex {
			return b, badEntry("profile index %d out of range", i)
		}
		if _, dup := seen[i]; dup {
			return b, badEntry("profile index %d repeated", i)
		}
		seen[i] = struct{}{}
	}
	start := len(b)
	b = append(b, entryProfile)
	d := e.Manifest.Digest()
	b = append(b, d[:]...)
	b = binary.AppendUvarint(b, e.Version)
	b = binary.AppendUvarint(b, uint64(len(e.Node)))
	b = append(b, e.Node...)
	if signed {
		b = appendSig(b, e.Sig, e.Key)
	}
	b = append(b, e.Profile.Encode()...)
	if len(b)-start > MaxCatalogEntrySize {
		return b[:start], badEntry("profile of %d bytes encoded (max %d); trim the profile", len(b)-start, MaxCatalogEntrySize)
	}
	return b, nil
}

// entryDecoder reads the fields of one encoded entry.
type entryDecoder struct{ b []byte }

func (d *entryDecoder) uvarint(what string, limit uint64) (uint64, error) {
	v, n := binary.Uvarint(d.b)
	if n <= 0 || v > limit {
		return 0, badEntry("bad %s", what)
	}
	d.b = d.b[n:]
	return v, nil
}

func (d *entryDecoder) bytes(n int, what string) ([]byte, error) {
	if n > len(d.b) {
		return nil, badEntry("short %s", what)
	}
	v := d.b[:n]
	d.b = d.b[n:]
	return v, nil
}

func (d *entryDecoder) manifest() (chunkstore.ID, error) {
	v, err := d.bytes(sha256.Size, "manifest digest")
	if err != nil {
		return chunkstore.ID{}, err
	}
	return chunkstore.IDFromDigest([sha256.Size]byte(v)), nil
}

// sig reads a signature and the public key that goes with it.
func (d *entryDecoder) sig() (sig, key []byte, err error) {
	n, err := d.uvarint("signature length", maxSigLen)
	if err != nil {
		return nil, nil, err
	}
	if n == 0 {
		return nil, nil, badEntry("not signed")
	}
	v, err := d.bytes(int(n), "signature")
	if err != nil {
		return nil, nil, err
	}
	sig = bytes.Clone(v)
	if n, err = d.uvarint("public key length", maxKeyLen); err != nil {
		return nil, nil, err
	}
	if n > 0 {
		if v, err = d.bytes(int(n), "public key"); err != nil {
			return nil, nil, err
		}
		key = bytes.Clone(v)
	}
	return sig, key, nil
}

func (d *entryDecoder) peerID(what string) (peer.ID, error) {
	n, err := d.uvarint(what+" length", maxPeerIDLen)
	if err != nil {
		return "", err
	}
	v, err := d.bytes(int(n), what)
	if err != nil {
		return "", err
	}
	return peer.ID(v), nil
}

// DecodeCatalogEntry parses an encoded catalog entry strictly: anything out of
// bounds, trailing or not in canonical form is an error wrapping
// ErrBadCatalogEntry. The result does not alias b.
func DecodeCatalogEntry(b []byte) (CatalogEntry, error) {
	var e CatalogEntry
	if len(b) > MaxCatalogEntrySize {
		return e, badEntry("%d bytes (max %d)", len(b), MaxCatalogEntrySize)
	}
	if len(b) == 0 || b[0] != entryCatalog {
		return e, badEntry("not a catalog entry")
	}
	d := &entryDecoder{b: b[1:]}
	var err error
	if e.Manifest, err = d.manifest(); err != nil {
		return e, err
	}
	flags, err := d.bytes(1, "flags")
	if err != nil {
		return e, err
	}
	if flags[0]&^7 != 0 {
		return e, badEntry("unknown flags %#x", flags[0])
	}
	e.Removed, e.Pin, e.Full = flags[0]&1 != 0, flags[0]&2 != 0, flags[0]&4 != 0
	if e.Version, err = d.uvarint("version", 1<<64-1); err != nil {
		return e, err
	}
	if e.Publisher, err = d.peerID("publisher"); err != nil {
		return e, err
	}
	n, err := d.uvarint("name count", MaxCatalogNames)
	if err != nil {
		return e, err
	}
	if n > 0 {
		e.Names = make([]string, 0, n)
	}
	for range n {
		l, err := d.uvarint("name length", MaxCatalogNameLen)
		if err != nil {
			return e, err
		}
		v, err := d.bytes(int(l), "name")
		if err != nil {
			return e, err
		}
		e.Names = append(e.Names, string(v))
	}
	if e.Sig, e.Key, err = d.sig(); err != nil {
		return e, err
	}
	if len(d.b) != 0 {
		return e, badEntry("%d trailing bytes", len(d.b))
	}
	again, err := AppendCatalogEntry(nil, e)
	if err != nil {
		return CatalogEntry{}, err
	}
	if !bytes.Equal(again, b) {
		return CatalogEntry{}, badEntry("not in canonical form")
	}
	return e, nil
}

// DecodeProfileEntry parses an encoded profile entry strictly, as
// DecodeCatalogEntry.
func DecodeProfileEntry(b []byte) (ProfileEntry, error) {
	var e ProfileEntry
	if len(b) > MaxCatalogEntrySize {
		return e, badEntry("%d bytes (max %d)", len(b), MaxCatalogEntrySize)
	}
	if len(b) == 0 || b[0] != entryProfile {
		return e, badEntry("not a profile entry")
	}
	d := &entryDecoder{b: b[1:]}
	var err error
	if e.Manifest, err = d.manifest(); err != nil {
		return e, err
	}
	if e.Version, err = d.uvarint("version", 1<<64-1); err != nil {
		return e, err
	}
	if e.Node, err = d.peerID("node"); err != nil {
		return e, err
	}
	if err := checkPeerID(e.Node, "node"); err != nil {
		return ProfileEntry{}, err
	}
	if e.Sig, e.Key, err = d.sig(); err != nil {
		return ProfileEntry{}, err
	}
	if err := checkSigned(e.Node, e.Sig, e.Key); err != nil {
		return ProfileEntry{}, err
	}
	// DecodeProfile checks that its count fits the data, so the allocation
	// is bounded by len(b).
	prof, err := chunkstore.DecodeProfile(d.b, maxProfileIndex)
	if err != nil {
		return ProfileEntry{}, badEntry("%v", err)
	}
	if len(prof.Chunks) > MaxProfileChunks {
		return ProfileEntry{}, badEntry("profile of %d chunks (max %d)", len(prof.Chunks), MaxProfileChunks)
	}
	if prof.Boots < 0 {
		return ProfileEntry{}, badEntry("boot count out of range")
	}
	e.Profile = *prof
	return e, nil
}

// SignCatalogEntry returns e signed with priv, the key of e.Publisher (filled
// in from priv when empty).
func SignCatalogEntry(priv crypto.PrivKey, e CatalogEntry) (CatalogEntry, error) {
	id, key, err := signer(priv, &e.Publisher)
	if err != nil {
		return e, fmt.Errorf("sign catalog entry of %s: %w", e.Manifest, err)
	}
	e.Key = key
	body, err := appendCatalogBody([]byte(catalogSigDomain), e)
	if err != nil {
		return e, fmt.Errorf("sign catalog entry of %s: %w", e.Manifest, err)
	}
	if e.Sig, err = priv.Sign(body); err != nil {
		return e, fmt.Errorf("sign catalog entry of %s as %s: %w", e.Manifest, id, err)
	}
	return e, nil
}

// SignProfileEntry returns e signed with priv, the key of e.Node (filled in
// from priv when empty).
func SignProfileEntry(priv crypto.PrivKey, e ProfileEntry) (ProfileEntry, error) {
	id, key, err := signer(priv, &e.Node)
	if err != nil {
		return e, fmt.Errorf("sign profile of %s: %w", e.Manifest, err)
	}
	e.Key = key
	body, err := appendProfileBody([]byte(profileSigDomain), e)
	if err != nil {
		return e, fmt.Errorf("sign profile of %s: %w", e.Manifest, err)
	}
	if e.Sig, err = priv.Sign(body); err != nil {
		return e, fmt.Errorf("sign profile of %s as %s: %w", e.Manifest, id, err)
	}
	return e, nil
}

// signer checks that priv is the key of *who, filling *who in when empty,
// and returns the public key an entry must carry (nil when the ID embeds it).
func signer(priv crypto.PrivKey, who *peer.ID) (peer.ID, []byte, error) {
	if priv == nil {
		return "", nil, errors.New("no private key: the node's identity key is not in its peerstore")
	}
	id, err := peer.IDFromPrivateKey(priv)
	if err != nil {
		return "", nil, err
	}
	if *who == "" {
		*who = id
	}
	if *who != id {
		return "", nil, fmt.Errorf("entry of %s cannot be signed by %s: a node signs only its own changes", *who, id)
	}
	if embedsKey(id) {
		return id, nil, nil
	}
	key, err := crypto.MarshalPublicKey(priv.GetPublic())
	if err != nil {
		return "", nil, err
	}
	return id, key, nil
}

// VerifyCatalogEntry checks e.Sig against e.Publisher's public key, taken
// from its peer ID. An error wraps ErrBadCatalogEntry: the entry is false
// (or its publisher's key cannot be had) and must be dropped.
func VerifyCatalogEntry(e CatalogEntry) error {
	body, err := appendCatalogBody([]byte(catalogSigDomain), e)
	if err != nil {
		return err
	}
	return verifySig(e.Publisher, body, e.Sig, e.Key, "catalog entry of "+e.Manifest.String())
}

// VerifyProfileEntry checks e.Sig against e.Node's public key, as
// VerifyCatalogEntry.
func VerifyProfileEntry(e ProfileEntry) error {
	body, err := appendProfileBody([]byte(profileSigDomain), e)
	if err != nil {
		return err
	}
	return verifySig(e.Node, body, e.Sig, e.Key, "profile of "+e.Manifest.String())
}

func verifySig(id peer.ID, body, sig, key []byte, what string) error {
	if err := checkSigned(id, sig, key); err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	var pub crypto.PubKey
	var err error
	if len(key) == 0 {
		pub, err = id.ExtractPublicKey()
	} else if pub, err = crypto.UnmarshalPublicKey(key); err == nil && !id.MatchesPublicKey(pub) {
		err = errors.New("the key carried is not the peer ID's")
	}
	if err != nil {
		return badEntry("%s: no public key of %s (%v): its publisher must sign it with its identity key (SignCatalogEntry)", what, id, err)
	}
	ok, err := pub.Verify(body, sig)
	if err != nil || !ok {
		return badEntry("%s: signature is not %s's", what, id)
	}
	return nil
}
