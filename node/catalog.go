package node

import (
	"context"
	"errors"

	"github.com/hoardvm/hoard/chunkstore"
)

// announceAll puts every image this node holds into the cluster catalog
// when the catalog has no entry for it yet (the node's first start in a
// cluster, or images added while it ran standalone). An image the catalog
// knows, live or removed, is left to the catalog: a tombstone learned while
// this node was down wins over the node's copy.
func (n *Node) announceAll(ctx context.Context) {
	names, err := n.store.Names(ctx)
	if err != nil {
		n.log.Warn("cannot list images to announce", "err", err)
		return
	}
	byManifest := map[chunkstore.ID][]string{}
	var order []chunkstore.ID
	for _, nm := range names {
		if _, ok := byManifest[nm.Manifest]; !ok {
			order = append(order, nm.Manifest)
		}
		byManifest[nm.Manifest] = append(byManifest[nm.Manifest], nm.Name)
	}
	for _, id := range order {
		if ctx.Err() != nil {
			return
		}
		if _, known := n.cat.Entry(id); !known {
			n.cat.Added(ctx, id, byManifest[id])
		}
	}
	// This node's own profiles, for peers that sync with it.
	for _, id := range order {
		m, err := n.store.GetManifest(ctx, id)
		if err != nil {
			continue
		}
		p, err := n.store.GetProfile(ctx, id, len(m.Entries))
		if errors.Is(err, chunkstore.ErrNotFound) || err != nil {
			continue
		}
		if !n.cat.HasOwnProfile(id) {
			n.cat.ProfileSaved(ctx, id, *p)
		}
	}
}
