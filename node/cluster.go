package node

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math"
	"os"
	"slices"
	"sync"
	"time"

	"github.com/hoardvm/hoard/chunkstore"
	"github.com/hoardvm/hoard/node/api"
	"github.com/hoardvm/hoard/node/local"
	"github.com/hoardvm/hoard/p2p"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"golang.org/x/sync/errgroup"
	"golang.org/x/sync/singleflight"
)

// maxViewPeers bounds how many peers are asked for their have-bitmap of an
// image when its view is refreshed.
const maxViewPeers = 64

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
	// resolveTimeout bounds the shared work of resolving an unknown image
	// name through the cluster.
	resolveTimeout = 30 * time.Second
)

// cluster is the node's side of the p2p layer: it serves the store to peers
// (p2p.Backend), advertises images, and fetches missing chunks from peers
// (Fetcher) with cluster-wide origin coalescing.
//
// Coalescing: for a chunk no peer holds, the designated fetcher is
// p2p.Designated over the peers known to serve the image plus this node. When
// that is another peer it is asked with the fetch flag and runs this same
// read path; since the designated peer has the highest rendezvous score of
// the asker's view, a request only ever moves to a higher score, so a chain
// of askers whose views differ climbs towards the same peer and never loops.
type cluster struct {
	n   *Node
	p   *p2p.Peer
	log *slog.Logger

	mu         sync.Mutex
	views      map[chunkstore.ID]*view
	refreshing map[chunkstore.ID]chan struct{} // closed when the refresh is done
	closing    bool
	wg         sync.WaitGroup     // view refreshes
	sf         singleflight.Group // remote resolves, by name
}

// view is what this node knows of an image's peers: their have-bitmaps.
type view struct {
	at    time.Time
	used  time.Time              // last read that used it (under cluster.mu)
	haves map[peer.ID]p2p.Bitmap // peers that know the manifest (bitmap not empty)
	// complete is nil for a complete view; for a partial one (slow peers not
	// in yet) it is closed when the complete view replaces it.
	complete chan struct{}
}

// putView stores v as manifest's view and drops views unused for viewIdle,
// then the least recently used beyond maxViews. c.mu is held.
func (c *cluster) putView(manifest chunkstore.ID, v *view, now time.Time) {
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

// p2pEnabled reports whether the config asks for the cluster.
func (c Config) p2pEnabled() (bool, error) {
	if c.P2P.Host != nil || len(c.P2P.Listen) > 0 || len(c.P2P.Bootstrap) > 0 {
		return true, nil
	}
	if _, err := os.Stat(c.P2P.SwarmKeyFile); err == nil {
		return true, nil
	} else if !errors.Is(err, os.ErrNotExist) {
		return false, fmt.Errorf("p2p.swarm_key_file %s: %w", c.P2P.SwarmKeyFile, err)
	}
	return false, nil
}

// startP2P builds the node's p2p peer; Run runs and closes it.
func (n *Node) startP2P(ctx context.Context) (*p2p.Peer, error) {
	cfg := n.cfg
	st := n.store
	opts := []p2p.Option{
		p2p.WithLogger(n.baseLog),
		p2p.WithRegisterer(n.reg),
		p2p.WithUploadLimit(cfg.P2P.UploadLimit),
		p2p.WithBackend(backend{n}),
		p2p.WithVerify(func(id chunkstore.ID, s chunkstore.Stored) ([]byte, error) {
			b, err := st.Decode(s)
			if err != nil {
				return nil, err
			}
			if !id.Verify(b) {
				return nil, chunkstore.ErrMismatch
			}
			return b, nil
		}),
	}
	if len(cfg.P2P.Bootstrap) > 0 {
		opts = append(opts, p2p.WithBootstrap(cfg.P2P.Bootstrap))
	}
	if cfg.P2P.Host != nil {
		opts = append(opts, p2p.WithHost(cfg.P2P.Host))
	} else {
		if len(cfg.P2P.Listen) > 0 {
			opts = append(opts, p2p.WithListenAddrs(cfg.P2P.Listen))
		}
		if _, err := os.Stat(cfg.P2P.SwarmKeyFile); err != nil {
			return nil, fmt.Errorf("p2p: no swarm key at %s: create one with hoard cluster keygen %s (and copy it to every node), or set p2p.swarm_key_file", cfg.P2P.SwarmKeyFile, cfg.P2P.SwarmKeyFile)
		}
		opts = append(opts,
			p2p.WithSwarmKeyFile(cfg.P2P.SwarmKeyFile),
			p2p.WithIdentityFile(cfg.DataDir+"/identity.key"),
			p2p.WithDataDir(cfg.DataDir))
		if len(cfg.P2P.AllowList) > 0 {
			ids := make([]peer.ID, 0, len(cfg.P2P.AllowList))
			for _, s := range cfg.P2P.AllowList {
				id, err := peer.Decode(s)
				if err != nil {
					return nil, fmt.Errorf("p2p.allow: %q is not a peer ID: %w", s, err)
				}
				ids = append(ids, id)
			}
			opts = append(opts, p2p.WithAllowList(ids))
		}
	}
	opts = append(opts, cfg.P2P.Options...)
	p, err := p2p.New(ctx, opts...)
	if err != nil {
		return nil, fmt.Errorf("p2p: %w", err)
	}
	n.cl = &cluster{n: n, p: p, log: n.log.With("component", "cluster"), views: map[chunkstore.ID]*view{},
		refreshing: map[chunkstore.ID]chan struct{}{}}
	return p, nil
}

// P2P returns the node's p2p peer, nil when the cluster is off; valid once
// Ready is closed.
func (n *Node) P2P() *p2p.Peer {
	if n.cl == nil {
		return nil
	}
	return n.cl.p
}

// advertiseAll announces every registered image.
func (c *cluster) advertiseAll(ctx context.Context) {
	names, err := c.n.store.Names(ctx)
	if err != nil {
		c.log.Warn("cannot list images to advertise", "err", err)
		return
	}
	for _, nm := range names {
		c.advertise(ctx, nm.Name, nm.Manifest)
	}
}

// advertise announces that this node holds image id under name (and its
// Glance ID). Announcements that fail are kept and retried by p2p.
func (c *cluster) advertise(ctx context.Context, name string, id chunkstore.ID) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := c.p.Provide(ctx, id); err != nil {
		c.log.Debug("advertise image", "image", name, "err", err)
	}
	names := []string{name}
	if m, err := c.n.store.GetManifest(ctx, id); err == nil && m.Source.Kind == "glance" && m.Source.Location != name {
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

// advertiseLater advertises in the background (owned by the node's bg group).
func (n *Node) advertiseLater(name string, id chunkstore.ID) {
	if n.cl == nil || n.runCtx == nil {
		return
	}
	n.bg.Add(1)
	go func() {
		defer n.bg.Done()
		n.cl.advertise(n.runCtx, name, id)
	}()
}

// withdraw stops advertising name, and the manifest when it is gone.
func (n *Node) withdraw(name string, id chunkstore.ID, manifestGone bool) {
	if n.cl == nil {
		return
	}
	if manifestGone {
		n.cl.p.Withdraw(id)
	} else {
		n.cl.p.WithdrawName(name)
	}
}

// peerView returns the have-bitmaps of the peers serving manifest. Views older
// than Config.P2P.ViewTTL are refreshed in the background while the old one is
// used; only the first view of an image is waited for, at most maxWait (a
// designated fetcher waits less: its askers are on a timer).
func (c *cluster) peerView(ctx context.Context, manifest chunkstore.ID, maxWait time.Duration) *view {
	c.mu.Lock()
	v := c.views[manifest]
	if v != nil {
		v.used = time.Now()
	}
	c.mu.Unlock()
	if v != nil && time.Since(v.at) < c.n.cfg.P2P.ViewTTL {
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
func (c *cluster) startRefresh(manifest chunkstore.ID) <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	if ch, ok := c.refreshing[manifest]; ok {
		return ch
	}
	if c.closing {
		return nil
	}
	ch := make(chan struct{})
	complete := make(chan struct{})
	c.refreshing[manifest] = ch
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		var once sync.Once
		published := func() { once.Do(func() { close(ch) }) }
		nv := c.refresh(c.n.runCtx, manifest, func(partial *view) {
			partial.complete = complete
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
		close(complete)
		published()
	}()
	return ch
}

// completeView waits (at most maxWait) for the complete view when v is
// partial, and returns the view to use.
func (c *cluster) completeView(ctx context.Context, manifest chunkstore.ID, v *view, maxWait time.Duration) *view {
	if v.complete == nil {
		return v
	}
	timer := time.NewTimer(maxWait)
	defer timer.Stop()
	select {
	case <-v.complete:
		c.mu.Lock()
		defer c.mu.Unlock()
		if nv := c.views[manifest]; nv != nil {
			return nv
		}
	case <-ctx.Done():
	case <-timer.C:
	}
	return v
}

// stop waits for background view refreshes; none starts afterwards.
func (c *cluster) stop() {
	c.mu.Lock()
	c.closing = true
	c.mu.Unlock()
	c.wg.Wait()
}

// refresh asks the image's providers and this node's neighbours (connected
// first) for their have-bitmaps. viewGrace after the first peer that holds
// some of the image answered, partial is called (at most once, and only
// while peers are still being waited for) with a copy of the view so far.
func (c *cluster) refresh(ctx context.Context, manifest chunkstore.ID, partial func(*view)) *view {
	self := c.p.ID()
	seen := map[peer.ID]bool{self: true}
	var cands []peer.ID
	add := func(id peer.ID) {
		if !seen[id] && len(cands) < maxViewPeers && !c.p.Bad(id) {
			seen[id] = true
			cands = append(cands, id)
		}
	}
	for _, id := range c.p.Host().Network().Peers() {
		add(id)
	}
	pctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	provs, err := c.p.FindProviders(pctx, manifest)
	cancel()
	if err != nil {
		c.log.Debug("find providers", "manifest", manifest.String(), "err", err)
	}
	for _, ai := range provs {
		add(ai.ID)
	}
	for _, pi := range c.p.Peers() {
		if id, err := peer.Decode(pi.ID); err == nil {
			add(id)
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
	for _, id := range cands {
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
	g.Wait()
	return v
}

// Fetch implements Fetcher over the cluster: from a peer that holds the
// chunk; else from the chunk's designated fetcher (which may go to the
// origin) within Config.P2P.DesignatedTimeout; else ErrNotFound, and the
// caller goes to the origin itself.
func (c *cluster) Fetch(ctx context.Context, manifest chunkstore.ID, index int, id chunkstore.ID) ([]byte, error) {
	b, _, err := c.FetchStored(ctx, manifest, index, id)
	return b, err
}

// FetchStored is Fetch that also returns the chunk as the peer sent it
// (compressed), to be stored as is. The p2p layer has verified it: decoded,
// and hashed against id.
func (c *cluster) FetchStored(ctx context.Context, manifest chunkstore.ID, index int, id chunkstore.ID) ([]byte, chunkstore.Stored, error) {
	designated := ctx.Value(designatedKey{}) != nil
	maxWait := time.Duration(math.MaxInt64)
	if designated {
		maxWait = c.n.cfg.P2P.DesignatedTimeout / 2
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
	// The designated fetcher is chosen from the complete view only: nodes
	// whose views differ choose differently, and the origin pays.
	v = c.completeView(ctx, manifest, v, maxWait)
	live := make([]peer.ID, 0, len(v.haves)+1)
	live = append(live, c.p.ID())
	for pid := range v.haves {
		// A peer that just stalled a fetch (stopped?) is no designated
		// fetcher: its askers would wait DesignatedTimeout for nothing.
		if !c.p.Bad(pid) && !c.p.Slow(pid) {
			live = append(live, pid)
		}
	}
	slices.Sort(live)
	d := p2p.Designated(id, live)
	if d == c.p.ID() {
		return nil, chunkstore.Stored{}, fmt.Errorf("chunk %s: this node is its designated fetcher: %w", id, chunkstore.ErrNotFound)
	}
	dctx, cancel := context.WithTimeout(ctx, c.n.cfg.P2P.DesignatedTimeout)
	defer cancel()
	_, err := c.p.Fetch(dctx, d, manifest, want, true, keep)
	if got != nil {
		return got, gotStored, nil
	}
	if ctx.Err() != nil {
		return nil, chunkstore.Stored{}, ctx.Err()
	}
	c.n.stats.designatedFallbacks.Add(1)
	c.log.Debug("designated fetcher did not deliver; going to the origin", "chunk_id", id.String(), "peer_id", d.String(), "err", err)
	return nil, chunkstore.Stored{}, fmt.Errorf("chunk %s: designated fetcher %s did not deliver (%v): %w", id, d, err, chunkstore.ErrNotFound)
}

// designatedKey marks the context of a fetch this node runs as a peer's
// designated fetcher.
type designatedKey struct{}

// resolveRemote registers an image this node has never seen, by name or
// manifest CID: the name is resolved through the DHT, the manifest fetched
// from a provider (verified by CID), stored and named, and advertised.
// Concurrent callers for one name share one resolution, which runs on a
// context of its own (the node's, bounded by resolveTimeout): a caller that
// gives up stops waiting without failing the others.
func (c *cluster) resolveRemote(ctx context.Context, name string) (chunkstore.ID, error) {
	ch := c.sf.DoChan("name:"+name, func() (any, error) {
		c.mu.Lock()
		if c.closing {
			c.mu.Unlock()
			return nil, errors.New("node is shutting down")
		}
		c.wg.Add(1)
		c.mu.Unlock()
		defer c.wg.Done()
		base := c.n.runCtx
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

// resolveShared is resolveRemote's shared work.
func (c *cluster) resolveShared(ctx context.Context, name string) (any, error) {
	if id, err := c.n.store.Resolve(ctx, name); err == nil {
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
	m, err := chunkstore.DecodeManifest(enc)
	if err != nil {
		return nil, fmt.Errorf("image %q: manifest from peers: %w", name, err)
	}
	got, err := c.n.store.PutManifest(ctx, m)
	if err != nil {
		return nil, err
	}
	if got != id {
		return nil, fmt.Errorf("image %q: manifest re-encodes to %s, want %s", name, got, id)
	}
	regName := name
	if byID {
		regName = id.String()
	} else if err := c.n.store.SetName(ctx, name, id); err != nil {
		return nil, err
	}
	c.log.Info("image registered from peers", "image", name, "manifest", id.String(), "size", m.Size, "from_peers", len(provs))
	c.n.advertiseLater(regName, id)
	return id, nil
}

// PullImage registers an image known to the cluster by name (or manifest CID)
// without fetching its chunks.
func (n *Node) PullImage(ctx context.Context, name string) (api.ImageInfo, error) {
	if _, err := n.store.Resolve(ctx, name); err != nil {
		if n.cl == nil {
			return api.ImageInfo{}, fmt.Errorf("image %q is not here and the cluster is off (no swarm key): %w", name, err)
		}
		if _, err := n.cl.resolveRemote(ctx, name); err != nil {
			return api.ImageInfo{}, err
		}
	}
	id, err := n.store.Resolve(ctx, name)
	if err != nil {
		return api.ImageInfo{}, err
	}
	info, _, err := local.Describe(ctx, n.store, chunkstore.Named{Name: name, Manifest: id})
	return info, err
}

// backend serves the node's store to peers (p2p.Backend).
type backend struct{ n *Node }

// wait holds a peer's request until the node is ready (p2p starts serving
// just before).
func (b backend) wait(ctx context.Context) error {
	select {
	case <-b.n.ready:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (b backend) Manifest(ctx context.Context, id chunkstore.ID) ([]byte, error) {
	if err := b.wait(ctx); err != nil {
		return nil, err
	}
	return b.n.store.GetManifestBytes(ctx, id)
}

func (b backend) Have(ctx context.Context, manifest chunkstore.ID) ([]byte, error) {
	if err := b.wait(ctx); err != nil {
		return nil, err
	}
	img, err := b.n.image(ctx, manifest)
	if err != nil {
		return nil, err
	}
	return b.n.haveBitmap(ctx, img), nil
}

func (b backend) Chunk(ctx context.Context, manifest chunkstore.ID, index int, fetch bool) (chunkstore.Stored, error) {
	n := b.n
	if err := b.wait(ctx); err != nil {
		return chunkstore.Stored{}, err
	}
	img, err := n.image(ctx, manifest)
	if err != nil {
		return chunkstore.Stored{}, err
	}
	if index < 0 || index >= len(img.m.Entries) || img.m.Entries[index].Zero {
		return chunkstore.Stored{}, fmt.Errorf("entry %d of %s: %w", index, manifest, chunkstore.ErrNotFound)
	}
	e := img.m.Entries[index]
	st, err := n.store.GetStored(ctx, e.ID)
	if err == nil || !fetch {
		return st, err
	}
	// Designated fetcher: this node's own read path (peers that hold it,
	// a higher-ranked designated peer, or the origin), single-flight per chunk.
	raw, _, err := n.chunk(ctx, img, index, forPeer)
	if err != nil {
		return chunkstore.Stored{}, err
	}
	if st, err := n.store.GetStored(ctx, e.ID); err == nil {
		return st, nil
	}
	return chunkstore.Stored{Codec: chunkstore.CodecRaw, RawLen: len(raw), Payload: raw}, nil
}

// haveBitmap returns which entries of img are in the local store, from a
// cache refreshed every 30 s and updated as chunks are fetched. The store scan
// runs without haveMu, so markHave (after every fetch) never waits for it;
// marks made during a scan are added to its result. One scan at a time: other
// callers wait for it (or their ctx) and share its result.
func (n *Node) haveBitmap(ctx context.Context, img *image) p2p.Bitmap {
	img.haveMu.Lock()
	for img.have == nil || time.Since(img.haveAt) > 30*time.Second {
		if scan := img.haveScan; scan != nil {
			stale := img.have
			img.haveMu.Unlock()
			select {
			case <-scan:
			case <-ctx.Done():
				return p2p.Bitmap(slices.Clone(stale))
			}
			img.haveMu.Lock()
			continue
		}
		scan := make(chan struct{})
		img.haveScan, img.haveMarks = scan, nil
		img.haveMu.Unlock()
		bm := p2p.NewBitmap(len(img.m.Entries))
		for i, e := range img.m.Entries {
			if e.Zero {
				continue
			}
			if ok, _ := n.store.Has(ctx, e.ID); ok {
				bm.Set(i)
			}
		}
		img.haveMu.Lock()
		for _, i := range img.haveMarks {
			bm.Set(i)
		}
		img.haveScan, img.haveMarks = nil, nil
		close(scan)
		if ctx.Err() != nil { // an interrupted scan is incomplete: not cached
			img.haveMu.Unlock()
			return bm
		}
		img.have, img.haveAt = bm, time.Now()
	}
	out := p2p.Bitmap(slices.Clone(img.have))
	img.haveMu.Unlock()
	return out
}

// markHave records in img's cached bitmap that entry idx is now stored.
func (img *image) markHave(idx int) {
	img.haveMu.Lock()
	defer img.haveMu.Unlock()
	if img.have != nil {
		img.have.Set(idx)
	}
	if img.haveScan != nil {
		img.haveMarks = append(img.haveMarks, idx)
	}
}
