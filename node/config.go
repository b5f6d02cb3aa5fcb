package node

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"path/filepath"
	"time"
	"unicode/utf8"

	"github.com/hoardvm/hoard/node/hot"
	"github.com/hoardvm/hoard/node/origin"
	"github.com/hoardvm/hoard/p2p"
	"github.com/hoardvm/hoard/planner"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/prometheus/client_golang/prometheus"
)

// Config is everything a Node needs, filled by cmd (flags, env, config file)
// or by tests. Zero values mean the documented defaults.
type Config struct {
	// DataDir holds the chunk store (DataDir/store). Required.
	DataDir string
	// StoreQuota limits the chunk store's stored bytes; 0: unlimited.
	StoreQuota int64
	// StoreCompression is the codec for new chunks: zstd (default), s2, none.
	StoreCompression string
	// Eviction names the store's eviction policy, one of
	// planner.EvictionNames(); default planner.DefaultEviction. Chunks of
	// images with an open export are never evicted, whatever the policy.
	Eviction string

	// NBDSocket is the NBD unix socket; default DataDir/nbd.sock. "-" disables it.
	NBDSocket string
	// NBDSocketGroup is the group (name or numeric GID) the NBD unix socket
	// is given; empty: the daemon's. QEMU under libvirt opens the socket as
	// its own user (libvirt-qemu on Debian), which must be in this group.
	NBDSocketGroup string
	// NBDSocketMode is the NBD unix socket's permission bits; default 0660.
	NBDSocketMode fs.FileMode
	// NBDListen is an optional TCP address for NBD (e.g. 127.0.0.1:10809); empty: off.
	NBDListen string
	// APIListen is the admin HTTP API address; default 127.0.0.1:7480. "-" disables it.
	APIListen string
	// APIToken is the bearer token every API request but /healthz, /readyz
	// and /metrics must carry. Empty (the default): Run creates a random one
	// on first start in DataDir/api.token (mode 0600) and reuses it.
	APIToken string
	// APIMaxConns caps the admin API's open connections; more wait to be
	// accepted. Default 256.
	APIMaxConns int
	// APIIdleTimeout closes a keep-alive API connection idle this long.
	// Default 30s.
	APIIdleTimeout time.Duration
	// NBDMaxConns caps the open NBD connections per listener; more wait to
	// be accepted. Default nbd.DefaultMaxConns.
	NBDMaxConns int
	// NBDMaxBufferedBytes bounds the read replies all NBD connections
	// together hold in memory. Default nbd.DefaultMaxBufferedBytes.
	NBDMaxBufferedBytes int64
	// apiTokenFile is where Run loaded APIToken from, "" when configured.
	apiTokenFile string

	// Origin configures the origin sources opened for lazy images.
	Origin origin.Config
	// GlanceListen is the address of the Glance v2 download mirror (package
	// glancemirror), e.g. 127.0.0.1:9293; empty: off. It needs
	// Origin.GlanceURL: every download is authorized by that Glance.
	GlanceListen string
	// GlanceMaxDownloads bounds the mirror's downloads at once (default
	// glancemirror.DefaultMaxDownloads) and GlanceWriteTimeout the write of
	// each block to a client (default glancemirror.DefaultWriteTimeout).
	GlanceMaxDownloads int
	GlanceWriteTimeout time.Duration
	// GlanceRegisterWait bounds how long a node that asked the cluster's
	// registrar to register an image no node knew waits for an answer or
	// progress from it (the registrar reports progress every few seconds)
	// before registering the image itself. Default DefaultGlanceRegisterWait.
	GlanceRegisterWait time.Duration
	// OriginTimeout bounds one chunk fetch from an origin, retries included; a
	// read that needs the chunk fails (EIO) when it runs out. Asking the peers
	// first has a budget of the same length, so a miss fails after at most
	// twice this. Default 30s.
	OriginTimeout time.Duration
	// OriginConcurrency bounds concurrent origin requests. Default 8.
	OriginConcurrency int
	// OriginRate bounds the bytes per second this node pulls from origins,
	// for every reason together (VM reads, peers' designated fetches,
	// hoarding): the transfer control that keeps the image service up.
	// 0: DefaultOriginRate; negative: unlimited.
	OriginRate int64
	// HoardBudget is the stored bytes kept for hoarded working sets (see
	// package hoarder). 0: half of StoreQuota (or DefaultHoardBudget with no
	// quota); negative: hoarding off.
	HoardBudget int64
	// HoardRate bounds the bytes per second the hoarder fetches. 0:
	// DefaultHoardRate; negative: unlimited.
	HoardRate int64
	// HoardInterval is how often the hoarder plans again without being
	// asked (catalog and profile changes ask at once). 0: 30 s.
	HoardInterval time.Duration
	// Fetcher, when set, is asked for missing chunks before the origin. When
	// nil and the cluster is enabled (P2P), the node's peers are.
	Fetcher Fetcher
	// P2P configures the node's cluster membership (peers).
	P2P P2PConfig
	// NodeName is this node's name in placement (hoard place, the Nova
	// weigher): what the scheduler calls the host. Default: the OS host
	// name, which is what Nova calls a compute host.
	NodeName string

	// MemCache is the size in bytes of the in-memory cache of verified,
	// uncompressed chunks. Default 64 MiB; negative disables it.
	MemCache int64
	// HotCache is the disk, in bytes, of the hot tier: the decoded chunks of
	// the images being read, in one sparse raw file per image under
	// DataDir/hot, served like a raw file from the page cache (see package hot).
	// It is a cache of the running daemon, emptied at start. Default 4 GiB;
	// negative disables it.
	HotCache int64
	// Readahead is how many chunks are prefetched ahead of a sequential
	// reader. Default 8; negative disables readahead.
	Readahead int
	// PrefetchConcurrency bounds background fetches (readahead and profile
	// prefetch) per node. Default 4.
	PrefetchConcurrency int
	// ProfileWindow is how long after an image's first read its reads are
	// recorded in its boot profile. Default 2m.
	ProfileWindow time.Duration
	// NoProfilePrefetch turns off prefetching a stored profile on attach.
	NoProfilePrefetch bool

	// Registerer receives the node's metrics; nil: a registry of its own,
	// served on /metrics.
	Registerer prometheus.Registerer
	// Gatherer is served on /metrics when Registerer is set.
	Gatherer prometheus.Gatherer
}

// OriginCredentialsFile, in the data dir, keeps the real URLs of HTTP
// origins with credentials or a query string; manifests (which peers
// receive) record them redacted. Mode 0600, never sent anywhere.
const OriginCredentialsFile = "origin-credentials.json"

// Defaults of the hoarding and origin transfer controls.
const (
	// DefaultOriginRate: 100 MB/s (~0.8 Gbit/s) per node from origins.
	DefaultOriginRate = 100_000_000
	// DefaultHoardRate: 50 MB/s per node for hoarding.
	DefaultHoardRate = 50_000_000
	// DefaultHoardBudget is the hoard budget of a store without a quota.
	DefaultHoardBudget = 5 << 30
)

// DefaultHotCache is the default size of the hot tier (Config.HotCache).
const DefaultHotCache = hot.DefaultSize

// DefaultAPIListen is the default admin API address.
const DefaultAPIListen = "127.0.0.1:7480"

func (c Config) withDefaults() (Config, error) {
	if c.DataDir == "" {
		return c, errors.New("node: no data dir; set data_dir (--data-dir, HOARD_DATA_DIR)")
	}
	if c.Eviction == "" {
		c.Eviction = planner.DefaultEviction
	}
	p, err := planner.NewEviction(c.Eviction)
	if err != nil {
		return c, fmt.Errorf("node: %w", err)
	}
	c.Eviction = p.Name()
	if c.NBDSocket == "" {
		c.NBDSocket = filepath.Join(c.DataDir, "nbd.sock")
	}
	if c.NodeName == "" {
		c.NodeName = defaultNodeName()
	}
	if len(c.NodeName) > p2p.MaxNodeNameLen || !utf8.ValidString(c.NodeName) {
		return c, fmt.Errorf("node: node.name %q: want at most %d bytes of UTF-8", c.NodeName, p2p.MaxNodeNameLen)
	}
	if c.NBDSocketMode == 0 {
		c.NBDSocketMode = 0o660
	}
	if c.NBDSocket != "-" {
		setSocketPerms(c.NBDSocket, c.NBDSocketGroup, c.NBDSocketMode)
	}
	if c.APIListen == "" {
		c.APIListen = DefaultAPIListen
	}
	if c.GlanceListen != "" && c.Origin.GlanceURL == "" {
		return c, fmt.Errorf("node: glance.listen %s needs the real Glance to authorize downloads: set origin.glance.url (HOARD_ORIGIN_GLANCE_URL), e.g. http://controller:9292", c.GlanceListen)
	}
	if c.GlanceRegisterWait <= 0 {
		c.GlanceRegisterWait = DefaultGlanceRegisterWait
	}
	if c.APIMaxConns <= 0 {
		c.APIMaxConns = 256
	}
	if c.APIIdleTimeout <= 0 {
		c.APIIdleTimeout = 30 * time.Second
	}
	if c.OriginTimeout <= 0 {
		c.OriginTimeout = 30 * time.Second
	}
	if c.OriginConcurrency <= 0 {
		c.OriginConcurrency = 8
	}
	switch {
	case c.OriginRate == 0:
		c.OriginRate = DefaultOriginRate
	case c.OriginRate < 0:
		c.OriginRate = 0 // unlimited
	}
	switch {
	case c.HoardBudget == 0 && c.StoreQuota > 0:
		c.HoardBudget = c.StoreQuota / 2
	case c.HoardBudget == 0:
		c.HoardBudget = DefaultHoardBudget
	case c.HoardBudget < 0:
		c.HoardBudget = 0 // off
	}
	switch {
	case c.HoardRate == 0:
		c.HoardRate = DefaultHoardRate
	case c.HoardRate < 0:
		c.HoardRate = 0 // unlimited
	}
	if c.MemCache == 0 {
		c.MemCache = 64 << 20
	}
	if c.HotCache == 0 {
		c.HotCache = DefaultHotCache
	}
	if c.Readahead == 0 {
		c.Readahead = 8
	}
	if c.PrefetchConcurrency <= 0 {
		c.PrefetchConcurrency = 4
	}
	if c.ProfileWindow <= 0 {
		c.ProfileWindow = 2 * time.Minute
	}
	if c.P2P.SwarmKeyFile == "" {
		c.P2P.SwarmKeyFile = filepath.Join(c.DataDir, "swarm.key")
	}
	if c.P2P.DesignatedTimeout <= 0 {
		c.P2P.DesignatedTimeout = 4 * time.Second
	}
	if c.P2P.ViewTTL <= 0 {
		c.P2P.ViewTTL = 5 * time.Second
	}
	if c.Origin.Credentials == nil {
		c.Origin.Credentials = origin.NewCredentials(filepath.Join(c.DataDir, OriginCredentialsFile))
	}
	// Never export the daemon's own data or keys, whoever asks.
	c.Origin.DenyPaths = append(c.Origin.DenyPaths[:len(c.Origin.DenyPaths):len(c.Origin.DenyPaths)], c.DataDir, c.P2P.SwarmKeyFile,
		filepath.Join(c.DataDir, "identity.key"), filepath.Join(c.DataDir, APITokenFile),
		filepath.Join(c.DataDir, OriginCredentialsFile))
	if c.Origin.Log == nil {
		c.Origin.Log = slog.New(slog.DiscardHandler)
	}
	return c, nil
}

// P2PConfig is the node's cluster membership. The cluster is optional: with
// no swarm key at SwarmKeyFile, no listen or bootstrap addresses and no Host,
// the node runs standalone (local store -> origin).
type P2PConfig struct {
	// Listen are the libp2p listen multiaddrs; default p2p.DefaultListenAddrs.
	Listen []string
	// Bootstrap are peers to join through: multiaddrs ending in /p2p/ID, or dns:NAME.
	Bootstrap []string
	// SwarmKeyFile is the cluster's pre-shared key; default DataDir/swarm.key.
	SwarmKeyFile string
	// UploadLimit caps the bytes per second served to peers; 0: unlimited.
	UploadLimit int64
	// AllowList, when not empty, restricts connections to these peer IDs.
	AllowList []string
	// DesignatedTimeout is how long a node waits for the designated fetcher
	// of a chunk (another peer) before going to the origin itself. Default 4s.
	DesignatedTimeout time.Duration
	// ViewTTL is how long the have-bitmaps of an image's peers are reused
	// before they are asked again. Default 5s.
	ViewTTL time.Duration
	// Host, when set (tests: a mocknet host), is used instead of building a
	// libp2p host; Listen, SwarmKeyFile and AllowList do not apply to it.
	Host host.Host
	// Options are extra options passed to p2p.New (tests: timings).
	Options []p2p.Option
}
