package node

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"sort"
	"time"

	"github.com/hoardvm/hoard/chunkstore"
	"github.com/hoardvm/hoard/node/api"
	"github.com/hoardvm/hoard/node/local"
	"github.com/hoardvm/hoard/p2p"
)

// clusterStatus describes the cluster side of the node, nil when off.
func (n *Node) clusterStatus() *api.ClusterStatus {
	if n.cl == nil {
		return nil
	}
	p := n.cl.Peer()
	cs := &api.ClusterStatus{PeerID: p.ID().String(), Addrs: []string{}, Provided: p.Provided()}
	for _, a := range p.Addrs() {
		cs.Addrs = append(cs.Addrs, a.String())
	}
	peers := p.Peers()
	cs.Peers = len(peers)
	for _, pi := range peers {
		if pi.Connected {
			cs.ConnectedPeers++
		}
	}
	return cs
}

// Status reports the node's state.
func (n *Node) Status(ctx context.Context) (api.Status, error) {
	s := api.Status{DataDir: n.cfg.DataDir, NBDSocket: n.NBDSocket(), Store: n.store.Usage(), Quota: n.cfg.StoreQuota,
		Counters: n.stats.snapshot(), Hot: n.hotStats(), Exports: []api.ExportStatus{}}
	if n.nbdAddr != nil {
		s.NBDListen = n.nbdAddr.String()
	}
	s.Cluster = n.clusterStatus()
	if n.hoarder != nil {
		hs := n.hoarder.Status()
		s.Hoard = &hs
	}
	names, err := n.store.Names(ctx)
	if err != nil {
		return s, err
	}
	s.Images = len(names)
	imgs := n.loadedImages()
	for _, img := range imgs {
		img.mu.Lock()
		open := img.opens
		img.mu.Unlock()
		if open == 0 {
			continue
		}
		es := api.ExportStatus{Manifest: img.id, Open: open, Names: []string{}}
		for _, nm := range names {
			if nm.Manifest == img.id {
				es.Names = append(es.Names, nm.Name)
			}
		}
		s.Exports = append(s.Exports, es)
	}
	sort.Slice(s.Exports, func(i, j int) bool { return s.Exports[i].Manifest.String() < s.Exports[j].Manifest.String() })
	return s, nil
}

// apiServer is the admin API's server. Requests have a minute to arrive and
// a minute to be answered, idle connections are closed; the routes that run
// long (imports, pulls, verify, gc, profiles) lift the deadlines once the
// token was checked. Run caps the connections (Config.APIMaxConns).
func (n *Node) apiServer() *http.Server {
	return &http.Server{
		Handler:           n.Handler(),
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       time.Minute,
		WriteTimeout:      time.Minute,
		IdleTimeout:       n.cfg.APIIdleTimeout,
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          slog.NewLogLogger(n.baseLog.With("component", "api").Handler(), slog.LevelDebug),
	}
}

// progressInterval is how often streamed answers report progress (tests
// shorten it); 0: the api package's default.
var progressInterval time.Duration

// Handler is the admin API (see package api). Every route but the public
// ones needs the API token (Config.APIToken, or the one Run keeps in
// DataDir/api.token); before Run set it, every private route is refused.
func (n *Node) Handler() http.Handler {
	return api.Handler(n, api.Options{Token: n.APIToken, TokenHint: n.tokenHint, Gatherer: n.gatherer, ProgressInterval: progressInterval})
}

// Image describes one image (with its extents when entries is set).
func (n *Node) Image(ctx context.Context, name string, entries bool) (api.ImageDetail, error) {
	id, err := n.store.Resolve(ctx, name)
	if err != nil {
		return api.ImageDetail{}, err
	}
	info, m, err := local.Describe(ctx, n.store, chunkstore.Named{Name: name, Manifest: id})
	if err != nil {
		return api.ImageDetail{}, err
	}
	info.OpenExports = n.openExports(id)
	out := api.ImageDetail{ImageInfo: info, Chunking: m.Chunking, Checksum: m.Source.Checksum}
	if entries {
		out.Entries = m.Entries
	}
	return out, nil
}

// Peers lists the cluster's peers; an error wrapping api.ErrClusterOff when
// the node runs standalone.
func (n *Node) Peers(context.Context) ([]p2p.PeerInfo, error) {
	if n.cl == nil {
		return nil, api.ErrClusterOff
	}
	return n.cl.Peer().Peers(), nil
}

// StoreStats is the chunk store's statistics.
func (n *Node) StoreStats(ctx context.Context) (chunkstore.Stats, error) { return n.store.Stats(ctx) }

// StoreVerify checks every chunk of the store (see chunkstore.Store.Verify).
func (n *Node) StoreVerify(ctx context.Context, progress func(done, total int64)) (chunkstore.VerifyResult, error) {
	return n.store.Verify(ctx, progress)
}

// StoreGC collects the store's garbage (see chunkstore.Store.GC).
func (n *Node) StoreGC(ctx context.Context) (chunkstore.GCResult, error) { return n.store.GC(ctx) }

// tokenHint tells a client without the right token where to find it.
func (n *Node) tokenHint() string {
	if n.cfg.apiTokenFile == "" {
		return "missing or wrong API token; set HOARD_API_TOKEN (config api.token) to the daemon's api.token"
	}
	return fmt.Sprintf("missing or wrong API token; the token is in %s, readable only by the daemon's user "+
		"(run the command as that user, e.g. with sudo, or set HOARD_API_TOKEN to its content)", n.APITokenFile())
}
