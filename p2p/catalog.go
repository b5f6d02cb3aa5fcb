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
	"github.com/libp2p/go-libp2p/core/peer"
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
	// pubsub or by sync; from is the peer it came from (for pubsub the relay,
	// while e.Publisher is the verified signer). Entries may be old, repeated,
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
	a, _ := AppendCatalogEntry(nil, e)
	b, _ := AppendCatalogEntry(nil, old)
	return bytes.Compare(a, b) > 0
}

// Supersedes reports whether e wins over old, an entry for the same manifest
// and node: a greater Version wins, then the greater encoding.
func (e ProfileEntry) Supersedes(old ProfileEntry) bool {
	if e.Version != old.Version {
		return e.Version > old.Version
	}
	a, _ := AppendProfileEntry(nil, e)
	b, _ := AppendProfileEntry(nil, old)
	return bytes.Compare(a, b) > 0
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
// error, without appending, when e is out of bounds.
func AppendCatalogEntry(b []byte, e CatalogEntry) ([]byte, error) {
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
// error, without appending, when e is out of bounds.
func AppendProfileEntry(b []byte, e ProfileEntry) ([]byte, error) {
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
