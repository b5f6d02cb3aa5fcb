package node

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"sync"
	"time"

	"github.com/hoardvm/hoard/chunkstore"
	"github.com/hoardvm/hoard/node/api"
	"github.com/hoardvm/hoard/node/placement"
	"github.com/hoardvm/hoard/p2p"
	"github.com/hoardvm/hoard/planner"
	"github.com/libp2p/go-libp2p/core/peer"
)

// defaultNodeName is the OS host name (what Nova calls the compute host),
// or "localhost" when there is none.
func defaultNodeName() string {
	if h, err := os.Hostname(); err == nil && h != "" {
		return h
	}
	return "localhost"
}

// nodeInfo is this node's NodeInfo: its name and load, from counters only.
func (n *Node) nodeInfo() p2p.NodeInfo {
	e := p2p.NodeInfo{Name: n.cfg.NodeName, FreeQuota: -1}
	n.mu.Lock()
	imgs := make([]*image, 0, len(n.images))
	for _, img := range n.images {
		imgs = append(imgs, img)
	}
	n.mu.Unlock()
	for _, img := range imgs {
		img.mu.Lock()
		e.OpenExports += img.opens
		img.mu.Unlock()
	}
	if st := n.store; st != nil && st.Quota() > 0 {
		e.FreeQuota = max(st.Quota()-st.Usage().StoredBytes, 0)
	}
	return e
}

// The placement half of the backend (p2p.NodeBackend).

func (b backend) NodeInfo() p2p.NodeInfo { return b.n.nodeInfo() }

func (b backend) LearnNode(_ peer.ID, e p2p.NodeInfo) { b.n.nodes.Learn(e) }

// glanceIndex maps Glance image IDs to the manifests of images imported
// from Glance (their source records the ID), rebuilt from the store at
// most every glanceIndexAge when an ID is not in it.
type glanceIndex struct {
	mu  sync.Mutex
	at  time.Time
	ids map[string]chunkstore.ID
}

const glanceIndexAge = 5 * time.Second

func (g *glanceIndex) lookup(ctx context.Context, st *chunkstore.Store, id string) (chunkstore.ID, bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if m, ok := g.ids[id]; ok {
		return m, true
	}
	if time.Since(g.at) < glanceIndexAge {
		return chunkstore.ID{}, false
	}
	names, err := st.Names(ctx)
	if err != nil {
		return chunkstore.ID{}, false
	}
	g.ids, g.at = map[string]chunkstore.ID{}, time.Now()
	seen := map[chunkstore.ID]bool{}
	for _, nm := range names {
		if seen[nm.Manifest] {
			continue
		}
		seen[nm.Manifest] = true
		if m, err := st.GetManifest(ctx, nm.Manifest); err == nil && m.Source.Kind == "glance" && m.Source.Location != "" {
			g.ids[m.Source.Location] = nm.Manifest
		}
	}
	m, ok := g.ids[id]
	return m, ok
}

// resolvePlace resolves a name, manifest CID or Glance image ID.
func (n *Node) resolvePlace(ctx context.Context, name string) (chunkstore.ID, error) {
	id, err := n.store.Resolve(ctx, name)
	if err == nil {
		return id, nil
	}
	if !errors.Is(err, chunkstore.ErrNotFound) {
		return chunkstore.ID{}, err
	}
	if id, ok := n.glanceIDs.lookup(ctx, n.store, name); ok {
		return id, nil
	}
	return chunkstore.ID{}, fmt.Errorf("image %q: %w here (not a name, manifest CID or Glance image ID this node knows); list images with hoard image ls", name, chunkstore.ErrNotFound)
}

// localBits returns which entries of img this node holds: the cached
// have-bitmap (a stale one is rescanned in the background), or a scan now
// when there is none yet.
func (n *Node) localBits(ctx context.Context, img *image) p2p.Bitmap {
	img.haveMu.Lock()
	have, at := img.have, img.haveAt
	img.haveMu.Unlock()
	if have == nil {
		return n.haveBitmap(ctx, img)
	}
	if time.Since(at) > 30*time.Second {
		n.goBackground(func(ctx context.Context) { n.haveBitmap(ctx, img) })
	}
	return p2p.Bitmap(slices.Clone(have))
}

// Place ranks hosts for booting image (api.Service): every live node of
// the cluster and this one, or the named hosts. It answers from the
// catalog's working set, this node's have-bitmap and its cached views of
// the peers' (refreshed in the background when stale), and the node infos
// the peers gossip: it never waits for a peer.
func (n *Node) Place(ctx context.Context, name string, hosts []string) (api.Placement, error) {
	id, err := n.resolvePlace(ctx, name)
	if err != nil {
		return api.Placement{}, err
	}
	img, err := n.image(ctx, id)
	if err != nil {
		return api.Placement{}, err
	}
	pi := planner.PlaceImage{Sizes: make([]int64, len(img.m.Entries))}
	for i, e := range img.m.Entries {
		if !e.Zero {
			pi.Sizes[i] = e.Length
		}
	}
	pi.WorkingSet = n.workingSet(ctx, id, img.m).Chunks
	self := n.nodeInfo()
	var haves map[peer.ID]p2p.Bitmap
	fresh := true
	if n.cl != nil {
		self.Node = n.cl.Peer().ID()
		haves, fresh = n.cl.Haves(id)
	}
	ranked := n.nodes.Rank(placement.Request{Image: pi, Self: self, SelfBits: n.localBits(ctx, img), Haves: haves, Hosts: hosts})
	out := api.Placement{Image: name, Manifest: id.String(), Partial: !fresh, Hosts: make([]api.PlaceHost, 0, len(ranked))}
	for _, r := range ranked {
		out.WorkingSetBytes, out.ImageBytes = r.WorkingSetBytes, r.ImageBytes
		h := api.PlaceHost{Host: r.Host, Score: r.Score, Self: r.Self, WorkingSetShare: r.WorkingSetShare, ImageShare: r.ImageShare,
			LoadScore: r.LoadScore, WorkingSetLocalBytes: r.WorkingSetHeld, ImageLocalBytes: r.ImageHeld,
			OpenExports: r.OpenExports, FreeQuota: r.FreeQuota, Reason: r.Reason}
		if r.Peer != "" {
			h.PeerID = r.Peer.String()
		}
		out.Hosts = append(out.Hosts, h)
	}
	return out, nil
}
