package p2p

import (
	"context"
	"log/slog"
	"time"

	"github.com/hoardvm/hoard/chunkstore"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/prometheus/client_golang/prometheus"
)

type options struct {
	listen       []string
	bootstrap    []string
	identityFile string
	psk          []byte
	pskPath      string
	insecure     bool
	allow        []peer.ID
	reg          prometheus.Registerer
	uploadLimit  int64
	log          *slog.Logger
	host         host.Host
	backend      Backend
	verify       func(id chunkstore.ID, st chunkstore.Stored) ([]byte, error)
	dataDir      string

	reprovideInterval time.Duration
	recordTTL         time.Duration
	streamsPerPeer    int
	badPeerTTL        time.Duration
	hedgeAfter        time.Duration
	stallTimeout      time.Duration
	writeTimeout      time.Duration
	streamIdle        time.Duration
	lookupTimeout     time.Duration
	maxProviders      int

	catalogSyncInterval time.Duration
	nodeInfoInterval    time.Duration
}

// Option configures New.
type Option func(*options)

// DefaultListenAddrs are the listen multiaddrs when WithListenAddrs is not given.
var DefaultListenAddrs = []string{"/ip4/0.0.0.0/tcp/4001", "/ip4/0.0.0.0/udp/4001/quic-v1"}

// WithListenAddrs sets the libp2p listen multiaddrs (default DefaultListenAddrs).
// QUIC addresses are dropped, with a log line, on a private network: go-libp2p
// supports a pre-shared key on TCP only.
func WithListenAddrs(addrs []string) Option { return func(o *options) { o.listen = addrs } }

// WithBootstrap sets the peers to join through: multiaddrs ending in /p2p/ID, or
// "dns:NAME[:PORT]", resolved to A/AAAA records on every bootstrap attempt; the
// peer IDs behind a DNS name are learned from the handshake (see connect in dht.go).
// The port defaults to the TCP port this node listens on.
func WithBootstrap(addrs []string) Option { return func(o *options) { o.bootstrap = addrs } }

// WithIdentityFile keeps the node's Ed25519 key in path (created with mode 0600 on
// first run), so the peer ID survives restarts. Without it the ID is random.
func WithIdentityFile(path string) Option { return func(o *options) { o.identityFile = path } }

// WithDataDir sets where the DHT keeps its datastore (<dir>/dht). Without it the
// DHT's records live in memory.
func WithDataDir(dir string) Option { return func(o *options) { o.dataDir = dir } }

// WithSwarmKey sets the cluster's 32-byte pre-shared key (see LoadSwarmKey). A
// node refuses to start without one unless WithInsecureNoSwarmKey is given.
func WithSwarmKey(psk []byte) Option { return func(o *options) { o.psk = psk } }

// WithSwarmKeyFile loads the pre-shared key from path (LoadSwarmKey) when New
// runs, and names that file in error messages.
func WithSwarmKeyFile(path string) Option { return func(o *options) { o.pskPath = path } }

// WithInsecureNoSwarmKey lets a node run without a pre-shared key: anyone who can
// reach it may join. For tests and single-host experiments only.
func WithInsecureNoSwarmKey() Option { return func(o *options) { o.insecure = true } }

// WithAllowList restricts connections (both directions) to these peers.
func WithAllowList(ids []peer.ID) Option { return func(o *options) { o.allow = ids } }

// WithRegisterer registers hoard_p2p_* metrics (and libp2p's own) on reg.
func WithRegisterer(reg prometheus.Registerer) Option { return func(o *options) { o.reg = reg } }

// WithUploadLimit caps the chunk payload bytes per second served to peers
// (token bucket); 0 means unlimited.
func WithUploadLimit(bytesPerSec int64) Option {
	return func(o *options) { o.uploadLimit = bytesPerSec }
}

// WithLogger sets the logger.
func WithLogger(l *slog.Logger) Option { return func(o *options) { o.log = l } }

// WithHost uses h instead of building a libp2p host (tests: mocknet). The Peer
// does not close h. Listen, identity, swarm key and allow-list options do not
// apply to it.
func WithHost(h host.Host) Option { return func(o *options) { o.host = h } }

// WithBackend sets what the node serves to peers; without one it serves nothing
// (every request gets NOTFOUND or an error). A backend that also implements
// CatalogBackend turns the catalog on (gossip and sync, run by Run).
func WithBackend(b Backend) Option { return func(o *options) { o.backend = b } }

// WithVerify replaces the built-in decoder used to check chunks received from
// peers (for instance with (*chunkstore.Store).Decode plus ID.Verify). verify
// returns the uncompressed bytes, or an error when st does not decode to id.
func WithVerify(verify func(id chunkstore.ID, st chunkstore.Stored) ([]byte, error)) Option {
	return func(o *options) { o.verify = verify }
}

// WithReprovideInterval sets how often provided keys are announced again
// (default 30 min). Peers drop records after WithRecordTTL.
func WithReprovideInterval(d time.Duration) Option {
	return func(o *options) { o.reprovideInterval = d }
}

// WithRecordTTL sets how long this node keeps provider records others announce to
// it (default 3x the reprovide interval): how long a withdrawn image can still be
// found.
func WithRecordTTL(d time.Duration) Option { return func(o *options) { o.recordTTL = d } }

// WithStreamsPerPeer sets the size of the long-lived stream pool per peer (default 4).
func WithStreamsPerPeer(n int) Option { return func(o *options) { o.streamsPerPeer = n } }

// WithBadPeerTTL sets how long a peer that sent bad bytes is left out (default 1 h).
func WithBadPeerTTL(d time.Duration) Option { return func(o *options) { o.badPeerTTL = d } }

// WithHedging sets FetchFrom's timing: after hedgeAfter without a batch finishing,
// its missing chunks are also asked of another peer; after stall without any
// chunk arriving, the batch is abandoned (defaults 1 s and 10 s).
func WithHedging(hedgeAfter, stall time.Duration) Option {
	return func(o *options) { o.hedgeAfter, o.stallTimeout = hedgeAfter, stall }
}

// WithWriteTimeout bounds every write to a peer's stream: a write of n bytes
// may take d plus n at 1 MiB/s (default 10 s), after which the stream is reset
// and its requests fail (and are asked elsewhere), so a peer that stops
// reading cannot wedge a fetch or a server goroutine.
func WithWriteTimeout(d time.Duration) Option { return func(o *options) { o.writeTimeout = d } }

// WithCatalogSyncInterval sets how often a node syncs the catalog with a few
// random connected peers (default 1 min); it also bounds how often one peer
// is asked (see doc.go, Catalog).
func WithCatalogSyncInterval(d time.Duration) Option {
	return func(o *options) { o.catalogSyncInterval = d }
}

// WithNodeInfoInterval sets how often the node announces its NodeInfo
// (default DefaultNodeInfoInterval); receivers forget a node after a few
// intervals without news.
func WithNodeInfoInterval(d time.Duration) Option {
	return func(o *options) { o.nodeInfoInterval = d }
}

func defaults() options {
	return options{
		listen:            DefaultListenAddrs,
		log:               slog.New(slog.DiscardHandler),
		reprovideInterval: 30 * time.Minute,
		streamsPerPeer:    4,
		badPeerTTL:        time.Hour,
		hedgeAfter:        time.Second,
		stallTimeout:      10 * time.Second,
		writeTimeout:      10 * time.Second,
		streamIdle:        5 * time.Minute,
		lookupTimeout:     10 * time.Second,
		maxProviders:      20,

		catalogSyncInterval: time.Minute,
	}
}

// Backend is what a node serves to its peers; the daemon implements it over its
// chunk store and read path. Methods are called concurrently, once per request,
// with a context cancelled when the requester goes away.
type Backend interface {
	// Manifest returns the encoded manifest id, or an error wrapping
	// chunkstore.ErrNotFound.
	Manifest(ctx context.Context, id chunkstore.ID) ([]byte, error)
	// Have returns a bitmap over the manifest's entries, bit i set when entry i
	// is held locally (see Bitmap), or an error wrapping chunkstore.ErrNotFound
	// for an unknown manifest.
	Have(ctx context.Context, manifest chunkstore.ID) (bitmap []byte, err error)
	// Chunk returns entry index of manifest in its stored (compressed) form. With
	// fetch, this node is the cluster's designated fetcher for it and may go to
	// the origin; without, it answers from local storage only. An error wrapping
	// chunkstore.ErrNotFound is sent as NOTFOUND. The payload is not retained.
	Chunk(ctx context.Context, manifest chunkstore.ID, index int, fetch bool) (chunkstore.Stored, error)
}
