package node_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hoardvm/hoard/node"
	"github.com/hoardvm/hoard/node/api"
	"github.com/hoardvm/hoard/node/importer"
	"github.com/hoardvm/hoard/node/origin"
)

// needTool skips the test when a client binary is missing. CI installs them
// (scripts/install-test-deps.sh).
func needTool(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		t.Skipf("%s not installed (scripts/install-test-deps.sh installs it): %v", name, err)
	}
	return p
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.CommandContext(t.Context(), needTool(t, name), args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// testNode is a daemon running in-process on a temp dir.
type testNode struct {
	*node.Node
	dir    string
	client *api.Client
	// stop stops the daemon and returns Run's error (the cleanup does so
	// when it was not called).
	stop func() error
}

func startNode(t *testing.T, cfg node.Config) *testNode {
	t.Helper()
	tn, err := tryStartNode(t, cfg)
	if err != nil {
		t.Fatal(err)
	}
	return tn
}

// tryStartNode is startNode that returns its error instead of failing the
// test, so that it may run in a goroutine of its own.
func tryStartNode(t *testing.T, cfg node.Config) (*testNode, error) {
	t.Helper()
	if cfg.DataDir == "" {
		cfg.DataDir = t.TempDir()
	}
	// Unix socket paths are limited to 108 bytes: keep it short.
	sockDir, err := os.MkdirTemp("", "hoard-sock")
	if err != nil {
		return nil, err
	}
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	cfg.NBDSocket = filepath.Join(sockDir, "nbd.sock")
	if cfg.APIListen == "" {
		cfg.APIListen = "127.0.0.1:0"
	}
	n, err := node.New(cfg, nil)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- n.Run(ctx) }()
	var stopOnce sync.Once
	var runErr error
	stop := func() error {
		stopOnce.Do(func() {
			cancel()
			runErr = <-done
		})
		return runErr
	}
	t.Cleanup(func() {
		if err := stop(); err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	select {
	case <-n.Ready():
	case err := <-done:
		done <- err // for the cleanup
		return nil, fmt.Errorf("Run: %w", err)
	case <-time.After(60 * time.Second): // 50 nodes under -race on 2 busy cores start slowly
		return nil, errors.New("node not ready after 60s")
	}
	return &testNode{Node: n, dir: cfg.DataDir, client: api.NewClient(n.APIAddr().String(), n.APIToken()), stop: stop}, nil
}

func (tn *testNode) uri(export string) string {
	return "nbd+unix:///" + export + "?socket=" + tn.NBDSocket()
}

func (tn *testNode) counters(t *testing.T) api.Counters {
	t.Helper()
	s, err := tn.client.Status(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	return s.Counters
}

// writeImage writes a raw image of size bytes: random data with zero runs.
func writeImage(t *testing.T, path string, size int, seed uint64) []byte {
	t.Helper()
	r := rand.New(rand.NewPCG(seed, 7))
	b := make([]byte, size)
	for off := 0; off < size; {
		n := min(size-off, 64<<10+int(r.IntN(512<<10)))
		if r.IntN(3) > 0 {
			for i := off; i < off+n; i++ {
				b[i] = byte(r.Uint32())
			}
		}
		off += n
	}
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return b
}

func addImage(t *testing.T, tn *testNode, req api.ImportRequest) *importer.Result {
	t.Helper()
	res, err := tn.client.AddImage(t.Context(), req)
	if err != nil {
		t.Fatalf("add image %s: %v", req.Source, err)
	}
	return res
}

// rangeServer serves data with Range support, counts body bytes, and fails
// with 500 while failing is set.
type rangeServer struct {
	*httptest.Server
	data    []byte
	bytes   atomic.Int64
	gets    atomic.Int64
	failing atomic.Bool
	mu      sync.Mutex
	ranges  map[string]int // Range header -> GETs
}

// repeated returns the ranges requested more than once.
func (s *rangeServer) repeated() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []string
	for r, n := range s.ranges {
		if n > 1 {
			out = append(out, fmt.Sprintf("%s x%d", r, n))
		}
	}
	return out
}

type countingWriter struct {
	http.ResponseWriter
	n *atomic.Int64
}

func (w countingWriter) Write(p []byte) (int, error) {
	n, err := w.ResponseWriter.Write(p)
	w.n.Add(int64(n))
	return n, err
}

func newRangeServer(t *testing.T, data []byte) *rangeServer {
	s := &rangeServer{data: data, ranges: map[string]int{}}
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if s.failing.Load() {
			http.Error(w, "boom", http.StatusInternalServerError)
			return
		}
		if r.Method == http.MethodGet {
			s.gets.Add(1)
			if rg := r.Header.Get("Range"); rg != "" && rg != "bytes=0-0" {
				s.mu.Lock()
				s.ranges[rg]++
				s.mu.Unlock()
			}
		}
		http.ServeContent(countingWriter{w, &s.bytes}, r, "image.raw", time.Time{}, bytes.NewReader(s.data))
	}))
	t.Cleanup(s.Close)
	return s
}

func TestExportsMatchSource(t *testing.T) {
	t.Parallel()
	needTool(t, "qemu-img")
	tn := startNode(t, node.Config{})
	dir := t.TempDir()
	raw := filepath.Join(dir, "disk.raw")
	writeImage(t, raw, 24<<20+12345, 1)
	qcow := filepath.Join(dir, "disk.qcow2")
	run(t, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow)
	addImage(t, tn, api.ImportRequest{Source: raw, Name: "raw-img"})
	// --format raw: the qcow2 file's bytes (guest_test.go covers auto).
	res := addImage(t, tn, api.ImportRequest{Source: qcow, Name: "qcow-img", Chunking: "fixed", Format: "raw"})
	if res.Format != "qcow2" {
		t.Fatalf("format %q, want qcow2", res.Format)
	}
	for _, tc := range []struct{ export, format, src, srcFormat string }{
		{"raw-img", "raw", raw, "raw"},
		{res.Manifest.String(), "qcow2", qcow, "qcow2"}, // by manifest CID
		{"qcow-img", "qcow2", raw, "raw"},               // the guest-visible bytes
	} {
		run(t, "qemu-img", "compare", "-f", tc.srcFormat, "-F", tc.format, tc.src, tn.uri(tc.export))
	}
	if c := tn.counters(t); c.ReadBytes["origin"] != 0 || c.ReadBytes["local"] == 0 {
		t.Errorf("counters %+v: want local reads only", c)
	}
	for path, want := range map[string]string{
		"/healthz": "ok",
		"/readyz":  "ready",
		"/metrics": `hoard_read_bytes_total{source="local"}`,
	} {
		resp, err := http.Get("http://" + tn.APIAddr().String() + path)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || !strings.Contains(string(body), want) {
			t.Errorf("GET %s: %d, body lacks %q:\n%.500s", path, resp.StatusCode, want, body)
		}
	}

	needTool(t, "nbdinfo")
	list := run(t, "nbdinfo", "--list", "nbd+unix:///?socket="+tn.NBDSocket())
	for _, want := range []string{"raw-img", "qcow-img"} {
		if !strings.Contains(list, want) {
			t.Errorf("nbdinfo --list lacks %s:\n%s", want, list)
		}
	}
	// Holes: the map must agree with the source's zero runs.
	var extents []struct {
		Offset, Length int64
		Type           int
	}
	out := run(t, "nbdinfo", "--map", "--json", tn.uri("raw-img"))
	if err := json.Unmarshal([]byte(out), &extents); err != nil {
		t.Fatalf("nbdinfo --map --json: %v\n%s", err, out)
	}
	data, _ := os.ReadFile(raw)
	var holes int64
	for _, e := range extents {
		if e.Type&1 != 0 {
			holes += e.Length
			if !bytes.Equal(data[e.Offset:e.Offset+e.Length], make([]byte, e.Length)) {
				t.Errorf("hole [%d,+%d) is not zero in the source", e.Offset, e.Length)
			}
		}
	}
	if holes == 0 {
		t.Errorf("no holes reported: %s", out)
	}
	if needTool(t, "nbdcopy"); true {
		dst := filepath.Join(dir, "copy.raw")
		run(t, "nbdcopy", "--connections=4", tn.uri("raw-img"), dst)
		got, _ := os.ReadFile(dst)
		if !bytes.Equal(got, data) {
			t.Error("nbdcopy --connections=4 copy differs from the source")
		}
	}
}

func TestLazyImageFromHTTP(t *testing.T) {
	t.Parallel()
	needTool(t, "nbdcopy")
	dir := t.TempDir()
	data := writeImage(t, filepath.Join(dir, "src.raw"), 16<<20, 2)
	srv := newRangeServer(t, data)
	tn := startNode(t, node.Config{})
	res := addImage(t, tn, api.ImportRequest{Source: srv.URL + "/disk.raw", Name: "lazy", Lazy: true})
	if u := tn.Store().Usage(); u.Chunks != 0 {
		t.Fatalf("lazy import stored %d chunks", u.Chunks)
	}
	before := srv.bytes.Load() // the import streamed the image once
	dst := filepath.Join(dir, "copy.raw")
	run(t, "nbdcopy", "--connections=2", tn.uri("lazy"), dst)
	got, _ := os.ReadFile(dst)
	if !bytes.Equal(got, data) {
		t.Fatal("lazy export differs from the origin's bytes")
	}
	fetched := srv.bytes.Load() - before
	c := tn.counters(t)
	if c.OriginBytes == 0 || c.OriginBytes != fetched {
		t.Errorf("origin bytes counted %d, the server sent %d", c.OriginBytes, fetched)
	}
	if fetched > res.NonZeroBytes {
		t.Errorf("fetched %d bytes from the origin, more than the %d non-zero bytes", fetched, res.NonZeroBytes)
	}
	// Everything is local now: a second read costs the origin nothing.
	run(t, "nbdcopy", tn.uri("lazy"), filepath.Join(dir, "copy2.raw"))
	if after := srv.bytes.Load() - before; after != fetched {
		t.Errorf("second read fetched %d more origin bytes", after-fetched)
	}
}

func TestOriginFailureFailsOnlyItsReads(t *testing.T) {
	t.Parallel()
	needTool(t, "qemu-io")
	dir := t.TempDir()
	data := randBytes(8<<20, 3)
	srv := newRangeServer(t, data)
	tn := startNode(t, node.Config{
		Origin: origin.Config{Retries: 1, RetryBase: time.Millisecond},
		// Generous: the healthy reads must not time out on a loaded CI
		// machine; the failing origin answers 500 at once, so its reads fail
		// fast anyway (checked below).
		OriginTimeout: 15 * time.Second,
		Readahead:     -1,
		MemCache:      -1,
	})
	addImage(t, tn, api.ImportRequest{Source: srv.URL + "/d.raw", Name: "flaky", Lazy: true, Chunking: "fixed"})
	qio := func(cmd string) (string, error) {
		out, err := exec.CommandContext(t.Context(), "qemu-io", "-r", "-f", "raw", "-c", cmd, tn.uri("flaky")).CombinedOutput()
		return string(out), err
	}
	if out, err := qio("read -P 0 0 0"); err != nil { // warm nothing; checks the tool works
		t.Fatalf("qemu-io: %v\n%s", err, out)
	}
	if out, err := qio("read 0 1M"); err != nil || strings.Contains(out, "error") {
		t.Fatalf("cached read: %v\n%s", err, out)
	}
	srv.failing.Store(true)
	start := time.Now()
	out, _ := qio("read 4M 64k")
	if !strings.Contains(out, "Input/output error") {
		t.Errorf("read needing a failing origin: want EIO, got:\n%s", out)
	}
	if d := time.Since(start); d > 12*time.Second {
		t.Errorf("failing read took %s: an origin answering 500 must fail the read quickly", d)
	}
	out, err := qio("read 0 1M")
	if err != nil || strings.Contains(out, "error") {
		t.Errorf("cached read while the origin fails: %v\n%s", err, out)
	}
	if c := tn.counters(t); c.OriginErrors == 0 {
		t.Errorf("counters %+v: want origin errors", c)
	}
	srv.failing.Store(false)
	if out, err := qio("read 4M 64k"); err != nil || strings.Contains(out, "error") {
		t.Errorf("read after the origin recovered: %v\n%s", err, out)
	}
	_ = dir
}

func TestProfileRecordedAndPrefetched(t *testing.T) {
	t.Parallel()
	needTool(t, "qemu-io")
	data := randBytes(8<<20, 4)
	srv := newRangeServer(t, data)
	tn := startNode(t, node.Config{Readahead: -1, MemCache: -1})
	res := addImage(t, tn, api.ImportRequest{Source: srv.URL + "/p.raw", Name: "boot", Lazy: true, Chunking: "fixed"})
	// A "boot": scattered reads, in this order.
	offs := []int64{5 << 20, 64 << 10, 7 << 20, 1 << 20}
	var cmds []string
	for _, o := range offs {
		cmds = append(cmds, "-c", fmt.Sprintf("read %d 4k", o))
	}
	run(t, "qemu-io", append([]string{"-r", "-f", "raw"}, append(cmds, tn.uri("boot"))...)...)
	var p api.ProfileInfo
	eventually(t, 10*time.Second, func() bool {
		var err error
		p, err = tn.client.Profile(t.Context(), "boot")
		return err == nil && p.Boots == 1
	}, "no boot profile saved: %+v", p)
	if len(p.Entries) != len(offs) {
		t.Fatalf("profile has %d chunks, want %d: %+v", len(p.Entries), len(offs), p)
	}
	for i, e := range p.Entries {
		if e.Offset != offs[i]/(64<<10)*(64<<10) {
			t.Errorf("profile entry %d at %d, want the chunk of %d", i, e.Offset, offs[i])
		}
	}
	// Evict the chunks (as quota pressure would), then attach again: the
	// profile is fetched in the background without any read.
	st := tn.Store()
	m, _ := st.GetManifest(t.Context(), res.Manifest)
	if err := st.Delete(t.Context(), m.ChunkIDs()...); err != nil {
		t.Fatal(err)
	}
	before := tn.counters(t).PrefetchChunks["profile"]
	run(t, "qemu-io", "-r", "-f", "raw", "-c", "sleep 2000", tn.uri("boot"))
	eventually(t, 10*time.Second, func() bool {
		return tn.counters(t).PrefetchChunks["profile"]-before == int64(len(offs))
	}, "the %d chunks of the profile not prefetched", len(offs))
	for _, e := range p.Entries {
		if ok, _ := st.Has(t.Context(), e.ID); !ok {
			t.Errorf("profile chunk %d not in the store after prefetch", e.Index)
		}
	}
	// That attach read nothing: the profile still counts one boot.
	if p, _ := tn.client.Profile(t.Context(), "boot"); p.Boots != 1 {
		t.Errorf("boots %d after a read-less attach, want 1", p.Boots)
	}
}

// waitFor is eventually with a 60 s bound (generous: -race on two loaded
// cores; it only waits that long when something is wrong).
func waitFor(t *testing.T, what string, ok func() bool) {
	t.Helper()
	eventually(t, 60*time.Second, ok, "timed out waiting for %s", what)
}

func randBytes(n int, seed uint64) []byte {
	b := make([]byte, n)
	rand.NewChaCha8([32]byte{byte(seed)}).Read(b)
	return b
}

// TestOneFetchPerChunk: many readers of the same cold chunks at once cause one
// origin request per chunk (single-flight), and all get the right bytes.
func TestOneFetchPerChunk(t *testing.T) {
	t.Parallel()
	data := randBytes(4<<20, 5)
	srv := newRangeServer(t, data)
	tn := startNode(t, node.Config{MemCache: -1})
	addImage(t, tn, api.ImportRequest{Source: srv.URL + "/d.raw", Name: "hot", Lazy: true, Chunking: "fixed"})
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for r := range 16 {
		x, err := tn.Open(t.Context(), "hot")
		if err != nil {
			t.Fatal(err)
		}
		defer x.Close()
		wg.Go(func() {
			for k := range 8 {
				off := int64((k*7+r)%8) * 512 << 10 // every reader, the same 8 spans, in different orders
				p := make([]byte, 300<<10)
				if err := x.ReadAt(t.Context(), p, off); err != nil {
					errs <- err
					return
				}
				if !bytes.Equal(p, data[off:off+int64(len(p))]) {
					errs <- fmt.Errorf("reader %d: wrong bytes at %d", r, off)
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if rep := srv.repeated(); len(rep) > 0 {
		t.Errorf("origin ranges requested more than once: %v", rep)
	}
	if c := tn.counters(t); c.OriginBytes == 0 || c.OriginBytes > int64(len(data)) {
		t.Errorf("fetched %d origin bytes for a %d-byte image", c.OriginBytes, len(data))
	}
}

// eventually polls cond until it holds, failing the test with the message
// (a format and its arguments) when timeout passes first.
func eventually(t testing.TB, timeout time.Duration, cond func() bool, format string, args ...any) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("after %s: "+format, append([]any{timeout}, args...)...)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
