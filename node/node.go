package node

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
	"github.com/hoardvm/hoard/chunkstore"
	"github.com/hoardvm/hoard/nbd"
	"github.com/hoardvm/hoard/node/api"
	"github.com/hoardvm/hoard/node/catalog"
	"github.com/hoardvm/hoard/node/cluster"
	"github.com/hoardvm/hoard/node/hoarder"
	"github.com/hoardvm/hoard/node/hot"
	"github.com/hoardvm/hoard/node/placement"
	"github.com/hoardvm/hoard/p2p"
	"github.com/hoardvm/hoard/planner"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/net/netutil"
	"golang.org/x/sync/errgroup"
	"golang.org/x/sync/singleflight"
	"golang.org/x/time/rate"
)

// Fetcher gets chunks from somewhere other than the local store and the
// origin: in practice the cluster's peers (package cluster). The node verifies what it returns against the
// ID; a Fetcher need not.
type Fetcher interface {
	// Fetch returns the chunk's uncompressed bytes, or an error wrapping
	// chunkstore.ErrNotFound when no peer has it. Called concurrently; it must
	// return when ctx is done. The caller owns the returned slice.
	Fetch(ctx context.Context, manifest chunkstore.ID, index int, id chunkstore.ID) ([]byte, error)
}

// Node is one hoard daemon. Create it with New and run it with Run.
type Node struct {
	cfg     Config
	log     *slog.Logger
	baseLog *slog.Logger
	cl      *cluster.Cluster // nil: standalone; set by Run before ready
	cat     *catalog.Catalog // the cluster catalog; nil: standalone; set by Run before ready

	reg      prometheus.Registerer
	gatherer prometheus.Gatherer
	m        *metrics

	ready   chan struct{}
	runOnce sync.Once

	// Set by Run before ready is closed; read-only afterwards.
	store   *chunkstore.Store
	runCtx  context.Context
	apiAddr net.Addr
	nbdAddr net.Addr
	// glanceAddr is the Glance mirror's address (Config.GlanceListen); nil: off.
	glanceAddr net.Addr

	cache     *memCache
	hot       *hot.Tier // nil: off
	hotAuto   bool      // Config.HotCache was not set: size it by the free space (autoHotSize)
	flights   singleflight.Group
	origSlots originSlots
	// originRate is Config.OriginRate; nil: unlimited.
	originRate *rate.Limiter
	bgSem      chan struct{}
	bg         sync.WaitGroup

	mu     sync.Mutex
	images map[chunkstore.ID]*image
	// imageIdle: images without an open export unused this long are
	// dropped from images (DefaultImageIdle; tests shorten it).
	imageIdle time.Duration

	nodes     *placement.Nodes // the live nodes of the cluster, for placement
	glanceIDs glanceIndex      // Glance image ID -> manifest, for placement
	hoarder   *hoarder.Hoarder // set by Run before ready
	vmWaiting atomic.Int64     // VM reads waiting on a fetch (the hoarder yields)
	wsChanged chan struct{}    // the catalog changed: refreshWorkingSets runs

	live     liveSet
	mirror   *mirrorImages // the Glance mirror's images (also the registrar for peers)
	evict    *evictor      // the store's eviction policy (Config.Eviction); set by Run
	stats    stats
	handlers inflight // admin API requests being served
	fetches  inflight // chunk fetches (peers, origin) under way
}

// inflight counts work that uses the store (admin API requests, chunk
// fetches), so that Run can wait for it before closing the store.
type inflight struct {
	what string // for the log: "admin API requests"

	mu     sync.RWMutex // held shared around Add, so that no Add follows closed
	closed bool
	wg     sync.WaitGroup
}

// enter counts one more, or reports false once wait has begun.
func (f *inflight) enter() bool {
	f.mu.RLock()
	defer f.mu.RUnlock()
	if f.closed {
		return false
	}
	f.wg.Add(1)
	return true
}

func (f *inflight) leave() { f.wg.Done() }

// track counts h's requests; it refuses them once wait has begun.
func (f *inflight) track(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !f.enter() {
			api.ReplyError(w, http.StatusServiceUnavailable, errors.New("the daemon is shutting down"))
			return
		}
		defer f.leave()
		h.ServeHTTP(w, r)
	})
}

// wait refuses new work and returns when all of it has ended. Its contexts
// are cancelled by then (they derive from Run's), so only work that ignores
// its context keeps it waiting, and that is logged.
func (f *inflight) wait(log *slog.Logger) {
	f.mu.Lock()
	f.closed = true
	f.mu.Unlock()
	done := make(chan struct{})
	go func() { f.wg.Wait(); close(done) }()
	t := time.NewTicker(5 * time.Second)
	defer t.Stop()
	for {
		select {
		case <-done:
			return
		case <-t.C:
			log.Warn("still waiting for work to end before closing the store", "work", f.what)
		}
	}
}

// usage is the store's usage, zero before Run opened it.
func (n *Node) usage() chunkstore.Usage {
	select {
	case <-n.ready:
		return n.store.Usage()
	default:
		return chunkstore.Usage{}
	}
}

// hotStats is the hot tier's state, zero before Run opened it.
func (n *Node) hotStats() hot.Stats {
	select {
	case <-n.ready:
		return n.hot.Stats()
	default:
		return hot.Stats{}
	}
}

// New checks cfg and builds a Node. It starts nothing and opens nothing.
func New(cfg Config, log *slog.Logger) (*Node, error) {
	hotAuto := cfg.HotCache == 0
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	n := &Node{
		cfg:        cfg,
		log:        log.With("component", "node"),
		baseLog:    log,
		ready:      make(chan struct{}),
		cache:      newMemCache(cfg.MemCache),
		origSlots:  originSlots{per: cfg.OriginConcurrency},
		originRate: newRate(cfg.OriginRate),
		wsChanged:  make(chan struct{}, 1),
		bgSem:      make(chan struct{}, cfg.PrefetchConcurrency),
		images:     make(map[chunkstore.ID]*image),
		nodes:      placement.NewNodes(nil),
		imageIdle:  DefaultImageIdle,
		hotAuto:    hotAuto,
		handlers:   inflight{what: "admin API requests"},
		fetches:    inflight{what: "chunk fetches"},
	}
	n.mirror = newMirrorImages(n)
	n.reg, n.gatherer = cfg.Registerer, cfg.Gatherer
	if n.reg == nil {
		r := prometheus.NewRegistry()
		n.reg, n.gatherer = r, r
	}
	n.m = newMetrics(n)
	if err := n.m.register(n.reg); err != nil {
		return nil, fmt.Errorf("node: register metrics: %w", err)
	}
	return n, nil
}

// APIAddrFile, in the data dir, holds the admin API address while a daemon runs.
const APIAddrFile = "api.addr"

// Ready is closed once Run has opened the store and its listeners.
func (n *Node) Ready() <-chan struct{} { return n.ready }

// Store is the node's chunk store; valid once Ready is closed and until Run returns.
func (n *Node) Store() *chunkstore.Store { return n.store }

// APIAddr is the address the admin API listens on (after Ready), nil if disabled.
func (n *Node) APIAddr() net.Addr { return n.apiAddr }

// NBDSocket is the NBD unix socket path, "" if disabled.
func (n *Node) NBDSocket() string {
	if n.cfg.NBDSocket == "-" {
		return ""
	}
	return n.cfg.NBDSocket
}

// GlanceAddr is the Glance mirror's listen address, nil when it is off;
// valid once Ready is closed.
func (n *Node) GlanceAddr() net.Addr { return n.glanceAddr }

// NBDAddr is the NBD TCP address (after Ready), nil if disabled.
func (n *Node) NBDAddr() net.Addr { return n.nbdAddr }

// Run opens the store and serves NBD and the admin API until ctx is cancelled;
// it then stops serving, waits for every goroutine, persists profiles, closes
// the store, and returns nil. It returns an error if something cannot start
// or fails. Run may be called once.
func (n *Node) Run(ctx context.Context) (err error) {
	ran := true
	n.runOnce.Do(func() { ran = false })
	if ran {
		return errors.New("node: Run called twice")
	}
	cfg := n.cfg
	if err := os.MkdirAll(cfg.DataDir, 0o750); err != nil {
		return fmt.Errorf("create data dir: %w", err)
	}
	if err := n.loadAPIToken(); err != nil {
		return err
	}
	// Listen before anything slow (the store's recovery after a crash, the
	// hot tier, the cluster): a QEMU reconnecting after a restart waits in
	// the socket's backlog while the rest starts. Under systemd
	// socket activation (contrib/systemd/hoard.socket) the sockets are
	// systemd's and outlive this process.
	sd, err := systemdListeners()
	if err != nil {
		return err
	}
	var lns []net.Listener
	closeAll := func() {
		for _, ln := range lns {
			ln.Close()
		}
	}
	// On an early return; once serving, the servers close them (again: harmless).
	defer closeAll()
	for name, ln := range sd {
		lns = append(lns, ln)
		if name != systemdNBDSocket && name != systemdNBDTCP && name != systemdAPI {
			n.log.Warn("systemd passed a socket hoard does not use; name it nbd, nbd-tcp or api (FileDescriptorName)", "name", name)
		}
	}
	var unixLn, tcpLn, apiLn net.Listener
	sockPath := n.NBDSocket()
	if ln := sd[systemdNBDSocket]; ln != nil {
		unixLn = ln
		if sock := n.NBDSocket(); sock != ln.Addr().String() {
			n.log.Warn("serving NBD on the socket systemd passed, not on nbd.socket; make them match so that hoard vm overlay writes the right path",
				"socket", ln.Addr().String(), "nbd_socket", sock)
		}
		sockPath = ln.Addr().String()
	} else if sock := n.NBDSocket(); sock != "" {
		if unixLn, err = listenUnix(sock); err != nil {
			closeAll()
			return err
		}
		lns = append(lns, unixLn)
	}
	if ln := sd[systemdNBDTCP]; ln != nil {
		tcpLn = ln
	} else if cfg.NBDListen != "" {
		if tcpLn, err = net.Listen("tcp", cfg.NBDListen); err != nil {
			closeAll()
			return fmt.Errorf("nbd.listen %s: %w", cfg.NBDListen, err)
		}
		lns = append(lns, tcpLn)
	}
	if tcpLn != nil {
		n.nbdAddr = tcpLn.Addr()
		if ip, ok := tcpLn.Addr().(*net.TCPAddr); ok && !ip.IP.IsLoopback() {
			n.log.Warn("NBD over TCP is not on loopback: anyone who can reach it can read every image", "addr", n.nbdAddr)
		}
	}
	if ln := sd[systemdAPI]; ln != nil {
		apiLn = ln
		n.apiAddr = ln.Addr()
	} else if cfg.APIListen != "-" {
		if apiLn, err = net.Listen("tcp", cfg.APIListen); err != nil {
			closeAll()
			return fmt.Errorf("api.listen %s: %w (is another hoard daemon running? set api.listen / --api-listen)", cfg.APIListen, err)
		}
		lns = append(lns, apiLn)
		n.apiAddr = apiLn.Addr()
	}
	var glanceLn net.Listener
	if cfg.GlanceListen != "" {
		if glanceLn, err = net.Listen("tcp", cfg.GlanceListen); err != nil {
			closeAll()
			return fmt.Errorf("glance.listen %s: %w", cfg.GlanceListen, err)
		}
		lns = append(lns, glanceLn)
		n.glanceAddr = glanceLn.Addr()
		if ip, ok := glanceLn.Addr().(*net.TCPAddr); ok && !ip.IP.IsLoopback() {
			n.log.Warn("the Glance mirror is not on loopback: Glance authorizes every download, but its traffic (tokens included) is plain HTTP", "addr", n.glanceAddr)
		}
	}

	policy, err := planner.NewEviction(cfg.Eviction) // checked by New
	if err != nil {
		return err
	}
	n.evict = newEvictor(policy)
	st, err := chunkstore.OpenContext(ctx, filepath.Join(cfg.DataDir, "store"),
		chunkstore.WithQuota(cfg.StoreQuota),
		chunkstore.WithCodec(cfg.StoreCompression),
		chunkstore.WithLogger(n.baseLog.With("component", "chunkstore")),
		chunkstore.WithEvictionPolicy(liveFilter{live: &n.live, next: policy}))
	if err != nil {
		return err
	}
	n.store = st
	defer func() {
		if cerr := st.Close(); cerr != nil && err == nil {
			err = fmt.Errorf("close chunk store: %w", cerr)
		}
	}()
	if err := n.evict.load(ctx, st, n.log); err != nil {
		n.log.Warn("cannot give the eviction policy the images' working sets; it evicts without them until a profile is saved", "policy", policy.Name(), "err", err)
	}
	hotSize := cfg.HotCache
	hotDir := filepath.Join(cfg.DataDir, "hot")
	if n.hotAuto {
		hotSize = hot.AutoSize(cfg.DataDir, n.baseLog.With("component", "hot"))
	}
	if n.hot, err = hot.New(hotDir, hotSize, n.baseLog.With("component", "hot")); err != nil {
		return err
	}
	if n.hot != nil {
		// The last run's hot files, checked block by block on use: a
		// restart starts warm.
		n.hot.Adopt(func(id chunkstore.ID) (*chunkstore.Manifest, error) { return st.GetManifest(ctx, id) })
		defer n.hot.Close()
	}

	n.hoarder = hoarder.New(hoardSource{n}, hoarder.Config{Budget: cfg.HoardBudget, Rate: cfg.HoardRate,
		Interval: cfg.HoardInterval, Log: n.baseLog, Registerer: n.reg})

	// The cluster after the sockets and the store: p2p.New only builds the
	// host (no network I/O; a client connecting meanwhile waits in the
	// backlog), and everything slow (DHT bootstrap, advertising) runs in
	// the background below, so NBD readiness never waits on peers.
	var peer *p2p.Peer
	if on, err := cfg.p2pEnabled(); err != nil {
		closeAll()
		return err
	} else if on {
		if n.cat, err = catalog.Open(st, catalog.Options{
			Path:       filepath.Join(cfg.DataDir, "catalog.json"),
			Log:        n.baseLog.With("component", "catalog"),
			InUse:      func(id chunkstore.ID) bool { return n.openExports(id) > 0 },
			Registered: n.advertiseLater,
			Removed:    n.removed,
			Changed:    n.catalogChanged,
			Pinned:     n.prefetchPinned,
		}); err != nil {
			closeAll()
			return err
		}
		if peer, err = n.startP2P(ctx); err != nil {
			closeAll()
			return err
		}
		n.cat.Attach(peer)
	} else {
		n.log.Info("running standalone (no cluster): to share chunks with peers, create a swarm key with hoard cluster keygen "+
			cfg.P2P.SwarmKeyFile+", copy it to every node, and set p2p.bootstrap", "swarm_key_file", cfg.P2P.SwarmKeyFile)
	}

	g, gctx := errgroup.WithContext(ctx)
	n.runCtx = gctx
	g.Go(func() error { n.sweepImages(gctx); return nil })
	g.Go(func() error { return n.hoarder.Run(gctx) })
	g.Go(func() error { n.refreshWorkingSets(gctx); return nil })
	if peer != nil {
		g.Go(func() error { return peer.Run(gctx) })
		g.Go(func() error { n.cl.Run(gctx); return nil })
		g.Go(func() error { return n.cat.Run(gctx) })
		g.Go(func() error { n.announceAll(gctx); return nil })
		addrs := make([]string, 0)
		for _, a := range peer.Addrs() {
			addrs = append(addrs, a.String())
		}
		n.log.Info("cluster on", "peer_id", peer.ID().String(), "addrs", strings.Join(addrs, " "),
			"bootstrap", strings.Join(cfg.P2P.Bootstrap, " "))
	}
	srv := &nbd.Server{Exporter: n, Log: n.baseLog.With("component", "nbd"), MaxConns: cfg.NBDMaxConns, MaxBufferedBytes: cfg.NBDMaxBufferedBytes}
	if unixLn != nil {
		g.Go(func() error { return srv.Serve(gctx, unixLn) })
		n.log.Info("serving NBD", "socket", sockPath, "uri", "nbd+unix:///IMAGE?socket="+sockPath, "systemd", sd[systemdNBDSocket] != nil)
	}
	if tcpLn != nil {
		g.Go(func() error { return srv.Serve(gctx, tcpLn) })
		n.log.Info("serving NBD over TCP", "addr", n.nbdAddr.String(), "uri", "nbd://"+n.nbdAddr.String()+"/IMAGE")
	}
	if apiLn != nil {
		hs := n.apiServer()
		// Every request runs on Run's context, so that stopping cancels
		// in-flight work (an import), and is counted, so that Run waits for
		// its handlers before it closes the store they use.
		hs.BaseContext = func(net.Listener) context.Context { return gctx }
		hs.Handler = n.handlers.track(hs.Handler)
		g.Go(func() error {
			if err := hs.Serve(netutil.LimitListener(apiLn, n.cfg.APIMaxConns)); !errors.Is(err, http.ErrServerClosed) {
				return fmt.Errorf("admin API: %w", err)
			}
			return nil
		})
		g.Go(func() error {
			<-gctx.Done()
			sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			return hs.Shutdown(sctx)
		})
		n.log.Info("serving admin API", "addr", n.apiAddr.String(), "token_file", n.cfg.apiTokenFile)
	}
	if glanceLn != nil {
		if err := n.serveGlanceMirror(gctx, g, glanceLn); err != nil {
			return err
		}
	}
	if n.apiAddr != nil {
		// Tell CLIs on this data dir where the API is (the store is locked).
		af := filepath.Join(cfg.DataDir, APIAddrFile)
		if err := os.WriteFile(af, []byte(n.apiAddr.String()+"\n"), 0o640); err != nil {
			n.log.Warn("cannot write the API address file", "path", af, "err", err)
		}
		defer os.Remove(af)
	}
	u := st.Usage()
	n.log.Info("hoard daemon ready", "data_dir", cfg.DataDir, "store_chunks", u.Chunks, "store_bytes", u.StoredBytes, "quota", cfg.StoreQuota)
	close(n.ready)
	notifySystemd(daemon.SdNotifyReady)
	g.Go(func() error {
		<-gctx.Done()
		notifySystemd(daemon.SdNotifyStopping)
		return nil
	})

	err = g.Wait()
	n.handlers.wait(n.log)
	n.bg.Wait()
	n.fetches.wait(n.log)
	if peer != nil {
		n.cl.Stop()
		if cerr := peer.Close(); cerr != nil {
			n.log.Warn("close p2p", "err", cerr)
		}
	}
	n.shutdownImages()
	if err != nil && ctx.Err() == nil {
		return err
	}
	return nil
}

// listenUnix listens on a unix socket, removing a stale socket file left by a
// daemon that died (but never one a live daemon is serving).
func listenUnix(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return nil, fmt.Errorf("nbd.socket: %w", err)
	}
	if _, err := os.Stat(path); err == nil {
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("nbd.socket %s: another daemon is serving it; stop it or set nbd.socket", path)
		}
		os.Remove(path)
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("nbd.socket %s: %w", path, err)
	}
	// The socket is the local trust boundary: owner and group only.
	if err := applySocketPerms(path); err != nil {
		ln.Close()
		return nil, fmt.Errorf("nbd.socket %s: %w", path, err)
	}
	return ln, nil
}

// goBackground runs f in the background if a prefetch slot is free, and
// reports whether it did. Run waits for it before closing the store.
func (n *Node) goBackground(f func(ctx context.Context)) bool {
	ctx := n.runCtx
	if ctx == nil || ctx.Err() != nil {
		return false
	}
	select {
	case n.bgSem <- struct{}{}:
	default:
		return false
	}
	n.bg.Add(1)
	go func() {
		defer n.bg.Done()
		defer func() { <-n.bgSem }()
		f(ctx)
	}()
	return true
}
