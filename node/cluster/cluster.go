// Package cluster is a node's side of the p2p layer: it advertises the
// node's images, resolves images the node has never seen, and fetches
// missing chunks from peers (node.Fetcher) with cluster-wide origin
// coalescing. It knows the store and the p2p peer, not the node: serving the
// node's chunks to peers is the node's p2p.Backend.
package cluster

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math"
	"slices"
	"sync"
	"time"

	"github.com/hoardvm/hoard/chunkstore"
	"github.com/hoardvm/hoard/p2p"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"golang.org/x/sync/errgroup"
	"golang.org/x/sync/singleflight"
)

// Options configure a Cluster.
type Options struct {
	// ViewTTL is how long an image's peer view (have-bitmaps) is used before
	// it is asked again.
	ViewTTL time.Duration
	// DesignatedTimeout bounds the wait for a chunk's designated fetcher.
	DesignatedTimeout time.Duration
	// OnFallback is called each time a designated fetcher did not deliver in
	// time, so that the caller goes to the origin itself.
	OnFallback func()
	// Members returns the cluster's live nodes as this node knows them
	// (NodeInfo announcements): with the connected peers and the peers
	// known to serve an image, the set a chunk's designated fetcher is
	// chosen from. Nil: connected peers and the image's peers only.
	Members func() []peer.ID
	Log     *slog.Logger
}

// New is the cluster side of peer p over store st.
func New(p *p2p.Peer, st *chunkstore.Store, o Options) *Cluster {
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	return &Cluster{p: p, st: st, o: o, log: o.Log, views: map[chunkstore.ID]*view{}, refreshing: map[chunkstore.ID]chan struct{}{}, learnSem: make(chan struct{}, maxLearning)}
}

// Peer is the p2p peer.
func (c *Cluster) Peer() *p2p.Peer { return c.p }

// Run advertises every registered image, then keeps ctx for the
// background work (view refreshes, shared resolves, advertisements) until
// ctx is done.
func (c *Cluster) Run(ctx context.Context) {
	c.mu.Lock()
	c.ctx = ctx
	c.mu.Unlock()
	c.advertiseAll(ctx)
	<-ctx.Done()
}

// baseCtx is Run's context, nil before Run.
func (c *Cluster) baseCtx() context.Context {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.ctx
}

func (c *Cluster) baseCtxOr(def context.Context) context.Context {
	if ctx := c.baseCtx(); ctx != nil {
		return ctx
	}
	return def
}

// AdvertiseLater advertises name and id in the background, once Run
// started; Stop waits for it.
func (c *Cluster) AdvertiseLater(name string, id chunkstore.ID) {
	c.mu.Lock()
	ctx := c.ctx
	if ctx == nil || c.closing {
		c.mu.Unlock()
		return
	}
	c.wg.Add(1)
	c.mu.Unlock()
	go func() {
		defer c.wg.Done()
		c.Advertise(ctx, name, id)
	}()
}

// WithDesignated marks ctx as the context of a fetch this node runs as a
// peer's designated fetcher: FetchStored then waits for views only briefly.
func WithDesignated(ctx context.Context) context.Context {
	return context.WithValue(ctx, designatedKey{}, true)
}

// Withdraw stops advertising name, and the manifest too when it is gone.
func (c *Cluster) Withdraw(name string, id chunkstore.ID, manifestGone bool) {
	if manifestGone {
		c.p.Withdraw(id)
	} else {
		c.p.WithdrawName(name)
	}
}

// maxViewPeers bounds how many peers are asked for their have-bitmap of an
// image when its view is refreshed.
const maxViewPeers = 256

const (
	// maxViews bounds the images whose peer views are kept; the least
	// recently used go first.
	maxViews = 1024
	// viewIdle drops the view of an image no read used for this long.
	viewIdle = 10 * time.Minute
	// viewGrace is how long the first view of an image waits for slow peers
	// once one peer has answered: a stopped peer must not hold the first
	// read for the whole Have timeout (3 s, then 5 s). The refresh goes on
	// and its complete view replaces this one.
	viewGrace = 500 * time.Millisecond
	// designatedViewWait bounds how long a designated fetcher waits for a
	// first view of the image before it designates (itself, most often).
	designatedViewWait = time.Second
	// resolveTimeout bounds the shared work of resolving an unknown image
	// name through the cluster.
	resolveTimeout = 30 * time.Second
)

// cluster is the node's side of the p2p layer: it serves the store to peers
// (p2p.Backend), advertises images, and fetches missing chunks from peers
// (Fetcher) with cluster-wide origin coalescing.
//
// Coalescing: for a chunk no peer holds, the designated fetcher is
// p2p.Designated over the cluster's members as this node knows them (see
// members) plus this node. When
// that is another peer it is asked with the fetch flag and runs this same
// read path; since the designated peer has the highest rendezvous score of
// the asker's view, a request only ever moves to a higher score, so a chain
// of askers whose views differ climbs towards the same peer and never loops.
type Cluster struct {
	p   *p2p.Peer
	st  *chunkstore.Store
	o   Options
	log *slog.Logger
	ctx context.Context // Run's; nil before Run (under mu)

	mu         sync.Mutex
	views      map[chunkstore.ID]*view
	refreshing map[chunkstore.ID]chan struct{} // closed when the refresh is done
	closing    bool
	wg         sync.WaitGroup     // view refreshes
	sf         singleflight.Group // remote resolves, by name
	// failed holds the designated fetchers that did not deliver lately:
	// no members for failedTTL (see markFailed).
	failed map[peer.ID]failure
	// learnSem bounds the manifests ResolveFrom fetches at once.
	learnSem chan struct{}
}

// maxLearning bounds the manifests learnt from askers at once.
const maxLearning = 2

// failure is a designated fetcher's failure to deliver.
type failure struct {
	at        time.Time
	connected bool // still connected then: stopped, or overloaded
}

// failedTTL is how long a designated fetcher that did not deliver is left out
// of designation: a stopped node stays a member until its NodeInfo expires,
// and without this its askers would wait or fall back for each chunk.
const failedTTL = 30 * time.Second

// markFailed records that designated fetcher id did not deliver.
func (c *Cluster) markFailed(id peer.ID) {
	connected := c.p.Host().Network().Connectedness(id) == network.Connected
	c.mu.Lock()
	defer c.mu.Unlock()
	now := time.Now()
	for p, f := range c.failed {
		if now.Sub(f.at) > failedTTL {
			delete(c.failed, p)
		}
	}
	if c.failed == nil {
		c.failed = map[peer.ID]failure{}
	}
	c.failed[id] = failure{at: now, connected: connected}
}

// designatable reports whether id may be designated: it did not fail to
// deliver lately, or it could not be reached then and is connected again.
func (c *Cluster) designatable(id peer.ID) bool {
	c.mu.Lock()
	f, ok := c.failed[id]
	c.mu.Unlock()
	if !ok || time.Since(f.at) > failedTTL {
		return true
	}
	return !f.connected && c.p.Host().Network().Connectedness(id) == network.Connected
}

// view is what this node knows of an image's peers: their have-bitmaps.
type view struct {
	at    time.Time
	used  time.Time              // last read that used it (under cluster.mu)
	haves map[peer.ID]p2p.Bitmap // peers that know the manifest (bitmap not empty)
	// partial marks a first view published while slow peers were still
	// being waited for; the complete one replaces it.
	partial bool
}

// putView stores v as manifest's view and drops views unused for viewIdle,
// then the least recently used beyond maxViews. c.mu is held.
func (c *Cluster) putView(manifest chunkstore.ID, v *view, now time.Time) {
	if old := c.views[manifest]; old != nil && old.used.After(v.used) {
		v.used = old.used
	}
	if v.used.IsZero() {
		v.used = now
	}
	c.views[manifest] = v
	for id, x := range c.views {
		if now.Sub(x.used) > viewIdle {
			delete(c.views, id)
		}
	}
	for len(c.views) > maxViews {
		var oldest chunkstore.ID
		var at time.Time
		for id, x := range c.views {
			if at.IsZero() || x.used.Before(at) {
				oldest, at = id, x.used
			}
		}
		delete(c.views, oldest)
	}
}

// advertiseAll announces every registered image.
func (c *Cluster) advertiseAll(ctx context.Context) {
	names, err := c.st.Names(ctx)
	if err != nil {
		c.log.Warn("cannot list images to advertise", "err", err)
		return
	}
	for _, nm := range names {
		c.Advertise(ctx, nm.Name, nm.Manifest)
	}
}

// Advertise announces that this node holds image id under name (and its
// Glance ID). Announcements that fail are kept and retried by p2p.
func (c *Cluster) Advertise(ctx context.Context, name string, id chunkstore.ID) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := c.p.Provide(ctx, id); err != nil {
		c.log.Debug("advertise image", "image", name, "err", err)
	}
	names := []string{name}
	if m, err := c.st.GetManifest(ctx, id); err == nil && m.Source.Kind == "glance" && m.Source.Location != name {
		names = append(names, m.Source.Location)
	}
	for _, nm := range names {
		if nm == "" || nm == id.String() {
			continue
		}
		if err := c.p.ProvideName(ctx, nm, id); err != nil {
			c.log.Debug("advertise image name", "image", nm, "err", err)
		}
	}
}

// peerView returns the have-bitmaps of the peers serving manifest. Views older
// than Config.P2P.ViewTTL are refreshed in the background while the old one is
// used; only the first view of an image is waited for, at most maxWait (a
// designated fetcher waits less: its askers are on a timer).
func (c *Cluster) peerView(ctx context.Context, manifest chunkstore.ID, maxWait time.Duration) *view {
	c.mu.Lock()
	v := c.views[manifest]
	if v != nil {
		v.used = time.Now()
	}
	c.mu.Unlock()
	if v != nil && time.Since(v.at) < c.o.ViewTTL {
		return v
	}
	done := c.startRefresh(manifest)
	if v != nil {
		return v
	}
	if done == nil {
		return &view{}
	}
	timer := time.NewTimer(maxWait)
	defer timer.Stop()
	select {
	case <-done:
		c.mu.Lock()
		v = c.views[manifest]
		c.mu.Unlock()
		if v != nil {
			return v
		}
	case <-ctx.Done():
	case <-timer.C:
	}
	return &view{}
}

// startRefresh refreshes the view of manifest in the background unless that
// is under way; the returned channel is closed when a view is there: the
// complete one, or a partial one viewGrace after the first peer answered
// (nil once the cluster is closing). stop waits for refreshes.
func (c *Cluster) startRefresh(manifest chunkstore.ID) <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	if ch, ok := c.refreshing[manifest]; ok {
		return ch
	}
	if c.closing {
		return nil
	}
	ch := make(chan struct{})
	c.refreshing[manifest] = ch
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		var once sync.Once
		published := func() { once.Do(func() { close(ch) }) }
		nv := c.refresh(c.baseCtxOr(context.Background()), manifest, func(partial *view) {
			partial.partial = true
			c.mu.Lock()
			if c.views[manifest] == nil { // a first view only: never replace a complete one
				c.putView(manifest, partial, time.Now())
			}
			c.mu.Unlock()
			published()
		})
		c.mu.Lock()
		c.putView(manifest, nv, time.Now())
		delete(c.refreshing, manifest)
		c.mu.Unlock()
		published()
	}()
	return ch
}

// Stop waits for background view refreshes; none starts afterwards.
func (c *Cluster) Stop() {
	c.mu.Lock()
	c.closing = true
	c.mu.Unlock()
	c.wg.Wait()
}

// refresh asks the image's providers and this node's neighbours (connected
// first) for their have-bitmaps. viewGrace after the first peer that holds
// some of the image answered, partial is called (at most once, and only
// while peers are still being waited for) with a copy of the view so far.
func (c *Cluster) refresh(ctx context.Context, manifest chunkstore.ID, partial func(*view)) *view {
	self := c.p.ID()
	var seenMu sync.Mutex
	seen := map[peer.ID]bool{self: true}
	asked := 0
	// take reports whether id is still to be asked (and counts it).
	take := func(id peer.ID) bool {
		seenMu.Lock()
		defer seenMu.Unlock()
		if seen[id] || asked >= maxViewPeers || c.p.Bad(id) {
			return false
		}
		seen[id] = true
		asked++
		return true
	}
	var cands []peer.ID
	for _, id := range c.p.Host().Network().Peers() {
		if take(id) {
			cands = append(cands, id)
		}
	}
	for _, pi := range c.p.Peers() {
		if id, err := peer.Decode(pi.ID); err == nil && take(id) {
			cands = append(cands, id)
		}
	}
	v := &view{at: time.Now(), haves: map[peer.ID]p2p.Bitmap{}}
	var mu sync.Mutex
	var grace *time.Timer
	graceDone := make(chan struct{})
	finished := false
	defer func() { // no partial view after the complete one; wait for one under way
		mu.Lock()
		finished = true
		running := grace != nil && !grace.Stop()
		mu.Unlock()
		if running {
			<-graceDone
		}
	}()
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(16)
	ask := func(id peer.ID) {
		g.Go(func() error {
			// One retry: a peer left out of a view because it was slow to
			// answer makes this node's designated fetchers differ from others'.
			var bm p2p.Bitmap
			var err error
			for try := range 2 {
				hctx, cancel := context.WithTimeout(gctx, time.Duration(3+2*try)*time.Second)
				bm, err = c.p.Have(hctx, id, manifest)
				cancel()
				if err == nil || gctx.Err() != nil {
					break
				}
			}
			if err != nil || len(bm) == 0 {
				return nil // gone, or does not know the image
			}
			mu.Lock()
			v.haves[id] = bm
			if grace == nil && partial != nil {
				grace = time.AfterFunc(viewGrace, func() {
					defer close(graceDone)
					mu.Lock()
					if finished {
						mu.Unlock()
						return
					}
					pv := &view{at: v.at, haves: maps.Clone(v.haves)}
					mu.Unlock()
					partial(pv)
				})
			}
			mu.Unlock()
			return nil
		})
	}
	// The DHT's providers are asked as they are found, beside the known
	// peers: a slow lookup (up to 3 s) must not hold the first view.
	g.Go(func() error {
		pctx, cancel := context.WithTimeout(gctx, 3*time.Second)
		provs, err := c.p.FindProviders(pctx, manifest)
		cancel()
		if err != nil {
			c.log.Debug("find providers", "manifest", manifest.String(), "err", err)
		}
		for _, ai := range provs {
			if take(ai.ID) {
				ask(ai.ID)
			}
		}
		return nil
	})
	for _, id := range cands {
		ask(id)
	}
	g.Wait()
	return v
}

// Fetch implements Fetcher over the cluster: from a peer that holds the
// chunk; else from the chunk's designated fetcher (which may go to the
// origin) within Config.P2P.DesignatedTimeout; else ErrNotFound, and the
// caller goes to the origin itself.
func (c *Cluster) Fetch(ctx context.Context, manifest chunkstore.ID, index int, id chunkstore.ID) ([]byte, error) {
	b, _, err := c.FetchStored(ctx, manifest, index, id)
	return b, err
}

// FetchStored is Fetch that also returns the chunk as the peer sent it
// (compressed), to be stored as is. The p2p layer has verified it: decoded,
// and hashed against id.
func (c *Cluster) FetchStored(ctx context.Context, manifest chunkstore.ID, index int, id chunkstore.ID) ([]byte, chunkstore.Stored, error) {
	designated := ctx.Value(designatedKey{}) != nil
	maxWait := time.Duration(math.MaxInt64)
	if designated {
		// The asker found no holder in its view; this node's view only
		// helps if it knows a holder the asker did not. Its askers are on a
		// timer, and choosing the next designated fetcher needs no view.
		maxWait = min(c.o.DesignatedTimeout/2, designatedViewWait)
	}
	v := c.peerView(ctx, manifest, maxWait)
	want := []p2p.Want{{Index: index, ID: id}}
	var got []byte
	var gotStored chunkstore.Stored
	keep := func(ch p2p.Chunk) error {
		if ch.ID == id { // verified by p2p (WithVerify above)
			got, gotStored = ch.Data, ch.Stored
		}
		return nil
	}
	holders := map[peer.ID]p2p.Bitmap{}
	for pid, bm := range v.haves {
		if bm.Has(index) {
			holders[pid] = bm
		}
	}
	if len(holders) > 1 {
		// A peer that went away stays in a view until it is refreshed: prefer
		// the holders this node is still connected to.
		conn := map[peer.ID]p2p.Bitmap{}
		for pid, bm := range holders {
			if c.p.Host().Network().Connectedness(pid) == network.Connected {
				conn[pid] = bm
			}
		}
		if len(conn) > 0 {
			holders = conn
		}
	}
	if len(holders) > 0 {
		if _, err := c.p.FetchFrom(ctx, manifest, want, holders, 1, keep); err != nil && ctx.Err() != nil {
			return nil, chunkstore.Stored{}, err
		}
		if got != nil {
			return got, gotStored, nil
		}
	}
	d := p2p.Designated(id, c.members(v))
	if d == c.p.ID() {
		return nil, chunkstore.Stored{}, fmt.Errorf("chunk %s: this node is its designated fetcher: %w", id, chunkstore.ErrNotFound)
	}
	wait := c.o.DesignatedTimeout
	if designated {
		// This node serves an asker that waits DesignatedTimeout for it:
		// give up on the next one in time to fetch the chunk itself, and
		// leave the blame with the one that did not deliver.
		wait /= 2
	}
	dctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	notFound, err := c.p.Fetch(dctx, d, manifest, want, true, keep)
	if got != nil {
		return got, gotStored, nil
	}
	if ctx.Err() != nil {
		if context.Cause(ctx) == context.Canceled {
			return nil, chunkstore.Stored{}, ctx.Err()
		}
		// The fetch's budget for peers ran out while the designated fetcher
		// worked: the caller goes to the origin too.
		if c.o.OnFallback != nil {
			c.o.OnFallback()
		}
		return nil, chunkstore.Stored{}, fmt.Errorf("chunk %s: designated fetcher %s did not deliver within the peers' budget: %w", id, d, ErrNotDelivered)
	}
	if err != nil || len(notFound) == 0 {
		// It did not answer in time. One that answered "not found" (it has
		// not learnt the image yet, or its origin failed) stays a member.
		c.markFailed(d)
	}
	if c.o.OnFallback != nil {
		c.o.OnFallback()
	}
	c.log.Debug("designated fetcher did not deliver; going to the origin", "chunk_id", id.String(), "peer_id", d.String(), "err", err)
	return nil, chunkstore.Stored{}, fmt.Errorf("chunk %s: designated fetcher %s did not deliver (%v): %w", id, d, err, ErrNotDelivered)
}

// ErrNotDelivered is the error of a fetch whose designated fetcher did not
// deliver: the caller may go to the origin itself (a VM waits) or leave the
// chunk for later (background work: the designated fetcher's own fetch goes
// on and stores it). It wraps chunkstore.ErrNotFound.
var ErrNotDelivered = fmt.Errorf("the designated fetcher did not deliver: %w", chunkstore.ErrNotFound)

// members is the set a chunk's designated fetcher is chosen from: this node,
// the peers v knows to serve the image, the connected peers and the live
// members of the cluster (Options.Members), less the peers that misbehaved or
// just stalled a fetch (stopped?), whose askers would wait
// DesignatedTimeout for nothing. A member that does not know the image yet
// learns its manifest from the asker (ResolveFrom) when asked.
//
// Designating over cluster membership rather than over the peers that
// answered a Have request keeps nodes' choices the same while their views of
// an image differ: a node that just learnt the image, or whose Have requests
// timed out under load, still designates the peer every other node does.
// Where memberships differ the choice still climbs (see Cluster).
func (c *Cluster) members(v *view) []peer.ID {
	self := c.p.ID()
	seen := map[peer.ID]bool{self: true}
	out := []peer.ID{self}
	add := func(id peer.ID) {
		if seen[id] {
			return
		}
		seen[id] = true
		if !c.p.Bad(id) && c.designatable(id) {
			out = append(out, id)
		}
	}
	for id := range v.haves {
		add(id)
	}
	for _, id := range c.p.Host().Network().Peers() {
		add(id)
	}
	if c.o.Members != nil {
		for _, id := range c.o.Members() {
			add(id)
		}
	}
	slices.Sort(out)
	return out
}

// enter counts shared background work that Stop waits for; it fails once
// the cluster is closing.
func (c *Cluster) enter() (leave func(), err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closing {
		return nil, errors.New("node is shutting down")
	}
	c.wg.Add(1)
	return c.wg.Done, nil
}

// ResolveFrom registers manifest id, fetched from peer from (which asked
// this node for one of its chunks as their designated fetcher, so it holds
// the manifest) and checked against its CID, without a name: the catalog
// names it when its entry arrives. Concurrent callers share one fetch.
func (c *Cluster) ResolveFrom(ctx context.Context, from peer.ID, id chunkstore.ID) error {
	if _, err := c.st.GetManifest(ctx, id); err == nil {
		return nil
	}
	ch := c.sf.DoChan("manifest:"+id.String(), func() (any, error) {
		leave, err := c.enter()
		if err != nil {
			return nil, err
		}
		defer leave()
		mctx, cancel := context.WithTimeout(c.baseCtxOr(context.WithoutCancel(ctx)), 10*time.Second)
		defer cancel()
		select { // manifests can be large: a few at a time
		case c.learnSem <- struct{}{}:
			defer func() { <-c.learnSem }()
		case <-mctx.Done():
			return nil, fmt.Errorf("manifest %s: too many being learnt at once: %w", id, mctx.Err())
		}
		enc, err := c.p.Manifest(mctx, from, id) // checked against id there
		if err != nil {
			return nil, fmt.Errorf("manifest %s from %s: %w", id, from, err)
		}
		if _, err := c.putManifest(mctx, enc, id); err != nil {
			if errors.Is(err, chunkstore.ErrBadManifest) {
				c.p.ReportBad(from, err)
			}
			return nil, fmt.Errorf("manifest %s from %s: %w", id, from, err)
		}
		c.log.Debug("manifest learnt from a peer that designated this node", "manifest", id.String(), "peer_id", from.String())
		return nil, nil
	})
	select {
	case r := <-ch:
		return r.Err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// putManifest decodes enc, a manifest a peer sent for id (p2p checked its
// hash), and stores it.
func (c *Cluster) putManifest(ctx context.Context, enc []byte, id chunkstore.ID) (*chunkstore.Manifest, error) {
	m, err := chunkstore.DecodeManifest(enc)
	if err != nil {
		return nil, err
	}
	got, err := c.st.PutManifest(ctx, m)
	if err != nil {
		return nil, err
	}
	if got != id {
		return nil, fmt.Errorf("manifest re-encodes to %s, want %s", got, id)
	}
	return m, nil
}

// designatedKey marks the context of a fetch this node runs as a peer's
// designated fetcher.
type designatedKey struct{}

// Resolve registers an image this node has never seen, by name or
// manifest CID: the name is resolved through the DHT, the manifest fetched
// from a provider (verified by CID), stored and named, and advertised.
// Concurrent callers for one name share one resolution, which runs on a
// context of its own (the node's, bounded by resolveTimeout): a caller that
// gives up stops waiting without failing the others.
func (c *Cluster) Resolve(ctx context.Context, name string) (chunkstore.ID, error) {
	ch := c.sf.DoChan("name:"+name, func() (any, error) {
		leave, err := c.enter()
		if err != nil {
			return nil, err
		}
		defer leave()
		base := c.baseCtx()
		if base == nil {
			base = context.WithoutCancel(ctx)
		}
		wctx, cancel := context.WithTimeout(base, resolveTimeout)
		defer cancel()
		return c.resolveShared(wctx, name)
	})
	select {
	case r := <-ch:
		if r.Err != nil {
			return chunkstore.ID{}, r.Err
		}
		return r.Val.(chunkstore.ID), nil
	case <-ctx.Done():
		return chunkstore.ID{}, fmt.Errorf("resolve image %q: %w", name, ctx.Err())
	}
}

// resolveShared is Resolve's shared work.
func (c *Cluster) resolveShared(ctx context.Context, name string) (any, error) {
	if id, err := c.st.Resolve(ctx, name); err == nil {
		return id, nil
	}
	var id chunkstore.ID
	var provs []peer.AddrInfo
	var err error
	byID := false
	if pid, perr := chunkstore.ParseID(name); perr == nil {
		id, byID = pid, true
		provs, err = c.p.FindProviders(ctx, id)
	} else {
		id, provs, err = c.p.ResolveName(ctx, name)
	}
	if err != nil {
		return nil, err
	}
	var enc []byte
	lastErr := fmt.Errorf("image %q: no peer holds it: %w", name, chunkstore.ErrNotFound)
	for _, ai := range provs {
		mctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		enc, err = c.p.Manifest(mctx, ai.ID, id)
		cancel()
		if err == nil {
			break
		}
		lastErr = err
	}
	if enc == nil {
		return nil, lastErr
	}
	m, err := c.putManifest(ctx, enc, id)
	if err != nil {
		return nil, fmt.Errorf("image %q: manifest from peers: %w", name, err)
	}
	regName := name
	if byID {
		regName = id.String()
	} else if err := c.st.SetName(ctx, name, id); err != nil {
		return nil, err
	}
	c.log.Info("image registered from peers", "image", name, "manifest", id.String(), "size", m.Size, "from_peers", len(provs))
	c.AdvertiseLater(regName, id)
	return id, nil
}
