package node

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"

	"github.com/hoardvm/hoard/chunkstore"
	"github.com/hoardvm/hoard/node/api"
	"github.com/hoardvm/hoard/node/importer"
	"github.com/hoardvm/hoard/node/local"
	"github.com/hoardvm/hoard/planner"
)

// Images lists the registered images with their open export counts.
func (n *Node) Images(ctx context.Context) ([]api.ImageInfo, error) {
	names, err := n.store.Names(ctx)
	if err != nil {
		return nil, err
	}
	out := []api.ImageInfo{}
	for _, nm := range names {
		r, _, err := local.Describe(ctx, n.store, nm)
		if err != nil {
			return nil, err
		}
		r.OpenExports = n.openExports(nm.Manifest)
		if n.hoarder != nil {
			if hs, ok := n.hoarder.Image(nm.Manifest); ok {
				r.WorkingSetBytes, r.WorkingSetLocalBytes = hs.WorkingSetBytes, hs.LocalBytes
			}
		}
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

// AddImage imports an image into the node's store (see local.Add) and
// advertises it; progress, if not nil, is called with the bytes read from the
// source and its size, as importer.Options.Progress.
func (n *Node) AddImage(ctx context.Context, req api.ImportRequest, progress func(done, total int64)) (*importer.Result, error) {
	if !strings.Contains(req.Source, "://") && !filepath.IsAbs(req.Source) {
		return nil, fmt.Errorf("source %q: %w: the daemon needs an absolute path or a URL", req.Source, api.ErrInvalid)
	}
	res, err := local.Add(ctx, n.store, n.cfg.Origin, req, progress)
	if err == nil {
		n.advertiseLater(res.Name, res.Manifest)
		n.announce(ctx, res.Manifest)
	}
	return res, err
}

// announce tells the cluster catalog that this node holds manifest, under
// every name it has here.
func (n *Node) announce(ctx context.Context, manifest chunkstore.ID) {
	if n.cat == nil {
		return
	}
	names, err := n.store.Names(ctx)
	if err != nil {
		n.log.Warn("cannot list the image's names to announce it", "manifest", manifest.String(), "err", err)
		return
	}
	var mine []string
	for _, nm := range names {
		if nm.Manifest == manifest {
			mine = append(mine, nm.Name)
		}
	}
	n.cat.Added(context.WithoutCancel(ctx), manifest, mine)
}

// RemoveImage removes an image from the node's store. An image with an open
// export cannot be removed: the error wraps api.ErrInUse. With cluster, the
// image (its manifest, under every name) is removed from every node of the
// cluster: a tombstone in the catalog, which nodes that are down learn when
// they return; without, only here (the catalog does not bring it back
// unless it is added again somewhere).
func (n *Node) RemoveImage(ctx context.Context, name string, cluster bool) (api.RemoveResult, error) {
	id, err := n.store.Resolve(ctx, name)
	if err != nil {
		return api.RemoveResult{}, err
	}
	if cluster && n.cat == nil {
		return api.RemoveResult{}, fmt.Errorf("image rm --cluster: %w", api.ErrClusterOff)
	}
	if k := n.openExports(id); k > 0 {
		return api.RemoveResult{}, fmt.Errorf("image %q %w: it has %d open %s; shut down the VMs using it first", name, api.ErrInUse, k, plural(k, "export"))
	}
	names := []string{name}
	if cluster {
		all, err := n.store.Names(ctx)
		if err != nil {
			return api.RemoveResult{}, err
		}
		for _, nm := range all {
			if nm.Manifest == id && nm.Name != name {
				names = append(names, nm.Name)
			}
		}
	}
	var res api.RemoveResult
	for _, nm := range names {
		r, err := local.Remove(ctx, n.store, nm)
		if err != nil {
			return res, err
		}
		if nm == name {
			res = r
		} else {
			res.FreedChunks += r.FreedChunks
			res.FreedBytes += r.FreedBytes
		}
		_, gerr := n.store.GetManifestBytes(ctx, id)
		n.removed(nm, id, gerr != nil)
	}
	if n.cat != nil {
		if cluster {
			n.cat.RemovedCluster(context.WithoutCancel(ctx), id)
		} else {
			n.cat.RemovedLocal(id)
		}
	}
	return res, nil
}

// removed cleans up after name (of manifest id) was removed from the store:
// the loaded image, the hot tier's file and the adverts, once the manifest
// is gone.
func (n *Node) removed(name string, id chunkstore.ID, manifestGone bool) {
	if manifestGone {
		n.mu.Lock()
		img := n.images[id]
		n.mu.Unlock()
		if img != nil {
			n.forget(img)
		}
		if n.hot != nil {
			n.hot.Remove(id)
		}
	}
	n.withdraw(name, id, manifestGone)
}

func plural(n int, w string) string {
	if n == 1 {
		return w
	}
	return w + "s"
}

// Profile returns an image's boot profile (an empty one when none is recorded).
func (n *Node) Profile(ctx context.Context, name string) (api.ProfileInfo, error) {
	if n.cat == nil {
		return local.Profile(ctx, n.store, name)
	}
	id, err := n.store.Resolve(ctx, name)
	if err != nil {
		return api.ProfileInfo{}, err
	}
	m, err := n.store.GetManifest(ctx, id)
	if err != nil {
		return api.ProfileInfo{}, err
	}
	ws := n.workingSet(ctx, id, m)
	if ws.Contributors == 0 {
		return local.ProfileInfo(name, id, m, nil, 0), nil
	}
	return local.ProfileInfo(name, id, m, &ws.Profile, ws.Contributors), nil
}

// workingSet is an image's boot working set as the cluster knows it: this
// node's profile merged with every other node's (planner.MergeProfiles).
func (n *Node) workingSet(ctx context.Context, id chunkstore.ID, m *chunkstore.Manifest) planner.MergedProfile {
	own, err := n.store.GetProfile(ctx, id, len(m.Entries))
	if err != nil {
		own = nil
	}
	if n.cat == nil {
		if own == nil {
			return planner.MergedProfile{}
		}
		return planner.MergedProfile{Profile: *own, Contributors: 1}
	}
	return n.cat.WorkingSet(id, own, len(m.Entries))
}

// Pull registers an image another node of the cluster has (PullImage); when
// the image is not here and this node cannot ask any other, the error says
// that the node is not in a cluster and how to join one.
func (n *Node) Pull(ctx context.Context, name string) (api.ImageInfo, error) {
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
	for _, p := range n.cl.Peer().Peers() {
		if p.Connected {
			return info, err // peers were asked: their answer stands
		}
	}
	return info, fmt.Errorf("image %q is not here, and this node is connected to no peer: it is not in a cluster yet "+
		"(a node whose swarm key differs from the others' cannot connect to them); %s (%w)", name, join, err)
}
