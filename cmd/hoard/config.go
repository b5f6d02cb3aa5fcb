package main

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/hoardvm/hoard/node"
	"github.com/hoardvm/hoard/planner"
	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"
)

// valueKind is how a key's value is typed.
type valueKind int

const (
	kindString valueKind = iota
	kindBool
	kindDuration
	kindList // several values: a YAML list, repeated flags, or commas
	kindMode // an octal file mode, a string: "0660"
)

// scope says which commands take a key's flag.
type scope int

const (
	scopeGlobal  scope = iota // a persistent flag of every command
	scopeDaemon               // a flag of hoard daemon (and hoard config show)
	scopeNoFlag               // no flag: file and environment only
	scopeEnvOnly              // environment only (HOARD_API: it would shadow the api section in a file)
)

// configKey is one configuration key. configKeys is the one table the
// flags, the validation, hoard config show, hoard config example (and so
// hoard.example.yaml) and the README are driven from; TestConfigTable checks
// that every key the code reads is in it.
type configKey struct {
	name   string // viper key, e.g. store.quota; env twin HOARD_STORE_QUOTA
	flag   string // flag name, e.g. store-quota; "" for none
	alias  string // an older flag name still accepted
	scope  scope
	kind   valueKind
	def    string // default as written in a file ("" for none or computed)
	defDoc string // what an empty default means, e.g. "<data_dir>/nbd.sock"
	help   string
	accept string             // the accepted form, named in errors
	check  func(string) error // one value (each element of a list); nil: anything
	// example is a value shown, commented out, in hoard.example.yaml when
	// def is empty.
	example  string
	secret   bool // config show prints "(set)" instead of the value
	required bool // an empty value is an error (otherwise: not set)
}

// envName is the key's environment variable.
func (k *configKey) envName() string {
	return "HOARD_" + strings.ToUpper(strings.NewReplacer(".", "_", "-", "_").Replace(k.name))
}

const (
	acceptSize     = "a size with an explicit unit: 10GiB, 512MiB (powers of 1024), 10GB, 500MB (powers of 1000), or bytes (4096); 0 for none"
	acceptRate     = "bytes per second with an explicit unit, e.g. 100MiB or 100MiB/s; 0 or unlimited for none"
	acceptDuration = "a duration with a unit, e.g. 30s, 2m, 1h30m"
	acceptBool     = "true or false"
	acceptHostPort = "HOST:PORT, e.g. 127.0.0.1:10809"
)

var configKeys = []*configKey{
	{name: "data_dir", flag: "data-dir", scope: scopeGlobal, def: "./.hoard",
		help:   "data directory: chunk store, index, identity, profiles, API token",
		accept: "a directory path", check: nonEmpty, required: true},
	{name: "log.level", flag: "log-level", scope: scopeGlobal, def: "info",
		help:   "log level: debug, info, warn, error",
		accept: "debug, info, warn or error", check: oneOf("debug", "info", "warn", "error")},
	{name: "store.quota", flag: "store-quota", scope: scopeGlobal, def: "10GiB",
		help:   "chunk store size limit (disk bytes of pack files); unpinned chunks are evicted (store.eviction chooses which) from 95% down to 85%; 0 for none",
		accept: acceptSize, check: checkSize},
	{name: "store.compression", flag: "store-compression", scope: scopeGlobal, def: "zstd",
		help:   "codec for new chunks: zstd (best ratio), s2 (~3x less CPU, ~15% larger) or none",
		accept: "zstd, s2 or none", check: oneOf("zstd", "s2", "none")},
	{name: "store.eviction", flag: "store-eviction", scope: scopeDaemon, def: planner.DefaultEviction,
		help: "the daemon's eviction policy: sharing (evicts chunks of no boot working set first, and keeps longest those most images' working sets share), " +
			"arc (adaptive replacement: chunks read twice outlast chunks read once) or lru; chunks of open exports are never evicted",
		accept: strings.Join(planner.EvictionNames(), ", "), check: oneOf(planner.EvictionNames()...)},

	{name: "api", scope: scopeEnvOnly,
		help:   "the CLI talks to the daemon at this API address instead of the one on the data dir (HOST:PORT)",
		accept: acceptHostPort + " or http://HOST:PORT", check: checkAPIAddr, example: "127.0.0.1:7481"},
	{name: "api.listen", flag: "api-listen", scope: scopeDaemon, def: node.DefaultAPIListen,
		help:   "admin HTTP API, status page and /metrics (- to disable)",
		accept: acceptHostPort + ", or - for off", check: hostPortOr("-")},
	{name: "api.token", flag: "api-token", scope: scopeDaemon, secret: true,
		defDoc: "a random token the daemon keeps in <data_dir>/api.token",
		help:   "bearer token every API route but /healthz, /readyz and /metrics requires; a flag is visible to every local user in ps: prefer HOARD_API_TOKEN or the default",
		accept: "a token without spaces", check: noSpace, example: "change-me"},

	{name: "nbd.socket", flag: "nbd-socket", scope: scopeDaemon, defDoc: "<data_dir>/nbd.sock",
		help:   "NBD unix socket (- to disable); under systemd socket activation the .socket unit's ListenStream is used instead",
		accept: "a socket path, or - for off", example: "/run/hoard/nbd.sock"},
	{name: "nbd.socket_group", flag: "nbd-socket-group", scope: scopeDaemon, defDoc: "the daemon's group",
		help: "group of the NBD unix socket, a name or a numeric GID. QEMU opens the socket itself, so under libvirt its user " +
			"(libvirt-qemu on Debian/Ubuntu, qemu on Fedora/RHEL) must be in this group: set kvm (libvirt-qemu is a member on Debian) " +
			"or libvirt-qemu, keep nbd.socket_mode 0660, and let that user reach the socket's directory (and AppArmor/SELinux allow it). " +
			"Under systemd socket activation set SocketGroup= in hoard.socket instead",
		accept: "a group name or numeric GID", check: noSpace, example: "kvm"},
	{name: "nbd.socket_mode", flag: "nbd-socket-mode", scope: scopeDaemon, def: "0660", kind: kindMode,
		help:   "permissions of the NBD unix socket, octal; whoever can open it can read every image, so keep it 0660 (owner and nbd.socket_group); 0666 lets every local user in",
		accept: "an octal mode such as 0660", check: checkMode},
	{name: "nbd.listen", flag: "nbd-listen", scope: scopeDaemon, defDoc: "off",
		help:   "NBD over TCP; keep it on loopback (anyone who can reach it can read every image)",
		accept: acceptHostPort, check: hostPortOr(), example: "127.0.0.1:10809"},
	{name: "nbd.max_buffered", flag: "nbd-max-buffered", scope: scopeDaemon, def: "256MiB",
		help:   "memory all NBD clients together may hold in read replies not yet sent",
		accept: acceptSize, check: checkSize},

	{name: "cache.memory", flag: "cache-memory", alias: "mem-cache", scope: scopeDaemon, def: "64MiB",
		help:   "memory for verified, uncompressed chunks; 0 for none",
		accept: acceptSize, check: checkSize},
	{name: "cache.hot", flag: "cache-hot", alias: "hot-cache", scope: scopeDaemon,
		defDoc: "4GiB, or a quarter of the free disk space if less",
		help:   "hot tier: disk under <data_dir>/hot for the decoded chunks of the images being read, served from the page cache like a raw file; emptied at start; 0 for none. Disk use is store.quota + cache.hot",
		accept: acceptSize, check: checkSize, example: "4GiB"},

	{name: "origin.timeout", flag: "origin-timeout", scope: scopeDaemon, def: "30s",
		help:   "bound on one chunk fetch from an origin; reads fail with EIO after it",
		accept: acceptDuration + " (more than 0)", kind: kindDuration, check: checkDuration},
	{name: "origin.allow_loopback", flag: "origin-allow-loopback", scope: scopeDaemon, def: "false", kind: kindBool,
		help:   "allow http(s) origins at loopback and link-local addresses (off: a token holder cannot make the daemon fetch from the node's own services)",
		accept: acceptBool},
	{name: "origin.rate", flag: "origin-rate", scope: scopeDaemon, def: "100MB",
		help:   "bytes per second this node pulls from origins, for every reason together (VM reads, peers' designated fetches, hoarding): keeps the image service up in a boot storm",
		accept: acceptRate, check: checkRate, example: "50MB"},
	{name: "origin.glance.url", scope: scopeNoFlag,
		help:   "Glance v2 endpoint images are added from (glance://ID)",
		accept: "an http:// or https:// URL", check: checkURL, example: "http://glance.example:9292"},
	{name: "origin.glance.token", scope: scopeNoFlag, secret: true,
		help:   "keystone token sent to Glance (X-Auth-Token)",
		accept: "a token without spaces", check: noSpace, example: "gAAAA..."},
	{name: "origin.glance.headers", scope: scopeNoFlag,
		help:   "extra headers sent to Glance, Name=value,...; a keystone-less Glance wants X-Roles=admin,X-Tenant-Id=...",
		accept: "Name=value pairs separated by commas", check: checkHeaders, example: "X-Roles=admin,X-Tenant-Id=demo"},
	{name: "glance.listen", flag: "glance-listen", scope: scopeDaemon, defDoc: "off",
		help: "address of the Glance v2 download mirror (GET /v2/images/ID/file from the cluster, each download authorized by the real Glance " +
			"with the caller's credentials; needs origin.glance.url). Point Nova at it: [glance] endpoint_override = http://ADDR",
		accept: acceptHostPort, check: hostPortOr(), example: "127.0.0.1:9293"},
	{name: "glance.max_downloads", flag: "glance-max-downloads", scope: scopeDaemon, def: "64",
		help:   "image downloads the Glance mirror serves at once; more get 503 with Retry-After (each holds its image's chunks out of eviction and up to 8 MiB read ahead)",
		accept: "a whole number from 1", check: checkPositiveInt},
	{name: "glance.write_timeout", flag: "glance-write-timeout", scope: scopeDaemon, def: "1m0s",
		help:   "bound on writing each 1 MiB block of a mirror download to its client; a client that takes none for that long is dropped",
		accept: acceptDuration + " (more than 0)", kind: kindDuration, check: checkDuration},

	{name: "node.name", flag: "node-name", scope: scopeDaemon, defDoc: "the OS host name",
		help:   "this node's name in placement (hoard place, the Nova weigher): what the scheduler calls the host",
		accept: "1 to 255 bytes without white space", check: checkNodeName, example: "compute-7"},
	{name: "hoard.budget", flag: "hoard-budget", scope: scopeDaemon, defDoc: "half of store.quota",
		help:   "store bytes (stored, compressed) kept for every known image's boot working set, fetched ahead of any boot; 0 turns hoarding off",
		accept: acceptSize, check: checkSize, example: "5GiB"},
	{name: "hoard.rate", flag: "hoard-rate", scope: scopeDaemon, def: "50MB",
		help:   "bytes per second the hoarder fetches (VM reads always go first)",
		accept: acceptRate, check: checkRate, example: "20MB"},

	{name: "p2p.listen", flag: "p2p-listen", scope: scopeDaemon, kind: kindList,
		defDoc: "/ip4/0.0.0.0/tcp/4001 (QUIC is off on a private network)",
		help:   "libp2p listen multiaddrs",
		accept: "a multiaddr such as /ip4/0.0.0.0/tcp/4001", check: checkMultiaddr, example: "/ip4/0.0.0.0/tcp/4001"},
	{name: "p2p.bootstrap", flag: "p2p-bootstrap", scope: scopeDaemon, kind: kindList,
		help:   "peers to join: multiaddrs ending in /p2p/ID, or dns:NAME[:PORT] (every A/AAAA record of NAME)",
		accept: "a multiaddr ending in /p2p/ID (e.g. /ip4/10.0.0.1/tcp/4001/p2p/12D3KooW...) or dns:NAME[:PORT]",
		check:  checkBootstrap, example: "dns:hoard-seed:4001"},
	{name: "p2p.swarm_key_file", flag: "p2p-swarm-key-file", scope: scopeDaemon, defDoc: "<data_dir>/swarm.key",
		help:   "cluster pre-shared key, written by hoard cluster keygen; without it the node runs standalone",
		accept: "a file path", example: "/etc/hoard/swarm.key"},
	{name: "p2p.upload_limit", flag: "p2p-upload-limit", scope: scopeDaemon, defDoc: "unlimited",
		help:   "bytes per second served to peers",
		accept: acceptRate, check: checkRate, example: "100MiB"},
	{name: "p2p.allow", flag: "p2p-allow", scope: scopeDaemon, kind: kindList, defDoc: "any node with the swarm key",
		help:   "only these peer IDs may connect",
		accept: "a peer ID such as 12D3KooW... (hoard status prints a node's)", check: checkPeerID,
		example: "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"},
}

// configKeyByName finds a key of the table.
func configKeyByName(name string) *configKey {
	for _, k := range configKeys {
		if k.name == name {
			return k
		}
	}
	return nil
}

// values returns a key's raw value (as viper holds it) as the strings its
// check takes: one for a scalar, each element for a list.
func (k *configKey) values(raw any) ([]string, error) {
	if raw == nil {
		return nil, nil
	}
	switch k.kind {
	case kindList:
		var l []string
		switch x := raw.(type) {
		case []string:
			l = x
		case string:
			l = []string{x}
		case []any:
			for _, e := range x {
				s, ok := scalarString(e)
				if !ok {
					return nil, errors.New("a list inside the list")
				}
				l = append(l, s)
			}
		default:
			return nil, errors.New("not a list of strings")
		}
		return splitList(l), nil
	case kindBool:
		switch x := raw.(type) {
		case bool:
		case string:
			if _, err := strconv.ParseBool(x); err != nil {
				return nil, fmt.Errorf("%q is not a boolean", x)
			}
		default:
			return nil, fmt.Errorf("%v is not a boolean", raw)
		}
		return nil, nil
	case kindDuration:
		switch d := raw.(type) {
		case time.Duration:
			return []string{d.String()}, nil
		case string:
			return []string{d}, nil
		}
		return nil, fmt.Errorf("%v has no unit", raw)
	}
	if k.kind == kindMode {
		m, err := configMode(raw)
		if err != nil {
			return nil, err
		}
		return []string{fmt.Sprintf("%04o", m)}, nil
	}
	s, ok := scalarString(raw)
	if !ok {
		return nil, errors.New("a list or a map where one value is expected")
	}
	return []string{s}, nil
}

// scalarString is a scalar config value as a string.
func scalarString(raw any) (string, bool) {
	switch x := raw.(type) {
	case string:
		return x, true
	case int, int8, int16, int32, int64, uint, uint8, uint16, uint32, uint64, float32, float64, bool, time.Duration:
		return fmt.Sprint(x), true
	}
	return "", false
}

func nonEmpty(s string) error {
	if strings.TrimSpace(s) == "" {
		return errors.New("empty")
	}
	return nil
}

func checkNodeName(s string) error {
	if s == "" || len(s) > 255 {
		return errors.New("want 1 to 255 bytes")
	}
	return noSpace(s)
}

func noSpace(s string) error {
	if strings.ContainsAny(s, " \t\r\n") {
		return errors.New("contains white space")
	}
	return nil
}

func oneOf(vals ...string) func(string) error {
	return func(s string) error {
		for _, v := range vals {
			if strings.EqualFold(s, v) {
				return nil
			}
		}
		return errors.New("not one of " + strings.Join(vals, ", "))
	}
}

func checkSize(s string) error {
	_, err := sizeValue(s)
	return err
}

func checkRate(s string) error {
	if _, err := parseRate(s); err != nil {
		if r := errors.Unwrap(err); r != nil {
			return r
		}
		return err
	}
	return nil
}

func checkDuration(s string) error {
	d, err := time.ParseDuration(strings.TrimSpace(s))
	if err != nil {
		return errors.New("not a duration")
	}
	if d <= 0 {
		return errors.New("not more than 0")
	}
	return nil
}

func checkPositiveInt(s string) error {
	n, err := strconv.Atoi(strings.TrimSpace(s))
	if err != nil {
		return errors.New("not a whole number")
	}
	if n < 1 {
		return errors.New("less than 1")
	}
	return nil
}

func checkMode(s string) error {
	_, err := parseMode(s)
	return err
}

// configMode is a file mode from a config value, an octal string
// ("0660"). A number is refused: YAML reads 0660 as octal but 660 as
// decimal, and either can be a mistake.
func configMode(raw any) (uint32, error) {
	switch raw.(type) {
	case int, int64, uint64, float64:
		return 0, fmt.Errorf("%v is a number; write the mode quoted, e.g. \"0660\"", raw)
	}
	s, _ := scalarString(raw)
	return parseMode(s)
}

// parseMode parses an octal permission mode, "0660" or "660" or "0o660".
func parseMode(s string) (uint32, error) {
	t := strings.TrimPrefix(strings.TrimSpace(s), "0o")
	m, err := strconv.ParseUint(t, 8, 32)
	if err != nil || m > 0o777 {
		return 0, fmt.Errorf("invalid mode %q", s)
	}
	return uint32(m), nil
}

// hostPortOr accepts HOST:PORT (HOST may be empty: every address) or one of
// the given words.
func hostPortOr(words ...string) func(string) error {
	return func(s string) error {
		for _, w := range words {
			if s == w {
				return nil
			}
		}
		_, port, err := net.SplitHostPort(s)
		if err != nil {
			return errors.New("not HOST:PORT")
		}
		if p, err := strconv.Atoi(port); err != nil || p < 0 || p > 65535 {
			return fmt.Errorf("port %q is not a number from 0 to 65535", port)
		}
		return nil
	}
}

func checkAPIAddr(s string) error {
	return hostPortOr()(strings.TrimSuffix(strings.TrimPrefix(s, "http://"), "/"))
}

func checkURL(s string) error {
	u, err := url.Parse(s)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return errors.New("not an http(s) URL")
	}
	return nil
}

func checkHeaders(s string) error {
	for _, kv := range strings.Split(s, ",") {
		if k, _, ok := strings.Cut(kv, "="); !ok || strings.TrimSpace(k) == "" {
			return fmt.Errorf("%q is not Name=value", kv)
		}
	}
	return nil
}

func checkMultiaddr(s string) error {
	if _, err := ma.NewMultiaddr(s); err != nil {
		return fmt.Errorf("not a multiaddr (%v)", err)
	}
	return nil
}

func checkBootstrap(s string) error {
	if rest, ok := strings.CutPrefix(s, "dns:"); ok {
		host := rest
		if h, port, err := net.SplitHostPort(rest); err == nil {
			if p, err := strconv.Atoi(port); err != nil || p <= 0 || p > 65535 {
				return fmt.Errorf("port %q is not a number from 1 to 65535", port)
			}
			host = h
		}
		if host == "" || strings.ContainsAny(host, "/ ") {
			return errors.New("no host name after dns:")
		}
		return nil
	}
	if _, err := peer.AddrInfoFromString(s); err != nil {
		return fmt.Errorf("not a multiaddr with /p2p/ID (%v)", err)
	}
	return nil
}

func checkPeerID(s string) error {
	if _, err := peer.Decode(s); err != nil {
		return errors.New("not a peer ID")
	}
	return nil
}
