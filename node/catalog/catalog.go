// Package catalog is a node's copy of the cluster-wide image catalog and of
// every node's boot profiles (issue "scatter hoarding", parts 1 and 2).
//
// The p2p layer carries the entries (gossip for live changes, a sync with
// each peer on join and periodically: p2p.CatalogBackend); this package
// decides what they mean for the node:
//
//   - A live entry for a manifest the node does not hold is registered
//     lazily: the manifest is fetched from the peer that sent the entry (or
//     its publisher), checked against its CID by p2p and decoded strictly,
//     stored, and named with the entry's names (a name the node already maps
//     to another manifest is left alone, and logged). A manifest that fails
//     its check is dropped and the peer that served it demoted
//     (p2p.Peer.ReportBad); the entry comes back at the next sync from an
//     honest peer.
//   - A tombstone (image rm --cluster) removes the manifest's names here,
//     once no export of it is open (until then it waits and is retried).
//   - A local image rm is local: the node remembers the entry version it
//     removed and registers the image again only when a newer entry (a new
//     add somewhere) arrives.
//   - Profiles are kept per (image, node), the latest version winning; the
//     working set of an image is planner.MergeProfiles over them and this
//     node's own, so every node that knows the same profiles computes the
//     same working set.
//
// The catalog is bounded (MaxEntries in all, MaxEntriesPerPublisher of one
// publisher, and as many profiles): a flood evicts the oldest tombstones and
// entries of images not here, never the images named here.
//
// Everything the catalog knows is kept in one file (Options.Path), written
// atomically after changes, so a restart does not forget tombstones.
package catalog

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/hoardvm/hoard/chunkstore"
	"github.com/hoardvm/hoard/p2p"
	"github.com/hoardvm/hoard/planner"
	"github.com/libp2p/go-libp2p/core/peer"
	"golang.org/x/sync/errgroup"
)

// MaxWorkingSet bounds a merged working set, in chunks.
const MaxWorkingSet = p2p.MaxProfileChunks

const (
	// fetchTimeout bounds one manifest fetch from one peer.
	fetchTimeout = 30 * time.Second
	// retryEvery is how often pending work (registrations whose peers
	// failed, tombstones of images in use) is tried again.
	retryEvery = 5 * time.Second
	// saveEvery bounds how often the file is written.
	saveEvery = time.Second
	// maxPending bounds the registrations waiting for a manifest.
	maxPending = 4096
	// maxRegistrations bounds the registrations and removals under way at
	// once (manifest fetches from peers, each from one peer at a time).
	maxRegistrations = 8
)

// Catalog bounds. A node keeps at most MaxEntries catalog entries, at most
// MaxEntriesPerPublisher of them from one publisher (a quarter: one peer
// flooding the catalog cannot crowd out the others), and as many profiles,
// MaxProfilesPerNode of one node. This node's own entries and profiles are
// never evicted nor counted against a share. When a bound is reached the
// catalog evicts, oldest version first, down to 15/16 of it (so a flood costs
// one pass per bound/16 entries):
//
//  1. tombstones (a node offline for longer than the flood took may then
//     miss a removal);
//  2. live entries of images not named in this node's store (never
//     registered: their manifest could not be had, or removed here);
//
// and refuses the new entry when nothing is left to evict: images named
// here stay. Profiles go likewise: first those of manifests with no live
// entry, then the oldest.
const (
	MaxEntries             = 1 << 16
	MaxEntriesPerPublisher = MaxEntries / 4
	MaxProfiles            = 1 << 16
	MaxProfilesPerNode     = MaxProfiles / 4
)

// limits are a Catalog's bounds (the constants above; tests lower them).
type limits struct {
	entries, perPublisher, profiles, perNode int
}

var defaultLimits = limits{MaxEntries, MaxEntriesPerPublisher, MaxProfiles, MaxProfilesPerNode}

// Peer is what the catalog needs of the p2p layer (*p2p.Peer).
type Peer interface {
	ID() peer.ID
	Manifest(ctx context.Context, remote peer.ID, id chunkstore.ID) ([]byte, error)
	ReportBad(id peer.ID, why error)
	PublishCatalog(ctx context.Context, e p2p.CatalogEntry) error
	PublishProfile(ctx context.Context, e p2p.ProfileEntry) error
	// SignCatalog and SignProfile sign this node's own entries (what it
	// records, and serves by sync, before it publishes them).
	SignCatalog(e p2p.CatalogEntry) (p2p.CatalogEntry, error)
	SignProfile(e p2p.ProfileEntry) (p2p.ProfileEntry, error)
}

// Options configure a Catalog.
type Options struct {
	// Path is the file the catalog is kept in; empty: memory only.
	Path string
	Log  *slog.Logger
	// InUse reports whether an image has open exports: its removal by a
	// tombstone waits until it has none.
	InUse func(manifest chunkstore.ID) bool
	// Registered is called after an image learned from the cluster was
	// registered (to advertise it); Removed after a tombstone removed one
	// of its names (manifestGone: the manifest went with it).
	Registered func(name string, manifest chunkstore.ID)
	Removed    func(name string, manifest chunkstore.ID, manifestGone bool)
	// Changed is called (not under any lock) after the catalog or the
	// profiles changed: the hoarder plans again.
	Changed func()
	// Pinned is called (from a registration's goroutine; it should hand the work off)
	// when an entry asks every node to fetch and pin an image (hoard image
	// prefetch --cluster): its working set, or all of it with full.
	Pinned func(manifest chunkstore.ID, full bool)
}

// Catalog is a node's view of the cluster catalog. Create it with Open.
type Catalog struct {
	st *chunkstore.Store
	o  Options

	mu       sync.Mutex
	p        Peer // nil until Attach
	self     peer.ID
	entries  map[chunkstore.ID]p2p.CatalogEntry
	profiles map[chunkstore.ID]map[peer.ID]p2p.ProfileEntry
	// dropped: manifests removed here by a local image rm, with the version
	// of the entry then known; an entry of that version or older is not
	// registered again.
	dropped map[chunkstore.ID]uint64
	// pending: registrations and removals still to do, with the peers to
	// ask for the manifest.
	pending map[chunkstore.ID][]peer.ID
	// learned: the names the catalog set here (not a local add), so that a
	// name two images claim is taken back.
	learned map[string]chunkstore.ID
	dirty   bool
	wake    chan struct{}

	lim limits
	// byPublisher counts entries per publisher and byNode profiles per
	// node, for the bounds; nProfiles counts every profile.
	byPublisher map[peer.ID]int
	byNode      map[peer.ID]int
	nProfiles   int
	// refused counts entries and profiles refused for want of room.
	refused int

	// jobs runs the registrations and removals (work), at most
	// maxRegistrations at once; inflight holds their manifests, failed
	// those that failed since the last retry; jobDone is signalled when one
	// ends. nameMu serializes the jobs' changes to the store's names (the
	// manifest fetches run in parallel), so that two images claiming one
	// name are decided as if one at a time.
	jobs     errgroup.Group
	inflight map[chunkstore.ID]struct{}
	failed   map[chunkstore.ID]struct{}
	jobDone  chan struct{}
	nameMu   sync.Mutex
}

// file is the catalog's on-disk form.
type file struct {
	Entries  []p2p.CatalogEntry       `json:"entries"`
	Profiles []p2p.ProfileEntry       `json:"profiles"`
	Dropped  map[chunkstore.ID]uint64 `json:"dropped,omitempty"`
	Learned  map[string]chunkstore.ID `json:"learned,omitempty"`
}

// Open loads the catalog kept at o.Path (a missing file is an empty
// catalog; a damaged one is set aside as .bad and the catalog starts empty:
// peers fill it again at the next sync).
func Open(st *chunkstore.Store, o Options) (*Catalog, error) {
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	c := &Catalog{st: st, o: o, entries: map[chunkstore.ID]p2p.CatalogEntry{},
		profiles: map[chunkstore.ID]map[peer.ID]p2p.ProfileEntry{}, dropped: map[chunkstore.ID]uint64{},
		pending: map[chunkstore.ID][]peer.ID{}, learned: map[string]chunkstore.ID{}, wake: make(chan struct{}, 1),
		lim: defaultLimits, byPublisher: map[peer.ID]int{}, byNode: map[peer.ID]int{},
		inflight: map[chunkstore.ID]struct{}{}, failed: map[chunkstore.ID]struct{}{}, jobDone: make(chan struct{}, 1)}
	c.jobs.SetLimit(maxRegistrations)
	if o.Path == "" {
		return c, nil
	}
	b, err := os.ReadFile(o.Path)
	if errors.Is(err, os.ErrNotExist) {
		return c, nil
	}
	if err != nil {
		return nil, fmt.Errorf("catalog %s: %w (check its permissions, or remove it: peers fill it again)", o.Path, err)
	}
	var f file
	if err := json.Unmarshal(b, &f); err != nil {
		bad := o.Path + ".bad"
		o.Log.Warn("catalog file damaged; set aside, starting empty (peers fill it again)", "path", o.Path, "moved_to", bad, "err", err)
		os.Rename(o.Path, bad)
		return c, nil
	}
	for _, e := range f.Entries {
		if old, ok := c.entries[e.Manifest]; !ok || e.Supersedes(old) {
			c.setEntry(e)
		}
	}
	for _, e := range f.Profiles {
		c.putProfile(e)
	}
	for id, v := range f.Dropped {
		c.dropped[id] = v
	}
	for name, id := range f.Learned {
		c.learned[name] = id
	}
	return c, nil
}

// Attach gives the catalog its peer, once the cluster is on. It signs this
// node's own entries that are not signed yet (changes made standalone, or
// kept from before entries were signed): peers refuse unsigned entries, and
// this node serves only signed ones.
func (c *Catalog) Attach(p Peer) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.p, c.self = p, p.ID()
	signed := 0
	for id, e := range c.entries {
		if len(e.Sig) > 0 || (e.Publisher != "" && e.Publisher != c.self) {
			continue
		}
		e.Publisher = c.self
		if s, err := p.SignCatalog(e); err != nil {
			c.o.Log.Warn("catalog: cannot sign this node's entry; peers will not learn it from here", "manifest", id.String(), "err", err)
		} else {
			c.setEntry(s)
			signed++
		}
	}
	for _, e := range c.profiles {
		own, ok := e[c.self]
		if !ok || len(own.Sig) > 0 {
			continue
		}
		if s, err := p.SignProfile(own); err != nil {
			c.o.Log.Warn("catalog: cannot sign this node's profile; peers will not learn it from here", "manifest", own.Manifest.String(), "err", err)
		} else {
			e[c.self] = s
			signed++
		}
	}
	if signed > 0 {
		c.dirty = true
	}
}

// Run does the catalog's pending work (manifest fetches, deferred
// removals) and keeps its file, until ctx is done; then it writes the file
// a last time.
func (c *Catalog) Run(ctx context.Context) error {
	retry := time.NewTicker(retryEvery)
	defer retry.Stop()
	save := time.NewTicker(saveEvery)
	defer save.Stop()
	// Tombstones learned before a restart may still need doing.
	c.mu.Lock()
	for id, e := range c.entries {
		if e.Removed {
			c.pending[id] = nil
		}
	}
	c.mu.Unlock()
	c.poke()
	for {
		select {
		case <-ctx.Done():
			c.jobs.Wait() // they end with ctx
			c.save()
			return nil
		case <-c.wake:
			c.work(ctx, true)
		case <-retry.C:
			c.work(ctx, true)
		case <-c.jobDone:
			c.work(ctx, false)
		case <-save.C:
			c.save()
		}
	}
}

func (c *Catalog) poke() {
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// Catalog implements p2p.CatalogBackend: every entry, live and tombstones.
func (c *Catalog) Catalog(context.Context) ([]p2p.CatalogEntry, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]p2p.CatalogEntry, 0, len(c.entries))
	for _, e := range c.entries {
		out = append(out, e)
	}
	return out, nil
}

// Profiles implements p2p.CatalogBackend: every node's profile of every image.
func (c *Catalog) Profiles(context.Context) ([]p2p.ProfileEntry, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []p2p.ProfileEntry
	for _, byNode := range c.profiles {
		for _, e := range byNode {
			out = append(out, e)
		}
	}
	return out, nil
}

// LearnCatalog implements p2p.CatalogBackend. It records e when it wins and
// queues the work it implies; it does no I/O.
func (c *Catalog) LearnCatalog(from peer.ID, e p2p.CatalogEntry) {
	c.mu.Lock()
	old, ok := c.entries[e.Manifest]
	if ok && !e.Supersedes(old) {
		if len(old.Sig) == 0 && len(e.Sig) > 0 && e.SameChange(old) {
			// The signed copy of an entry kept unsigned: this node can
			// serve it now.
			c.entries[e.Manifest] = e
			c.dirty = true
		}
		c.mu.Unlock()
		return
	}
	if !c.roomFor(e, old, ok) {
		c.refused++
		c.mu.Unlock()
		c.o.Log.Debug("catalog full: entry refused", "manifest", e.Manifest.String(), "publisher", e.Publisher.String(), "refused", c.refused)
		return
	}
	c.setEntry(e)
	c.dirty = true
	if len(c.pending) < maxPending || e.Removed {
		asks := []peer.ID{}
		for _, p := range []peer.ID{from, e.Publisher} {
			if p != "" && p != c.self && !slices.Contains(asks, p) {
				asks = append(asks, p)
			}
		}
		c.pending[e.Manifest] = asks
	}
	c.mu.Unlock()
	c.poke()
	c.changed()
}

// LearnProfile implements p2p.CatalogBackend.
func (c *Catalog) LearnProfile(_ peer.ID, e p2p.ProfileEntry) {
	c.mu.Lock()
	changed := c.putProfile(e)
	if changed {
		c.dirty = true
	}
	c.mu.Unlock()
	if changed {
		c.changed()
	}
}

// putProfile keeps e when it wins for its (manifest, node) and there is
// room. c.mu is held.
func (c *Catalog) putProfile(e p2p.ProfileEntry) bool {
	byNode := c.profiles[e.Manifest]
	old, ok := byNode[e.Node]
	if ok && !e.Supersedes(old) {
		if len(old.Sig) == 0 && len(e.Sig) > 0 && e.SameChange(old) {
			byNode[e.Node] = e // its signed copy, which this node can serve
		}
		return false
	}
	if !ok && !c.profileRoomFor(e.Node) {
		c.refused++
		return false
	}
	if byNode = c.profiles[e.Manifest]; byNode == nil { // makeProfileRoom may have removed it
		byNode = map[peer.ID]p2p.ProfileEntry{}
		c.profiles[e.Manifest] = byNode
	}
	if !ok {
		c.nProfiles++
		c.byNode[e.Node]++
	}
	byNode[e.Node] = e
	return true
}

func (c *Catalog) changed() {
	if c.o.Changed != nil {
		c.o.Changed()
	}
}

// Added records that this node registered manifest under names (all its
// names here) and announces it to the cluster.
func (c *Catalog) Added(ctx context.Context, manifest chunkstore.ID, names []string) {
	c.publish(ctx, manifest, names, false)
}

// RemovedCluster records that image manifest was removed from the whole
// cluster (image rm --cluster) and announces the tombstone.
func (c *Catalog) RemovedCluster(ctx context.Context, manifest chunkstore.ID) {
	c.publish(ctx, manifest, nil, true)
}

// PinCluster asks every node of the cluster to fetch image manifest's
// working set (with full, all of it) and pin it; names are its names here.
// A node that joins later does it when it learns the entry.
func (c *Catalog) PinCluster(ctx context.Context, manifest chunkstore.ID, names []string, full bool) {
	c.publishEntry(ctx, p2p.CatalogEntry{Manifest: manifest, Names: names, Pin: true, Full: full})
}

// RemovedLocal records that this node removed image manifest for itself
// only: the entry known now is not registered again (a newer one is).
func (c *Catalog) RemovedLocal(manifest chunkstore.ID) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if e, ok := c.entries[manifest]; ok && !e.Removed {
		c.dropped[manifest] = e.Version
		c.dirty = true
	}
	delete(c.pending, manifest)
}

func (c *Catalog) publish(ctx context.Context, manifest chunkstore.ID, names []string, removed bool) {
	e := p2p.CatalogEntry{Manifest: manifest, Names: names, Removed: removed}
	c.mu.Lock()
	if old := c.entries[manifest]; !removed && !old.Removed {
		// A new announcement of a pinned image keeps it pinned.
		e.Pin, e.Full = old.Pin, old.Full
	}
	c.mu.Unlock()
	c.publishEntry(ctx, e)
}

// publishEntry stamps e as this node's newest change and announces it.
func (c *Catalog) publishEntry(ctx context.Context, e p2p.CatalogEntry) {
	manifest := e.Manifest
	c.mu.Lock()
	old := c.entries[manifest]
	e.Version, e.Publisher = p2p.NextVersion(old.Version, time.Now()), c.self
	if c.p != nil {
		if s, err := c.p.SignCatalog(e); err != nil {
			c.o.Log.Warn("catalog: cannot sign the entry; peers will not learn it from here", "manifest", manifest.String(), "err", err)
		} else {
			e = s
		}
	}
	c.setEntry(e)
	delete(c.dropped, manifest)
	delete(c.pending, manifest)
	c.dirty = true
	p := c.p
	c.mu.Unlock()
	c.changed()
	if p == nil {
		return // standalone: kept, and synced once the node joins a cluster
	}
	if err := p.PublishCatalog(ctx, e); err != nil {
		c.o.Log.Warn("cannot announce the image to the cluster now; peers learn it at their next sync", "manifest", manifest.String(), "err", err)
	}
}

// ProfileSaved announces this node's profile of manifest.
func (c *Catalog) ProfileSaved(ctx context.Context, manifest chunkstore.ID, prof chunkstore.Profile) {
	if len(prof.Chunks) > p2p.MaxProfileChunks {
		prof.Chunks = prof.Chunks[:p2p.MaxProfileChunks]
	}
	c.mu.Lock()
	self, p := c.self, c.p
	if p == nil {
		c.mu.Unlock()
		return // the node's own profile is in its store
	}
	old := c.profiles[manifest][self]
	e := p2p.ProfileEntry{Manifest: manifest, Node: self, Profile: prof, Version: p2p.NextVersion(old.Version, time.Now())}
	if s, err := p.SignProfile(e); err != nil {
		c.o.Log.Warn("catalog: cannot sign the boot profile; peers will not learn it from here", "manifest", manifest.String(), "err", err)
	} else {
		e = s
	}
	c.putProfile(e)
	c.dirty = true
	c.mu.Unlock()
	c.changed()
	if err := p.PublishProfile(ctx, e); err != nil {
		c.o.Log.Warn("cannot announce the boot profile to the cluster now; peers learn it at their next sync", "manifest", manifest.String(), "err", err)
	}
}

// HasOwnProfile reports whether the catalog holds this node's profile of manifest.
func (c *Catalog) HasOwnProfile(manifest chunkstore.ID) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	_, ok := c.profiles[manifest][c.self]
	return ok
}

// WorkingSet is an image's working set as the cluster knows it: its merged
// profile and how many nodes contributed. own is this node's profile (from
// its store; nil if none); entries is the manifest's entry count.
func (c *Catalog) WorkingSet(manifest chunkstore.ID, own *chunkstore.Profile, entries int) planner.MergedProfile {
	in := map[string]chunkstore.Profile{}
	c.mu.Lock()
	self := c.self
	for node, e := range c.profiles[manifest] {
		if node != self {
			in[node.String()] = e.Profile
		}
	}
	c.mu.Unlock()
	if own != nil {
		in["self:"+self.String()] = *own
	}
	return planner.MergeProfiles(in, entries, MaxWorkingSet)
}

// Entry returns the catalog's entry for manifest.
func (c *Catalog) Entry(manifest chunkstore.ID) (p2p.CatalogEntry, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.entries[manifest]
	return e, ok
}

// work starts the pending registrations and removals, at most
// maxRegistrations at a time and one at a time per manifest (an add and then
// a remove of one image apply in order: the second waits for the first and
// runs after it, the entry having changed meanwhile). retry: also those that
// failed since the last retry (a wake from LearnCatalog or the retry tick);
// else only the others (a job finished: room for one more). Run's goroutine
// calls it.
func (c *Catalog) work(ctx context.Context, retry bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if retry {
		clear(c.failed)
	}
	p := c.p
	for id, asks := range c.pending {
		if len(c.inflight) >= maxRegistrations || ctx.Err() != nil {
			return
		}
		if _, busy := c.inflight[id]; busy {
			continue
		}
		if _, failed := c.failed[id]; failed {
			continue
		}
		e := c.entries[id]
		if !c.jobs.TryGo(func() error { c.job(ctx, p, e, asks); return nil }) {
			return // a job still leaving; it signals jobDone
		}
		c.inflight[id] = struct{}{}
	}
}

// job does one registration or removal. When it changed the images here (a
// name set or taken back, an image removed), Changed is called: LearnCatalog's
// own call came before the manifest was fetched, when the hoarder could not
// yet see the image.
func (c *Catalog) job(ctx context.Context, p Peer, e p2p.CatalogEntry, asks []peer.ID) {
	var done, changed bool
	if e.Removed {
		done, changed = c.remove(ctx, e)
	} else {
		done, changed = c.register(ctx, p, e, asks)
		if done && e.Pin && c.o.Pinned != nil {
			c.o.Pinned(e.Manifest, e.Full)
		}
	}
	c.mu.Lock()
	delete(c.inflight, e.Manifest)
	if cur := c.entries[e.Manifest]; done && cur.Version == e.Version && cur.Publisher == e.Publisher {
		delete(c.pending, e.Manifest)
	} else if !done {
		c.failed[e.Manifest] = struct{}{}
	}
	c.mu.Unlock()
	if changed {
		c.changed()
	}
	select {
	case c.jobDone <- struct{}{}:
	default:
	}
}

// register makes a live entry's image known here. It reports whether the
// work is done (registered, or nothing to do) and whether it changed the
// images here.
func (c *Catalog) register(ctx context.Context, p Peer, e p2p.CatalogEntry, asks []peer.ID) (done, changed bool) {
	c.mu.Lock()
	if v, ok := c.dropped[e.Manifest]; ok && e.Version <= v {
		c.mu.Unlock()
		return true, false
	}
	delete(c.dropped, e.Manifest)
	c.mu.Unlock()
	if _, err := c.st.GetManifestBytes(ctx, e.Manifest); err != nil {
		if !errors.Is(err, chunkstore.ErrNotFound) {
			c.o.Log.Warn("catalog: cannot read the store", "manifest", e.Manifest.String(), "err", err)
			return false, false
		}
		if p == nil || len(asks) == 0 {
			return false, false
		}
		if !c.fetchManifest(ctx, p, e, asks) {
			return false, false
		}
		changed = true // the image is known by its CID now
	}
	// The names one job at a time (see Catalog.nameMu); a local rm while the
	// manifest was fetched wins.
	c.nameMu.Lock()
	defer c.nameMu.Unlock()
	c.mu.Lock()
	v, dropped := c.dropped[e.Manifest]
	c.mu.Unlock()
	if dropped && e.Version <= v {
		return true, changed
	}
	for _, name := range e.Names {
		id, err := c.st.Resolve(ctx, name)
		if other, ok := c.claimedElsewhere(name, e.Manifest); ok {
			// Two images claim the name: neither gets it from the catalog
			// (a local add keeps its own), and one the catalog gave is
			// taken back; users choose by CID.
			c.mu.Lock()
			mine := c.learned[name] == id && err == nil
			if mine {
				delete(c.learned, name)
				c.dirty = true
			}
			c.mu.Unlock()
			if mine {
				if err := c.st.DeleteName(ctx, name); err == nil {
					changed = true
					if c.o.Removed != nil {
						c.o.Removed(name, id, false)
					}
				}
			}
			c.o.Log.Warn("catalog: two images claim one name; registered by CID only (pull the one meant by its CID, or rename one)",
				"image", name, "manifest", e.Manifest.String(), "other_manifest", other.String())
			continue
		}
		switch {
		case err == nil && id == e.Manifest:
			continue
		case err == nil:
			c.o.Log.Warn("catalog: a peer names another image like one here; kept the local one (pull the other by its CID)",
				"image", name, "local_manifest", id.String(), "cluster_manifest", e.Manifest.String())
			continue
		case !errors.Is(err, chunkstore.ErrNotFound):
			c.o.Log.Warn("catalog: cannot read the store", "image", name, "err", err)
			return false, changed
		}
		if err := c.st.SetName(ctx, name, e.Manifest); err != nil {
			if errors.Is(err, chunkstore.ErrInvalid) {
				continue
			}
			c.o.Log.Warn("catalog: cannot name the image", "image", name, "err", err)
			return false, changed
		}
		changed = true
		c.mu.Lock()
		c.learned[name] = e.Manifest
		c.dirty = true
		c.mu.Unlock()
		c.o.Log.Info("image learned from the cluster", "image", name, "manifest", e.Manifest.String(), "publisher", e.Publisher.String())
		if c.o.Registered != nil {
			c.o.Registered(name, e.Manifest)
		}
	}
	if len(e.Names) == 0 && c.o.Registered != nil {
		c.o.Registered(e.Manifest.String(), e.Manifest)
	}
	return true, changed
}

// claimedElsewhere reports another live entry that claims name.
func (c *Catalog) claimedElsewhere(name string, manifest chunkstore.ID) (chunkstore.ID, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for id, e := range c.entries {
		if id != manifest && !e.Removed && slices.Contains(e.Names, name) {
			return id, true
		}
	}
	return chunkstore.ID{}, false
}

// fetchManifest gets e's manifest from one of asks and stores it.
func (c *Catalog) fetchManifest(ctx context.Context, p Peer, e p2p.CatalogEntry, asks []peer.ID) bool {
	for _, from := range asks {
		fctx, cancel := context.WithTimeout(ctx, fetchTimeout)
		b, err := p.Manifest(fctx, from, e.Manifest)
		cancel()
		if err != nil {
			if errors.Is(err, chunkstore.ErrMismatch) {
				p.ReportBad(from, err)
				c.o.Log.Warn("catalog: a peer sent a manifest that fails its CID check; peer demoted", "peer_id", from.String(), "manifest", e.Manifest.String(), "err", err)
			} else {
				c.o.Log.Debug("catalog: manifest fetch failed", "peer_id", from.String(), "manifest", e.Manifest.String(), "err", err)
			}
			continue
		}
		if !e.Manifest.Verify(b) {
			p.ReportBad(from, chunkstore.ErrMismatch)
			c.o.Log.Warn("catalog: a peer sent a manifest that fails its CID check; peer demoted", "peer_id", from.String(), "manifest", e.Manifest.String())
			continue
		}
		m, err := chunkstore.DecodeManifest(b)
		if err != nil {
			p.ReportBad(from, err)
			c.o.Log.Warn("catalog: a peer sent a manifest that does not decode; peer demoted", "peer_id", from.String(), "manifest", e.Manifest.String(), "err", err)
			continue
		}
		got, err := c.st.PutManifest(ctx, m)
		if err != nil {
			c.o.Log.Warn("catalog: cannot store a manifest learned from the cluster", "manifest", e.Manifest.String(), "err", err)
			return false
		}
		if got != e.Manifest {
			p.ReportBad(from, chunkstore.ErrMismatch)
			return false
		}
		return true
	}
	return false
}

// remove applies a tombstone: every name of the manifest goes, once no
// export of it is open. It reports whether that is done and whether it
// removed a name.
func (c *Catalog) remove(ctx context.Context, e p2p.CatalogEntry) (done, changed bool) {
	if c.o.InUse != nil && c.o.InUse(e.Manifest) {
		return false, false
	}
	c.nameMu.Lock()
	defer c.nameMu.Unlock()
	names, err := c.st.Names(ctx)
	if err != nil {
		return false, false
	}
	for _, nm := range names {
		if nm.Manifest != e.Manifest {
			continue
		}
		if _, err := c.st.RemoveName(ctx, nm.Name); err != nil && !errors.Is(err, chunkstore.ErrNotFound) {
			c.o.Log.Warn("catalog: cannot remove an image the cluster removed; retrying", "image", nm.Name, "err", err)
			return false, changed
		}
		changed = true
		_, gerr := c.st.GetManifestBytes(ctx, e.Manifest)
		c.o.Log.Info("image removed from the cluster", "image", nm.Name, "manifest", e.Manifest.String(), "publisher", e.Publisher.String())
		if c.o.Removed != nil {
			c.o.Removed(nm.Name, e.Manifest, gerr != nil)
		}
	}
	return true, changed
}

// save writes the file when something changed.
func (c *Catalog) save() {
	c.mu.Lock()
	if !c.dirty || c.o.Path == "" {
		c.mu.Unlock()
		return
	}
	f := file{Dropped: map[chunkstore.ID]uint64{}}
	for _, e := range c.entries {
		f.Entries = append(f.Entries, e)
	}
	for _, byNode := range c.profiles {
		for _, e := range byNode {
			f.Profiles = append(f.Profiles, e)
		}
	}
	for id, v := range c.dropped {
		f.Dropped[id] = v
	}
	f.Learned = maps.Clone(c.learned)
	c.dirty = false
	c.mu.Unlock()
	b, err := json.Marshal(f)
	if err == nil {
		err = writeFileAtomic(c.o.Path, b)
	}
	if err != nil {
		c.mu.Lock()
		c.dirty = true
		c.mu.Unlock()
		c.o.Log.Warn("cannot write the catalog file; retrying", "path", c.o.Path, "err", err)
	}
}

func writeFileAtomic(path string, b []byte) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), filepath.Base(path)+".tmp*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(b); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}

// Live reports whether the catalog holds a live entry for manifest that
// this node has not removed since: an image the cluster wants served here.
func (c *Catalog) Live(manifest chunkstore.ID) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.entries[manifest]
	if !ok || e.Removed {
		return false
	}
	if v, ok := c.dropped[manifest]; ok && e.Version <= v {
		return false
	}
	return true
}
