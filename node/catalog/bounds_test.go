package catalog

import (
	"fmt"
	"testing"

	"github.com/hoardvm/hoard/chunkstore"
	"github.com/hoardvm/hoard/p2p"
	"github.com/libp2p/go-libp2p/core/peer"
)

// TestCatalogBounded: a flood of entries and profiles, from one publisher
// and from many, leaves the catalog within its bounds (MaxEntries,
// MaxEntriesPerPublisher, MaxProfiles, MaxProfilesPerNode); the images named
// here and this node's own entries stay; the oldest tombstones go first.
func TestCatalogBounded(t *testing.T) {
	t.Parallel()
	fp := &fakePeer{id: pid(t, "self")}
	c, st := newCatalog(t, "", Options{})
	c.Attach(fp)
	// Real images: two learned from peers and named here, one of this node.
	var real []chunkstore.ID
	for i := range 3 {
		m, _, id := testManifest(t, 100+i)
		if _, err := st.PutNamedManifest(t.Context(), fmt.Sprint("real-", i), m); err != nil {
			t.Fatal(err)
		}
		real = append(real, id)
	}
	rogue := pid(t, "rogue")
	c.LearnCatalog(rogue, p2p.CatalogEntry{Manifest: real[0], Names: []string{"real-0"}, Version: 1, Publisher: rogue})
	c.LearnCatalog(pid(t, "p"), p2p.CatalogEntry{Manifest: real[1], Names: []string{"real-1"}, Version: 1, Publisher: pid(t, "p")})
	c.Added(t.Context(), real[2], []string{"real-2"})

	// One publisher floods live entries of images no one has, then
	// tombstones.
	v := uint64(10)
	flood := func(pub peer.ID, n int, removed bool) {
		for i := range n {
			v++
			c.LearnCatalog(pub, p2p.CatalogEntry{Manifest: chunkstore.Sum(fmt.Appendf(nil, "%s/%v/%d", pub, removed, i)),
				Removed: removed, Version: v, Publisher: pub})
		}
	}
	flood(rogue, MaxEntriesPerPublisher+5000, false)
	flood(rogue, 5000, true)
	counts := func() (total int, perPub map[peer.ID]int) {
		l, err := c.Catalog(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		perPub = map[peer.ID]int{}
		for _, e := range l {
			perPub[e.Publisher]++
		}
		return len(l), perPub
	}
	total, perPub := counts()
	n := perPub[rogue]
	if n > MaxEntriesPerPublisher || n < MaxEntriesPerPublisher*7/8 || total > MaxEntries {
		t.Fatalf("one publisher's flood: it holds %d entries (bound %d), %d in all", n, MaxEntriesPerPublisher, total)
	}
	// Many publishers flood tombstones past the total bound.
	var pubs []peer.ID
	for i := range 6 {
		p := pid(t, fmt.Sprint("flood-", i))
		pubs = append(pubs, p)
		flood(p, MaxEntriesPerPublisher, true)
	}
	last := chunkstore.Sum(fmt.Appendf(nil, "%s/%v/%d", pubs[5], true, MaxEntriesPerPublisher-1))
	first := chunkstore.Sum(fmt.Appendf(nil, "%s/%v/%d", pubs[0], true, 0))
	total, perPub = counts()
	if total > MaxEntries || total < MaxEntries*7/8 {
		t.Fatalf("after the floods: %d entries, want at most %d (and not far fewer)", total, MaxEntries)
	}
	for p, n := range perPub {
		if n > MaxEntriesPerPublisher {
			t.Errorf("publisher %s holds %d entries (bound %d)", p, n, MaxEntriesPerPublisher)
		}
	}
	for i, id := range real {
		if e, ok := c.Entry(id); !ok || e.Removed {
			t.Errorf("real image %d evicted by the flood", i)
		}
	}
	if _, ok := c.Entry(last); !ok {
		t.Error("the newest tombstone was evicted")
	}
	if _, ok := c.Entry(first); ok {
		t.Error("an old tombstone stayed while newer ones came")
	}

	// Profiles: one node's flood, then many nodes'.
	pv := uint64(0)
	floodProf := func(node peer.ID, n int) {
		for i := range n {
			pv++
			c.LearnProfile(node, p2p.ProfileEntry{Manifest: chunkstore.Sum(fmt.Appendf(nil, "p/%s/%d", node, i)), Node: node,
				Version: pv, Profile: chunkstore.Profile{Boots: 1, Chunks: []int{1}}})
		}
	}
	c.ProfileSaved(t.Context(), real[2], chunkstore.Profile{Boots: 1, Chunks: []int{0}})
	c.LearnProfile(pid(t, "p"), p2p.ProfileEntry{Manifest: real[1], Node: pid(t, "p"), Version: 1, Profile: chunkstore.Profile{Boots: 1, Chunks: []int{2}}})
	floodProf(rogue, MaxProfilesPerNode+1000)
	for _, p := range pubs {
		floodProf(p, MaxProfilesPerNode)
	}
	profs, err := c.Profiles(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	nRogue := 0
	for _, p := range profs {
		if p.Node == rogue {
			nRogue++
		}
	}
	if np := len(profs); np > MaxProfiles || np < MaxProfiles*7/8 || nRogue > MaxProfilesPerNode {
		t.Fatalf("profiles after the floods: %d (bound %d), %d of one node (bound %d)", np, MaxProfiles, nRogue, MaxProfilesPerNode)
	}
	if !c.HasOwnProfile(real[2]) {
		t.Error("this node's own profile was evicted")
	}
	if ws := c.WorkingSet(real[1], nil, 8); ws.Contributors != 1 {
		t.Error("the profile of a live image was evicted before those of images no one has")
	}
}

// The counts the bounds use match what the catalog holds.
func TestCatalogBoundsAccounting(t *testing.T) {
	t.Parallel()
	fp := &fakePeer{id: pid(t, "self")}
	c, _ := newCatalog(t, "", Options{})
	c.Attach(fp)
	c.lim = limits{entries: 64, perPublisher: 16, profiles: 32, perNode: 8}
	pubs := []peer.ID{pid(t, "a"), pid(t, "b"), pid(t, "c"), pid(t, "d"), pid(t, "e"), pid(t, "f")}
	for i := range 400 {
		p := pubs[i%len(pubs)]
		// Some manifests change publisher, some become tombstones.
		id := chunkstore.Sum(fmt.Append(nil, i%97))
		c.LearnCatalog(p, p2p.CatalogEntry{Manifest: id, Removed: i%3 == 0, Version: uint64(i + 1), Publisher: p})
		c.LearnProfile(p, p2p.ProfileEntry{Manifest: id, Node: p, Version: uint64(i + 1)})
	}
	c.Added(t.Context(), chunkstore.Sum([]byte("own")), nil)
	c.mu.Lock()
	defer c.mu.Unlock()
	perPub := map[peer.ID]int{}
	for _, e := range c.entries {
		perPub[e.Publisher]++
	}
	for p, n := range perPub {
		if c.byPublisher[p] != n || (p != fp.id && n > c.lim.perPublisher) {
			t.Errorf("publisher %s: %d entries, counted %d (bound %d)", p, n, c.byPublisher[p], c.lim.perPublisher)
		}
	}
	if len(c.byPublisher) != len(perPub) || len(c.entries) > c.lim.entries+1 {
		t.Errorf("%d publishers counted, %d hold entries; %d entries (bound %d)", len(c.byPublisher), len(perPub), len(c.entries), c.lim.entries)
	}
	np, perNode := 0, map[peer.ID]int{}
	for _, byNode := range c.profiles {
		np += len(byNode)
		for n := range byNode {
			perNode[n]++
		}
	}
	if np != c.nProfiles || np > c.lim.profiles {
		t.Errorf("%d profiles, counted %d (bound %d)", np, c.nProfiles, c.lim.profiles)
	}
	for n, k := range perNode {
		if c.byNode[n] != k || k > c.lim.perNode {
			t.Errorf("node %s: %d profiles, counted %d (bound %d)", n, k, c.byNode[n], c.lim.perNode)
		}
	}
}
