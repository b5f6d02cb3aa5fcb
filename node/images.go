package node

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strings"

	"github.com/hoardvm/hoard/chunkstore"
	"github.com/hoardvm/hoard/node/importer"
	"github.com/hoardvm/hoard/node/origin"
)

var (
	// ErrInUse: the image has open exports, so it cannot be removed now (the
	// API answers 409).
	ErrInUse = errors.New("is in use")
	// ErrInvalid: the request is malformed (the API answers 400).
	ErrInvalid = errors.New("invalid request")
)

// ImageInfo is what a listing shows of an image.
type ImageInfo struct {
	Name         string        `json:"name"`
	Manifest     chunkstore.ID `json:"manifest"`
	Format       string        `json:"format"`
	Size         int64         `json:"size"`
	NonZeroBytes int64         `json:"non_zero_bytes"`
	Chunks       int           `json:"unique_chunks"`
	Present      int           `json:"present_chunks"`
	Pinned       bool          `json:"pinned"`
	Source       string        `json:"source"`
	OpenExports  int           `json:"open_exports"`
}

// DescribeImage summarises an image of st.
func DescribeImage(ctx context.Context, st *chunkstore.Store, n chunkstore.Named) (ImageInfo, *chunkstore.Manifest, error) {
	m, err := st.GetManifest(ctx, n.Manifest)
	if err != nil {
		return ImageInfo{}, nil, fmt.Errorf("image %s: %w", n.Name, err)
	}
	s := m.Summarize()
	r := ImageInfo{Name: n.Name, Manifest: n.Manifest, Format: m.Format, Size: m.Size, NonZeroBytes: s.NonZeroBytes,
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

// Images lists the registered images with their open export counts.
func (n *Node) Images(ctx context.Context) ([]ImageInfo, error) {
	names, err := n.store.Names(ctx)
	if err != nil {
		return nil, err
	}
	out := []ImageInfo{}
	for _, nm := range names {
		r, _, err := DescribeImage(ctx, n.store, nm)
		if err != nil {
			return nil, err
		}
		r.OpenExports = n.openExports(nm.Manifest)
		out = append(out, r)
	}
	return out, nil
}

func (n *Node) openExports(id chunkstore.ID) int {
	n.mu.Lock()
	img := n.images[id]
	n.mu.Unlock()
	if img == nil {
		return 0
	}
	img.mu.Lock()
	defer img.mu.Unlock()
	return img.opens
}

// ImportRequest asks the daemon to add an image.
type ImportRequest struct {
	Source   string `json:"source"`             // path (absolute), URL or glance://ID
	Name     string `json:"name,omitempty"`     // default: derived from the source
	Chunking string `json:"chunking,omitempty"` // cdc (default) or fixed
	Lazy     bool   `json:"lazy,omitempty"`
	Pin      bool   `json:"pin,omitempty"`
}

// DefaultImageName is the name an image gets when none is given: the Glance
// ID, or the last path element of the file or URL.
func DefaultImageName(ref origin.Ref) string {
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

// AddImage imports an image into the node's store (see Import).
func (n *Node) AddImage(ctx context.Context, req ImportRequest) (*importer.Result, error) {
	return n.AddImageProgress(ctx, req, nil)
}

// AddImageProgress is AddImage; progress, if not nil, is called with the
// bytes read from the source and its size, as importer.Options.Progress.
func (n *Node) AddImageProgress(ctx context.Context, req ImportRequest, progress func(done, total int64)) (*importer.Result, error) {
	if !strings.Contains(req.Source, "://") && !filepath.IsAbs(req.Source) {
		return nil, fmt.Errorf("source %q: %w: the daemon needs an absolute path or a URL", req.Source, ErrInvalid)
	}
	res, err := AddImageTo(ctx, n.store, n.cfg.Origin, req, progress)
	if err == nil {
		n.advertiseLater(res.Name, res.Manifest)
	}
	return res, err
}

// AddImageTo opens req's source with the origin config oc and imports it
// into st under req.Name (default: DefaultImageName): the one add path of
// the daemon and of the offline CLI. A lazy add is refused when the origin
// cannot serve ranges; a taken name is an error wrapping chunkstore.ErrExists.
func AddImageTo(ctx context.Context, st *chunkstore.Store, oc origin.Config, req ImportRequest, progress func(done, total int64)) (*importer.Result, error) {
	ck := chunkstore.DefaultCDC
	if req.Chunking != "" {
		var err error
		if ck, err = chunkstore.ParseChunking(req.Chunking); err != nil {
			return nil, err
		}
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
		name = DefaultImageName(src.Ref())
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
	return importer.Import(ctx, st, src, importer.Options{Name: name, Chunking: ck, Lazy: req.Lazy, Pin: req.Pin && !req.Lazy, Progress: progress})
}

// RemoveResult says what removing an image freed.
type RemoveResult struct {
	Name        string        `json:"name"`
	Manifest    chunkstore.ID `json:"manifest"`
	FreedChunks int           `json:"freed_chunks"`
	FreedBytes  int64         `json:"freed_stored_bytes"`
}

// RemoveImage drops a name; when no other name uses its manifest, the manifest
// goes too, with the chunks that no other manifest references or pins, in one
// step of the store (chunkstore.Store.RemoveName).
func RemoveImage(ctx context.Context, st *chunkstore.Store, name string) (RemoveResult, error) {
	r, err := st.RemoveName(ctx, name)
	return RemoveResult{Name: name, Manifest: r.Manifest, FreedChunks: r.Chunks, FreedBytes: r.StoredBytes}, err
}

// RemoveImage removes an image from the node's store. An image with an open
// export cannot be removed: the error wraps ErrInUse.
func (n *Node) RemoveImage(ctx context.Context, name string) (RemoveResult, error) {
	id, err := n.store.Resolve(ctx, name)
	if err != nil {
		return RemoveResult{}, err
	}
	if k := n.openExports(id); k > 0 {
		return RemoveResult{}, fmt.Errorf("image %q %w: it has %d open %s; shut down the VMs using it first", name, ErrInUse, k, plural(k, "export"))
	}
	res, err := RemoveImage(ctx, n.store, name)
	if err == nil {
		_, gerr := n.store.GetManifestBytes(ctx, id)
		if gerr != nil {
			n.mu.Lock()
			img := n.images[id]
			n.mu.Unlock()
			if img != nil {
				n.forget(img)
			}
		}
		n.withdraw(name, id, gerr != nil)
		if gerr != nil && n.hot != nil {
			n.hot.Remove(id)
		}
	}
	return res, err
}

func plural(n int, w string) string {
	if n == 1 {
		return w
	}
	return w + "s"
}

// ProfileInfo is an image's boot profile, for display.
type ProfileInfo struct {
	Name     string         `json:"name"`
	Manifest chunkstore.ID  `json:"manifest"`
	Boots    int            `json:"boots"`
	Chunks   int            `json:"chunks"`
	Bytes    int64          `json:"bytes"`
	Entries  []ProfileEntry `json:"entries"`
}

// ProfileEntry is one chunk of a profile, in first-read order.
type ProfileEntry struct {
	Index  int           `json:"index"`
	Offset int64         `json:"offset"`
	Length int64         `json:"length"`
	ID     chunkstore.ID `json:"id"`
}

// Profile returns an image's boot profile (an empty one when none is recorded).
func (n *Node) Profile(ctx context.Context, name string) (ProfileInfo, error) {
	return ProfileOf(ctx, n.store, name)
}

// ProfileOf returns the boot profile of an image of st (an empty one when none is recorded).
func ProfileOf(ctx context.Context, st *chunkstore.Store, name string) (ProfileInfo, error) {
	id, err := st.Resolve(ctx, name)
	if err != nil {
		return ProfileInfo{}, err
	}
	m, err := st.GetManifest(ctx, id)
	if err != nil {
		return ProfileInfo{}, err
	}
	out := ProfileInfo{Name: name, Manifest: id, Entries: []ProfileEntry{}}
	p, err := st.GetProfile(ctx, id, len(m.Entries))
	if err != nil {
		if errors.Is(err, chunkstore.ErrNotFound) {
			return out, nil
		}
		return out, err
	}
	out.Boots, out.Chunks = p.Boots, len(p.Chunks)
	for _, i := range p.Chunks {
		e := m.Entries[i]
		out.Bytes += e.Length
		out.Entries = append(out.Entries, ProfileEntry{Index: i, Offset: e.Offset, Length: e.Length, ID: e.ID})
	}
	return out, nil
}

// Pull registers an image another node of the cluster has (PullImage); when
// the image is not here and this node cannot ask any other, the error says
// that the node is not in a cluster and how to join one.
func (n *Node) Pull(ctx context.Context, name string) (ImageInfo, error) {
	info, err := n.PullImage(ctx, name)
	if err == nil || ctx.Err() != nil {
		return info, err
	}
	if _, rerr := n.store.Resolve(ctx, name); rerr == nil {
		return info, err // here: the failure is not about the cluster
	}
	join := fmt.Sprintf("to join a cluster, copy its swarm key (made once, on any node, with hoard cluster keygen) to %s on this node, "+
		"set p2p.bootstrap to the address of a node already in it (hoard status on that node lists them), and restart the daemon",
		n.cfg.P2P.SwarmKeyFile)
	if n.cl == nil {
		return info, fmt.Errorf("image %q: %w here, and this node is not in a cluster (no swarm key at %s), so there is no peer to ask; %s",
			name, chunkstore.ErrNotFound, n.cfg.P2P.SwarmKeyFile, join)
	}
	for _, p := range n.cl.p.Peers() {
		if p.Connected {
			return info, err // peers were asked: their answer stands
		}
	}
	return info, fmt.Errorf("image %q is not here, and this node is connected to no peer: it is not in a cluster yet "+
		"(a node whose swarm key differs from the others' cannot connect to them); %s (%w)", name, join, err)
}
