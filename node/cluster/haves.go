package cluster

import (
	"maps"
	"time"

	"github.com/hoardvm/hoard/chunkstore"
	"github.com/hoardvm/hoard/p2p"
	"github.com/libp2p/go-libp2p/core/peer"
)

// Haves returns the have-bitmaps of the peers that know manifest, as this
// node last asked them, without waiting for any peer: placement answers
// from it. When there is no view yet, or it is older than ViewTTL, a
// refresh starts in the background (the next call sees it); fresh reports
// whether the view is there and within ViewTTL. The map is the caller's;
// the bitmaps are shared and must not be modified.
func (c *Cluster) Haves(manifest chunkstore.ID) (haves map[peer.ID]p2p.Bitmap, fresh bool) {
	c.mu.Lock()
	v := c.views[manifest]
	if v != nil {
		v.used = time.Now()
	}
	c.mu.Unlock()
	fresh = v != nil && !v.partial && time.Since(v.at) < c.o.ViewTTL
	if !fresh {
		c.startRefresh(manifest)
	}
	if v == nil {
		return map[peer.ID]p2p.Bitmap{}, false
	}
	return maps.Clone(v.haves), fresh
}
