package origin

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
)

// httpSource reads an image over HTTP(S); Glance image data is served by one too.
type httpSource struct {
	st      *settings
	ref     Ref
	url     string // request URL, without fragment
	name    string // URL for messages, password redacted
	headers http.Header
	client  *http.Client // nil: st.client
	size    int64
	ranges  bool   // the server honours Range requests
	format  string // disk format when the origin says ("" for plain HTTP)

	notFoundHint string // what a 404 means here and what to do
	deniedHint   string // what a 401/403 means here and what to do
}

func openHTTP(ctx context.Context, ref string, st *settings) (Source, error) {
	u, err := url.Parse(ref)
	if err != nil || u.Host == "" {
		return nil, invalidf("open image source %q: not a valid URL; want http(s)://host/path", Redact(ref))
	}
	var checksum string
	if u.Fragment != "" {
		algo, hexsum, ok := strings.Cut(u.Fragment, "=")
		if !ok {
			return nil, fmt.Errorf("open image source %s: URL fragment %q: want #sha256=<hex> (or #sha512=, #md5=)", Redact(ref), u.Fragment)
		}
		checksum = strings.ToLower(algo) + ":" + strings.ToLower(hexsum)
		if _, _, _, err := parseChecksum(checksum); err != nil {
			return nil, fmt.Errorf("open image source %s: URL fragment: %w", Redact(ref), err)
		}
		u.Fragment, u.RawFragment = "", ""
	}
	if isRedacted(u) {
		// A manifest's reference (the secrets were left out): the real URL
		// is in this node's local credentials, if it was opened here.
		real, ok := "", false
		if st.Credentials != nil {
			if real, ok, err = st.Credentials.get(u.String()); err != nil {
				return nil, fmt.Errorf("open image source %s: %w", u, err)
			}
		}
		if !ok {
			return nil, mark(ErrDenied, "open image source %s: the URL's credentials are not recorded in the manifest (peers never get them), "+
				"and this node has none for it; add the image on this node with its full URL", u)
		}
		if u, err = url.Parse(real); err != nil {
			return nil, fmt.Errorf("open image source %s: recorded URL: %w", Redact(real), err)
		}
	}
	s := &httpSource{
		st:           st,
		url:          u.String(),
		name:         Redact(u.String()),
		headers:      http.Header{},
		notFoundHint: "the image is not there; check the URL",
		deniedHint:   "access denied; check the URL and its credentials",
	}
	s.ref = Ref{Kind: "http", Location: s.name, Checksum: checksum}
	if st.BlockLoopback {
		if err := checkHostAllowed(ctx, u.Hostname()); err != nil {
			return nil, fmt.Errorf("open image source %s: %w", s.name, err)
		}
		s.client = st.guardedClient()
	}
	if err := s.probe(ctx); err != nil {
		return nil, fmt.Errorf("open image source: %w", err)
	}
	if s.name != s.url && st.Credentials != nil {
		if err := st.Credentials.put(s.name, s.url); err != nil {
			return nil, fmt.Errorf("open image source %s: keep its credentials for later reads: %w", s.name, err)
		}
	}
	st.log.Debug("origin opened", "url", s.name, "size", s.size, "ranges", s.ranges)
	return s, nil
}

// probe learns the size and range support: HEAD, then GET bytes=0-0 when HEAD is refused or
// does not say both.
func (s *httpSource) probe(ctx context.Context) error {
	s.size = -1
	headDone := false
	err := s.st.retry(ctx, func() error {
		resp, err := s.send(ctx, http.MethodHead, "")
		if err != nil {
			return err
		}
		resp.Body.Close()
		switch resp.StatusCode {
		case http.StatusOK:
			headDone = true
			s.size = resp.ContentLength
			s.ranges = strings.Contains(strings.ToLower(resp.Header.Get("Accept-Ranges")), "bytes")
			return nil
		case http.StatusMethodNotAllowed, http.StatusNotImplemented, http.StatusForbidden:
			// HEAD not allowed (or, for presigned URLs, not signed): ask with GET below.
			return nil
		}
		return s.statusErr(resp)
	})
	if err != nil {
		return err
	}
	if !headDone || s.size < 0 || !s.ranges {
		err = s.st.retry(ctx, func() error {
			resp, err := s.send(ctx, http.MethodGet, "bytes=0-0")
			if err != nil {
				return err
			}
			// Closing without draining drops the connection: right for a 200 with the whole image.
			defer resp.Body.Close()
			switch resp.StatusCode {
			case http.StatusPartialContent:
				_, _, total, err := parseContentRange(resp.Header.Get("Content-Range"))
				if err != nil {
					return fmt.Errorf("GET %s: %w; the server's range answers are broken, report it to its operator", s.name, err)
				}
				if total >= 0 {
					s.size = total
				}
				s.ranges = true
			case http.StatusRequestedRangeNotSatisfiable: // an empty image: "bytes */0"
				cr := resp.Header.Get("Content-Range")
				total, err := strconv.ParseInt(strings.TrimPrefix(cr, "bytes */"), 10, 64)
				if err != nil || !strings.HasPrefix(cr, "bytes */") {
					return fmt.Errorf("GET %s: HTTP 416 to bytes=0-0 with Content-Range %q; check the URL", s.name, cr)
				}
				s.size, s.ranges = total, true
			case http.StatusOK:
				s.ranges = false
				if resp.ContentLength >= 0 {
					s.size = resp.ContentLength
				}
			default:
				return s.statusErr(resp)
			}
			return nil
		})
		if err != nil {
			return err
		}
	}
	if s.size < 0 {
		return fmt.Errorf("%s does not announce the image size (no Content-Length); hoard needs it: serve the image from a server that sends Content-Length", s.name)
	}
	if !s.ranges {
		s.st.log.Warn("origin does not support Range requests; only whole-image import will work", "url", s.name)
	}
	return nil
}

// ErrNoRanges: the origin cannot serve byte ranges, so it cannot back a lazy
// image (every read of one would fail); importing it whole works.
var ErrNoRanges = errors.New("origin does not support Range requests")

// RangeChecker is implemented by sources that can tell up front whether
// ReadAt, the lazy path, will work.
type RangeChecker interface {
	// CheckRanges returns an error wrapping ErrNoRanges, with the reason
	// and what to do, when ReadAt cannot work; nil when it can.
	CheckRanges() error
}

// CheckLazy returns why src cannot back a lazy image (chunks read from the
// origin on demand), nil when it can. Call it before registering a lazy image.
func CheckLazy(src Source) error {
	if rc, ok := src.(RangeChecker); ok {
		return rc.CheckRanges()
	}
	return nil
}

// CheckRanges says whether the server honoured the range probe of Open.
func (s *httpSource) CheckRanges() error {
	if s.ranges {
		return nil
	}
	return fmt.Errorf("%w: %s answers a Range request with the whole image (HTTP 200), so every read of a lazy image "+
		"would fail; add it without --lazy to import it whole, or serve it from a server with byte-range support "+
		"(nginx, Apache, caddy)", ErrNoRanges, s.name)
}

func (s *httpSource) Ref() Ref       { return s.ref }
func (s *httpSource) Size() int64    { return s.size }
func (s *httpSource) Format() string { return s.format }
func (s *httpSource) Close() error   { return nil }

// send makes one request with the source's headers. Network failures come back as
// *transientError (or permanent for DNS names that do not exist and TLS verification
// failures); any HTTP status comes back as a response, which the caller must close.
func (s *httpSource) send(ctx context.Context, method, rng string) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, method, s.url, nil)
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", method, s.name, err)
	}
	for k, v := range s.headers {
		req.Header[k] = v
	}
	// Sizes and ranges count stored bytes: ask for no transfer encoding a client would undo.
	req.Header.Set("Accept-Encoding", "identity")
	if rng != "" {
		req.Header.Set("Range", rng)
	}
	// The stall watchdog: a request that gets no answer, or a body read that gets no byte,
	// for StallTimeout is cancelled, and the failure is transient (retried or resumed).
	reqCtx, cancel := context.WithCancel(ctx)
	w := &watchdog{d: s.st.StallTimeout, cancel: cancel}
	w.t = time.AfterFunc(w.d, w.fire)
	client := s.client
	if client == nil {
		client = s.st.client
	}
	resp, err := client.Do(req.WithContext(reqCtx))
	w.t.Stop()
	if err == nil {
		resp.Body = &watchedBody{ReadCloser: resp.Body, w: w}
		return resp, nil
	}
	cancel()
	if ctx.Err() != nil {
		return nil, fmt.Errorf("%s %s: %w", method, s.name, ctx.Err())
	}
	if w.stalled.Load() {
		return nil, &transientError{
			what:  method + " " + s.name,
			hint:  "the origin does not answer; check it, or retry later",
			cause: fmt.Errorf("no answer within %v", w.d),
		}
	}
	// *url.Error repeats the method and URL, which the messages below already name.
	var urlErr *url.Error
	if errors.As(err, &urlErr) {
		err = urlErr.Err
	}
	var dnsErr *net.DNSError
	var certErr *tls.CertificateVerificationError
	var unknownCA x509.UnknownAuthorityError
	var hostErr x509.HostnameError
	switch {
	case errors.Is(err, ErrForbidden):
		return nil, fmt.Errorf("%s %s: %w", method, s.name, err)
	case errors.As(err, &dnsErr) && dnsErr.IsNotFound:
		return nil, fmt.Errorf("%s %s: host %q does not exist; check the URL: %w", method, s.name, dnsErr.Name, err)
	case errors.As(err, &certErr), errors.As(err, &unknownCA), errors.As(err, &hostErr):
		return nil, fmt.Errorf("%s %s: TLS certificate not trusted; check the URL or install the CA certificate: %w", method, s.name, err)
	}
	return nil, &transientError{
		what:  method + " " + s.name,
		hint:  "the origin is unreachable; check the URL and the network, or retry later",
		cause: err,
	}
}

// statusErr turns an unexpected HTTP status into an error (transient for 408, 429 and 5xx)
// and closes the body.
func (s *httpSource) statusErr(resp *http.Response) error {
	io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
	code := resp.StatusCode
	what := fmt.Sprintf("HTTP %d from %s", code, s.name)
	switch {
	case code == http.StatusNotFound || code == http.StatusGone:
		return mark(ErrNotFound, "%s: %s", what, s.notFoundHint)
	case code == http.StatusUnauthorized || code == http.StatusForbidden:
		return mark(ErrDenied, "%s: %s", what, s.deniedHint)
	case code == http.StatusTooManyRequests || code == http.StatusRequestTimeout || code >= 500:
		return &transientError{what: what, hint: "the origin is failing; retry later", retryAfter: retryAfter(resp.Header.Get("Retry-After"))}
	}
	return fmt.Errorf("%s: unexpected answer; check the URL", what)
}

// watchdog cancels a request when it fires.
type watchdog struct {
	d       time.Duration
	t       *time.Timer
	cancel  context.CancelFunc
	stalled atomic.Bool
}

func (w *watchdog) fire() {
	w.stalled.Store(true)
	w.cancel()
}

// watchedBody arms the watchdog while a Read waits, so a stalled body is abandoned but a
// slow consumer between Reads is not punished.
type watchedBody struct {
	io.ReadCloser
	w *watchdog
}

func (b *watchedBody) Read(p []byte) (int, error) {
	b.w.t.Reset(b.w.d)
	n, err := b.ReadCloser.Read(p)
	b.w.t.Stop()
	if err != nil && err != io.EOF && b.w.stalled.Load() {
		err = fmt.Errorf("no data for %v, abandoned the connection: %w", b.w.d, err)
	}
	return n, err
}

func (b *watchedBody) Close() error {
	b.w.t.Stop()
	err := b.ReadCloser.Close()
	b.w.cancel()
	return err
}

func retryAfter(v string) time.Duration {
	if v == "" {
		return 0
	}
	if secs, err := strconv.Atoi(strings.TrimSpace(v)); err == nil && secs >= 0 {
		return time.Duration(secs) * time.Second
	}
	if t, err := http.ParseTime(v); err == nil {
		return max(time.Until(t), 0)
	}
	return 0
}

// parseContentRange parses "bytes first-last/total" (total may be "*", returned as -1).
func parseContentRange(v string) (first, last, total int64, err error) {
	bad := fmt.Errorf("malformed Content-Range %q", v)
	rest, ok := strings.CutPrefix(v, "bytes ")
	if !ok {
		return 0, 0, 0, bad
	}
	span, tot, ok := strings.Cut(rest, "/")
	if !ok {
		return 0, 0, 0, bad
	}
	a, b, ok := strings.Cut(span, "-")
	if !ok {
		return 0, 0, 0, bad
	}
	if first, err = strconv.ParseInt(a, 10, 64); err != nil {
		return 0, 0, 0, bad
	}
	if last, err = strconv.ParseInt(b, 10, 64); err != nil || last < first {
		return 0, 0, 0, bad
	}
	total = -1
	if tot != "*" {
		if total, err = strconv.ParseInt(tot, 10, 64); err != nil || total <= last {
			return 0, 0, 0, bad
		}
	}
	return first, last, total, nil
}

func (s *httpSource) ReadAt(ctx context.Context, p []byte, off int64) error {
	if err := checkSpan(s.name, s.size, len(p), off); err != nil {
		return err
	}
	if len(p) == 0 {
		return nil
	}
	if !s.ranges {
		return fmt.Errorf("read %s at %d: the server does not support Range requests (it answers 200 with the whole image); lazy fetch needs range support: serve the image from a server that supports byte ranges, or import it whole", s.name, off)
	}
	got := 0 // bytes of p filled so far; a retry asks only for the rest
	err := s.st.retry(ctx, func() error {
		start, end := off+int64(got), off+int64(len(p))-1
		resp, err := s.send(ctx, http.MethodGet, fmt.Sprintf("bytes=%d-%d", start, end))
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		switch resp.StatusCode {
		case http.StatusPartialContent:
		case http.StatusOK:
			return fmt.Errorf("GET %s bytes=%d-%d: HTTP 200 with the whole image: the server ignores Range requests now; lazy fetch needs range support, serve the image from a server that supports byte ranges", s.name, start, end)
		default:
			return s.statusErr(resp)
		}
		first, last, total, err := parseContentRange(resp.Header.Get("Content-Range"))
		if err != nil || first != start {
			return fmt.Errorf("GET %s bytes=%d-%d: answer has Content-Range %q; the server's range answers are broken, report it to its operator", s.name, start, end, resp.Header.Get("Content-Range"))
		}
		if total >= 0 && total != s.size {
			sentinel := ErrShort
			if total > s.size {
				sentinel = ErrLong
			}
			return fmt.Errorf("GET %s: the image is now %d bytes, it was %d when opened: %w; the image changed at the origin, open it again", s.name, total, s.size, sentinel)
		}
		n := min(last, end) - start + 1
		m, err := io.ReadFull(resp.Body, p[got:got+int(n)])
		got += m
		if err != nil {
			return &transientError{what: fmt.Sprintf("GET %s bytes=%d-%d", s.name, start, end), hint: "the origin keeps dropping the connection; retry later", cause: err}
		}
		if got < len(p) {
			return &transientError{what: fmt.Sprintf("GET %s bytes=%d-%d", s.name, start, end), hint: "the origin keeps answering with partial ranges; retry later", cause: io.ErrUnexpectedEOF}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("read %d bytes at %d: %w", len(p), off, err)
	}
	return nil
}

func (s *httpSource) Stream(ctx context.Context) (io.ReadCloser, error) {
	open := func(ctx context.Context, pos int64) (io.ReadCloser, error) {
		var body io.ReadCloser
		err := s.st.retry(ctx, func() error {
			rng := ""
			if pos > 0 && s.ranges {
				rng = fmt.Sprintf("bytes=%d-", pos)
			}
			resp, err := s.send(ctx, http.MethodGet, rng)
			if err != nil {
				return err
			}
			switch resp.StatusCode {
			case http.StatusOK:
				if pos > 0 { // no range support: skip what already arrived
					s.st.log.Debug("origin resume without Range: skipping", "url", s.name, "bytes", pos)
					if _, err := io.CopyN(io.Discard, resp.Body, pos); err != nil {
						resp.Body.Close()
						return &transientError{what: "GET " + s.name, hint: "the origin keeps dropping the connection; retry later", cause: err}
					}
				}
			case http.StatusPartialContent:
				if first, _, _, err := parseContentRange(resp.Header.Get("Content-Range")); err != nil || first != pos {
					resp.Body.Close()
					return fmt.Errorf("GET %s bytes=%d-: answer has Content-Range %q; the server's range answers are broken, report it to its operator", s.name, pos, resp.Header.Get("Content-Range"))
				}
			case http.StatusRequestedRangeNotSatisfiable:
				if pos != s.size {
					return s.statusErr(resp)
				}
				resp.Body.Close() // the connection dropped right after the last byte
				body = http.NoBody
				return nil
			default:
				return s.statusErr(resp)
			}
			body = resp.Body
			return nil
		})
		return body, err
	}
	resumable := func(error) bool { return true } // a body read error is a dropped connection
	return newStream(ctx, s.name, s.size, s.ref.Checksum, s.st, open, resumable)
}
