package origin_test

import (
	"bytes"
	"context"
	"crypto/md5"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hoardvm/hoard/node/origin"
)

// fastCfg retries quickly so failure tests stay fast.
func fastCfg() origin.Config {
	return origin.Config{Retries: 3, RetryBase: time.Millisecond}
}

func randomData(t *testing.T, n int) []byte {
	t.Helper()
	r := rand.New(rand.NewPCG(uint64(n), 42))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// serveData serves data like a static file server: HEAD, Range, Accept-Ranges.
func serveData(data []byte) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		http.ServeContent(w, r, "image.raw", time.Time{}, bytes.NewReader(data))
	}
}

// counting wraps h and counts requests per method.
type counting struct {
	mu     sync.Mutex
	seen   []string // "METHOD Range"
	handle http.HandlerFunc
}

func (c *counting) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	c.mu.Lock()
	c.seen = append(c.seen, r.Method+" "+r.Header.Get("Range"))
	c.mu.Unlock()
	c.handle(w, r)
}

func (c *counting) requests() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]string(nil), c.seen...)
}

func newServer(t *testing.T, h http.HandlerFunc) (*httptest.Server, *counting) {
	t.Helper()
	c := &counting{handle: h}
	srv := httptest.NewServer(c)
	t.Cleanup(srv.Close)
	return srv, c
}

func open(t *testing.T, ref string, cfg origin.Config) origin.Source {
	t.Helper()
	src, err := origin.Open(t.Context(), ref, cfg)
	if err != nil {
		t.Fatalf("Open(%q): %v", ref, err)
	}
	t.Cleanup(func() { src.Close() })
	return src
}

func readAll(t *testing.T, src origin.Source) ([]byte, error) {
	t.Helper()
	rc, err := src.Stream(t.Context())
	if err != nil {
		t.Fatalf("Stream: %v", err)
	}
	defer rc.Close()
	return io.ReadAll(rc)
}

func checkRandomReads(t *testing.T, src origin.Source, data []byte, n int) {
	t.Helper()
	r := rand.New(rand.NewPCG(7, 7))
	spans := [][2]int{{0, 1}, {0, len(data)}, {len(data) - 1, 1}, {len(data), 0}}
	for range n {
		off := r.IntN(len(data))
		spans = append(spans, [2]int{off, r.IntN(min(len(data)-off, 300<<10)) + 1})
	}
	for _, sp := range spans {
		p := make([]byte, sp[1])
		if err := src.ReadAt(t.Context(), p, int64(sp[0])); err != nil {
			t.Fatalf("ReadAt(%d, %d): %v", sp[0], sp[1], err)
		}
		if !bytes.Equal(p, data[sp[0]:sp[0]+sp[1]]) {
			t.Fatalf("ReadAt(%d, %d): wrong bytes", sp[0], sp[1])
		}
	}
}

func wantErr(t *testing.T, err, target error, parts ...string) {
	t.Helper()
	if err == nil {
		t.Fatalf("got no error, want %v", target)
	}
	t.Logf("error (as users see it): %v", err)
	if target != nil && !errors.Is(err, target) {
		t.Fatalf("error %q does not wrap %v", err, target)
	}
	for _, p := range parts {
		if !strings.Contains(err.Error(), p) {
			t.Fatalf("error %q does not mention %q", err, p)
		}
	}
}

func TestHTTPRangeReads(t *testing.T) {
	t.Parallel()
	data := randomData(t, 3<<20+123)
	srv, _ := newServer(t, serveData(data))
	src := open(t, srv.URL+"/debian.raw", fastCfg())
	if err := origin.CheckLazy(src); err != nil {
		t.Fatalf("CheckLazy of a server with Range support: %v", err)
	}
	if got := src.Size(); got != int64(len(data)) {
		t.Fatalf("Size = %d, want %d", got, len(data))
	}
	if got, want := src.Ref(), (origin.Ref{Kind: "http", Location: srv.URL + "/debian.raw"}); got != want {
		t.Fatalf("Ref = %+v, want %+v", got, want)
	}
	if f, ok := src.(origin.Formatter); !ok || f.Format() != "" {
		t.Fatalf("plain HTTP source should be a Formatter reporting \"\"")
	}
	checkRandomReads(t, src, data, 50)
	wantErr(t, src.ReadAt(t.Context(), make([]byte, 2), int64(len(data)-1)), nil, "outside the image")

	// Concurrent readers share the source.
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Go(func() {
			p := make([]byte, 64<<10)
			off := int64(i) * 100_000
			if err := src.ReadAt(t.Context(), p, off); err != nil || !bytes.Equal(p, data[off:off+int64(len(p))]) {
				t.Errorf("concurrent ReadAt at %d: %v", off, err)
			}
		})
	}
	wg.Wait()

	got, err := readAll(t, src)
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("Stream: %d bytes, err %v; want %d bytes", len(got), err, len(data))
	}
}

func TestHTTPNotFoundIsPermanent(t *testing.T) {
	t.Parallel()
	srv, c := newServer(t, http.NotFound)
	_, err := origin.Open(t.Context(), srv.URL+"/missing.raw", fastCfg())
	wantErr(t, err, origin.ErrNotFound, "HTTP 404", srv.URL+"/missing.raw", "check the URL")
	if n := len(c.requests()); n != 1 {
		t.Fatalf("%d requests for a 404, want 1 (no retries): %v", n, c.requests())
	}
}

func TestHTTPForbiddenIsPermanent(t *testing.T) {
	t.Parallel()
	srv, c := newServer(t, func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "no", http.StatusForbidden)
	})
	_, err := origin.Open(t.Context(), srv.URL+"/x", fastCfg())
	wantErr(t, err, origin.ErrDenied, "HTTP 403", "access denied")
	// HEAD 403 falls back to GET (presigned URLs sign one method); then no retries.
	if got := c.requests(); len(got) != 2 {
		t.Fatalf("requests = %v, want HEAD then one GET", got)
	}
}

func TestHTTPRetriesTransientErrors(t *testing.T) {
	t.Parallel()
	data := randomData(t, 200_000)
	var failures atomic.Int32
	srv, c := newServer(t, func(w http.ResponseWriter, r *http.Request) {
		if failures.Add(-1) >= 0 {
			if failures.Load()%2 == 0 {
				w.Header().Set("Retry-After", "0")
				http.Error(w, "slow down", http.StatusTooManyRequests)
				return
			}
			http.Error(w, "boom", http.StatusInternalServerError)
			return
		}
		serveData(data)(w, r)
	})
	failures.Store(2)
	src := open(t, srv.URL+"/img", fastCfg())
	if n := len(c.requests()); n != 3 {
		t.Fatalf("Open made %d requests, want 3 (2 failures, 1 success)", n)
	}
	failures.Store(3) // Retries is 3: the fourth attempt succeeds
	p := make([]byte, 1000)
	if err := src.ReadAt(t.Context(), p, 5000); err != nil || !bytes.Equal(p, data[5000:6000]) {
		t.Fatalf("ReadAt after 3 transient failures: %v", err)
	}
	failures.Store(2)
	got, err := readAll(t, src)
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("Stream after transient failures: %d bytes, %v", len(got), err)
	}
}

func TestHTTPGivesUp(t *testing.T) {
	t.Parallel()
	srv, c := newServer(t, func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "boom", http.StatusInternalServerError)
	})
	_, err := origin.Open(t.Context(), srv.URL+"/img", fastCfg())
	wantErr(t, err, origin.ErrUnavailable, "HTTP 500", srv.URL+"/img", "after 4 attempts", "retry later")
	if n := len(c.requests()); n != 4 {
		t.Fatalf("%d requests, want 4", n)
	}

	// Retries that would outlast ctx stop with ctx.
	ctx, cancel := context.WithTimeout(t.Context(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err = origin.Open(ctx, srv.URL+"/img", origin.Config{Retries: 10, RetryBase: time.Second})
	wantErr(t, err, context.DeadlineExceeded, "HTTP 500")
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("Open took %v after ctx expired", d)
	}
}

func TestHTTPUnreachable(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close() // nothing listens there now
	_, err = origin.Open(t.Context(), "http://"+addr+"/img", origin.Config{Retries: 1, RetryBase: time.Millisecond})
	wantErr(t, err, origin.ErrUnavailable, "unreachable", "after 2 attempts")
}

// rawResponse hijacks the connection and writes a hand-made response with at most cut body
// bytes, then closes the connection: abruptly (RST) when it cut the body short.
func rawResponse(w http.ResponseWriter, status string, hdr map[string]string, body []byte, cut int) {
	conn, buf, err := w.(http.Hijacker).Hijack()
	if err != nil {
		panic(err)
	}
	fmt.Fprintf(buf, "HTTP/1.1 %s\r\n", status)
	for k, v := range hdr {
		fmt.Fprintf(buf, "%s: %s\r\n", k, v)
	}
	buf.WriteString("\r\n")
	buf.Write(body[:min(cut, len(body))])
	buf.Flush()
	if tc, ok := conn.(*net.TCPConn); ok && cut < len(body) {
		tc.SetLinger(0) // close with RST: a connection reset, not a clean FIN
	}
	conn.Close()
}

func rangeStart(r *http.Request) int {
	v, ok := strings.CutPrefix(r.Header.Get("Range"), "bytes=")
	if !ok {
		return 0
	}
	a, _, _ := strings.Cut(v, "-")
	n, _ := strconv.Atoi(a)
	return n
}

func TestHTTPStreamResumesAfterReset(t *testing.T) {
	t.Parallel()
	data := randomData(t, 1<<20)
	sum := sha256.Sum256(data)
	const perConn = 300 << 10 // every connection dies after this many body bytes
	srv, c := newServer(t, func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodHead {
			serveData(data)(w, r)
			return
		}
		start := rangeStart(r)
		hdr := map[string]string{"Content-Length": strconv.Itoa(len(data) - start), "Accept-Ranges": "bytes"}
		status := "200 OK"
		if r.Header.Get("Range") != "" {
			status = "206 Partial Content"
			hdr["Content-Range"] = fmt.Sprintf("bytes %d-%d/%d", start, len(data)-1, len(data))
		}
		rawResponse(w, status, hdr, data[start:], perConn)
	})
	src := open(t, srv.URL+"/img#sha256="+hex.EncodeToString(sum[:]), fastCfg())
	if got := src.Ref().Checksum; got != "sha256:"+hex.EncodeToString(sum[:]) {
		t.Fatalf("Ref.Checksum = %q", got)
	}
	got, err := readAll(t, src)
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("Stream: %d bytes, err %v; want %d bytes", len(got), err, len(data))
	}
	// A reset discards what the client's kernel had not delivered yet, so where each resume
	// starts varies; it must be a Range request from a later offset each time.
	reqs := c.requests()
	if len(reqs) < 3 || reqs[0] != "HEAD " || reqs[1] != "GET " {
		t.Fatalf("requests = %q, want HEAD, GET, then resumes", reqs)
	}
	last := 0
	for _, r := range reqs[2:] {
		v, ok := strings.CutPrefix(r, "GET bytes=")
		n, err := strconv.Atoi(strings.TrimSuffix(v, "-"))
		if !ok || err != nil || n <= last {
			t.Fatalf("requests = %q: want resumes with Range from growing offsets", reqs)
		}
		last = n
	}
}

func TestHTTPStreamResumesWithoutRangeSupport(t *testing.T) {
	t.Parallel()
	data := randomData(t, 500_000)
	var n atomic.Int32
	srv, _ := newServer(t, func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodHead {
			w.Header().Set("Content-Length", strconv.Itoa(len(data)))
			return
		}
		cut := len(data)
		if n.Add(1) == 2 { // the first GET is the range probe; the second dies midway
			cut = 123_457
		}
		rawResponse(w, "200 OK", map[string]string{"Content-Length": strconv.Itoa(len(data))}, data, cut)
	})
	src := open(t, srv.URL+"/img", fastCfg())
	got, err := readAll(t, src)
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("Stream: %d bytes, err %v", len(got), err)
	}
}

func TestHTTPStreamSizeChecks(t *testing.T) {
	t.Parallel()
	data := randomData(t, 10_000)
	tests := []struct {
		name    string
		handler http.HandlerFunc
		want    error
		parts   []string
	}{{
		// Every connection drops at byte 5000 although Content-Length promised more:
		// resumes make no progress, and the stream gives up.
		name: "body shorter than Content-Length",
		handler: func(w http.ResponseWriter, r *http.Request) {
			start := rangeStart(r)
			hdr := map[string]string{"Content-Length": strconv.Itoa(len(data) - start), "Accept-Ranges": "bytes"}
			if r.Method == http.MethodHead {
				w.Header().Set("Accept-Ranges", "bytes")
				w.Header().Set("Content-Length", strconv.Itoa(len(data)))
				return
			}
			status := "200 OK"
			if r.Header.Get("Range") != "" {
				status = "206 Partial Content"
				hdr["Content-Range"] = fmt.Sprintf("bytes %d-%d/%d", start, len(data)-1, len(data))
			}
			rawResponse(w, status, hdr, data[start:], max(5000-start, 0))
		},
		want:  origin.ErrShort,
		parts: []string{"at byte 5000 of 10000"},
	}, {
		name: "body shorter than announced size",
		handler: func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Accept-Ranges", "bytes")
			if r.Method == http.MethodHead {
				w.Header().Set("Content-Length", strconv.Itoa(len(data)))
				return
			}
			w.Header().Set("Content-Length", "6000")
			w.Write(data[:6000])
		},
		want:  origin.ErrShort,
		parts: []string{"got 6000 of the announced 10000 bytes", "open it again"},
	}, {
		name: "body longer than announced size",
		handler: func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Accept-Ranges", "bytes")
			if r.Method == http.MethodHead {
				w.Header().Set("Content-Length", "9000")
				return
			}
			w.Write(data)
		},
		want:  origin.ErrLong,
		parts: []string{"more than the announced 9000 bytes"},
	}}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			srv, _ := newServer(t, tt.handler)
			src := open(t, srv.URL+"/img", fastCfg())
			_, err := readAll(t, src)
			wantErr(t, err, tt.want, tt.parts...)
		})
	}
}

func TestHTTPChecksum(t *testing.T) {
	t.Parallel()
	data := randomData(t, 100_000)
	srv, _ := newServer(t, serveData(data))
	s256 := sha256.Sum256(data)
	m5 := md5.Sum(data)
	bad := sha256.Sum256([]byte("something else"))
	tests := []struct {
		fragment string
		want     error
	}{
		{"sha256=" + hex.EncodeToString(s256[:]), nil},
		{"md5=" + strings.ToUpper(hex.EncodeToString(m5[:])), nil},
		{"sha256=" + hex.EncodeToString(bad[:]), origin.ErrChecksum},
	}
	for _, tt := range tests {
		src := open(t, srv.URL+"/img#"+tt.fragment, fastCfg())
		got, err := readAll(t, src)
		if tt.want == nil {
			if err != nil || !bytes.Equal(got, data) {
				t.Fatalf("#%s: %d bytes, %v", tt.fragment, len(got), err)
			}
			continue
		}
		wantErr(t, err, tt.want, "sha256 is "+hex.EncodeToString(s256[:]), "origin announced "+hex.EncodeToString(bad[:]), "re-upload")
	}
	for _, frag := range []string{"sha256=abc", "crc32=00000000", "nochecksum"} {
		_, err := origin.Open(t.Context(), srv.URL+"/img#"+frag, fastCfg())
		wantErr(t, err, nil, "fragment")
	}
}

func TestHTTPServerIgnoresRange(t *testing.T) {
	t.Parallel()
	data := randomData(t, 50_000)
	srv, _ := newServer(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", strconv.Itoa(len(data)))
		if r.Method != http.MethodHead {
			w.Write(data)
		}
	})
	src := open(t, srv.URL+"/img", fastCfg())
	if src.Size() != int64(len(data)) {
		t.Fatalf("Size = %d", src.Size())
	}
	wantErr(t, src.ReadAt(t.Context(), make([]byte, 10), 100), nil, "does not support Range", "lazy fetch needs range support")
	// A lazy add is refused up front, with the reason and what to do.
	wantErr(t, origin.CheckLazy(src), origin.ErrNoRanges, "whole image", "without --lazy")
	got, err := readAll(t, src)
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("Stream: %d bytes, %v", len(got), err)
	}
}

func TestHTTPHeadNotAllowed(t *testing.T) {
	t.Parallel()
	data := randomData(t, 70_000)
	srv, _ := newServer(t, func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodHead {
			w.Header().Set("Allow", "GET")
			w.WriteHeader(http.StatusMethodNotAllowed)
			return
		}
		serveData(data)(w, r)
	})
	src := open(t, srv.URL+"/img", fastCfg())
	if src.Size() != int64(len(data)) {
		t.Fatalf("Size = %d, want %d", src.Size(), len(data))
	}
	checkRandomReads(t, src, data, 10)
}

func TestHTTPReadAtAfterImageDeleted(t *testing.T) {
	t.Parallel()
	data := randomData(t, 70_000)
	var gone atomic.Bool
	srv, _ := newServer(t, func(w http.ResponseWriter, r *http.Request) {
		if gone.Load() {
			http.NotFound(w, r)
			return
		}
		serveData(data)(w, r)
	})
	src := open(t, srv.URL+"/img", fastCfg())
	gone.Store(true)
	wantErr(t, src.ReadAt(t.Context(), make([]byte, 10), 0), origin.ErrNotFound, "HTTP 404")
}

func TestOpenBadReferences(t *testing.T) {
	t.Parallel()
	tests := []struct{ ref, part string }{
		{"", "empty reference"},
		{"ftp://host/x", `unknown scheme "ftp"`},
		{"http://", "not a valid URL"},
		{"glance://abc", "set origin.glance.url (or HOARD_ORIGIN_GLANCE_URL)"},
	}
	for _, tt := range tests {
		_, err := origin.Open(t.Context(), tt.ref, origin.Config{})
		wantErr(t, err, nil, tt.part)
	}
}

func TestHTTPStalledOriginIsAbandoned(t *testing.T) {
	t.Parallel()
	data := randomData(t, 200_000)
	var stalls atomic.Int32
	stalls.Store(2) // the first Stream GET and the first ReadAt stall midway
	srv, _ := newServer(t, func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodHead || stalls.Add(-1) < 0 {
			serveData(data)(w, r)
			return
		}
		w.Header().Set("Content-Length", strconv.Itoa(len(data)-rangeStart(r)))
		if r.Header.Get("Range") != "" {
			w.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", rangeStart(r), len(data)-1, len(data)))
			w.WriteHeader(http.StatusPartialContent)
		}
		w.Write(data[rangeStart(r) : rangeStart(r)+10_000])
		w.(http.Flusher).Flush()
		<-r.Context().Done() // stall until the client gives up
	})
	cfg := fastCfg()
	cfg.StallTimeout = 200 * time.Millisecond
	src := open(t, srv.URL+"/img", cfg)
	got, err := readAll(t, src)
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("Stream: %d bytes, %v", len(got), err)
	}
	stalls.Store(1)
	p := make([]byte, 50_000)
	if err := src.ReadAt(t.Context(), p, 1000); err != nil || !bytes.Equal(p, data[1000:51_000]) {
		t.Fatalf("ReadAt: %v", err)
	}
}

func TestHTTPSlowConsumerIsNotAStall(t *testing.T) {
	t.Parallel()
	data := randomData(t, 100_000)
	srv, c := newServer(t, serveData(data))
	cfg := fastCfg()
	cfg.StallTimeout = time.Second // generous: a loaded CI machine must not see false stalls
	src := open(t, srv.URL+"/img", cfg)
	rc, err := src.Stream(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	var got []byte
	buf := make([]byte, 40_000)
	for {
		n, err := rc.Read(buf)
		got = append(got, buf[:n]...)
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		time.Sleep(1500 * time.Millisecond) // longer than StallTimeout between reads
	}
	if !bytes.Equal(got, data) {
		t.Fatalf("got %d bytes, want %d", len(got), len(data))
	}
	var gets []string
	for _, r := range c.requests() {
		if strings.HasPrefix(r, "GET") {
			gets = append(gets, r)
		}
	}
	if len(gets) != 1 {
		t.Fatalf("GET requests = %q, want one (no resume)", gets)
	}
}
