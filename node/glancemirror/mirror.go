package glancemirror

import (
	"context"
	"crypto/md5"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// ErrUnknown is what Images.Open wraps when no node of the cluster holds the
// image yet: the mirror then registers it (Images.Register).
var ErrUnknown = errors.New("image not registered in hoard")

// Meta is what Glance's image record (GET /v2/images/{id}) says of an image,
// as far as the mirror needs it.
type Meta struct {
	ID          string `json:"id"`
	Status      string `json:"status"`
	Size        *int64 `json:"size"`
	Checksum    string `json:"checksum"` // md5, hex
	OSHashAlgo  string `json:"os_hash_algo"`
	OSHashValue string `json:"os_hash_value"`
	DiskFormat  string `json:"disk_format"`
}

// Image is a registered image's original bytes (what Glance stores: a qcow2
// stays a qcow2 file).
type Image interface {
	// Size is the image's size in bytes.
	Size() int64
	// ReadAt fills all of p from off; [off, off+len(p)) lies within Size.
	// Safe for concurrent use; the bytes are verified by the read path.
	ReadAt(ctx context.Context, p []byte, off int64) error
	// Close releases the image; no ReadAt may follow.
	Close() error
}

// Images is what the mirror needs of the node.
type Images interface {
	// Open returns the image Glance knows as meta.ID, this node's or one a
	// peer holds, or an error wrapping ErrUnknown when no node has it. It
	// must not return an image whose bytes are not Glance's original bytes
	// (another size or checksum).
	Open(ctx context.Context, meta Meta) (Image, error)
	// Register registers an image no node knows yet: it streams it from
	// Glance once, with hoard's own credentials, into the store and returns
	// the same bytes as they arrive. The reader returns io.EOF only once the
	// size and checksum were verified (and the image registered); any other
	// error means the bytes already read must not be trusted. Closing the
	// reader early does not stop the registration. An implementation may
	// instead wait for another node's registration and stream its result.
	Register(ctx context.Context, meta Meta) (io.ReadCloser, error)
}

// Verifying is an optional interface of the reader Images.Register returns:
// Verifies reports that the reader itself fails (rather than return io.EOF)
// unless the bytes matched a checksum of the Glance record the download was
// authorized with (its md5 or os_hash), so the mirror need not hash them
// again.
type Verifying interface {
	Verifies() bool
}

// Config configures a Handler.
type Config struct {
	// GlanceURL is the real Glance endpoint, e.g. http://controller:9292
	// (origin.glance.url). Required.
	GlanceURL string
	// Images serves the bytes. Required.
	Images Images
	// Client sends the requests to Glance; default: a client with a 30s
	// response header timeout.
	Client *http.Client
	// AuthTimeout bounds the authorization request to Glance. Default 30s.
	AuthTimeout time.Duration
	// WriteTimeout bounds the write of each block (1 MiB) of a download to
	// its client: a client that takes longer has its download cut.
	// Default DefaultWriteTimeout.
	WriteTimeout time.Duration
	// MaxDownloads bounds the downloads served at once; beyond it a
	// download is answered 503 with Retry-After. Default
	// DefaultMaxDownloads.
	MaxDownloads int
	// Log, default slog.Default().
	Log *slog.Logger
	// Registerer, if set, gets the mirror's metrics
	// (hoard_glance_mirror_requests_total, hoard_glance_mirror_authorize_seconds).
	Registerer prometheus.Registerer
}

// DefaultWriteTimeout is the default of Config.WriteTimeout.
const DefaultWriteTimeout = time.Minute

// DefaultMaxDownloads is the default of Config.MaxDownloads.
const DefaultMaxDownloads = 64

// retryAfter is the Retry-After (seconds) of a download refused for the
// MaxDownloads bound.
const retryAfter = "5"

// Handler is the mirror's http.Handler.
type Handler struct {
	base    string
	images  Images
	client  *http.Client
	authTO  time.Duration
	writeTO time.Duration
	slots   chan struct{} // one per download under way
	log     *slog.Logger
	m       *metrics
}

// New returns the mirror's handler for c.
func New(c Config) (*Handler, error) {
	base := strings.TrimSuffix(strings.TrimRight(c.GlanceURL, "/"), "/v2")
	u, err := url.Parse(base)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("glance mirror: Glance endpoint %q is not an http(s) URL; set origin.glance.url, e.g. http://controller:9292", c.GlanceURL)
	}
	if c.Images == nil {
		return nil, errors.New("glance mirror: no Images")
	}
	m, err := newMetrics(c.Registerer)
	if err != nil {
		return nil, fmt.Errorf("glance mirror: register metrics: %w", err)
	}
	h := &Handler{base: base, images: c.Images, client: c.Client, authTO: c.AuthTimeout, writeTO: c.WriteTimeout, log: c.Log, m: m}
	if h.client == nil {
		tr := http.DefaultTransport.(*http.Transport).Clone()
		tr.ResponseHeaderTimeout = 30 * time.Second
		h.client = &http.Client{Transport: tr}
	}
	if h.authTO <= 0 {
		h.authTO = 30 * time.Second
	}
	if h.writeTO <= 0 {
		h.writeTO = DefaultWriteTimeout
	}
	if c.MaxDownloads <= 0 {
		c.MaxDownloads = DefaultMaxDownloads
	}
	h.slots = make(chan struct{}, c.MaxDownloads)
	if h.log == nil {
		h.log = slog.Default()
	}
	return h, nil
}

// ServeHTTP implements http.Handler.
func (h *Handler) ServeHTTP(rw http.ResponseWriter, r *http.Request) {
	w := &statusWriter{ResponseWriter: rw}
	kind := "proxy"
	if _, ok := fileID(r.URL.Path); ok && r.Method == http.MethodGet {
		kind = "download"
	}
	defer h.m.count(kind, w)
	h.serveHTTP(w, r)
}

func (h *Handler) serveHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		http.Error(w, "the hoard Glance mirror is read-only: send "+r.Method+" requests to Glance itself", http.StatusMethodNotAllowed)
		return
	}
	if id, ok := fileID(r.URL.Path); ok {
		if r.Method == http.MethodHead {
			h.proxy(w, r) // Glance answers HEAD .../file itself (405)
			return
		}
		h.download(w, r, id)
		return
	}
	h.proxy(w, r)
}

// fileID returns the image id of a download path /v2/images/{id}/file.
func fileID(p string) (string, bool) {
	rest, ok := strings.CutPrefix(p, "/v2/images/")
	if !ok {
		return "", false
	}
	id, ok := strings.CutSuffix(rest, "/file")
	if !ok || id == "" || strings.Contains(id, "/") {
		return "", false
	}
	return id, true
}

// forwardHeaders are the caller's headers sent on to Glance: all but the
// hop-by-hop ones and those about the body or the range.
func forwardHeaders(in http.Header) http.Header {
	out := in.Clone()
	for _, k := range []string{"Connection", "Keep-Alive", "Proxy-Connection", "Te", "Trailer", "Transfer-Encoding", "Upgrade",
		"Range", "If-Range", "If-Match", "If-None-Match", "If-Modified-Since", "If-Unmodified-Since",
		"Content-Length", "Accept-Encoding", "Host"} {
		out.Del(k)
	}
	return out
}

// proxy passes r to Glance with the caller's headers and copies the answer.
func (h *Handler) proxy(w http.ResponseWriter, r *http.Request) {
	req, err := http.NewRequestWithContext(r.Context(), r.Method, h.base+r.URL.RequestURI(), nil)
	if err != nil {
		http.Error(w, "bad request: "+err.Error(), http.StatusBadRequest)
		return
	}
	req.Header = forwardHeaders(r.Header)
	if v := r.Header.Get("Range"); v != "" {
		req.Header.Set("Range", v)
	}
	resp, err := h.client.Do(req)
	if err != nil {
		h.unreachable(w, r, err)
		return
	}
	defer resp.Body.Close()
	copyHeaders(w.Header(), resp.Header)
	w.WriteHeader(resp.StatusCode)
	if r.Method != http.MethodHead {
		_, _ = io.Copy(w, resp.Body)
	}
}

func copyHeaders(dst, src http.Header) {
	for k, vs := range src {
		switch http.CanonicalHeaderKey(k) {
		case "Connection", "Keep-Alive", "Transfer-Encoding", "Trailer", "Upgrade":
			continue
		}
		dst[k] = append([]string(nil), vs...)
	}
}

func (h *Handler) unreachable(w http.ResponseWriter, r *http.Request, err error) {
	h.log.Warn("glance mirror: cannot reach Glance; nothing is served", "path", r.URL.Path, "err", err)
	http.Error(w, fmt.Sprintf("hoard Glance mirror: cannot reach Glance at %s (%v); the mirror serves nothing Glance has not authorized: check that Glance is up and origin.glance.url", h.base, err), http.StatusBadGateway)
}

// authorize asks Glance, with the caller's headers, for the image record
// (Glance's get_image policy) and, for an image with data, for its first
// byte (GET .../file with Range: bytes=0-0: Glance's download_image policy,
// which can be stricter). It returns the record when Glance allowed both;
// otherwise it has answered w itself (Glance's refusal as Glance sent it).
func (h *Handler) authorize(w http.ResponseWriter, r *http.Request, id string) (Meta, bool) {
	ctx, cancel := context.WithTimeout(r.Context(), h.authTO)
	defer cancel()
	start := time.Now()
	path := "/v2/images/" + url.PathEscape(id)
	status, body, ok := h.ask(ctx, w, r, id, path, "", http.StatusOK)
	if !ok {
		h.m.authorized(status, start)
		return Meta{}, false
	}
	var m Meta
	if err := json.Unmarshal(body, &m); err != nil || m.ID == "" {
		h.m.authorized("unreachable", start)
		http.Error(w, fmt.Sprintf("hoard Glance mirror: Glance's answer to GET /v2/images/%s is not an image record (%v); check origin.glance.url", id, err), http.StatusBadGateway)
		return Meta{}, false
	}
	if m.ID != id {
		h.m.authorized("unreachable", start)
		http.Error(w, fmt.Sprintf("hoard Glance mirror: Glance answered GET /v2/images/%s with image %s", id, m.ID), http.StatusBadGateway)
		return Meta{}, false
	}
	if m.Status == "active" && m.Size != nil && *m.Size > 0 {
		if status, _, ok := h.ask(ctx, w, r, id, path+"/file", "bytes=0-0", http.StatusOK, http.StatusPartialContent); !ok {
			h.m.authorized(status, start)
			return Meta{}, false
		}
	}
	h.m.authorized("allowed", start)
	return m, true
}

// ask sends GET path to Glance with the caller's headers (and range rng,
// if set). On one of the statuses in want it returns the body's first bytes
// (at most 4 MiB; the rest is discarded); otherwise it has answered w and
// returns the authorization result to count ("refused", "unreachable").
func (h *Handler) ask(ctx context.Context, w http.ResponseWriter, r *http.Request, id, path, rng string, want ...int) (string, []byte, bool) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, h.base+path, nil)
	if err != nil {
		http.Error(w, "bad image id: "+err.Error(), http.StatusBadRequest)
		return "refused", nil, false
	}
	req.Header = forwardHeaders(r.Header)
	if rng != "" {
		req.Header.Set("Range", rng)
	} else {
		req.Header.Set("Accept", "application/json")
	}
	what := "GET " + path
	if rng != "" {
		what += " (Range: " + rng + ")"
	}
	resp, err := h.client.Do(req)
	if err != nil {
		h.unreachable(w, r, err)
		return "unreachable", nil, false
	}
	defer resp.Body.Close()
	limit := int64(4 << 20)
	if rng != "" && (resp.StatusCode == http.StatusOK || resp.StatusCode == http.StatusPartialContent) {
		limit = 64 << 10 // the image's first bytes, discarded: the mirror serves its own
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, limit))
	if err != nil {
		h.unreachable(w, r, err)
		return "unreachable", nil, false
	}
	for _, c := range want {
		if resp.StatusCode == c {
			return "allowed", body, true
		}
	}
	if resp.StatusCode >= 500 {
		h.log.Warn("glance mirror: Glance failed the authorization request; nothing is served", "glance_image", id, "request", what, "status", resp.StatusCode)
		http.Error(w, fmt.Sprintf("hoard Glance mirror: Glance answered %s to %s, so the download cannot be authorized and nothing is served; try again when Glance is healthy: %s",
			resp.Status, what, strings.TrimSpace(string(body))), http.StatusServiceUnavailable)
		return "unreachable", nil, false
	}
	if rng != "" && resp.StatusCode < 400 {
		// Not a refusal, yet no data (a 204, a redirect): serve nothing.
		http.Error(w, fmt.Sprintf("hoard Glance mirror: Glance answered %s to %s, not the image's first byte, so the download is not authorized; download the image from Glance itself", resp.Status, what), http.StatusBadGateway)
		return "refused", nil, false
	}
	// Glance's refusal, as Glance sent it.
	copyHeaders(w.Header(), resp.Header)
	w.Header().Del("Content-Length")
	w.WriteHeader(resp.StatusCode)
	_, _ = w.Write(body)
	return "refused", nil, false
}

// download serves GET /v2/images/{id}/file.
func (h *Handler) download(w http.ResponseWriter, r *http.Request, id string) {
	select {
	case h.slots <- struct{}{}:
		defer func() { <-h.slots }()
	default:
		h.log.Warn("glance mirror: too many downloads under way; refusing one", "glance_image", id, "max_downloads", cap(h.slots))
		w.Header().Set("Retry-After", retryAfter)
		http.Error(w, fmt.Sprintf("hoard Glance mirror: this node serves %d downloads at once, all under way; retry in %s seconds, or download from another hoard node or from Glance itself",
			cap(h.slots), retryAfter), http.StatusServiceUnavailable)
		return
	}
	meta, ok := h.authorize(w, r, id)
	if !ok {
		return
	}
	if meta.Status != "active" || meta.Size == nil {
		// No data yet (queued, importing), or none any more: Glance says
		// what it says for such an image (204, 403, ...).
		h.proxy(w, r)
		return
	}
	size := *meta.Size
	lo, hi, partial, err := parseRange(r.Header.Get("Range"), size)
	if err != nil {
		w.Header().Set("Content-Range", fmt.Sprintf("bytes */%d", size))
		http.Error(w, err.Error(), http.StatusRequestedRangeNotSatisfiable)
		return
	}
	log := h.log.With("glance_image", id)
	img, err := h.images.Open(r.Context(), meta)
	if errors.Is(err, ErrUnknown) {
		rc, rerr := h.images.Register(r.Context(), meta)
		if rerr != nil {
			log.Warn("glance mirror: cannot register the image", "err", rerr)
			http.Error(w, fmt.Sprintf("hoard Glance mirror: cannot register image %s: %v", id, rerr), http.StatusBadGateway)
			return
		}
		defer rc.Close()
		if !partial {
			log.Info("glance mirror: registering the image while serving it", "size", size)
			vr, ok := rc.(Verifying)
			h.serve(w, meta, rc, !ok || !vr.Verifies(), log)
			return
		}
		// A range of an image being registered: wait until it is verified.
		if _, err := io.Copy(io.Discard, rc); err != nil {
			log.Warn("glance mirror: registration failed", "err", err)
			http.Error(w, fmt.Sprintf("hoard Glance mirror: registering image %s failed: %v", id, err), http.StatusBadGateway)
			return
		}
		img, err = h.images.Open(r.Context(), meta)
	}
	if err != nil {
		log.Warn("glance mirror: cannot open the image", "err", err)
		http.Error(w, fmt.Sprintf("hoard Glance mirror: image %s: %v", id, err), http.StatusBadGateway)
		return
	}
	defer img.Close()
	if img.Size() != size {
		log.Error("glance mirror: hoard's copy has another size than Glance's image; not served", "size", img.Size(), "glance_size", size)
		http.Error(w, fmt.Sprintf("hoard Glance mirror: hoard's copy of image %s is %d bytes, Glance says %d; remove it (hoard image rm %s) and download again", id, img.Size(), size, id), http.StatusBadGateway)
		return
	}
	if !partial {
		ar := newAheadReader(r.Context(), img, 0, size, ReadAhead)
		defer ar.Close()
		h.serve(w, meta, ar, true, log)
		return
	}
	setHeaders(w, meta, hi-lo)
	w.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", lo, hi-1, size))
	w.WriteHeader(http.StatusPartialContent)
	ar := newAheadReader(r.Context(), img, lo, hi, ReadAhead)
	defer ar.Close()
	buf := make([]byte, blockSize)
	rc := http.NewResponseController(w)
	for off := lo; off < hi; {
		n, err := io.ReadFull(ar, buf[:min(int64(len(buf)), hi-off)])
		if err != nil {
			log.Warn("glance mirror: read failed; aborting the response", "offset", off, "err", err)
			panic(http.ErrAbortHandler)
		}
		if err := h.writeBlock(rc, w, buf[:n]); err != nil {
			log.Info("glance mirror: the client does not take the range; giving up on it", "offset", off, "err", err)
			return
		}
		off += int64(n)
	}
}

// blockSize is how much the mirror reads and writes at a time.
const blockSize = 1 << 20

// writeBlock writes b to the client within the write timeout.
func (h *Handler) writeBlock(rc *http.ResponseController, w http.ResponseWriter, b []byte) error {
	if err := rc.SetWriteDeadline(time.Now().Add(h.writeTO)); err != nil && !errors.Is(err, http.ErrNotSupported) {
		return err
	}
	_, err := w.Write(b)
	return err
}

func setHeaders(w http.ResponseWriter, meta Meta, length int64) {
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Content-Length", strconv.FormatInt(length, 10))
	if meta.Checksum != "" {
		// Glance sends its md5 checksum in hex (not base64, as RFC 1864 would).
		w.Header().Set("Content-MD5", meta.Checksum)
	}
}

// serve streams the whole image from src, verifying it as it goes: it holds
// back the last block until the size and the checksums matched, and aborts
// the connection otherwise, so the client never gets a complete wrong image.
//
// Unless verify is set, src verifies the checksum itself (Verifying) and
// only the size is checked here.
func (h *Handler) serve(w http.ResponseWriter, meta Meta, src io.Reader, verify bool, log *slog.Logger) {
	size := *meta.Size
	v := &verifier{}
	if verify {
		v = newVerifier(meta, log)
	}
	defer v.stop()
	setHeaders(w, meta, size)
	w.WriteHeader(http.StatusOK)
	var held []byte
	var total int64
	rc := http.NewResponseController(w)
	for {
		// A buffer per block: the hashers read it while the next is read
		// and this one is written.
		buf := make([]byte, blockSize)
		n, err := io.ReadFull(src, buf)
		if n > 0 {
			total += int64(n)
			if total > size {
				log.Error("glance mirror: more bytes than Glance announced; aborting the download", "size", size)
				panic(http.ErrAbortHandler)
			}
			v.write(buf[:n])
			if held != nil {
				if werr := h.writeBlock(rc, w, held); werr != nil {
					// Closing src does not stop a registration behind it
					// (Images.Register).
					log.Info("glance mirror: the client does not take the download; giving up on it", "offset", total, "err", werr)
					return
				}
			}
			held = buf[:n]
		}
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			break
		}
		if err != nil {
			log.Warn("glance mirror: reading the image failed; aborting the download", "offset", total, "err", err)
			panic(http.ErrAbortHandler)
		}
	}
	if total != size {
		log.Error("glance mirror: fewer bytes than Glance announced; aborting the download", "got", total, "size", size)
		panic(http.ErrAbortHandler)
	}
	if err := v.check(); err != nil {
		log.Error("glance mirror: the bytes do not match Glance's checksum; aborting the download", "err", err)
		panic(http.ErrAbortHandler)
	}
	if held != nil {
		_ = h.writeBlock(rc, w, held)
	}
}

// verifier hashes what is served with Glance's md5 and its os_hash, each
// hash in a goroutine of its own, so that hashing overlaps reading and
// writing the download.
type verifier struct {
	md5     *asyncHash
	wantMD5 string
	os      *asyncHash
	osAlgo  string
	wantOS  string
	once    sync.Once
}

// asyncHash hashes the blocks sent to it, in order.
type asyncHash struct {
	h    hash.Hash
	in   chan []byte
	done chan struct{}
}

func newAsyncHash(h hash.Hash) *asyncHash {
	a := &asyncHash{h: h, in: make(chan []byte, 4), done: make(chan struct{})}
	go func() {
		defer close(a.done)
		for b := range a.in {
			a.h.Write(b)
		}
	}()
	return a
}

func newVerifier(meta Meta, log *slog.Logger) *verifier {
	v := &verifier{}
	if meta.Checksum != "" {
		v.md5, v.wantMD5 = newAsyncHash(md5.New()), strings.ToLower(meta.Checksum)
	}
	if meta.OSHashValue != "" {
		var h hash.Hash
		switch strings.ToLower(meta.OSHashAlgo) {
		case "sha512":
			h = sha512.New()
		case "sha256":
			h = sha256.New()
		default:
			log.Warn("glance mirror: Glance announces an os_hash hoard cannot verify; checking the md5 only", "os_hash_algo", meta.OSHashAlgo)
		}
		if h != nil {
			v.os, v.osAlgo, v.wantOS = newAsyncHash(h), strings.ToLower(meta.OSHashAlgo), strings.ToLower(meta.OSHashValue)
		}
	}
	return v
}

// write hashes b, which must not change afterwards.
func (v *verifier) write(b []byte) {
	for _, a := range []*asyncHash{v.md5, v.os} {
		if a != nil {
			a.in <- b
		}
	}
}

// stop ends the hashers and waits for them.
func (v *verifier) stop() {
	v.once.Do(func() {
		for _, a := range []*asyncHash{v.md5, v.os} {
			if a != nil {
				close(a.in)
				<-a.done
			}
		}
	})
}

func (v *verifier) check() error {
	v.stop()
	if v.md5 != nil {
		if got := hex.EncodeToString(v.md5.h.Sum(nil)); got != v.wantMD5 {
			return fmt.Errorf("md5 %s, Glance's checksum is %s", got, v.wantMD5)
		}
	}
	if v.os != nil {
		if got := hex.EncodeToString(v.os.h.Sum(nil)); got != v.wantOS {
			return fmt.Errorf("%s %s, Glance's os_hash_value is %s", v.osAlgo, got, v.wantOS)
		}
	}
	return nil
}

// parseRange parses a single-range Range header against size: the byte
// range [lo, hi) and whether it is partial. An empty header is the whole
// image; an unsatisfiable or multi-range one is an error (416).
func parseRange(v string, size int64) (lo, hi int64, partial bool, err error) {
	if v == "" {
		return 0, size, false, nil
	}
	spec, ok := strings.CutPrefix(strings.TrimSpace(v), "bytes=")
	if !ok {
		return 0, 0, false, fmt.Errorf("range %q: want bytes=FIRST-LAST", v)
	}
	if strings.Contains(spec, ",") {
		return 0, 0, false, fmt.Errorf("range %q: one range per request", v)
	}
	a, b, ok := strings.Cut(strings.TrimSpace(spec), "-")
	if !ok {
		return 0, 0, false, fmt.Errorf("range %q: want bytes=FIRST-LAST", v)
	}
	if a == "" { // suffix: the last b bytes
		n, err := strconv.ParseInt(b, 10, 64)
		if err != nil || n <= 0 || size == 0 {
			return 0, 0, false, fmt.Errorf("range %q of a %d-byte image is not satisfiable", v, size)
		}
		return max(0, size-n), size, true, nil
	}
	lo, err = strconv.ParseInt(a, 10, 64)
	if err != nil || lo < 0 || lo >= size {
		return 0, 0, false, fmt.Errorf("range %q of a %d-byte image is not satisfiable", v, size)
	}
	hi = size
	if b != "" {
		last, err := strconv.ParseInt(b, 10, 64)
		if err != nil || last < lo {
			return 0, 0, false, fmt.Errorf("range %q of a %d-byte image is not satisfiable", v, size)
		}
		hi = min(size, last+1)
	}
	return lo, hi, true, nil
}
