package node

import (
	"context"
	"fmt"
	"time"

	"github.com/hoardvm/hoard/chunkstore"
	"github.com/hoardvm/hoard/node/api"
	"github.com/hoardvm/hoard/node/hoarder"
	"golang.org/x/time/rate"
)

// hoardSource is the node as the hoarder sees it (hoarder.Source): every
// image the store names (those added here and those the catalog learned),
// each with its cluster-wide working set, fetched through the read path
// (local, then peers, then the origin through the designated fetcher).
type hoardSource struct{ n *Node }

func (s hoardSource) Images(ctx context.Context) ([]hoarder.Image, error) {
	names, err := s.n.store.Names(ctx)
	if err != nil {
		return nil, err
	}
	seen := map[chunkstore.ID]bool{}
	var out []hoarder.Image
	for _, nm := range names {
		if seen[nm.Manifest] {
			continue
		}
		seen[nm.Manifest] = true
		m, err := s.n.store.GetManifest(ctx, nm.Manifest)
		if err != nil {
			continue // removed meanwhile
		}
		ws := s.n.workingSet(ctx, nm.Manifest, m)
		out = append(out, hoarder.Image{ID: nm.Manifest, Manifest: m, WorkingSet: ws.Chunks, Boots: ws.Boots})
	}
	return out, nil
}

func (s hoardSource) Has(ctx context.Context, id chunkstore.ID) bool {
	ok, _ := s.n.store.Has(ctx, id)
	return ok
}

func (s hoardSource) Fetch(ctx context.Context, manifest chunkstore.ID, index int) (int64, string, error) {
	img, err := s.n.image(ctx, manifest)
	if err != nil {
		return 0, "", err
	}
	if index < 0 || index >= len(img.m.Entries) || img.m.Entries[index].Zero {
		return 0, "", fmt.Errorf("entry %d of %s: %w", index, manifest, api.ErrInvalid)
	}
	b, from, err := s.n.chunk(ctx, img, index, forHoard)
	if err != nil {
		return 0, "", err
	}
	src := hoarder.SourceLocal
	switch from {
	case fromPeer:
		src = hoarder.SourcePeer
	case fromOrigin:
		src = hoarder.SourceOrigin
	}
	return int64(len(b)), src, nil
}

func (s hoardSource) Busy() bool { return s.n.vmWaiting.Load() > 0 }

func (s hoardSource) StoredRatio() float64 {
	u := s.n.store.Usage()
	if u.RawBytes <= 0 {
		return 0
	}
	return min(float64(u.StoredBytes)/float64(u.RawBytes), 1)
}

// catalogChanged is called when the cluster catalog or a profile changed:
// the hoarder plans again, and the eviction policy gets the new working
// sets (refreshWorkingSets).
func (n *Node) catalogChanged() {
	if h := n.hoarder; h != nil {
		h.Kick()
	}
	select {
	case n.wsChanged <- struct{}{}:
	default:
	}
}

// refreshWorkingSets gives the eviction policy every image's cluster-wide
// working set each time the catalog changed, at most every two seconds,
// until ctx is done.
func (n *Node) refreshWorkingSets(ctx context.Context) {
	src := hoardSource{n}
	for {
		select {
		case <-ctx.Done():
			return
		case <-n.wsChanged:
		}
		if imgs, err := src.Images(ctx); err == nil {
			ws := make(map[chunkstore.ID][]chunkstore.ID, len(imgs))
			for _, img := range imgs {
				if s := workingSet(img.Manifest, &chunkstore.Profile{Chunks: img.WorkingSet}); len(s) > 0 {
					ws[img.ID] = s
				}
			}
			n.evict.setAll(ws)
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(2 * time.Second):
		}
	}
}

// Prefetch fetches an image's working set (with full, all of it) now, here,
// and pins it, so that it is never evicted (image rm unpins it). With
// cluster, it also asks every node of the cluster to do the same (a pinned
// catalog entry, which nodes that join later also act on).
func (n *Node) Prefetch(ctx context.Context, name string, full, cluster bool, progress func(done, total int64)) (hoarder.PrefetchResult, error) {
	id, err := n.store.Resolve(ctx, name)
	if err != nil {
		return hoarder.PrefetchResult{}, err
	}
	if cluster {
		if n.cat == nil {
			return hoarder.PrefetchResult{}, fmt.Errorf("image prefetch --cluster: %w", api.ErrClusterOff)
		}
		names, err := n.namesOf(ctx, id)
		if err != nil {
			return hoarder.PrefetchResult{}, err
		}
		n.cat.PinCluster(context.WithoutCancel(ctx), id, names, full)
	}
	return n.prefetchPin(ctx, id, name, full, progress)
}

// prefetchPinned runs a prefetch a pinned catalog entry asked for, in the
// background (owned by the node's bg group).
func (n *Node) prefetchPinned(id chunkstore.ID, full bool) {
	ctx := n.runCtx
	if ctx == nil || ctx.Err() != nil {
		return
	}
	n.bg.Add(1)
	go func() {
		defer n.bg.Done()
		if _, err := n.store.GetManifestBytes(ctx, id); err != nil {
			return // not registered here (removed locally)
		}
		res, err := n.prefetchPin(ctx, id, id.String(), full, nil)
		if err != nil {
			n.log.Warn("prefetch the cluster asked for failed; the hoarder keeps trying within its budget", "manifest", id.String(), "err", err)
			return
		}
		n.log.Info("prefetched and pinned as the cluster asked", "manifest", id.String(), "full", full, "chunks", res.Chunks, "fetched", res.Fetched)
	}()
}

// namesOf is every name of manifest id here.
func (n *Node) namesOf(ctx context.Context, id chunkstore.ID) ([]string, error) {
	all, err := n.store.Names(ctx)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, nm := range all {
		if nm.Manifest == id {
			out = append(out, nm.Name)
		}
	}
	return out, nil
}

// prefetchPin fetches and pins image id (called name in messages).
func (n *Node) prefetchPin(ctx context.Context, id chunkstore.ID, name string, full bool, progress func(done, total int64)) (hoarder.PrefetchResult, error) {
	if n.hoarder == nil {
		return hoarder.PrefetchResult{}, fmt.Errorf("image prefetch: the daemon is starting; retry in a moment")
	}
	res, err := n.hoarder.Prefetch(ctx, id, full, progress)
	if err != nil {
		return res, err
	}
	m, err := n.store.GetManifest(ctx, id)
	if err != nil {
		return res, err
	}
	ids := m.ChunkIDs()
	if !full {
		ws := n.workingSet(ctx, id, m)
		ids = ids[:0]
		for _, i := range ws.Chunks {
			if e := m.Entries[i]; !e.Zero {
				ids = append(ids, e.ID)
			}
		}
	}
	if err := n.store.Pin(ctx, chunkstore.PinOwnerImage(id), ids); err != nil {
		return res, fmt.Errorf("image %q fetched, but pinning it failed: %w", name, err)
	}
	return res, nil
}

// newRate is a limiter of bytesPerSec with a burst of at least the largest
// chunk; nil (unlimited) for 0.
func newRate(bytesPerSec int64) *rate.Limiter {
	if bytesPerSec <= 0 {
		return nil
	}
	return rate.NewLimiter(rate.Limit(bytesPerSec), int(max(bytesPerSec, 8<<20)))
}
