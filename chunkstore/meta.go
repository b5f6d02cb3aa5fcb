package chunkstore

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"regexp"
	"sort"

	"github.com/cockroachdb/pebble/v2"
)

// Pins: key 'p' digest owner, and the reverse 'P' owner 0 digest so that an
// owner's pins can be dropped without knowing its chunks.

func pinKey(d [32]byte, owner string) []byte {
	return append(append([]byte{pfxPin}, d[:]...), owner...)
}

func pinOwnerKey(owner string, d [32]byte) []byte {
	k := append([]byte{pfxPinOwner}, owner...)
	k = append(k, 0)
	return append(k, d[:]...)
}

func setPin(b *pebble.Batch, d [32]byte, owner string) error {
	if err := b.Set(pinKey(d, owner), nil, nil); err != nil {
		return err
	}
	return b.Set(pinOwnerKey(owner, d), nil, nil)
}

// Pin protects chunks from eviction on behalf of owner (an image, a live
// export, an import in progress). Pinning is idempotent per owner and chunk, and
// a chunk may be pinned before it is stored.
func (s *Store) Pin(ctx context.Context, owner string, ids []ID) error {
	if owner == "" {
		return errors.New("pin: empty owner")
	}
	done, err := s.enter()
	defer done()
	if err == nil {
		err = s.checkWrite()
	}
	if err != nil {
		return fmt.Errorf("pin %d chunks for %s: %w", len(ids), owner, err)
	}
	s.evictLock.RLock()
	defer s.evictLock.RUnlock()
	b := s.db.NewBatch()
	defer b.Close()
	for _, id := range ids {
		if err := setPin(b, id.digest, owner); err != nil {
			return err
		}
	}
	if err := s.commit(b); err != nil {
		return fmt.Errorf("pin %d chunks for %s: %w", len(ids), owner, err)
	}
	return nil
}

// Unpin drops every pin owner holds.
func (s *Store) Unpin(ctx context.Context, owner string) error {
	done, err := s.enter()
	defer done()
	if err == nil {
		err = s.checkRemove()
	}
	if err == nil {
		s.evictLock.RLock()
		b := s.db.NewBatch()
		err = s.unpinBatch(b, owner)
		if err == nil {
			err = s.commit(b)
		}
		b.Close()
		s.evictLock.RUnlock()
	}
	if err != nil {
		return fmt.Errorf("unpin %s: %w", owner, err)
	}
	return nil
}

// unpinBatch adds the deletion of every pin of owner to b.
func (s *Store) unpinBatch(b *pebble.Batch, owner string) error {
	p := append([]byte{pfxPinOwner}, owner...)
	p = append(p, 0)
	it, err := s.db.NewIter(prefixIter(p...))
	if err != nil {
		return err
	}
	defer it.Close()
	for it.First(); it.Valid(); it.Next() {
		var d [32]byte
		copy(d[:], it.Key()[len(p):])
		b.Delete(pinKey(d, owner), nil)
		b.Delete(it.Key(), nil)
	}
	return it.Error()
}

// Pinned reports whether any owner pins the chunk.
func (s *Store) Pinned(ctx context.Context, id ID) (bool, error) {
	done, err := s.enter()
	defer done()
	if err != nil {
		return false, err
	}
	return s.hasPrefix(append([]byte{pfxPin}, id.digest[:]...))
}

// PinOwnerImage is the pin owner name used for an image's chunks.
func PinOwnerImage(manifest ID) string { return "image:" + manifest.String() }

// PutManifest stores m and records a reference from it to each of its chunks,
// in one atomic commit. It returns the manifest's ID. Storing a manifest twice
// is harmless.
func (s *Store) PutManifest(ctx context.Context, m *Manifest) (ID, error) {
	return s.PutNamedManifest(ctx, "", m)
}

// PutNamedManifest stores m as PutManifest does and, when name is not
// empty, points name at it, all in one atomic commit: either both are stored
// or neither. A name that points at another manifest is not changed: the
// error wraps ErrExists. Storing the same manifest under the same name again
// is harmless.
func (s *Store) PutNamedManifest(ctx context.Context, name string, m *Manifest) (ID, error) {
	enc := m.Encode()
	if _, err := DecodeManifest(enc); err != nil {
		return ID{}, fmt.Errorf("put manifest: %w", err)
	}
	if name != "" {
		if err := ValidateName(name); err != nil {
			return ID{}, err
		}
	}
	id := Sum(enc)
	done, err := s.enter()
	defer done()
	if err == nil {
		err = s.checkWrite()
	}
	if err != nil {
		return ID{}, fmt.Errorf("put manifest %s: %w", id, err)
	}
	if name != "" {
		s.nameMu.Lock()
		defer s.nameMu.Unlock()
		if err := s.nameFree(name, id); err != nil {
			return ID{}, err
		}
	}
	s.evictLock.RLock()
	defer s.evictLock.RUnlock()
	b := s.db.NewBatch()
	defer b.Close()
	b.Set(append([]byte{pfxManifest}, id.digest[:]...), enc, nil)
	for _, c := range m.ChunkIDs() {
		b.Set(refKey(c.digest, id.digest), nil, nil)
	}
	if name != "" {
		b.Set(nameKey(name), id.digest[:], nil)
	}
	if err := s.commit(b); err != nil {
		return ID{}, fmt.Errorf("put manifest %s: %w", id, err)
	}
	return id, nil
}

func nameKey(name string) []byte { return append([]byte{pfxName}, name...) }

// nameFree checks, under nameMu, that name is unused or already points at id.
func (s *Store) nameFree(name string, id ID) error {
	cur, ok, err := s.lookupName(name)
	if err != nil {
		return fmt.Errorf("name %s: %w", name, err)
	}
	if ok && cur != id {
		return fmt.Errorf("image %q %w (manifest %s); remove it with hoard image rm %s, or choose another name", name, ErrExists, cur, name)
	}
	return nil
}

func (s *Store) lookupName(name string) (ID, bool, error) {
	v, c, err := s.db.Get(nameKey(name))
	if errors.Is(err, pebble.ErrNotFound) {
		return ID{}, false, nil
	}
	if err != nil {
		return ID{}, false, err
	}
	defer c.Close()
	var d [32]byte
	copy(d[:], v)
	return IDFromDigest(d), true, nil
}

func refKey(chunk, manifest [32]byte) []byte {
	k := append([]byte{pfxRef}, chunk[:]...)
	return append(k, manifest[:]...)
}

// GetManifest returns a stored manifest, verified against its ID.
func (s *Store) GetManifest(ctx context.Context, id ID) (*Manifest, error) {
	done, err := s.enter()
	defer done()
	if err != nil {
		return nil, fmt.Errorf("manifest %s: %w", id, err)
	}
	return s.getManifest(id)
}

func (s *Store) getManifest(id ID) (*Manifest, error) {
	v, c, err := s.db.Get(append([]byte{pfxManifest}, id.digest[:]...))
	if errors.Is(err, pebble.ErrNotFound) {
		return nil, fmt.Errorf("manifest %s: %w", id, ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("manifest %s: %w", id, err)
	}
	defer c.Close()
	if !id.Verify(v) {
		return nil, fmt.Errorf("manifest %s: %w", id, ErrCorrupt)
	}
	return DecodeManifest(v)
}

// GetManifestBytes returns a stored manifest's encoding (to send to a peer).
func (s *Store) GetManifestBytes(ctx context.Context, id ID) ([]byte, error) {
	done, err := s.enter()
	defer done()
	if err != nil {
		return nil, fmt.Errorf("manifest %s: %w", id, err)
	}
	v, c, err := s.db.Get(append([]byte{pfxManifest}, id.digest[:]...))
	if errors.Is(err, pebble.ErrNotFound) {
		return nil, fmt.Errorf("manifest %s: %w", id, ErrNotFound)
	}
	if err != nil {
		return nil, err
	}
	defer c.Close()
	return append([]byte(nil), v...), nil
}

// Manifests lists the IDs of all stored manifests.
func (s *Store) Manifests(ctx context.Context) ([]ID, error) {
	done, err := s.enter()
	defer done()
	if err != nil {
		return nil, err
	}
	it, err := s.db.NewIter(prefixIter(pfxManifest))
	if err != nil {
		return nil, err
	}
	defer it.Close()
	var ids []ID
	for it.First(); it.Valid(); it.Next() {
		var d [32]byte
		copy(d[:], it.Key()[1:])
		ids = append(ids, IDFromDigest(d))
	}
	return ids, it.Error()
}

// RemoveManifest deletes a manifest, its profile, its references and its
// pins, in one atomic commit. Its chunks stay until garbage collection finds
// them unreferenced (GC), so that removing one image never deletes a chunk
// another still uses; RemoveName removes an image and its garbage at once.
func (s *Store) RemoveManifest(ctx context.Context, id ID) error {
	done, err := s.enter()
	defer done()
	if err == nil {
		err = s.checkRemove()
	}
	if err != nil {
		return fmt.Errorf("remove manifest %s: %w", id, err)
	}
	s.evictLock.Lock()
	defer s.evictLock.Unlock()
	m, err := s.getManifest(id)
	if err != nil {
		return err
	}
	b := s.db.NewBatch()
	defer b.Close()
	if err := s.removeManifestBatch(b, id, m); err != nil {
		return fmt.Errorf("remove manifest %s: %w", id, err)
	}
	if err := s.commit(b); err != nil {
		return fmt.Errorf("remove manifest %s: %w", id, err)
	}
	return nil
}

// removeManifestBatch adds to b the deletion of manifest id (m), its
// references, profile and image pins.
func (s *Store) removeManifestBatch(b *pebble.Batch, id ID, m *Manifest) error {
	if err := s.unpinBatch(b, PinOwnerImage(id)); err != nil {
		return err
	}
	for _, c := range m.ChunkIDs() {
		b.Delete(refKey(c.digest, id.digest), nil)
	}
	b.Delete(append([]byte{pfxManifest}, id.digest[:]...), nil)
	b.Delete(append([]byte{pfxProfile}, id.digest[:]...), nil)
	return nil
}

// Removed says what RemoveName removed.
type Removed struct {
	Manifest ID `json:"manifest"`
	// ManifestRemoved is false when another name still uses the manifest
	// (then nothing else was removed).
	ManifestRemoved bool  `json:"manifest_removed"`
	Chunks          int   `json:"chunks"`       // chunks deleted
	StoredBytes     int64 `json:"stored_bytes"` // their stored bytes
}

// RemoveName removes an image: the name (or, given a manifest CID, no name)
// and, when no other name uses the manifest, the manifest with its profile,
// references and image pins, and exactly those of its chunks that no other
// manifest references and no owner pins. It is one step under the store's
// eviction lock, so no commit, pin or manifest can slip in between deciding
// what is garbage and deleting it. Then it compacts packs.
func (s *Store) RemoveName(ctx context.Context, name string) (Removed, error) {
	done, err := s.enter()
	defer done()
	if err == nil {
		err = s.checkRemove()
	}
	if err != nil {
		return Removed{}, fmt.Errorf("remove image %q: %w", name, err)
	}
	res, err := s.removeName(ctx, name)
	if err != nil || res.Chunks == 0 {
		return res, err
	}
	if _, err := s.compactFreed(ctx); err != nil {
		return res, fmt.Errorf("remove image %q: %w", name, err)
	}
	return res, nil
}

func (s *Store) removeName(ctx context.Context, name string) (Removed, error) {
	s.nameMu.Lock()
	defer s.nameMu.Unlock()
	id, named, err := s.lookupName(name)
	if err != nil {
		return Removed{}, fmt.Errorf("remove image %q: %w", name, err)
	}
	if !named {
		pid, perr := ParseID(name)
		if perr != nil || !s.hasManifest(pid) {
			return Removed{}, fmt.Errorf("image %q: %w; list images with hoard image ls", name, ErrNotFound)
		}
		id = pid
	}
	res := Removed{Manifest: id}
	s.evictLock.Lock()
	defer s.evictLock.Unlock()
	b := s.db.NewBatch()
	defer b.Close()
	if named {
		b.Delete(nameKey(name), nil)
	}
	shared, err := s.otherName(name, id)
	if err != nil {
		return res, fmt.Errorf("remove image %q: %w", name, err)
	}
	var m *Manifest
	if !shared {
		m, err = s.getManifest(id)
		switch {
		case errors.Is(err, ErrNotFound):
			m = nil // a dangling name: only the name goes
		case err != nil:
			return res, fmt.Errorf("remove image %q: %w", name, err)
		default:
			if err := s.removeManifestBatch(b, id, m); err != nil {
				return res, fmt.Errorf("remove image %q: %w", name, err)
			}
		}
	}
	if err := s.commit(b); err != nil {
		return res, fmt.Errorf("remove image %q: %w", name, err)
	}
	if m == nil {
		return res, nil
	}
	res.ManifestRemoved = true
	var garbage []ID
	for _, c := range m.ChunkIDs() {
		g, err := s.garbage(c.digest) // an open batch's dedup hit stays, as in GC
		if err != nil {
			return res, fmt.Errorf("remove image %q: %w", name, err)
		}
		if g {
			garbage = append(garbage, c)
		}
	}
	s.mu.Lock()
	before := s.usage.Chunks
	s.mu.Unlock()
	freed, err := s.deleteLocked(ctx, garbage, false)
	s.mu.Lock()
	res.Chunks = int(before - s.usage.Chunks)
	s.mu.Unlock()
	res.StoredBytes = freed
	if err != nil {
		return res, fmt.Errorf("remove image %q: delete its chunks: %w", name, err)
	}
	return res, nil
}

// otherName reports whether a name other than name points at id.
func (s *Store) otherName(name string, id ID) (bool, error) {
	it, err := s.db.NewIter(prefixIter(pfxName))
	if err != nil {
		return false, err
	}
	defer it.Close()
	for it.First(); it.Valid(); it.Next() {
		if string(it.Key()[1:]) != name && bytes.Equal(it.Value(), id.digest[:]) {
			return true, nil
		}
	}
	return false, it.Error()
}

func (s *Store) hasManifest(id ID) bool {
	_, c, err := s.db.Get(append([]byte{pfxManifest}, id.digest[:]...))
	if err != nil {
		return false
	}
	c.Close()
	return true
}

var nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._:+-]{0,199}$`)

// ValidateName checks an image name: 1-200 characters of letters, digits and
// . _ : + -, starting with a letter or digit (it becomes an NBD export name).
// The error wraps ErrInvalid.
func ValidateName(name string) error {
	if !nameRE.MatchString(name) {
		return fmt.Errorf("%w image name %q: use 1-200 letters, digits and . _ : + -, starting with a letter or digit", ErrInvalid, name)
	}
	return nil
}

// SetName points name at a stored manifest. A name that points at another
// manifest is not changed: the error wraps ErrExists (remove the image
// first); pointing a name at its own manifest again is harmless. To store a
// manifest and its name together, use PutNamedManifest.
func (s *Store) SetName(ctx context.Context, name string, id ID) error {
	if err := ValidateName(name); err != nil {
		return err
	}
	done, err := s.enter()
	defer done()
	if err == nil {
		err = s.checkWrite()
	}
	if err != nil {
		return fmt.Errorf("name %s: %w", name, err)
	}
	s.nameMu.Lock()
	defer s.nameMu.Unlock()
	if !s.hasManifest(id) {
		return fmt.Errorf("name %s: manifest %s: %w; store it first", name, id, ErrNotFound)
	}
	if err := s.nameFree(name, id); err != nil {
		return err
	}
	if err := s.commitSet(nameKey(name), id.digest[:]); err != nil {
		return fmt.Errorf("name %s: %w", name, err)
	}
	return nil
}

// DeleteName removes a name (the manifest stays; see RemoveName).
func (s *Store) DeleteName(ctx context.Context, name string) error {
	done, err := s.enter()
	defer done()
	if err == nil {
		err = s.checkRemove()
	}
	if err != nil {
		return fmt.Errorf("delete name %s: %w", name, err)
	}
	s.nameMu.Lock()
	defer s.nameMu.Unlock()
	b := s.db.NewBatch()
	defer b.Close()
	b.Delete(nameKey(name), nil)
	if err := s.commit(b); err != nil {
		return fmt.Errorf("delete name %s: %w", name, err)
	}
	return nil
}

// Resolve returns the manifest a name points to. A manifest CID string resolves
// to itself when that manifest is stored.
func (s *Store) Resolve(ctx context.Context, name string) (ID, error) {
	done, err := s.enter()
	defer done()
	if err != nil {
		return ID{}, fmt.Errorf("image %q: %w", name, err)
	}
	id, ok, err := s.lookupName(name)
	if err != nil {
		return ID{}, fmt.Errorf("image %q: %w", name, err)
	}
	if ok {
		return id, nil
	}
	if id, perr := ParseID(name); perr == nil && s.hasManifest(id) {
		return id, nil
	}
	return ID{}, fmt.Errorf("image %q: %w; list images with hoard image ls", name, ErrNotFound)
}

// Names returns every name and the manifest it points to, sorted by name.
func (s *Store) Names(ctx context.Context) ([]Named, error) {
	done, err := s.enter()
	defer done()
	if err != nil {
		return nil, err
	}
	it, err := s.db.NewIter(prefixIter(pfxName))
	if err != nil {
		return nil, err
	}
	defer it.Close()
	var out []Named
	for it.First(); it.Valid(); it.Next() {
		var d [32]byte
		copy(d[:], it.Value())
		out = append(out, Named{Name: string(it.Key()[1:]), Manifest: IDFromDigest(d)})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, it.Error()
}

// Named is a name and the manifest it points to.
type Named struct {
	Name     string `json:"name"`
	Manifest ID     `json:"manifest"`
}

// PutProfile stores the boot profile of an image.
func (s *Store) PutProfile(ctx context.Context, manifest ID, p *Profile) error {
	done, err := s.enter()
	defer done()
	if err == nil {
		err = s.checkWrite()
	}
	if err == nil {
		err = s.commitSet(append([]byte{pfxProfile}, manifest.digest[:]...), p.Encode())
	}
	if err != nil {
		return fmt.Errorf("put profile of %s: %w", manifest, err)
	}
	return nil
}

// GetProfile returns an image's boot profile, or ErrNotFound.
func (s *Store) GetProfile(ctx context.Context, manifest ID, entries int) (*Profile, error) {
	done, err := s.enter()
	defer done()
	if err != nil {
		return nil, fmt.Errorf("profile of %s: %w", manifest, err)
	}
	v, c, err := s.db.Get(append([]byte{pfxProfile}, manifest.digest[:]...))
	if errors.Is(err, pebble.ErrNotFound) {
		return nil, fmt.Errorf("profile of %s: %w", manifest, ErrNotFound)
	}
	if err != nil {
		return nil, err
	}
	defer c.Close()
	return DecodeProfile(v, entries)
}

// Referenced reports whether any manifest refers to the chunk.
func (s *Store) Referenced(ctx context.Context, id ID) (bool, error) {
	done, err := s.enter()
	defer done()
	if err != nil {
		return false, err
	}
	return s.hasPrefix(append([]byte{pfxRef}, id.digest[:]...))
}

// Stats describes the store and the images it holds.
type Stats struct {
	Usage
	Quota        int64   `json:"quota"`
	Images       int     `json:"images"`
	LogicalBytes int64   `json:"logical_bytes"`  // sum of image sizes
	NonZeroBytes int64   `json:"non_zero_bytes"` // sum of images' non-zero bytes
	DedupRatio   float64 `json:"dedup_ratio"`    // non-zero bytes / unique raw bytes present
	Compression  float64 `json:"compression_ratio"`
	PresentBytes int64   `json:"present_bytes"` // non-zero image bytes whose chunk is stored
}

// finish derives the ratios from the counts.
func (s *Stats) finish() {
	if s.RawBytes > 0 {
		s.DedupRatio = float64(s.PresentBytes) / float64(s.RawBytes)
	}
	if s.StoredBytes > 0 {
		s.Compression = float64(s.RawBytes) / float64(s.StoredBytes)
	}
}

// Stats computes store statistics; it reads every manifest.
func (s *Store) Stats(ctx context.Context) (Stats, error) {
	st := Stats{Usage: s.Usage(), Quota: s.opts.quota}
	done, err := s.enter()
	defer done()
	if err != nil {
		return st, err
	}
	ids, err := s.Manifests(ctx)
	if err != nil {
		return st, err
	}
	present := make(map[ID]bool)
	for _, id := range ids {
		m, err := s.GetManifest(ctx, id)
		if err != nil {
			return st, err
		}
		st.Images++
		st.LogicalBytes += m.Size
		for _, e := range m.Entries {
			if e.Zero {
				continue
			}
			st.NonZeroBytes += e.Length
			ok, seen := present[e.ID]
			if !seen {
				ok, err = s.Has(ctx, e.ID)
				if err != nil {
					return st, err
				}
				present[e.ID] = ok
			}
			if ok {
				st.PresentBytes += e.Length
			}
		}
	}
	st.finish()
	return st, nil
}

// GCResult says what garbage collection removed.
type GCResult struct {
	Chunks      int   `json:"chunks"`
	StoredBytes int64 `json:"stored_bytes"`
	// ReclaimedDiskBytes is what compacting packs gave back to the disk.
	ReclaimedDiskBytes int64 `json:"reclaimed_disk_bytes"`
}

// GC deletes chunks that no manifest references and no owner pins, then
// compacts packs to give the space back to the disk.
func (s *Store) GC(ctx context.Context) (GCResult, error) {
	var res GCResult
	done, err := s.enter()
	defer done()
	if err == nil {
		err = s.checkRemove()
	}
	if err != nil {
		return res, fmt.Errorf("gc: %w", err)
	}
	if err := s.flushAccess(); err != nil {
		return res, err
	}
	it, err := s.db.NewIter(prefixIter(pfxChunk))
	if err != nil {
		return res, err
	}
	var garbage []ID
	for it.First(); it.Valid(); it.Next() {
		var d [32]byte
		copy(d[:], it.Key()[1:])
		g, err := s.garbage(d)
		if err != nil {
			it.Close()
			return res, err
		}
		if g {
			garbage = append(garbage, IDFromDigest(d))
		}
	}
	if err := it.Close(); err != nil {
		return res, err
	}
	s.evictLock.Lock()
	// Check again under the lock: a manifest, pin or batch may have come
	// meanwhile.
	var still []ID
	for _, id := range garbage {
		if g, err := s.garbage(id.digest); err == nil && g {
			still = append(still, id)
		}
	}
	freed, err := s.deleteLocked(ctx, still, false)
	s.evictLock.Unlock()
	if err != nil {
		return res, err
	}
	res.Chunks, res.StoredBytes = len(still), freed
	res.ReclaimedDiskBytes, err = s.compactFreed(ctx)
	return res, err
}

// garbage reports whether GC may delete chunk d: no manifest references it,
// no owner pins it, no open batch holds it (a dedup hit of an import whose
// commit will pin it) and no commit is indexing it.
func (s *Store) garbage(d [32]byte) (bool, error) {
	if ref, err := s.hasPrefix(append([]byte{pfxRef}, d[:]...)); err != nil || ref {
		return false, err
	}
	if pin, err := s.hasPrefix(append([]byte{pfxPin}, d[:]...)); err != nil || pin {
		return false, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	_, committing := s.committing[d]
	return s.holds[d] == 0 && !committing, nil
}

// VerifyResult says what Verify found.
type VerifyResult struct {
	Chunks  int   `json:"chunks_checked"`
	Bytes   int64 `json:"bytes_checked"`
	Corrupt []ID  `json:"corrupt"` // dropped
	// Unreadable: chunks whose bytes could not be read (EIO, a short read);
	// they are kept. Check the disk, and verify again.
	Unreadable []ID `json:"unreadable,omitempty"`
	Missing    int  `json:"missing_chunks"` // chunks manifests need that are not stored (normal for lazy images)
	BadMeta    int  `json:"bad_manifests"`  // manifests that fail to decode or verify
}

// Verify reads and checks every stored chunk against its ID (dropping corrupt
// ones) and every manifest. A chunk that cannot be read is counted in
// Unreadable and kept, and Verify goes on. progress, if not nil, is called
// after each chunk.
func (s *Store) Verify(ctx context.Context, progress func(done, total int64)) (VerifyResult, error) {
	var res VerifyResult
	total := s.Usage().Chunks
	done, err := s.enter()
	defer done()
	if err != nil {
		return res, err
	}
	it, err := s.db.NewIter(prefixIter(pfxChunk))
	if err != nil {
		return res, err
	}
	var ids []ID
	for it.First(); it.Valid(); it.Next() {
		var d [32]byte
		copy(d[:], it.Key()[1:])
		ids = append(ids, IDFromDigest(d))
	}
	if err := it.Close(); err != nil {
		return res, err
	}
	for _, id := range ids {
		if err := ctx.Err(); err != nil {
			return res, err
		}
		_, b, err := s.load(ctx, id) // not an access: verifying must not reorder LRU
		var rerr *readError
		switch {
		case errors.Is(err, ErrCorrupt):
			res.Corrupt = append(res.Corrupt, id)
		case errors.As(err, &rerr):
			res.Unreadable = append(res.Unreadable, id)
			s.opts.log.Warn("verify: cannot read chunk; it is kept", "chunk_id", id.String(), "err", err)
		case errors.Is(err, ErrNotFound):
		case err != nil:
			return res, err
		default:
			res.Bytes += int64(len(b))
		}
		res.Chunks++
		if progress != nil {
			progress(int64(res.Chunks), total)
		}
	}
	mids, err := s.Manifests(ctx)
	if err != nil {
		return res, err
	}
	for _, mid := range mids {
		m, err := s.GetManifest(ctx, mid)
		if err != nil {
			res.BadMeta++
			continue
		}
		for _, c := range m.ChunkIDs() {
			if ok, err := s.Has(ctx, c); err == nil && !ok {
				res.Missing++
			}
		}
	}
	return res, nil
}
