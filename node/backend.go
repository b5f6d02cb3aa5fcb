package node

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"time"

	"github.com/hoardvm/hoard/chunkstore"
	"github.com/hoardvm/hoard/node/api"
	"github.com/hoardvm/hoard/node/cluster"
	"github.com/hoardvm/hoard/node/local"
	"github.com/hoardvm/hoard/p2p"
	"github.com/libp2p/go-libp2p/core/peer"
)

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
	n.cl = cluster.New(p, st, cluster.Options{
		ViewTTL:           cfg.P2P.ViewTTL,
		DesignatedTimeout: cfg.P2P.DesignatedTimeout,
		OnFallback:        func() { n.stats.designatedFallbacks.Add(1) },
		Members:           n.liveMembers,
		Log:               n.baseLog.With("component", "cluster"),
	})
	return p, nil
}

// P2P returns the node's p2p peer, nil when the cluster is off; valid once
// Ready is closed.
func (n *Node) P2P() *p2p.Peer {
	if n.cl == nil {
		return nil
	}
	return n.cl.Peer()
}

// advertiseLater advertises an image in the background (see
// cluster.Cluster.AdvertiseLater); nothing when the cluster is off.
func (n *Node) advertiseLater(name string, id chunkstore.ID) {
	if n.cl != nil {
		n.cl.AdvertiseLater(name, id)
	}
}

// withdraw stops advertising name, and the manifest when it is gone.
func (n *Node) withdraw(name string, id chunkstore.ID, manifestGone bool) {
	if n.cl != nil {
		n.cl.Withdraw(name, id, manifestGone)
	}
}

// PullImage registers an image known to the cluster by name (or manifest CID)
// without fetching its chunks.
func (n *Node) PullImage(ctx context.Context, name string) (api.ImageInfo, error) {
	if _, err := n.store.Resolve(ctx, name); err != nil {
		if n.cl == nil {
			return api.ImageInfo{}, fmt.Errorf("image %q is not here and the cluster is off (no swarm key): %w", name, err)
		}
		if _, err := n.cl.Resolve(ctx, name); err != nil {
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

// liveMembers is the peers of the cluster this node heard a NodeInfo from
// within its expiry (cluster.Options.Members).
func (n *Node) liveMembers() []peer.ID {
	live := n.nodes.Live()
	out := make([]peer.ID, 0, len(live))
	for _, e := range live {
		out = append(out, e.Node)
	}
	return out
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
	if errors.Is(err, chunkstore.ErrNotFound) && fetch && n.cl != nil && n.cat != nil && n.cat.Live(manifest) {
		// Designated over cluster membership, this node may be asked for an
		// image its catalog knows but it has not registered yet: the asker
		// has the manifest. Only then: a peer must not make this node store
		// manifests the cluster does not list, or bring back one removed here.
		if from, ok := p2p.Requester(ctx); ok {
			if rerr := n.cl.ResolveFrom(ctx, from, manifest); rerr != nil {
				n.log.Debug("asked as designated fetcher for an image not registered here; could not learn its manifest from the asker", "manifest", manifest.String(), "peer_id", from.String(), "err", rerr)
				return chunkstore.Stored{}, fmt.Errorf("entry %d of %s: this node does not know the image and could not learn it from the asker: %v: %w", index, manifest, rerr, chunkstore.ErrNotFound)
			}
			img, err = n.image(ctx, manifest)
		}
	}
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

// The catalog half of the backend (p2p.CatalogBackend): the node's catalog.
// Run attaches the catalog before the peer runs, so n.cat is set whenever
// the p2p layer calls these.

func (b backend) Catalog(ctx context.Context) ([]p2p.CatalogEntry, error) {
	return b.n.cat.Catalog(ctx)
}

func (b backend) Profiles(ctx context.Context) ([]p2p.ProfileEntry, error) {
	return b.n.cat.Profiles(ctx)
}

func (b backend) LearnCatalog(from peer.ID, e p2p.CatalogEntry) { b.n.cat.LearnCatalog(from, e) }

func (b backend) LearnProfile(from peer.ID, e p2p.ProfileEntry) { b.n.cat.LearnProfile(from, e) }
