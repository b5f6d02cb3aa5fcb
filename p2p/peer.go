package p2p

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hoardvm/hoard/chunkstore"
	"github.com/ipfs/go-cid"
	ds "github.com/ipfs/go-datastore"
	dssync "github.com/ipfs/go-datastore/sync"
	leveldb "github.com/ipfs/go-ds-leveldb"
	"github.com/libp2p/go-libp2p"
	dht "github.com/libp2p/go-libp2p-kad-dht"
	"github.com/libp2p/go-libp2p-kad-dht/records"
	"github.com/libp2p/go-libp2p/core/control"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/protocol"
	"github.com/libp2p/go-libp2p/core/sec"
	rcmgr "github.com/libp2p/go-libp2p/p2p/host/resource-manager"
	"github.com/libp2p/go-libp2p/p2p/net/swarm"
	tptu "github.com/libp2p/go-libp2p/p2p/net/upgrader"
	"github.com/libp2p/go-libp2p/p2p/security/noise"
	quic "github.com/libp2p/go-libp2p/p2p/transport/quic"
	"github.com/libp2p/go-libp2p/p2p/transport/tcp"
	ma "github.com/multiformats/go-multiaddr"
	"golang.org/x/time/rate"
)

// ProtocolChunks is the chunk-exchange protocol (see doc.go).
const ProtocolChunks protocol.ID = "/hoard/chunks/1.0.0"

// swarmNoise returns a Noise security transport bound to the cluster's swarm
// key: a digest of the key is the Noise prologue, which both sides mix into
// the handshake hash, so a peer without the same key cannot complete a
// handshake, learn this node's identity, or open a stream. This replaces
// go-libp2p's pnet layer (XSalsa20 over the whole connection, on top of Noise's
// own ChaCha20-Poly1305), which halved peer transfer throughput: 0.49x of plain
// TCP with pnet, 0.89x with Noise alone (HOARD_BENCH_P2P=1 TestBenchTransfer).
func swarmNoise(psk []byte) func(id protocol.ID, priv crypto.PrivKey, muxers []tptu.StreamMuxer) (sec.SecureTransport, error) {
	h := sha256.New()
	h.Write([]byte("hoard swarm key prologue v1\x00"))
	h.Write(psk)
	prologue := h.Sum(nil)
	return func(id protocol.ID, priv crypto.PrivKey, muxers []tptu.StreamMuxer) (sec.SecureTransport, error) {
		t, err := noise.New(id, priv, muxers)
		if err != nil {
			return nil, err
		}
		return t.WithSessionOptions(noise.Prologue(prologue))
	}
}

// dialTimeoutLocal bounds a dial to a private address (see newHost).
const dialTimeoutLocal = 15 * time.Second

// DHTPrefix is the protocol prefix of hoard's private DHT.
const DHTPrefix protocol.ID = "/hoard"

// Peer is a node's presence in the cluster: its libp2p host, the private DHT,
// the chunk-exchange protocol (client and server) and the peer bookkeeping
// used to choose whom to ask. All methods are safe for concurrent use.
type Peer struct {
	o       options
	log     *slog.Logger
	host    host.Host
	ownHost bool
	dht     *dht.IpfsDHT
	dstore  ds.Batching
	metrics *metrics
	limiter *rate.Limiter
	verify  func(id chunkstore.ID, st chunkstore.Stored) ([]byte, error)
	// launched, when set (by tests, before any fetch), is called on
	// FetchFrom's goroutine each time it asks a peer for a batch.
	launched func(id peer.ID, hedge bool)
	tcpPort  string

	ctx    context.Context // cancelled by Close: ends server requests
	cancel context.CancelFunc
	wg     sync.WaitGroup // stream readers and server requests
	reqID  atomic.Uint64

	mu       sync.Mutex
	provided map[cid.Cid]string // key -> what it is ("manifest ID" or "name NAME")
	retry    map[cid.Cid]string // announcements that failed, retried soon by the reprovide loop
	names    map[string]chunkstore.ID
	bad      map[peer.ID]time.Time
	slow     map[peer.ID]time.Time       // stalled a fetch recently (see markSlow)
	pools    map[peer.ID]*pool           // peers with live chunk streams
	conns    map[*conn]struct{}          // every client stream, whatever its pool
	served   map[network.Stream]struct{} // streams being served (handleStream)
	load     map[peer.ID]int64           // chunks requested and not yet answered
	closed   bool
	// glanceSlots bounds the ProtocolGlanceRegister requests served; nil: not served.
	glanceSlots *glanceSlots
	kick        chan struct{} // wakes the reprovide loop (after bootstrap)
	cat         catalogState
	// learnQueue is the size of the catalog's learn queue (tests shrink it).
	learnQueue int
	// nodeVersion is the Version of this node's last NodeInfo.
	nodeVersion uint64
}

// New builds a node: its host (unless WithHost), DHT, protocol handlers and,
// with a CatalogBackend, the catalog's GossipSub (whose goroutines, like the
// DHT's, end with Close). It starts no goroutine of its own; call Run to join
// the cluster, reprovide and learn the catalog, and Close when done.
func New(ctx context.Context, opts ...Option) (*Peer, error) {
	o := defaults()
	for _, f := range opts {
		f(&o)
	}
	if o.recordTTL == 0 {
		o.recordTTL = 3 * o.reprovideInterval
	}
	p := &Peer{o: o, log: o.log.With("component", "p2p"),
		provided: make(map[cid.Cid]string), retry: make(map[cid.Cid]string), names: make(map[string]chunkstore.ID),
		bad: make(map[peer.ID]time.Time), slow: make(map[peer.ID]time.Time), pools: make(map[peer.ID]*pool),
		conns: make(map[*conn]struct{}), served: make(map[network.Stream]struct{}),
		load: make(map[peer.ID]int64), kick: make(chan struct{}, 1),
		cat:        catalogState{lastSync: map[peer.ID]time.Time{}, syncing: map[peer.ID]bool{}},
		learnQueue: learnQueueSize}
	if o.catalogSyncInterval <= 0 {
		p.o.catalogSyncInterval = time.Minute
	}
	if o.nodeInfoInterval <= 0 {
		p.o.nodeInfoInterval = DefaultNodeInfoInterval
	}
	p.verify = o.verify
	if p.verify == nil {
		p.verify = verifyStored
	}
	if o.uploadLimit > 0 {
		burst := int(min(max(o.uploadLimit/10, 64<<10), 1<<30))
		p.limiter = rate.NewLimiter(rate.Limit(o.uploadLimit), burst)
	}
	if o.host != nil {
		p.host = o.host
	} else {
		h, err := p.newHost()
		if err != nil {
			return nil, err
		}
		p.host, p.ownHost = h, true
	}
	p.tcpPort = tcpPortOf(p.host.Addrs(), o.listen)
	p.metrics = newMetrics(o.reg, p)

	var err error
	if o.dataDir != "" {
		p.dstore, err = leveldb.NewDatastore(filepath.Join(o.dataDir, "dht"), nil)
		if err != nil {
			p.closeHost()
			return nil, fmt.Errorf("open dht datastore: %w (is another hoard daemon using %s?)", err, o.dataDir)
		}
	} else {
		p.dstore = dssync.MutexWrap(ds.NewMapDatastore())
	}
	p.dht, err = dht.New(p.host,
		dht.Mode(dht.ModeServer),
		dht.ProtocolPrefix(DHTPrefix),
		dht.Datastore(p.dstore),
		dht.ProviderManagerOpts(records.ProvideValidity(o.recordTTL)),
	)
	if err != nil {
		p.dstore.Close()
		p.closeHost()
		return nil, fmt.Errorf("start dht: %w", err)
	}
	p.ctx, p.cancel = context.WithCancel(context.WithoutCancel(ctx))
	if err := p.startGossip(); err != nil {
		p.cancel()
		p.stopGossip()
		p.dht.Close()
		p.dstore.Close()
		p.closeHost()
		return nil, err
	}
	p.host.SetStreamHandler(ProtocolChunks, p.handleStream)
	p.startGlanceRegister()
	return p, nil
}

func (p *Peer) closeHost() {
	if p.ownHost {
		p.host.Close()
	}
}

func (p *Peer) newHost() (host.Host, error) {
	o := p.o
	var priv crypto.PrivKey
	var err error
	if o.identityFile != "" {
		if priv, err = loadIdentity(o.identityFile); err != nil {
			return nil, err
		}
	} else if priv, _, err = crypto.GenerateEd25519Key(nil); err != nil {
		return nil, err
	}
	psk := o.psk
	if psk == nil && o.pskPath != "" {
		if psk, err = LoadSwarmKey(o.pskPath); err != nil {
			return nil, err
		}
	}
	if psk == nil && !o.insecure {
		return nil, errors.New("no swarm key: a hoard cluster is a private network; create a key with hoard cluster keygen, copy it to every node and set p2p.swarm_key_file")
	}
	if psk != nil && len(psk) != 32 {
		return nil, fmt.Errorf("swarm key is %d bytes, want 32", len(psk))
	}
	listen := o.listen
	if psk != nil {
		listen = slices.DeleteFunc(slices.Clone(listen), func(a string) bool {
			if strings.Contains(a, "/quic") {
				p.log.Info("not listening on QUIC: go-libp2p private networks (swarm key) are TCP-only", "addr", a)
				return true
			}
			return false
		})
	}
	rm, err := newResourceManager()
	if err != nil {
		return nil, err
	}
	hopts := []libp2p.Option{
		libp2p.Identity(priv),
		libp2p.ListenAddrStrings(listen...),
		libp2p.Transport(tcp.NewTCPTransport),
		libp2p.ResourceManager(rm),
		libp2p.DisableRelay(),
		libp2p.UserAgent("hoard"),
		// go-libp2p gives dials to private addresses 5 s, public ones 15 s.
		// hoard's peers are almost always on private networks, and a node
		// busy booting VMs can take longer than 5 s to finish a handshake.
		libp2p.SwarmOpts(swarm.WithDialTimeoutLocal(dialTimeoutLocal)),
	}
	if psk == nil {
		hopts = append(hopts, libp2p.Security(noise.ID, noise.New), libp2p.Transport(quic.NewTransport))
		p.log.Warn("no swarm key: this node accepts any libp2p peer (insecure, for tests only)")
	} else {
		hopts = append(hopts, libp2p.Security(noise.ID, swarmNoise(psk)))
	}
	if len(o.allow) > 0 {
		hopts = append(hopts, libp2p.ConnectionGater(newAllowList(o.allow, priv)))
	}
	if o.reg != nil {
		hopts = append(hopts, libp2p.PrometheusRegisterer(o.reg))
	} else {
		hopts = append(hopts, libp2p.DisableMetrics())
	}
	h, err := libp2p.New(hopts...)
	if err != nil {
		rm.Close()
		return nil, fmt.Errorf("start libp2p host on %v: %w (is the port in use? set p2p.listen)", listen, err)
	}
	return h, nil
}

// newResourceManager tunes libp2p's resource manager for data-center peers: the
// defaults allow 8 connections per IPv4 address and /56, which starves late
// joiners behind one NAT or a pod network (spegel #1523), and private ranges
// carry only cluster traffic.
func newResourceManager() (network.ResourceManager, error) {
	limits := rcmgr.DefaultLimits
	libp2p.SetDefaultServiceLimits(&limits)
	limits.AddProtocolLimit(ProtocolChunks,
		rcmgr.BaseLimit{StreamsInbound: 1024, StreamsOutbound: 1024, Streams: 2048, Memory: 256 << 20},
		rcmgr.BaseLimitIncrease{StreamsInbound: 512, StreamsOutbound: 512, Streams: 1024, Memory: 64 << 20})
	limits.AddProtocolPeerLimit(ProtocolChunks,
		rcmgr.BaseLimit{StreamsInbound: 32, StreamsOutbound: 32, Streams: 64, Memory: 64 << 20},
		rcmgr.BaseLimitIncrease{})
	scaled := limits.AutoScale()
	perIP := []rcmgr.ConnLimitPerSubnet{{PrefixLength: 32, ConnCount: 64}}
	perIP6 := []rcmgr.ConnLimitPerSubnet{{PrefixLength: 64, ConnCount: 64}, {PrefixLength: 48, ConnCount: 1024}}
	private := func(s string) rcmgr.NetworkPrefixLimit {
		return rcmgr.NetworkPrefixLimit{Network: netip.MustParsePrefix(s), ConnCount: math.MaxInt}
	}
	v4 := []rcmgr.NetworkPrefixLimit{private("127.0.0.0/8"), private("10.0.0.0/8"), private("172.16.0.0/12"),
		private("192.168.0.0/16"), private("100.64.0.0/10")}
	v6 := []rcmgr.NetworkPrefixLimit{private("::1/128"), private("fc00::/7")}
	return rcmgr.NewResourceManager(rcmgr.NewFixedLimiter(scaled),
		rcmgr.WithLimitPerSubnet(perIP, perIP6),
		rcmgr.WithNetworkPrefixLimit(v4, v6),
		rcmgr.WithMetricsDisabled())
}

// allowList is a connection gater admitting only listed peers (and itself).
type allowList struct{ ids map[peer.ID]bool }

func newAllowList(ids []peer.ID, self crypto.PrivKey) *allowList {
	a := &allowList{ids: make(map[peer.ID]bool, len(ids)+1)}
	for _, id := range ids {
		a.ids[id] = true
	}
	if id, err := peer.IDFromPrivateKey(self); err == nil {
		a.ids[id] = true
	}
	return a
}

func (a *allowList) InterceptPeerDial(p peer.ID) bool                 { return a.ids[p] }
func (a *allowList) InterceptAddrDial(p peer.ID, _ ma.Multiaddr) bool { return a.ids[p] }
func (a *allowList) InterceptAccept(network.ConnMultiaddrs) bool      { return true }
func (a *allowList) InterceptSecured(_ network.Direction, p peer.ID, _ network.ConnMultiaddrs) bool {
	return a.ids[p]
}
func (a *allowList) InterceptUpgraded(network.Conn) (bool, control.DisconnectReason) { return true, 0 }

// Close stops serving, closes streams, the DHT and (unless given by WithHost)
// the host.
func (p *Peer) Close() error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	pools := p.pools
	p.pools = map[peer.ID]*pool{}
	var streams []network.Stream
	for c := range p.conns {
		streams = append(streams, c.s)
	}
	for s := range p.served {
		streams = append(streams, s)
	}
	p.mu.Unlock()
	p.host.RemoveStreamHandler(ProtocolChunks)
	p.stopGlanceRegister()
	p.cancel()
	for _, pl := range pools {
		pl.closeAll()
	}
	// Every stream, pooled or not, client or server: a reader or a writer
	// blocked on a peer that stopped answering returns only when its stream
	// is reset, and Close waits for them all. At once: a server whose
	// context ends meanwhile would close its stream cleanly mid-answer.
	for _, s := range streams {
		s.Reset()
	}
	p.stopGossip()
	err := p.dht.Close()
	if p.ownHost {
		err = errors.Join(err, p.host.Close())
	}
	p.wg.Wait()
	err = errors.Join(err, p.dstore.Close())
	p.metrics.unregister()
	return err
}

// Host returns the libp2p host.
func (p *Peer) Host() host.Host { return p.host }

// ID returns this node's peer ID.
func (p *Peer) ID() peer.ID { return p.host.ID() }

// Addrs returns this node's full dialable multiaddrs, each ending in /p2p/ID:
// what other nodes put in p2p.bootstrap.
func (p *Peer) Addrs() []ma.Multiaddr {
	addrs, err := peer.AddrInfoToP2pAddrs(&peer.AddrInfo{ID: p.host.ID(), Addrs: p.host.Addrs()})
	if err != nil {
		return nil
	}
	return addrs
}

// PeerInfo describes a known peer, for hoard peers --json.
type PeerInfo struct {
	ID          string   `json:"id"`
	Addrs       []string `json:"addrs"`
	Connected   bool     `json:"connected"`
	LatencyMS   float64  `json:"latency_ms,omitempty"`
	Bad         bool     `json:"bad,omitempty"`
	Outstanding int64    `json:"outstanding_chunks,omitempty"`
	Streams     int      `json:"streams,omitempty"`
}

// Peers lists connected peers and the DHT's routing table, sorted by ID.
func (p *Peer) Peers() []PeerInfo {
	seen := map[peer.ID]bool{}
	var ids []peer.ID
	for _, id := range append(p.host.Network().Peers(), p.dht.RoutingTable().ListPeers()...) {
		if !seen[id] && id != p.host.ID() {
			seen[id] = true
			ids = append(ids, id)
		}
	}
	slices.Sort(ids)
	out := make([]PeerInfo, 0, len(ids))
	for _, id := range ids {
		pi := PeerInfo{ID: id.String(), Connected: p.connected(id), Bad: p.Bad(id), Outstanding: p.outstanding(id),
			LatencyMS: float64(p.host.Peerstore().LatencyEWMA(id)) / 1e6}
		for _, a := range p.host.Peerstore().Addrs(id) {
			pi.Addrs = append(pi.Addrs, a.String())
		}
		p.mu.Lock()
		if pl := p.pools[id]; pl != nil {
			pi.Streams = pl.size()
		}
		p.mu.Unlock()
		out = append(out, pi)
	}
	return out
}

func (p *Peer) connected(id peer.ID) bool {
	return p.host.Network().Connectedness(id) == network.Connected
}

// Bad reports whether id sent bytes that failed verification recently; such a
// peer is left out of selection for the bad-peer TTL (default 1 h).
func (p *Peer) Bad(id peer.ID) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	t, ok := p.bad[id]
	if ok && time.Since(t) > p.o.badPeerTTL {
		delete(p.bad, id)
		return false
	}
	return ok
}

// markBad records that id sent bad bytes and drops its streams.
func (p *Peer) markBad(id peer.ID, why error) {
	p.log.Warn("peer sent bad data; not asking it again for a while", "peer_id", id.String(), "err", why)
	p.metrics.badPeers.Inc()
	p.mu.Lock()
	now := time.Now()
	for b, t := range p.bad {
		if now.Sub(t) > p.o.badPeerTTL {
			delete(p.bad, b)
		}
	}
	p.bad[id] = now
	pl := p.pools[id]
	delete(p.pools, id)
	p.mu.Unlock()
	if pl != nil {
		pl.closeAll()
	}
}

// slowPeerTTL is how long a peer that stalled a fetch is asked only when no
// other holder has the chunk.
const slowPeerTTL = 30 * time.Second

// markSlow records that id let a fetch stall: nothing arrived before another
// holder's copy (hedge) or before the stall timeout. A stopped or overloaded
// peer keeps its connection for a while (until keep-alives fail, ~30 s), and
// without this every read would wait for the hedge delay again.
func (p *Peer) markSlow(id peer.ID) {
	p.mu.Lock()
	defer p.mu.Unlock()
	now := time.Now()
	for s, t := range p.slow {
		if now.Sub(t) > slowPeerTTL {
			delete(p.slow, s)
		}
	}
	if _, ok := p.slow[id]; !ok {
		p.log.Debug("peer stalled a fetch; asking others first for a while", "peer_id", id.String())
	}
	p.slow[id] = now
}

// clearSlow records that id delivered.
func (p *Peer) clearSlow(id peer.ID) {
	p.mu.Lock()
	delete(p.slow, id)
	p.mu.Unlock()
}

// Slow reports whether id stalled a fetch (sent nothing before another
// holder's copy or the stall timeout) in the last 30 s and has delivered
// nothing since: a stopped or overloaded peer whose connection is still up.
func (p *Peer) Slow(id peer.ID) bool { return p.isSlow(id) }

// isSlow reports whether id stalled a fetch in the last slowPeerTTL.
func (p *Peer) isSlow(id peer.ID) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	t, ok := p.slow[id]
	return ok && time.Since(t) <= slowPeerTTL
}

func (p *Peer) outstanding(id peer.ID) int64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.load[id]
}

func (p *Peer) addLoad(id peer.ID, n int64) {
	p.mu.Lock()
	p.load[id] += n
	if p.load[id] <= 0 {
		delete(p.load, id)
	}
	p.mu.Unlock()
}

func tcpPortOf(addrs []ma.Multiaddr, listen []string) string {
	for _, a := range addrs {
		if v, err := a.ValueForProtocol(ma.P_TCP); err == nil && v != "0" {
			return v
		}
	}
	for _, s := range listen {
		if a, err := ma.NewMultiaddr(s); err == nil {
			if v, err := a.ValueForProtocol(ma.P_TCP); err == nil && v != "0" {
				return v
			}
		}
	}
	return "4001"
}
