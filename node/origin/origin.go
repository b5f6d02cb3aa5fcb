package origin

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/cenkalti/backoff/v5"
)

// Sentinel errors; check them with errors.Is.
var (
	// ErrNotFound: the image does not exist at the origin (missing file, HTTP 404/410,
	// unknown Glance image id).
	ErrNotFound = errors.New("image not found at origin")
	// ErrDenied: the origin refused access (HTTP 401/403, file permissions).
	ErrDenied = errors.New("access to origin denied")
	// ErrShort: fewer bytes arrived than the origin announced.
	ErrShort = errors.New("origin sent fewer bytes than announced")
	// ErrLong: more bytes arrived than the origin announced.
	ErrLong = errors.New("origin sent more bytes than announced")
	// ErrChecksum: the bytes do not hash to the checksum the origin announced.
	ErrChecksum = errors.New("image checksum mismatch")
	// ErrForbidden: hoard refuses this source whoever asks: its own data dir
	// and keys, /proc, /sys, /dev (but block devices), or a loopback HTTP
	// origin when Config.BlockLoopback is set.
	ErrForbidden = errors.New("image source not allowed")
	// ErrInvalid: the source reference itself is wrong (an unknown scheme, a
	// malformed URL, a directory, glance:// with no Glance configured):
	// fixing the request, not retrying, helps.
	ErrInvalid = errors.New("invalid image source")
	// ErrUnavailable: the origin cannot serve now (transient failures outlasted the retries,
	// a Glance image not active yet); trying again later may work.
	ErrUnavailable = errors.New("origin unavailable")
)

// Ref identifies the source of an image, recorded in the manifest.
type Ref struct {
	Kind     string `json:"kind"`               // "file", "http", "glance"
	Location string `json:"location"`           // absolute path, URL, or glance image id
	Checksum string `json:"checksum,omitempty"` // "sha256:<hex>", "md5:<hex>", "sha512:<hex>" when the origin announces one; "" otherwise
}

// Source is an opened origin. All methods are safe for concurrent use.
type Source interface {
	// Ref returns what the source is, for the manifest.
	Ref() Ref
	// Size is the image size in bytes, learned when the source was opened.
	Size() int64
	// ReadAt fills all of p from offset off; [off, off+len(p)) must lie within Size. It is
	// the lazy path (one chunk's span) and needs range support from an HTTP origin. Transient
	// failures are retried with backoff within ctx. The caller owns p; ReadAt keeps no
	// reference to it after it returns.
	ReadAt(ctx context.Context, p []byte, off int64) error
	// Stream reads the whole content from the start (import). The reader resumes a dropped
	// connection with a Range request (bounded retries) and verifies at EOF: it returns an
	// error wrapping ErrShort or ErrLong if the byte count differs from Size, ErrChecksum if
	// the announced checksum does not match; io.EOF only after all checks passed. The caller
	// must Close the reader. Each reader is for one goroutine; several may run at once.
	Stream(ctx context.Context) (io.ReadCloser, error)
	// Close releases the source. Readers returned by Stream must be closed first.
	Close() error
}

// Formatter is implemented by sources that know the image's disk format: "raw", "qcow2",
// another Glance disk_format, or "" when unknown (the caller should sniff the content).
type Formatter interface {
	Format() string
}

// Config tunes Open. The zero value works for files and HTTP.
type Config struct {
	// GlanceURL is the Glance endpoint (config key origin.glance.url), e.g.
	// http://controller:9292; a trailing /v2 is accepted.
	GlanceURL string
	// GlanceToken is sent as X-Auth-Token when not empty (origin.glance.token).
	GlanceToken string
	// GlanceHeaders are added to every Glance request. A keystone-less Glance needs
	// {"X-Roles": "admin", "X-Tenant-Id": "<project>"} here.
	GlanceHeaders map[string]string
	// HTTPClient is used for HTTP and Glance. nil means a client with connect, TLS handshake
	// and response header timeouts but no overall timeout (streams of big images take long).
	HTTPClient *http.Client
	// Retries is how many times a transient failure is retried after the first attempt:
	// 0 means the default (4), a negative value means never retry.
	Retries int
	// RetryBase is the first backoff delay (default 200ms); it doubles on every retry,
	// with jitter, up to 10s.
	RetryBase time.Duration
	// StallTimeout abandons a request that gets no answer, or a body that sends no byte, for
	// this long; the failure counts as transient (retried, or resumed for Stream). Default 60s.
	StallTimeout time.Duration
	// Log receives retries and resumes at debug/warn level; nil discards.
	Log *slog.Logger

	// Credentials, when set, keeps the real URLs of HTTP origins with
	// credentials or a query, which Ref (and so the manifest) records
	// redacted, so that Open of the redacted URL works on this node.
	Credentials *Credentials

	// DenyPaths are files and directories a file source never opens (the
	// daemon's data dir and keys), checked after symlinks are resolved.
	// /proc, /sys and /dev (but block devices) are always refused.
	DenyPaths []string
	// BlockLoopback refuses HTTP(S) origins at loopback, link-local and
	// unspecified addresses (checked on every connection, so a DNS name or
	// a redirect cannot get around it): a daemon reachable by others must
	// not become a proxy to services that trust localhost. Glance
	// (GlanceURL, set by the operator) is exempt.
	BlockLoopback bool
}

const (
	defaultRetries   = 4
	defaultRetryBase = 200 * time.Millisecond
	defaultStall     = 60 * time.Second
	maxBackoff       = 10 * time.Second
	maxRetryAfter    = 5 * time.Second
)

// settings is Config with the defaults applied.
type settings struct {
	Config
	client *http.Client
	log    *slog.Logger
}

func (c Config) withDefaults() *settings {
	s := &settings{Config: c}
	switch {
	case s.Retries == 0:
		s.Retries = defaultRetries
	case s.Retries < 0:
		s.Retries = 0
	}
	if s.RetryBase <= 0 {
		s.RetryBase = defaultRetryBase
	}
	if s.StallTimeout <= 0 {
		s.StallTimeout = defaultStall
	}
	s.client = c.HTTPClient
	if s.client == nil {
		s.client = sharedClient()
	}
	s.log = c.Log
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	s.log = s.log.With("component", "origin")
	return s
}

// sharedClient is the default client, one for the process so that sources share idle
// connections.
var sharedClient = sync.OnceValue(defaultClient)

func defaultClient() *http.Client {
	t := http.DefaultTransport.(*http.Transport).Clone()
	t.DialContext = (&net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second}).DialContext
	t.TLSHandshakeTimeout = 10 * time.Second
	t.ResponseHeaderTimeout = 30 * time.Second
	t.IdleConnTimeout = 90 * time.Second
	t.MaxIdleConnsPerHost = 16
	// Byte counts and ranges refer to the stored bytes: never let the transport decompress.
	t.DisableCompression = true
	return &http.Client{Transport: t}
}

// Open parses ref and opens the source it names:
//   - a local path (relative or absolute) or file:///abs/path: a regular file or block device;
//   - http:// or https:// URL, optionally with a #sha256=<hex> (or #sha512=, #md5=) fragment;
//   - glance://<image-id>: an image of the Glance at cfg.GlanceURL.
//
// Open does I/O (stat, HEAD, Glance metadata) and starts no goroutine.
func Open(ctx context.Context, ref string, cfg Config) (Source, error) {
	s := cfg.withDefaults()
	if ref == "" {
		return nil, invalidf("open image source: empty reference; give a path, an http(s):// URL or glance://<image-id>")
	}
	lower := strings.ToLower(ref)
	switch {
	case strings.HasPrefix(lower, "http://"), strings.HasPrefix(lower, "https://"):
		return openHTTP(ctx, ref, s)
	case strings.HasPrefix(lower, "glance://"):
		return openGlance(ctx, ref[len("glance://"):], s)
	case strings.HasPrefix(lower, "file://"):
		return openFile(ctx, ref, s)
	case strings.Contains(ref, "://"):
		scheme, _, _ := strings.Cut(ref, "://")
		return nil, invalidf("open image source %q: unknown scheme %q; use a path, file://, http(s):// or glance://", Redact(ref), scheme)
	default:
		return openFile(ctx, ref, s)
	}
}

// invalidError is a wrong source reference: its message as written, and
// errors.Is(err, ErrInvalid).
type invalidError struct{ msg string }

func (e *invalidError) Error() string        { return e.msg }
func (e *invalidError) Is(target error) bool { return target == ErrInvalid }

func invalidf(format string, args ...any) error {
	return &invalidError{fmt.Sprintf(format, args...)}
}

// transientError marks one attempt's failure as worth retrying.
type transientError struct {
	what       string        // "HTTP 500 from URL", "GET URL"
	hint       string        // what to do when retries run out
	cause      error         // underlying error, may be nil
	retryAfter time.Duration // server-requested delay, 0 if none
}

func (e *transientError) Error() string {
	if e.cause != nil {
		return e.what + ": " + e.cause.Error()
	}
	return e.what
}

func (e *transientError) Unwrap() error { return e.cause }

// exhaustedError is a transient failure that outlasted the retries.
type exhaustedError struct {
	last     *transientError
	attempts int
}

func (e *exhaustedError) Error() string {
	msg := fmt.Sprintf("%s after %d %s", e.last.what, e.attempts, plural(e.attempts, "attempt"))
	if e.last.cause != nil {
		msg += ": " + e.last.cause.Error()
	}
	return msg + ": " + e.last.hint
}

func (e *exhaustedError) Unwrap() []error {
	if e.last.cause != nil {
		return []error{ErrUnavailable, e.last.cause}
	}
	return []error{ErrUnavailable}
}

// retry runs fn until it succeeds, fails permanently (any error that is not a
// *transientError), ctx ends, or the retries run out.
func (s *settings) retry(ctx context.Context, fn func() error) error {
	attempts := s.Retries + 1
	var last *transientError
	bo := s.backoff()
	for i := range attempts {
		if i > 0 {
			d := bo.NextBackOff()
			if last.retryAfter > d {
				d = min(last.retryAfter, maxRetryAfter)
			}
			s.log.Debug("origin attempt failed; retrying", "err", last, "attempt", i, "delay", d)
			if err := sleep(ctx, d); err != nil {
				return fmt.Errorf("%s: gave up after %d %s: %w", last.what, i, plural(i, "attempt"), err)
			}
		}
		err := fn()
		if err == nil {
			return nil
		}
		if !errors.As(err, &last) {
			return err
		}
		if ctx.Err() != nil {
			return fmt.Errorf("%s: %w", last.what, ctx.Err())
		}
	}
	s.log.Warn("origin failing; giving up", "err", last, "attempts", attempts)
	return &exhaustedError{last: last, attempts: attempts}
}

// backoff is the delays between attempts (cenkalti/backoff): RetryBase,
// doubling up to maxBackoff, each jittered by ±50%.
func (s *settings) backoff() *backoff.ExponentialBackOff {
	return &backoff.ExponentialBackOff{InitialInterval: s.RetryBase, RandomizationFactor: 0.5, Multiplier: 2, MaxInterval: maxBackoff}
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

func plural(n int, word string) string {
	if n == 1 {
		return word
	}
	return word + "s"
}

// mark returns an error with the formatted message that matches sentinel with errors.Is,
// without repeating the sentinel's own text.
func mark(sentinel error, format string, args ...any) error {
	return &markedError{msg: fmt.Sprintf(format, args...), is: sentinel}
}

// markedError is an error whose message already says everything; it matches a sentinel.
type markedError struct {
	msg string
	is  error
}

func (e *markedError) Error() string { return e.msg }
func (e *markedError) Unwrap() error { return e.is }

// checkSpan validates a ReadAt request against the source size.
func checkSpan(name string, size int64, n int, off int64) error {
	if off < 0 || off > size || int64(n) > size-off {
		return fmt.Errorf("read %s: span [%d, %d) is outside the image (size %d); this is a bug in the caller", name, off, off+int64(n), size)
	}
	return nil
}
