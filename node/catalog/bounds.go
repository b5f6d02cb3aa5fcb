package catalog

import (
	"cmp"
	"context"
	"slices"

	"github.com/hoardvm/hoard/chunkstore"
	"github.com/hoardvm/hoard/p2p"
	"github.com/libp2p/go-libp2p/core/peer"
)

// setEntry records e as the entry of its manifest, keeping the per-publisher
// counts. c.mu is held.
func (c *Catalog) setEntry(e p2p.CatalogEntry) {
	old, ok := c.entries[e.Manifest]
	if ok && old.Publisher != e.Publisher {
		c.uncount(old.Publisher)
	}
	if !ok || old.Publisher != e.Publisher {
		c.byPublisher[e.Publisher]++
	}
	c.entries[e.Manifest] = e
}

func (c *Catalog) uncount(pub peer.ID) {
	if c.byPublisher[pub]--; c.byPublisher[pub] <= 0 {
		delete(c.byPublisher, pub)
	}
}

// evict forgets the entry of manifest id and the work it implied. c.mu is held.
func (c *Catalog) evict(id chunkstore.ID) {
	e, ok := c.entries[id]
	if !ok {
		return
	}
	c.uncount(e.Publisher)
	delete(c.entries, id)
	delete(c.pending, id)
	delete(c.dropped, id)
	c.dirty = true
}

// own reports whether an entry or profile of pub is this node's own (an
// entry made standalone has no publisher yet).
func (c *Catalog) own(pub peer.ID) bool {
	return pub == "" || pub == c.self
}

// goal is what makeRoom trims a full bound of limit down to.
func goal(limit int) int {
	return limit - max(limit/16, 1)
}

// roomFor reports whether e, replacing old (when had) for its manifest,
// fits the bounds, evicting to make room. c.mu is held.
func (c *Catalog) roomFor(e, old p2p.CatalogEntry, had bool) bool {
	own := c.own(e.Publisher)
	if !own && (!had || old.Publisher != e.Publisher) && c.byPublisher[e.Publisher] >= c.lim.perPublisher {
		c.makeRoom(e.Publisher, goal(c.lim.perPublisher))
		if c.byPublisher[e.Publisher] >= c.lim.perPublisher {
			return false
		}
	}
	if !had && len(c.entries) >= c.lim.entries {
		c.makeRoom("", goal(c.lim.entries))
		if len(c.entries) >= c.lim.entries && !own {
			return false
		}
	}
	return true
}

// makeRoom evicts entries (of pub only, when set) until at most target are
// left, in the order the bounds' doc says: tombstones, then live entries of
// images not named here, oldest version first; never this node's own.
// c.mu is held.
func (c *Catalog) makeRoom(pub peer.ID, target int) {
	count := func() int {
		if pub != "" {
			return c.byPublisher[pub]
		}
		return len(c.entries)
	}
	before := count()
	var named map[chunkstore.ID]bool
	for pass := range 2 {
		if count() <= target {
			break
		}
		if pass == 1 {
			// Images named here stay; if the store cannot say which are,
			// none is evicted.
			names, err := c.st.Names(context.Background())
			if err != nil {
				c.o.Log.Warn("catalog full and the store's names unreadable: evicting tombstones only", "err", err)
				break
			}
			named = make(map[chunkstore.ID]bool, len(names))
			for _, nm := range names {
				named[nm.Manifest] = true
			}
		}
		var cands []p2p.CatalogEntry
		for _, e := range c.entries {
			if (pub != "" && e.Publisher != pub) || c.own(e.Publisher) {
				continue
			}
			if pass == 0 && e.Removed || pass == 1 && !e.Removed && !named[e.Manifest] {
				cands = append(cands, e)
			}
		}
		slices.SortFunc(cands, func(a, b p2p.CatalogEntry) int { return cmp.Compare(a.Version, b.Version) })
		for _, e := range cands {
			if count() <= target {
				break
			}
			c.evict(e.Manifest)
		}
	}
	if n := before - count(); n > 0 {
		c.o.Log.Warn("catalog full: evicted the oldest tombstones and entries of images not here", "evicted", n,
			"publisher", pub.String(), "entries", len(c.entries), "max_entries", c.lim.entries, "max_per_publisher", c.lim.perPublisher)
	}
}

// profileRoomFor reports whether a new profile of node fits the bounds,
// evicting to make room. c.mu is held.
func (c *Catalog) profileRoomFor(node peer.ID) bool {
	own := c.own(node)
	if !own && c.byNode[node] >= c.lim.perNode {
		c.makeProfileRoom(node, goal(c.lim.perNode))
		if c.byNode[node] >= c.lim.perNode {
			return false
		}
	}
	if c.nProfiles >= c.lim.profiles {
		c.makeProfileRoom("", goal(c.lim.profiles))
		if c.nProfiles >= c.lim.profiles && !own {
			return false
		}
	}
	return true
}

// makeProfileRoom evicts profiles (of node only, when set) until at most
// target are left: first those of manifests with no live entry, then the
// oldest; never this node's own. c.mu is held.
func (c *Catalog) makeProfileRoom(node peer.ID, target int) {
	count := func() int {
		if node != "" {
			return c.byNode[node]
		}
		return c.nProfiles
	}
	if count() <= target {
		return
	}
	type cand struct {
		e    p2p.ProfileEntry
		live bool
	}
	var cands []cand
	for m, byNode := range c.profiles {
		e, ok := c.entries[m]
		live := ok && !e.Removed
		for n, p := range byNode {
			if (node == "" || n == node) && !c.own(n) {
				cands = append(cands, cand{p, live})
			}
		}
	}
	slices.SortFunc(cands, func(a, b cand) int {
		if a.live != b.live {
			if a.live {
				return 1
			}
			return -1
		}
		return cmp.Compare(a.e.Version, b.e.Version)
	})
	n := 0
	for _, p := range cands {
		if count() <= target {
			break
		}
		byNode := c.profiles[p.e.Manifest]
		delete(byNode, p.e.Node)
		if len(byNode) == 0 {
			delete(c.profiles, p.e.Manifest)
		}
		c.nProfiles--
		if c.byNode[p.e.Node]--; c.byNode[p.e.Node] <= 0 {
			delete(c.byNode, p.e.Node)
		}
		n++
	}
	if n > 0 {
		c.dirty = true
		c.o.Log.Warn("catalog full: evicted profiles", "evicted", n, "node", node.String(), "profiles", c.nProfiles, "max_profiles", c.lim.profiles)
	}
}
