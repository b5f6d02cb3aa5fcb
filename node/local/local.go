// Package local is the image service over a chunk store this process holds:
// the one add, describe, remove and profile path of the daemon and of the
// offline CLI.
package local

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/hoardvm/hoard/chunkstore"
	"github.com/hoardvm/hoard/node/api"
	"github.com/hoardvm/hoard/node/importer"
	"github.com/hoardvm/hoard/node/origin"
)

// Describe summarises an image of st.
func Describe(ctx context.Context, st *chunkstore.Store, n chunkstore.Named) (api.ImageInfo, *chunkstore.Manifest, error) {
	m, err := st.GetManifest(ctx, n.Manifest)
	if err != nil {
		return api.ImageInfo{}, nil, fmt.Errorf("image %s: %w", n.Name, err)
	}
	s := m.Summarize()
	r := api.ImageInfo{Name: n.Name, Manifest: n.Manifest, Format: m.Format, Container: m.Container, Size: m.Size, NonZeroBytes: s.NonZeroBytes,
		Chunks: s.UniqueChunks, Source: m.Source.Kind + ":" + m.Source.Location}
	ids := m.ChunkIDs()
	for _, id := range ids {
		if ok, _ := st.Has(ctx, id); ok {
			r.Present++
		}
	}
	if len(ids) > 0 {
		r.Pinned, _ = st.Pinned(ctx, ids[0])
	}
	return r, m, nil
}

// DefaultName is the name an image gets when none is given: the Glance
// ID, or the last path element of the file or URL.
func DefaultName(ref origin.Ref) string {
	if ref.Kind == "glance" {
		return ref.Location
	}
	base := ref.Location
	if i := strings.IndexAny(base, "?#"); i >= 0 { // a query (redacted or not) is no part of a name
		base = base[:i]
	}
	if i := strings.LastIndexByte(base, '/'); i >= 0 {
		base = base[i+1:]
	}
	return base
}

// Add opens req's source with the origin config oc and imports it
// into st under req.Name (default: DefaultImageName): the one add path of
// the daemon and of the offline CLI. A lazy add is refused when the origin
// cannot serve ranges; a taken name is an error wrapping chunkstore.ErrExists.
func Add(ctx context.Context, st *chunkstore.Store, oc origin.Config, req api.ImportRequest, progress func(done, total int64)) (*importer.Result, error) {
	ck := chunkstore.DefaultCDC
	if req.Chunking != "" {
		var err error
		if ck, err = chunkstore.ParseChunking(req.Chunking); err != nil {
			return nil, err
		}
	}
	format, err := importer.ParseFormat(req.Format)
	if err != nil {
		return nil, err
	}
	src, err := origin.Open(ctx, req.Source, oc)
	if err != nil {
		return nil, err
	}
	defer src.Close()
	if req.Lazy {
		if err := origin.CheckLazy(src); err != nil {
			return nil, fmt.Errorf("lazy add of %s: %w", origin.Redact(req.Source), err)
		}
	}
	name := req.Name
	if name == "" {
		name = DefaultName(src.Ref())
	}
	if err := chunkstore.ValidateName(name); err != nil {
		return nil, fmt.Errorf("%w (pass --name)", err)
	}
	if existing, err := st.Resolve(ctx, name); err == nil {
		return nil, fmt.Errorf("image %q already exists (manifest %s); remove it with hoard image rm %s, or choose another --name: %w",
			name, existing, name, chunkstore.ErrExists)
	}
	if progress != nil {
		progress(0, src.Size())
	}
	return importer.Import(ctx, st, src, importer.Options{Name: name, Chunking: ck, Lazy: req.Lazy, Pin: req.Pin && !req.Lazy, Format: format, Progress: progress})
}

// Remove drops a name; when no other name uses its manifest, the manifest
// goes too, with the chunks that no other manifest references or pins, in one
// step of the store (chunkstore.Store.RemoveName).
func Remove(ctx context.Context, st *chunkstore.Store, name string) (api.RemoveResult, error) {
	r, err := st.RemoveName(ctx, name)
	return api.RemoveResult{Name: name, Manifest: r.Manifest, FreedChunks: r.Chunks, FreedBytes: r.StoredBytes}, err
}

// Profile returns the boot profile of an image of st (an empty one when none is recorded).
func Profile(ctx context.Context, st *chunkstore.Store, name string) (api.ProfileInfo, error) {
	id, err := st.Resolve(ctx, name)
	if err != nil {
		return api.ProfileInfo{}, err
	}
	m, err := st.GetManifest(ctx, id)
	if err != nil {
		return api.ProfileInfo{}, err
	}
	p, err := st.GetProfile(ctx, id, len(m.Entries))
	if err != nil {
		if errors.Is(err, chunkstore.ErrNotFound) {
			return ProfileInfo(name, id, m, nil, 0), nil
		}
		return api.ProfileInfo{Name: name, Manifest: id, Entries: []api.ProfileEntry{}}, err
	}
	return ProfileInfo(name, id, m, p, 1), nil
}

// ProfileInfo describes profile p of image name (manifest m), merged from
// contributors nodes' profiles; p nil: none recorded.
func ProfileInfo(name string, id chunkstore.ID, m *chunkstore.Manifest, p *chunkstore.Profile, contributors int) api.ProfileInfo {
	out := api.ProfileInfo{Name: name, Manifest: id, Entries: []api.ProfileEntry{}}
	if p == nil {
		return out
	}
	out.Boots, out.Chunks, out.Contributors = p.Boots, len(p.Chunks), contributors
	for _, i := range p.Chunks {
		e := m.Entries[i]
		out.Bytes += e.Length
		out.Entries = append(out.Entries, api.ProfileEntry{Index: i, Offset: e.Offset, Length: e.Length, ID: e.ID})
	}
	return out
}
