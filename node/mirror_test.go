package node_test

import (
	"bytes"
	"context"
	"crypto/md5"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hoardvm/hoard/chunkstore"
	"github.com/hoardvm/hoard/node"
	"github.com/hoardvm/hoard/node/api"
	"github.com/hoardvm/hoard/node/origin"
	"github.com/hoardvm/hoard/node/origin/glancetest"
	"github.com/hoardvm/hoard/p2p"
	"github.com/libp2p/go-libp2p/core/peer"
)

// glanceCounter is a proxy in front of Glance that counts the image bytes
// Glance serves (GET .../file bodies), but for the mirror's authorizations
// (authProbe).
type glanceCounter struct {
	fileBytes atomic.Int64
	files     atomic.Int64
}

func startGlanceCounter(t *testing.T, glanceURL string) (*glanceCounter, string) {
	t.Helper()
	u, err := url.Parse(glanceURL)
	if err != nil {
		t.Fatal(err)
	}
	c := &glanceCounter{}
	rp := httputil.NewSingleHostReverseProxy(u)
	rp.ModifyResponse = func(resp *http.Response) error {
		if strings.HasSuffix(resp.Request.URL.Path, "/file") && resp.Request.Method == http.MethodGet && !authProbe(resp.Request) {
			c.files.Add(1)
			resp.Body = &countingBody{ReadCloser: resp.Body, n: &c.fileBytes}
		}
		return nil
	}
	srv := httptest.NewServer(rp)
	t.Cleanup(srv.Close)
	return c, srv.URL
}

// authProbe reports whether r is the mirror's authorization of a download
// (its one-byte read of the file), which the Glance byte counts leave out.
func authProbe(r *http.Request) bool { return r.Header.Get("Range") == "bytes=0-0" }

type countingBody struct {
	io.ReadCloser
	n *atomic.Int64
}

func (b *countingBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	b.n.Add(int64(n))
	return n, err
}

// mirrorGet downloads path from a mirror with identity headers.
func mirrorGet(ctx context.Context, addr, path string, hdr map[string]string) (int, []byte, http.Header, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+path, nil)
	if err != nil {
		return 0, nil, nil, err
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, nil, nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, b, resp.Header, err
}

const glanceclientScript = `
import hashlib, json, sys
import glanceclient
from glanceclient import exc
url, image, project, roles, out = sys.argv[1:]
c = glanceclient.Client('2', endpoint=url, identity_headers={
    'X-Auth-Token': 'token-of-' + project, 'X-Identity-Status': 'Confirmed',
    'X-Project-Id': project, 'X-Tenant-Id': project, 'X-User-Id': 'user-of-' + project, 'X-Roles': roles})
try:
    body = c.images.data(image)
    h = hashlib.sha256()
    n = 0
    with open(out, 'wb') as f:
        for b in body:
            h.update(b)
            n += len(b)
            f.write(b)
    print(json.dumps({"ok": True, "bytes": n, "sha256": h.hexdigest()}))
except exc.HTTPException as e:
    print(json.dumps({"ok": False, "status": e.code, "error": str(e)}))
`

type glanceclientResult struct {
	OK     bool   `json:"ok"`
	Bytes  int64  `json:"bytes"`
	SHA256 string `json:"sha256"`
	Status int    `json:"status"`
	Error  string `json:"error"`
}

func glanceclientData(t *testing.T, endpoint, image, project, roles string) glanceclientResult {
	t.Helper()
	dir := t.TempDir()
	script := filepath.Join(dir, "data.py")
	if err := os.WriteFile(script, []byte(glanceclientScript), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 90*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "/usr/bin/python3", script, endpoint, image, project, roles, filepath.Join(dir, "out")).Output()
	if err != nil {
		var stderr []byte
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = ee.Stderr
		}
		t.Fatalf("glanceclient images.data through %s as %s: %v\n%s%s", endpoint, project, err, out, stderr)
	}
	var r glanceclientResult
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	if err := json.Unmarshal([]byte(lines[len(lines)-1]), &r); err != nil {
		t.Fatalf("glanceclient output %q: %v", out, err)
	}
	return r
}

func needGlanceclient(t *testing.T) {
	t.Helper()
	if err := exec.Command("/usr/bin/python3", "-c", "import glanceclient").Run(); err != nil {
		msg := "python3-glanceclient is not installed for /usr/bin/python3 (apt-get install python3-glanceclient)"
		if os.Getenv("HOARD_TEST_REQUIRE_TOOLS") == "1" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
}

// TestGlanceMirrorRealGlance: a project-enforcing glance-api with a private
// image of project A, 4 mocknet daemons with the mirror on. Four concurrent
// downloads of the image no node knows read it from Glance about once; the
// owner's glanceclient (which checks the checksum) gets identical bytes; project
// B gets Glance's refusal from every node, also the ones holding every byte.
func TestGlanceMirrorRealGlance(t *testing.T) {
	needGlanceclient(t)
	g := glancetest.StartEnforcing(t)
	const projectA, projectB = glancetest.Tenant, "project-b"
	data := writeImage(t, filepath.Join(t.TempDir(), "img.raw"), 24<<20+4321, 42)
	id := g.Upload(t, "private-a", "raw", data)
	counter, glanceURL := startGlanceCounter(t, g.URL())

	// Glance itself: the owner sees it, project B does not.
	ctx, cancel := context.WithTimeout(t.Context(), 4*time.Minute)
	defer cancel()
	for _, tc := range []struct {
		project string
		want    int
	}{{projectA, 200}, {projectB, 404}} {
		u, _ := url.Parse(g.URL())
		st, _, _, err := mirrorGet(ctx, u.Host, "/v2/images/"+id, glancetest.Identity(tc.project, "member"))
		if err != nil || st != tc.want {
			t.Fatalf("Glance GET /v2/images/%s as %s: %d %v, want %d: Glance does not enforce projects", id, tc.project, st, err, tc.want)
		}
	}

	nodes := startMockCluster(t, 4, func(i int, c *node.Config) {
		c.GlanceListen = "127.0.0.1:0"
		c.GlanceRegisterWait = 90 * time.Second
		c.Origin = origin.Config{GlanceURL: glanceURL, GlanceHeaders: g.Headers()}
	})
	path := "/v2/images/" + id + "/file"
	owner := glancetest.Identity(projectA, "member")

	// Four downloads at once, one per node, of an image no node knows.
	start := time.Now()
	var wg sync.WaitGroup
	errs := make([]error, len(nodes))
	for i, tn := range nodes {
		wg.Go(func() {
			st, body, hdr, err := mirrorGet(ctx, tn.GlanceAddr().String(), path, owner)
			switch {
			case err != nil:
				errs[i] = err
			case st != 200:
				errs[i] = fmt.Errorf("HTTP %d: %.200s", st, body)
			case !bytes.Equal(body, data):
				errs[i] = fmt.Errorf("%d bytes, not the image's %d", len(body), len(data))
			case hdr.Get("Content-MD5") == "":
				errs[i] = fmt.Errorf("no Content-MD5")
			}
		})
	}
	wg.Wait()
	took := time.Since(start)
	for i, err := range errs {
		if err != nil {
			t.Errorf("node %d: download: %v", i, err)
		}
	}
	glanceBytes := counter.fileBytes.Load()
	t.Logf("4 concurrent downloads of %d bytes took %v; Glance served %d bytes (%.2fx the image) in %d file requests",
		len(data), took.Round(time.Millisecond), glanceBytes, float64(glanceBytes)/float64(len(data)), counter.files.Load())
	if glanceBytes > int64(len(data))*3/2 {
		t.Errorf("Glance served %d bytes for 4 downloads of a %d-byte image, want about once", glanceBytes, len(data))
	}

	// The owner, with glanceclient (checks os_hash_value / Content-MD5), through every node.
	want := fmt.Sprintf("%x", sha256.Sum256(data))
	for i, tn := range nodes {
		r := glanceclientData(t, "http://"+tn.GlanceAddr().String(), id, projectA, "member")
		if !r.OK || r.Bytes != int64(len(data)) || r.SHA256 != want {
			t.Errorf("node %d: glanceclient as the owner: %+v, want %d bytes with sha256 %s", i, r, len(data), want)
		}
	}
	if after := counter.fileBytes.Load(); after != glanceBytes {
		t.Errorf("the owner's glanceclient downloads made Glance serve %d more bytes, want 0 (hoard holds the image)", after-glanceBytes)
	}

	// Project B: Glance's refusal, from every node, though they hold every byte.
	for i, tn := range nodes {
		r := glanceclientData(t, "http://"+tn.GlanceAddr().String(), id, projectB, "member")
		if r.OK || (r.Status != 404 && r.Status != 403) {
			t.Errorf("node %d: glanceclient as project B: %+v, want Glance's 404/403", i, r)
		}
		st, body, _, err := mirrorGet(ctx, tn.GlanceAddr().String(), path, glancetest.Identity(projectB, "member"))
		if err != nil || st != 404 || bytes.Contains(body, data[:4096]) {
			t.Errorf("node %d: GET as project B: %d %v %.100q, want Glance's 404", i, st, err, body)
		}
		st, _, _, err = mirrorGet(ctx, tn.GlanceAddr().String(), path, nil)
		if err != nil || st != 401 {
			t.Errorf("node %d: GET without identity: %d %v, want Glance's 401", i, st, err)
		}
	}
	t.Logf("project B refused by every node (glanceclient and plain GET); no identity: 401")
}

// fakeGlanceServer is a keystone-less Glance stand-in: the image record (with
// the checksums given) to anyone with X-Project-Id "a", the file with Range
// support; it counts the file bytes it sends (but for authProbe's).
func fakeGlanceServer(t *testing.T, id string, data []byte, md5hex, sha512hex string) (*atomic.Int64, string) {
	t.Helper()
	return fakeGlanceServerFormat(t, id, data, md5hex, sha512hex, "raw")
}

// fakeGlanceServerFormat is fakeGlanceServer with the image's disk_format.
func fakeGlanceServerFormat(t *testing.T, id string, data []byte, md5hex, sha512hex, diskFormat string) (*atomic.Int64, string) {
	t.Helper()
	var sent atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("X-Project-Id") != "a" {
			http.Error(w, "No image found", http.StatusNotFound)
			return
		}
		switch r.URL.Path {
		case "/v2/images/" + id:
			json.NewEncoder(w).Encode(map[string]any{"id": id, "status": "active", "size": len(data), "disk_format": diskFormat,
				"checksum": md5hex, "os_hash_algo": "sha512", "os_hash_value": sha512hex})
		case "/v2/images/" + id + "/file":
			var cw http.ResponseWriter = &glanceCountingWriter{ResponseWriter: w, n: &sent}
			if authProbe(r) {
				cw = w
			}
			http.ServeContent(cw, r, "", time.Time{}, bytes.NewReader(data))
		default:
			http.NotFound(w, r)
		}
	}))
	t.Cleanup(srv.Close)
	return &sent, srv.URL
}

type glanceCountingWriter struct {
	http.ResponseWriter
	n *atomic.Int64
}

func (w *glanceCountingWriter) Write(p []byte) (int, error) {
	n, err := w.ResponseWriter.Write(p)
	w.n.Add(int64(n))
	return n, err
}

// TestGlanceMirrorStandalone: on a node without a cluster, the first download
// of an unknown image streams it from Glance once, to the client and into the
// store (a second download and a range read cost Glance nothing); an image
// whose bytes do not match Glance's checksum fails the download and
// registers nothing.
func TestGlanceMirrorStandalone(t *testing.T) {
	t.Parallel()
	data := writeImage(t, filepath.Join(t.TempDir(), "img.raw"), 9<<20+77, 5)
	const good, bad = "11111111-0000-4000-8000-00000000000a", "11111111-0000-4000-8000-00000000000b"
	md := md5Hex(data)
	sh := sha512Hex(data)
	sentGood, urlGood := fakeGlanceServer(t, good, data, md, sh)
	wrong := strings.Repeat("0", len(sh))
	sentBad, urlBad := fakeGlanceServer(t, bad, data, md, wrong)

	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	hdr := map[string]string{"X-Project-Id": "a", "X-Auth-Token": "t"}
	for _, tc := range []struct {
		id, url string
		sent    *atomic.Int64
		ok      bool
	}{{good, urlGood, sentGood, true}, {bad, urlBad, sentBad, false}} {
		tn := startNode(t, node.Config{GlanceListen: "127.0.0.1:0", Origin: origin.Config{GlanceURL: tc.url, GlanceHeaders: map[string]string{"X-Project-Id": "a"}}})
		path := "/v2/images/" + tc.id + "/file"
		st, body, hdrs, err := mirrorGet(ctx, tn.GlanceAddr().String(), path, hdr)
		if !tc.ok {
			if err == nil && st == 200 && bytes.Equal(body, data) {
				t.Errorf("%s: a download whose bytes do not match os_hash_value completed", tc.id)
			}
			if _, rerr := tn.Store().Resolve(ctx, tc.id); rerr == nil {
				t.Errorf("%s: an image that failed its checksum was registered", tc.id)
			}
			t.Logf("checksum mismatch: HTTP %d, %d of %d bytes, err %v; nothing registered", st, len(body), len(data), err)
			if m := scrapeMetrics(t, tn); m[`hoard_glance_mirror_requests_total{code="aborted",kind="download"}`] != 1 {
				t.Errorf("a download cut short for its checksum is not counted as aborted: %v", m)
			}
			continue
		}
		if err != nil || st != 200 || !bytes.Equal(body, data) || hdrs.Get("Content-MD5") != md {
			t.Fatalf("%s: first download: HTTP %d, %d bytes, Content-MD5 %q, %v", tc.id, st, len(body), hdrs.Get("Content-MD5"), err)
		}
		first := tc.sent.Load()
		if first != int64(len(data)) {
			t.Errorf("first download: Glance sent %d bytes, want the image once (%d)", first, len(data))
		}
		st, body, _, err = mirrorGet(ctx, tn.GlanceAddr().String(), path, hdr)
		if err != nil || st != 200 || !bytes.Equal(body, data) {
			t.Fatalf("second download: HTTP %d, %d bytes, %v", st, len(body), err)
		}
		rh := map[string]string{"X-Project-Id": "a", "Range": "bytes=1000000-1999999"}
		st, body, hdrs, err = mirrorGet(ctx, tn.GlanceAddr().String(), path, rh)
		if err != nil || st != 206 || !bytes.Equal(body, data[1000000:2000000]) || hdrs.Get("Content-Range") != fmt.Sprintf("bytes 1000000-1999999/%d", len(data)) {
			t.Errorf("range: HTTP %d, %d bytes, Content-Range %q, %v", st, len(body), hdrs.Get("Content-Range"), err)
		}
		if more := tc.sent.Load() - first; more != 0 {
			t.Errorf("the second download and a range made Glance send %d more bytes, want 0", more)
		}
		t.Logf("standalone: first download Glance bytes %d (image %d), then 0 for a full download and a range", first, len(data))
		m := scrapeMetrics(t, tn)
		src := func(s string) float64 { return m[`hoard_glance_mirror_served_bytes_total{source="`+s+`"}`] }
		for series, want := range map[string]float64{
			`hoard_glance_mirror_requests_total{code="200",kind="download"}`:             2,
			`hoard_glance_mirror_requests_total{code="206",kind="download"}`:             1,
			`hoard_glance_mirror_authorize_seconds_count{result="allowed"}`:              3,
			`hoard_glance_mirror_served_bytes_total{source="glance_stream"}`:             float64(len(data)),
			"read path bytes (local, peer, origin, zero) of a full download and a range": float64(len(data) + 1000000),
		} {
			got := m[series]
			if strings.HasPrefix(series, "read path") {
				got = src("local") + src("peer") + src("origin") + src("zero")
			}
			if got != want {
				t.Errorf("metric %s = %v, want %v", series, got, want)
			}
		}
	}
}

func md5Hex(b []byte) string    { s := md5.Sum(b); return hex.EncodeToString(s[:]) }
func sha512Hex(b []byte) string { s := sha512.Sum512(b); return hex.EncodeToString(s[:]) }

// registrarOf is the node the cluster's rendezvous makes the registrar of
// Glance image id (as node/mirror.go chooses it, over all of nodes).
func registrarOf(nodes []*testNode, id string) int {
	ids := make([]peer.ID, len(nodes))
	for i, tn := range nodes {
		ids[i] = tn.P2P().ID()
	}
	d := p2p.Designated(chunkstore.Sum([]byte("hoard glance mirror registrar "+id)), ids)
	for i, pid := range ids {
		if pid == d {
			return i
		}
	}
	return -1
}

// waitConnected waits until tn is connected to every other of n nodes.
func waitConnected(t *testing.T, tn *testNode, n int) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		k := 0
		for _, pi := range tn.P2P().Peers() {
			if pi.Connected {
				k++
			}
		}
		if k >= n-1 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("node connected to %d of %d peers after 30s", k, n-1)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestGlanceMirrorNonRegistrar: in a 4-node cluster, one download of an
// image no node knows, asked of a node that is not its registrar, completes
// in seconds (the node asks the registrar to register it now rather than
// waiting for the registration to reach it), Glance serves it about once,
// and the registrar holds the image.
func TestGlanceMirrorNonRegistrar(t *testing.T) {
	t.Parallel()
	const id = "22222222-0000-4000-8000-00000000000c"
	data := writeImage(t, filepath.Join(t.TempDir(), "img.raw"), 12<<20+99, 9)
	sent, glanceURL := fakeGlanceServer(t, id, data, md5Hex(data), sha512Hex(data))
	nodes := startMockCluster(t, 4, func(i int, c *node.Config) {
		c.GlanceListen = "127.0.0.1:0"
		c.GlanceRegisterWait = 90 * time.Second // a bound only: the ask answers long before
		c.Origin = origin.Config{GlanceURL: glanceURL, GlanceHeaders: map[string]string{"X-Project-Id": "a"}}
	})
	reg := registrarOf(nodes, id)
	asked := (reg + 1) % len(nodes)
	waitConnected(t, nodes[asked], len(nodes))
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	start := time.Now()
	st, body, hdr, err := mirrorGet(ctx, nodes[asked].GlanceAddr().String(), "/v2/images/"+id+"/file", map[string]string{"X-Project-Id": "a"})
	took := time.Since(start)
	if err != nil || st != 200 || !bytes.Equal(body, data) || hdr.Get("Content-MD5") != md5Hex(data) {
		t.Fatalf("download from node %d (registrar %d): HTTP %d, %d bytes, %v: %.200s", asked, reg, st, len(body), err, body)
	}
	t.Logf("download of %d bytes from a non-registrar node took %v; Glance sent %d bytes (%.2fx)", len(data), took.Round(time.Millisecond), sent.Load(), float64(sent.Load())/float64(len(data)))
	if took > 20*time.Second {
		t.Errorf("the download took %v, want seconds: the node waited instead of asking the registrar", took)
	}
	if got := sent.Load(); got > int64(len(data))*5/4 {
		t.Errorf("Glance sent %d bytes for one %d-byte image, want about once", got, len(data))
	}
	if _, err := nodes[reg].Store().Resolve(ctx, id); err != nil {
		t.Errorf("the registrar did not register the image: %v", err)
	}
}

// TestGlanceMirrorGuestView: a compressed qcow2 added as its guest view
// (--format auto, exported raw) is served by the mirror as Glance's file: the
// first download registers its file view (glance-file:ID) from one stream
// from Glance, the bytes are the qcow2 file's and match its md5; the guest
// view stays the image's export; another node serves the file view with no
// Glance read.
func TestGlanceMirrorGuestView(t *testing.T) {
	t.Parallel()
	const id = "33333333-0000-4000-8000-00000000000d"
	_, _, qcow := guestImages(t, 16<<20)
	sent, glanceURL := fakeGlanceServerFormat(t, id, qcow, md5Hex(qcow), sha512Hex(qcow), "qcow2")
	nodes := startMockCluster(t, 2, func(i int, c *node.Config) {
		c.GlanceListen = "127.0.0.1:0"
		c.Origin = origin.Config{GlanceURL: glanceURL, GlanceHeaders: map[string]string{"X-Project-Id": "a"}}
	})
	waitConnected(t, nodes[0], len(nodes))
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	res, err := nodes[0].AddImage(ctx, api.ImportRequest{Source: "glance://" + id, Name: id, Format: "auto"}, nil)
	if err != nil || res.Container != chunkstore.ContainerQcow2 {
		t.Fatalf("add glance://%s as its guest view: %+v, %v", id, res, err)
	}
	afterAdd := sent.Load()
	hdr := map[string]string{"X-Project-Id": "a"}
	path := "/v2/images/" + id + "/file"
	st, body, h, err := mirrorGet(ctx, nodes[0].GlanceAddr().String(), path, hdr)
	if err != nil || st != 200 || !bytes.Equal(body, qcow) || h.Get("Content-MD5") != md5Hex(qcow) || md5Hex(body) != md5Hex(qcow) {
		t.Fatalf("mirror download of a guest-view image: HTTP %d, %d bytes (qcow2 file %d), Content-MD5 %q, %v: %.200s", st, len(body), len(qcow), h.Get("Content-MD5"), err, body)
	}
	first := sent.Load() - afterAdd
	t.Logf("first mirror download of a %d-byte qcow2 held as its guest view: Glance sent %d bytes (%.2fx)", len(qcow), first, float64(first)/float64(len(qcow)))
	if first > int64(len(qcow))*5/4 {
		t.Errorf("the file view's registration read %d bytes from Glance, want the file about once (%d)", first, len(qcow))
	}
	var fileNodes int
	for _, tn := range nodes {
		if _, err := tn.Store().Resolve(ctx, node.FileViewPrefix+id); err == nil {
			fileNodes++
		}
	}
	if fileNodes == 0 {
		t.Errorf("no node registered the file view %s%s", node.FileViewPrefix, id)
	}
	d, err := nodes[0].client.Image(ctx, id, false)
	if err != nil || d.Container != "qcow2" {
		t.Errorf("image %s after the download: %+v, %v; want still the qcow2 guest view", id, d, err)
	}
	for i, tn := range nodes {
		st, body, _, err := mirrorGet(ctx, tn.GlanceAddr().String(), path, hdr)
		if err != nil || st != 200 || !bytes.Equal(body, qcow) {
			t.Errorf("node %d: second download: HTTP %d, %d bytes, %v: %.200s", i, st, len(body), err, body)
		}
	}
	if more := sent.Load() - afterAdd - first; more != 0 {
		t.Errorf("downloads of the registered file view made Glance send %d more bytes, want 0", more)
	}
}

// TestGlanceMirrorDownloadHoldsChunks: a download in progress keeps its
// image's chunks out of eviction, as an open export does: with a small
// quota, a memory cache and hot tier off, and Glance refusing the file from
// then on, another image added mid-download does not evict the chunks the
// download still has to serve; it completes with the right bytes.
func TestGlanceMirrorDownloadHoldsChunks(t *testing.T) {
	t.Parallel()
	const id = "44444444-0000-4000-8000-00000000000e"
	dir := t.TempDir()
	data := writeImage(t, filepath.Join(dir, "a.raw"), 32<<20, 11)
	otherPath := filepath.Join(dir, "b.raw")
	writeImage(t, otherPath, 32<<20, 12)
	_, fakeURL := fakeGlanceServer(t, id, data, md5Hex(data), sha512Hex(data))
	u, _ := url.Parse(fakeURL)
	var fileOff atomic.Bool
	rp := httputil.NewSingleHostReverseProxy(u)
	gate := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if fileOff.Load() && strings.HasSuffix(r.URL.Path, "/file") {
			http.Error(w, "file service off for the test", http.StatusServiceUnavailable)
			return
		}
		rp.ServeHTTP(w, r)
	}))
	t.Cleanup(gate.Close)
	tn := startNode(t, node.Config{GlanceListen: "127.0.0.1:0", StoreQuota: 40 << 20, MemCache: -1, HotCache: -1, Readahead: -1,
		Origin: origin.Config{GlanceURL: gate.URL, GlanceHeaders: map[string]string{"X-Project-Id": "a"}}})
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	hdr := map[string]string{"X-Project-Id": "a"}
	path := "/v2/images/" + id + "/file"
	if st, body, _, err := mirrorGet(ctx, tn.GlanceAddr().String(), path, hdr); err != nil || st != 200 || !bytes.Equal(body, data) {
		t.Fatalf("first download (registration): HTTP %d, %d bytes, %v", st, len(body), err)
	}

	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+tn.GlanceAddr().String()+path, nil)
	req.Header.Set("X-Project-Id", "a")
	resp, err := http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("second download: %v %v", resp, err)
	}
	defer resp.Body.Close()
	got := make([]byte, 1<<20)
	if _, err := io.ReadFull(resp.Body, got); err != nil {
		t.Fatalf("second download, first MiB: %v", err)
	}
	// The download is under way; Glance can no longer serve what hoard
	// would evict, and another image presses on the quota.
	fileOff.Store(true)
	res, err := tn.AddImage(ctx, api.ImportRequest{Source: otherPath, Name: "other", Format: "raw"}, nil)
	t.Logf("adding a 32 MiB image under a 40 MiB quota mid-download: %+v, %v", res, err)
	rest, err := io.ReadAll(resp.Body)
	got = append(got, rest...)
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("the download under eviction pressure: %d of %d bytes, identical %v, %v", len(got), len(data), bytes.Equal(got, data), err)
	}
}

// scrapeMetrics reads tn's /metrics: each series (name{labels}) to its value.
func scrapeMetrics(t *testing.T, tn *testNode) map[string]float64 {
	t.Helper()
	resp, err := http.Get("http://" + tn.APIAddr().String() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]float64{}
	for _, line := range strings.Split(string(b), "\n") {
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		var v float64
		if _, err := fmt.Sscan(line[i+1:], &v); err == nil {
			out[line[:i]] = v
		}
	}
	return out
}

// TestGlanceMirrorThroughput measures (HOARD_MEASURE=1; 256 MiB, or
// HOARD_MEASURE_MIB) a download straight from a real glance-api against the
// same download through hoard's mirror: cold (no node holds the image: the
// registration stream), from a peer (another node holds it) and warm (this
// node holds it). Run it without -race:
//
//	HOARD_MEASURE=1 go test -count=1 -timeout 15m -run TestGlanceMirrorThroughput -v ./node/
func TestGlanceMirrorThroughput(t *testing.T) {
	if os.Getenv("HOARD_MEASURE") != "1" {
		t.Skip("a measurement: set HOARD_MEASURE=1")
	}
	mib := 256
	if v := os.Getenv("HOARD_MEASURE_MIB"); v != "" {
		fmt.Sscan(v, &mib)
	}
	g := glancetest.StartEnforcing(t)
	data := writeImage(t, filepath.Join(t.TempDir(), "img.raw"), mib<<20, 77)
	id := g.Upload(t, "throughput", "raw", data)
	owner := glancetest.Identity(glancetest.Tenant, "member")
	ctx, cancel := context.WithTimeout(t.Context(), 12*time.Minute)
	defer cancel()
	get := func(what, addr string) time.Duration {
		start := time.Now()
		st, body, _, err := mirrorGet(ctx, addr, "/v2/images/"+id+"/file", owner)
		took := time.Since(start)
		if err != nil || st != 200 || !bytes.Equal(body, data) {
			t.Fatalf("%s: HTTP %d, %d bytes, %v", what, st, len(body), err)
		}
		t.Logf("%-40s %8v  %6.1f MiB/s", what, took.Round(time.Millisecond), float64(mib)/took.Seconds())
		return took
	}
	u, _ := url.Parse(g.URL())
	get("direct from glance-api (1st)", u.Host)
	direct := get("direct from glance-api (2nd)", u.Host)

	nodes := startMockCluster(t, 2, func(i int, c *node.Config) {
		c.MemCache, c.Readahead = 0, 0 // the defaults, as a daemon runs
		c.GlanceListen = "127.0.0.1:0"
		c.Origin = origin.Config{GlanceURL: g.URL(), GlanceHeaders: g.Headers()}
	})
	reg := registrarOf(nodes, id)
	other := 1 - reg
	waitConnected(t, nodes[other], 2)
	cold := get("mirror, cold (registers from Glance)", nodes[reg].GlanceAddr().String())
	peer := get("mirror, image on a peer", nodes[other].GlanceAddr().String())
	warm := get("mirror, warm (image local)", nodes[other].GlanceAddr().String())
	t.Logf("download time relative to direct glance-api (%d MiB): cold %.2fx, from a peer %.2fx, warm %.2fx",
		mib, cold.Seconds()/direct.Seconds(), peer.Seconds()/direct.Seconds(), warm.Seconds()/direct.Seconds())
}

// TestGlanceMirrorRegistrarFails: when the registrar cannot register the
// image (here Glance refuses its credentials), the node that asked it
// registers the image itself at once instead of waiting
// GlanceRegisterWait.
func TestGlanceMirrorRegistrarFails(t *testing.T) {
	t.Parallel()
	data := writeImage(t, filepath.Join(t.TempDir(), "img.raw"), 6<<20+3, 13)
	md, sh := md5Hex(data), sha512Hex(data)
	var sent atomic.Int64
	// Any image ID, to project "a" only.
	glance := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rest, _ := strings.CutPrefix(r.URL.Path, "/v2/images/")
		id, file := strings.CutSuffix(rest, "/file")
		if r.Header.Get("X-Project-Id") != "a" || id == "" || strings.Contains(id, "/") {
			http.Error(w, "No image found", http.StatusNotFound)
			return
		}
		if file {
			http.ServeContent(&glanceCountingWriter{ResponseWriter: w, n: &sent}, r, "", time.Time{}, bytes.NewReader(data))
			return
		}
		json.NewEncoder(w).Encode(map[string]any{"id": id, "status": "active", "size": len(data), "disk_format": "raw",
			"checksum": md, "os_hash_algo": "sha512", "os_hash_value": sh})
	}))
	t.Cleanup(glance.Close)
	nodes := startMockCluster(t, 2, func(i int, c *node.Config) {
		project := "a"
		if i == 1 {
			project = "b" // node 1's own credentials see nothing
		}
		c.GlanceListen = "127.0.0.1:0"
		c.GlanceRegisterWait = 90 * time.Second
		c.Origin = origin.Config{GlanceURL: glance.URL, GlanceHeaders: map[string]string{"X-Project-Id": project}}
	})
	waitConnected(t, nodes[0], 2)
	var id string
	for i := range 1000 {
		if c := fmt.Sprintf("55555555-0000-4000-8000-%012d", i); registrarOf(nodes, c) == 1 {
			id = c
			break
		}
	}
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	start := time.Now()
	st, body, _, err := mirrorGet(ctx, nodes[0].GlanceAddr().String(), "/v2/images/"+id+"/file", map[string]string{"X-Project-Id": "a"})
	took := time.Since(start)
	if err != nil || st != 200 || !bytes.Equal(body, data) {
		t.Fatalf("download: HTTP %d, %d bytes, %v: %.200s", st, len(body), err, body)
	}
	t.Logf("the registrar failed; the asking node registered the image itself: %v, Glance sent %d bytes (image %d)", took.Round(time.Millisecond), sent.Load(), len(data))
	if took > 20*time.Second {
		t.Errorf("the download took %v, want seconds: the node waited for a registrar that had failed", took)
	}
	if _, err := nodes[0].Store().Resolve(ctx, id); err != nil {
		t.Errorf("the asking node did not register the image: %v", err)
	}
}

// TestGlanceMirrorStalledClient: the client of the first download of an
// unregistered image stops reading. The registration it started goes on
// without it: a second download (which joins the registration) completes,
// the image is registered, and the daemon shuts down promptly.
func TestGlanceMirrorStalledClient(t *testing.T) {
	t.Parallel()
	const id = "66666666-0000-4000-8000-000000000001"
	// Larger than the loopback socket buffers plus the mirror's lag bound.
	data := writeImage(t, filepath.Join(t.TempDir(), "img.raw"), 48<<20+5, 21)
	sent, glanceURL := fakeGlanceServer(t, id, data, md5Hex(data), sha512Hex(data))
	tn := startNode(t, node.Config{GlanceListen: "127.0.0.1:0",
		Origin: origin.Config{GlanceURL: glanceURL, GlanceHeaders: map[string]string{"X-Project-Id": "a"}}})
	addr := tn.GlanceAddr().String()
	path := "/v2/images/" + id + "/file"

	// The stalled client: it sends its request and never reads.
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.(*net.TCPConn).SetReadBuffer(4 << 10)
	if _, err := fmt.Fprintf(conn, "GET %s HTTP/1.1\r\nHost: %s\r\nX-Project-Id: a\r\n\r\n", path, addr); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for sent.Load() == 0 {
		if time.Now().After(deadline) {
			t.Fatal("the stalled client's download did not start a registration within 30s")
		}
		time.Sleep(10 * time.Millisecond)
	}

	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	start := time.Now()
	st, body, _, err := mirrorGet(ctx, addr, path, map[string]string{"X-Project-Id": "a"})
	if err != nil || st != 200 || !bytes.Equal(body, data) {
		t.Fatalf("second download while the first client stalls: HTTP %d, %d of %d bytes, %v (after %v)", st, len(body), len(data), err, time.Since(start).Round(time.Millisecond))
	}
	t.Logf("second download of %d bytes while the first client stalls: %v; Glance sent %d bytes", len(data), time.Since(start).Round(time.Millisecond), sent.Load())
	if _, err := tn.Store().Resolve(ctx, id); err != nil {
		t.Errorf("the image was not registered: %v", err)
	}

	stopped := make(chan error, 1)
	start = time.Now()
	go func() { stopped <- tn.stop() }()
	select {
	case err := <-stopped:
		t.Logf("the daemon stopped in %v with a client stalled", time.Since(start).Round(time.Millisecond))
		if err != nil {
			t.Errorf("Run: %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Errorf("the daemon did not stop within 20s while a mirror client stalls")
	}
}

// TestGlanceMirrorClientLeaves: the client of the first download of an
// unregistered image goes away after its first MiB; the registration goes
// on and registers the image.
func TestGlanceMirrorClientLeaves(t *testing.T) {
	t.Parallel()
	const id = "66666666-0000-4000-8000-000000000002"
	data := writeImage(t, filepath.Join(t.TempDir(), "img.raw"), 24<<20+3, 22)
	sent, glanceURL := fakeGlanceServer(t, id, data, md5Hex(data), sha512Hex(data))
	tn := startNode(t, node.Config{GlanceListen: "127.0.0.1:0",
		Origin: origin.Config{GlanceURL: glanceURL, GlanceHeaders: map[string]string{"X-Project-Id": "a"}}})
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+tn.GlanceAddr().String()+"/v2/images/"+id+"/file", nil)
	req.Header.Set("X-Project-Id", "a")
	resp, err := http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("download: %v %v", resp, err)
	}
	if _, err := io.ReadFull(resp.Body, make([]byte, 1<<20)); err != nil {
		t.Fatalf("first MiB: %v", err)
	}
	resp.Body.Close()
	waitFor(t, "the image to be registered after its client left", func() bool {
		_, err := tn.Store().Resolve(ctx, id)
		return err == nil
	})
	if got := sent.Load(); got != int64(len(data)) {
		t.Errorf("Glance sent %d bytes, want the image once (%d)", got, len(data))
	}
}
