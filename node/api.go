package node

import (
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/pprof"
	"sort"
	"strings"
	"time"

	"github.com/hoardvm/hoard/chunkstore"
	"github.com/hoardvm/hoard/node/hot"
	"github.com/hoardvm/hoard/node/origin"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Status is the answer of GET /v1/status.
type Status struct {
	DataDir   string           `json:"data_dir"`
	NBDSocket string           `json:"nbd_socket,omitempty"`
	NBDListen string           `json:"nbd_listen,omitempty"`
	Store     chunkstore.Usage `json:"store"`
	Quota     int64            `json:"store_quota"`
	Images    int              `json:"images"`
	Counters  Counters         `json:"counters"`
	Hot       hot.Stats        `json:"hot_cache"`
	Exports   []ExportStatus   `json:"exports"`
	// Cluster is this node's p2p identity; nil when the cluster is off.
	Cluster *ClusterStatus `json:"cluster,omitempty"`
}

// ClusterStatus is a node's p2p identity and neighbourhood.
type ClusterStatus struct {
	PeerID         string   `json:"peer_id"`
	Addrs          []string `json:"addrs"` // full dialable multiaddrs, ending in /p2p/ID
	Peers          int      `json:"peers"` // known peers (connected or in the routing table)
	ConnectedPeers int      `json:"connected_peers"`
	Provided       int      `json:"provided_keys"`
}

// clusterStatus describes the cluster side of the node, nil when off.
func (n *Node) clusterStatus() *ClusterStatus {
	if n.cl == nil {
		return nil
	}
	p := n.cl.p
	cs := &ClusterStatus{PeerID: p.ID().String(), Addrs: []string{}, Provided: p.Provided()}
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

// ExportStatus is an image with open exports.
type ExportStatus struct {
	Manifest chunkstore.ID `json:"manifest"`
	Names    []string      `json:"names"`
	Open     int           `json:"open"`
}

// Status reports the node's state.
func (n *Node) Status(r *http.Request) (Status, error) {
	ctx := r.Context()
	s := Status{DataDir: n.cfg.DataDir, NBDSocket: n.NBDSocket(), Store: n.store.Usage(), Quota: n.cfg.StoreQuota,
		Counters: n.stats.snapshot(), Hot: n.hotStats(), Exports: []ExportStatus{}}
	if n.nbdAddr != nil {
		s.NBDListen = n.nbdAddr.String()
	}
	s.Cluster = n.clusterStatus()
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
		es := ExportStatus{Manifest: img.id, Open: open, Names: []string{}}
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

// apiError is the JSON body of every API error.
type apiError struct {
	Error string `json:"error"`
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
		ErrorLog:          slog.NewLogLogger(n.log.With("component", "api").Handler(), slog.LevelDebug),
	}
}

// long lifts the server's read and write deadlines for a route that may run
// for minutes. (A read deadline that passes while the handler runs would
// cancel its context.)
func long(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		rc := http.NewResponseController(w)
		rc.SetReadDeadline(time.Time{})
		rc.SetWriteDeadline(time.Time{})
		h(w, r)
	}
}

// route is one admin API endpoint.
type route struct {
	pattern string // http.ServeMux pattern: "METHOD /path"
	h       http.HandlerFunc
}

// publicRoutes need no API token: liveness, readiness and metrics, which
// reveal nothing an unprivileged local user could abuse.
var publicRoutes = map[string]bool{"GET /healthz": true, "GET /readyz": true, "GET /metrics": true}

// Handler is the admin API. Every route but publicRoutes needs the API token
// (Config.APIToken, or the one Run keeps in DataDir/api.token).
func (n *Node) Handler() http.Handler {
	mux := http.NewServeMux()
	public := http.NewServeMux()
	for _, rt := range n.routes() {
		mux.HandleFunc(rt.pattern, rt.h)
		if publicRoutes[rt.pattern] {
			public.HandleFunc(rt.pattern, rt.h)
		}
	}
	return n.auth(public, mux)
}

// routes lists every admin API endpoint.
func (n *Node) routes() []route {
	metrics := promhttp.HandlerFor(n.gatherer, promhttp.HandlerOpts{})
	rs := []route{
		{"GET /healthz", func(w http.ResponseWriter, r *http.Request) {
			w.Write([]byte("ok\n"))
		}},
		{"GET /readyz", func(w http.ResponseWriter, r *http.Request) {
			select {
			case <-n.ready:
				w.Write([]byte("ready\n"))
			default:
				http.Error(w, "starting", http.StatusServiceUnavailable)
			}
		}},
		{"GET /metrics", metrics.ServeHTTP},
		// Go profiles, for performance work (token needed, like the rest):
		// curl -H "Authorization: Bearer $(cat DATA/api.token)" http://API/debug/pprof/profile > cpu.pprof
		{"GET /debug/pprof/", pprof.Index},
		{"GET /debug/pprof/profile", long(pprof.Profile)},
		{"GET /debug/pprof/trace", long(pprof.Trace)},
		{"GET /v1/status", func(w http.ResponseWriter, r *http.Request) {
			s, err := n.Status(r)
			reply(w, s, err)
		}},
		{"GET /v1/images", func(w http.ResponseWriter, r *http.Request) {
			l, err := n.Images(r.Context())
			reply(w, l, err)
		}},
		{"POST /v1/images", long(func(w http.ResponseWriter, r *http.Request) {
			var req ImportRequest
			body := http.MaxBytesReader(w, r.Body, 1<<20)
			if err := json.NewDecoder(body).Decode(&req); err != nil {
				replyError(w, http.StatusBadRequest, fmt.Errorf("bad request body: %w", err))
				return
			}
			// Read the body to its end: only then does the server watch the
			// connection and cancel the import when the client goes away.
			io.Copy(io.Discard, body)
			answer(w, r, "import", "bytes", func(ctx context.Context, report func(done, total int64)) (any, error) {
				return n.AddImageProgress(ctx, req, report)
			})
		})},
		{"GET /v1/images/{name}", func(w http.ResponseWriter, r *http.Request) {
			ctx := r.Context()
			name := r.PathValue("name")
			id, err := n.store.Resolve(ctx, name)
			if err != nil {
				reply(w, nil, err)
				return
			}
			info, m, err := DescribeImage(ctx, n.store, chunkstore.Named{Name: name, Manifest: id})
			if err != nil {
				reply(w, nil, err)
				return
			}
			info.OpenExports = n.openExports(id)
			out := ImageDetail{ImageInfo: info, Chunking: m.Chunking, Checksum: m.Source.Checksum}
			if r.URL.Query().Get("entries") != "" {
				out.Entries = m.Entries
			}
			reply(w, out, nil)
		}},
		{"DELETE /v1/images/{name}", func(w http.ResponseWriter, r *http.Request) {
			res, err := n.RemoveImage(r.Context(), r.PathValue("name"))
			reply(w, res, err)
		}},
		{"GET /v1/images/{name}/profile", func(w http.ResponseWriter, r *http.Request) {
			p, err := n.Profile(r.Context(), r.PathValue("name"))
			reply(w, p, err)
		}},
		{"GET /v1/peers", func(w http.ResponseWriter, r *http.Request) {
			if n.cl == nil {
				replyError(w, http.StatusConflict, errors.New("the cluster is off on this node (no swarm key); create one with hoard cluster keygen"))
				return
			}
			reply(w, n.cl.p.Peers(), nil)
		}},
		{"POST /v1/images/{name}/pull", long(func(w http.ResponseWriter, r *http.Request) {
			answer(w, r, "pull", "", func(ctx context.Context, _ func(done, total int64)) (any, error) {
				return n.Pull(ctx, r.PathValue("name"))
			})
		})},
	}
	return append(rs, n.storeRoutes()...)
}

// ImageDetail is the answer of GET /v1/images/{name}.
type ImageDetail struct {
	ImageInfo
	Chunking chunkstore.Chunking `json:"chunking"`
	Checksum string              `json:"source_checksum,omitempty"`
	Entries  []chunkstore.Entry  `json:"entries,omitempty"`
}

// auth serves public's routes to anyone and the rest only to requests that
// carry the API token. The token is the node's (APIToken) once Run set it;
// with none (a Handler used before Run), every private route is refused.
func (n *Node) auth(public *http.ServeMux, private http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if _, pattern := public.Handler(r); pattern != "" {
			public.ServeHTTP(w, r)
			return
		}
		tok := n.APIToken()
		got, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		if tok == "" || !ok || subtle.ConstantTimeCompare([]byte(got), []byte(tok)) != 1 {
			w.Header().Set("WWW-Authenticate", `Bearer realm="hoard"`)
			replyError(w, http.StatusUnauthorized, errors.New(n.tokenHint()))
			return
		}
		private.ServeHTTP(w, r)
	})
}

// tokenHint tells a client without the right token where to find it.
func (n *Node) tokenHint() string {
	if n.cfg.apiTokenFile == "" {
		return "missing or wrong API token; set HOARD_API_TOKEN (config api.token) to the daemon's api.token"
	}
	return fmt.Sprintf("missing or wrong API token; the token is in %s, readable only by the daemon's user "+
		"(run the command as that user, e.g. with sudo, or set HOARD_API_TOKEN to its content)", n.APITokenFile())
}

// errStatus is the HTTP status that answers err.
func errStatus(err error) int {
	switch {
	case errors.Is(err, chunkstore.ErrNotFound):
		return http.StatusNotFound
	case errors.Is(err, origin.ErrForbidden):
		return http.StatusForbidden
	case errors.Is(err, chunkstore.ErrExists), errors.Is(err, ErrInUse):
		return http.StatusConflict
	case errors.Is(err, origin.ErrNoRanges), errors.Is(err, origin.ErrInvalid), errors.Is(err, chunkstore.ErrInvalid), errors.Is(err, ErrInvalid):
		return http.StatusBadRequest
	}
	return http.StatusInternalServerError
}

func reply(w http.ResponseWriter, v any, err error) {
	if err != nil {
		replyError(w, errStatus(err), err)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

func replyError(w http.ResponseWriter, code int, err error) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(apiError{Error: err.Error()})
}
