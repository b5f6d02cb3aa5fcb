// Package api is the admin HTTP API of a hoard daemon: its wire types, the
// handler over a Service (which *node.Node implements), and the Go Client
// the CLI uses. It knows nothing of how a node works.
package api

import (
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/pprof"
	"strings"
	"time"

	"github.com/hoardvm/hoard/chunkstore"
	"github.com/hoardvm/hoard/node/hoarder"
	"github.com/hoardvm/hoard/node/importer"
	"github.com/hoardvm/hoard/node/origin"
	"github.com/hoardvm/hoard/p2p"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Service is what the API serves: a daemon (node.Node) implements it.
type Service interface {
	// Ready is closed once the store is open and NBD listens.
	Ready() <-chan struct{}
	Status(ctx context.Context) (Status, error)
	Images(ctx context.Context) ([]ImageInfo, error)
	Image(ctx context.Context, name string, entries bool) (ImageDetail, error)
	// AddImage imports an image; progress gets the bytes read and the size.
	AddImage(ctx context.Context, req ImportRequest, progress func(done, total int64)) (*importer.Result, error)
	// RemoveImage removes an image, with cluster from every node; an image
	// in use is an error wrapping ErrInUse.
	RemoveImage(ctx context.Context, name string, cluster bool) (RemoveResult, error)
	Profile(ctx context.Context, name string) (ProfileInfo, error)
	// Peers lists the cluster's peers; an error wrapping ErrClusterOff when
	// the node is standalone.
	Peers(ctx context.Context) ([]p2p.PeerInfo, error)
	// Pull registers an image another node has.
	Pull(ctx context.Context, name string) (ImageInfo, error)
	// Prefetch fetches an image's working set (with full, all of it) now
	// and pins it, with cluster on every node; progress gets the bytes done
	// and to do here.
	Prefetch(ctx context.Context, name string, full, cluster bool, progress func(done, total int64)) (hoarder.PrefetchResult, error)
	StoreStats(ctx context.Context) (chunkstore.Stats, error)
	StoreVerify(ctx context.Context, progress func(done, total int64)) (chunkstore.VerifyResult, error)
	StoreGC(ctx context.Context) (chunkstore.GCResult, error)
	// Place ranks hosts (every live node of the cluster, or the named ones)
	// for booting image (a name, manifest CID or Glance image ID), from
	// what the node already knows: it never waits for a peer.
	Place(ctx context.Context, image string, hosts []string) (Placement, error)
}

// Options configure Handler.
type Options struct {
	// Token returns the API token; "" refuses every private route.
	Token func() string
	// TokenHint tells a client without the right token where to find it.
	TokenHint func() string
	// Gatherer serves /metrics; nil: prometheus.DefaultGatherer.
	Gatherer prometheus.Gatherer
	// ProgressInterval is how often streamed answers report progress;
	// 0: DefaultProgressInterval.
	ProgressInterval time.Duration
}

// Handler is the admin API over svc. Every route but the public ones
// (/healthz, /readyz, /metrics) needs the API token.
func Handler(svc Service, o Options) http.Handler {
	mux := http.NewServeMux()
	public := http.NewServeMux()
	for _, rt := range routes(svc, o) {
		mux.HandleFunc(rt.pattern, rt.h)
		if publicRoutes[rt.pattern] {
			public.HandleFunc(rt.pattern, rt.h)
		}
	}
	return auth(public, mux, o)
}

// Patterns lists every route ("METHOD /path"), for documentation checks.
func Patterns() []string {
	var out []string
	for _, rt := range routes(nil, Options{}) {
		out = append(out, rt.pattern)
	}
	return out
}

// Public reports whether pattern is served without the API token.
func Public(pattern string) bool { return publicRoutes[pattern] }

// routes lists every admin API endpoint.
func routes(svc Service, o Options) []route {
	g := o.Gatherer
	if g == nil {
		g = prometheus.DefaultGatherer
	}
	metrics := promhttp.HandlerFor(g, promhttp.HandlerOpts{})
	every := o.ProgressInterval
	if every <= 0 {
		every = DefaultProgressInterval
	}
	return []route{
		{"GET /healthz", func(w http.ResponseWriter, r *http.Request) {
			w.Write([]byte("ok\n"))
		}},
		{"GET /readyz", func(w http.ResponseWriter, r *http.Request) {
			select {
			case <-svc.Ready():
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
			s, err := svc.Status(r.Context())
			reply(w, s, err)
		}},
		{"GET /v1/images", func(w http.ResponseWriter, r *http.Request) {
			l, err := svc.Images(r.Context())
			reply(w, l, err)
		}},
		{"POST /v1/images", long(func(w http.ResponseWriter, r *http.Request) {
			var req ImportRequest
			body := http.MaxBytesReader(w, r.Body, 1<<20)
			if err := json.NewDecoder(body).Decode(&req); err != nil {
				ReplyError(w, http.StatusBadRequest, fmt.Errorf("bad request body: %w", err))
				return
			}
			// Read the body to its end: only then does the server watch the
			// connection and cancel the import when the client goes away.
			io.Copy(io.Discard, body)
			answer(w, r, every, "import", "bytes", func(ctx context.Context, report func(done, total int64)) (any, error) {
				return svc.AddImage(ctx, req, report)
			})
		})},
		{"GET /v1/images/{name}", func(w http.ResponseWriter, r *http.Request) {
			d, err := svc.Image(r.Context(), r.PathValue("name"), r.URL.Query().Get("entries") != "")
			reply(w, d, err)
		}},
		{"DELETE /v1/images/{name}", func(w http.ResponseWriter, r *http.Request) {
			res, err := svc.RemoveImage(r.Context(), r.PathValue("name"), r.URL.Query().Get("cluster") != "")
			reply(w, res, err)
		}},
		{"GET /v1/images/{name}/profile", func(w http.ResponseWriter, r *http.Request) {
			p, err := svc.Profile(r.Context(), r.PathValue("name"))
			reply(w, p, err)
		}},
		{"GET /v1/place", func(w http.ResponseWriter, r *http.Request) {
			q := r.URL.Query()
			img := q.Get("image")
			if img == "" {
				ReplyError(w, http.StatusBadRequest, fmt.Errorf("%w: GET /v1/place needs ?image=NAME (a name, manifest CID or Glance image ID)", ErrInvalid))
				return
			}
			var hosts []string
			for _, v := range q["hosts"] {
				for _, h := range strings.Split(v, ",") {
					if h = strings.TrimSpace(h); h != "" {
						hosts = append(hosts, h)
					}
				}
			}
			p, err := svc.Place(r.Context(), img, hosts)
			reply(w, p, err)
		}},
		{"GET /v1/peers", func(w http.ResponseWriter, r *http.Request) {
			l, err := svc.Peers(r.Context())
			reply(w, l, err)
		}},
		{"POST /v1/images/{name}/pull", long(func(w http.ResponseWriter, r *http.Request) {
			answer(w, r, every, "pull", "", func(ctx context.Context, _ func(done, total int64)) (any, error) {
				return svc.Pull(ctx, r.PathValue("name"))
			})
		})},
		{"POST /v1/images/{name}/prefetch", long(func(w http.ResponseWriter, r *http.Request) {
			full, cluster := r.URL.Query().Get("full") != "", r.URL.Query().Get("cluster") != ""
			answer(w, r, every, "prefetch", "bytes", func(ctx context.Context, report func(done, total int64)) (any, error) {
				return svc.Prefetch(ctx, r.PathValue("name"), full, cluster, report)
			})
		})},
		// The chunk store's endpoints, so that hoard store ... works while
		// the daemon holds the store.
		{"GET /v1/store/stats", func(w http.ResponseWriter, r *http.Request) {
			s, err := svc.StoreStats(r.Context())
			reply(w, s, err)
		}},
		{"POST /v1/store/verify", long(func(w http.ResponseWriter, r *http.Request) {
			answer(w, r, every, "verify", "chunks", func(ctx context.Context, report func(done, total int64)) (any, error) {
				return svc.StoreVerify(ctx, report)
			})
		})},
		{"POST /v1/store/gc", long(func(w http.ResponseWriter, r *http.Request) {
			answer(w, r, every, "gc", "", func(ctx context.Context, _ func(done, total int64)) (any, error) {
				return svc.StoreGC(ctx)
			})
		})},
	}
}

// auth serves public's routes to anyone and the rest only to requests that
// carry the API token.
func auth(public *http.ServeMux, private http.Handler, o Options) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if _, pattern := public.Handler(r); pattern != "" {
			public.ServeHTTP(w, r)
			return
		}
		tok := ""
		if o.Token != nil {
			tok = o.Token()
		}
		got, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		if tok == "" || !ok || subtle.ConstantTimeCompare([]byte(got), []byte(tok)) != 1 {
			hint := "missing or wrong API token; set HOARD_API_TOKEN (config api.token) to the daemon's api.token"
			if o.TokenHint != nil {
				hint = o.TokenHint()
			}
			w.Header().Set("WWW-Authenticate", `Bearer realm="hoard"`)
			ReplyError(w, http.StatusUnauthorized, errors.New(hint))
			return
		}
		private.ServeHTTP(w, r)
	})
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

// StatusOf is the HTTP status that answers err.
func StatusOf(err error) int {
	switch {
	case errors.Is(err, chunkstore.ErrNotFound):
		return http.StatusNotFound
	case errors.Is(err, origin.ErrForbidden):
		return http.StatusForbidden
	case errors.Is(err, chunkstore.ErrExists), errors.Is(err, ErrInUse), errors.Is(err, ErrClusterOff):
		return http.StatusConflict
	case errors.Is(err, origin.ErrNoRanges), errors.Is(err, origin.ErrInvalid), errors.Is(err, chunkstore.ErrInvalid), errors.Is(err, ErrInvalid):
		return http.StatusBadRequest
	}
	return http.StatusInternalServerError
}

func reply(w http.ResponseWriter, v any, err error) {
	if err != nil {
		ReplyError(w, StatusOf(err), err)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

// ReplyError answers with code and err as the JSON error body.
func ReplyError(w http.ResponseWriter, code int, err error) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(errorBody{Error: err.Error()})
}
