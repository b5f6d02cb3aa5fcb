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
	}
	return res, err
}

// RemoveImage removes an image from the node's store. An image with an open
// export cannot be removed: the error wraps api.ErrInUse.
func (n *Node) RemoveImage(ctx context.Context, name string) (api.RemoveResult, error) {
	id, err := n.store.Resolve(ctx, name)
	if err != nil {
		return api.RemoveResult{}, err
	}
	if k := n.openExports(id); k > 0 {
		return api.RemoveResult{}, fmt.Errorf("image %q %w: it has %d open %s; shut down the VMs using it first", name, api.ErrInUse, k, plural(k, "export"))
	}
	res, err := local.Remove(ctx, n.store, name)
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

// Profile returns an image's boot profile (an empty one when none is recorded).
func (n *Node) Profile(ctx context.Context, name string) (api.ProfileInfo, error) {
	return local.Profile(ctx, n.store, name)
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
