package glancemirror_test

import (
	"bytes"
	"context"
	"crypto/md5"
	"crypto/sha512"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hoardvm/hoard/node/glancemirror"
)

const (
	imageID = "6a1f3c2e-0000-4000-8000-000000000001"
	owner   = "project-a"
)

// fakeGlance answers GET /v2/images/{id} like a project-enforcing Glance:
// 200 to the owner's project, 404 to another, 401 without identity; its
// download_image policy refuses the file (403) to the owner's role "viewer".
type fakeGlance struct {
	data   []byte
	status atomic.Int32 // when set, every request gets this status
	seen   atomic.Value // the last request's headers
	files  atomic.Int64 // file downloads Glance served itself
	probes atomic.Int64 // one-byte file reads (Range: bytes=0-0): the mirror's authorizations
}

func (g *fakeGlance) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	g.seen.Store(r.Header.Clone())
	if s := g.status.Load(); s != 0 {
		http.Error(w, "glance is unwell", int(s))
		return
	}
	if r.URL.Path == "/" || r.URL.Path == "/versions" {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusMultipleChoices)
		fmt.Fprint(w, `{"versions":[{"id":"v2.16","status":"CURRENT"}]}`)
		return
	}
	if r.Header.Get("X-Identity-Status") != "Confirmed" {
		http.Error(w, "401 Unauthorized: no identity", http.StatusUnauthorized)
		return
	}
	if r.Header.Get("X-Project-Id") != owner {
		http.Error(w, "404 Not Found: No image found with ID "+imageID, http.StatusNotFound)
		return
	}
	switch r.URL.Path {
	case "/v2/images/" + imageID:
		md := md5.Sum(g.data)
		sh := sha512.Sum512(g.data)
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(map[string]any{"id": imageID, "status": "active", "size": len(g.data),
			"checksum": hex.EncodeToString(md[:]), "os_hash_algo": "sha512", "os_hash_value": hex.EncodeToString(sh[:]),
			"disk_format": "qcow2", "owner": owner})
	case "/v2/images/" + imageID + "/file":
		if r.Header.Get("X-Roles") == "viewer" {
			http.Error(w, "403 Forbidden: You are not authorized to complete download_image action.", http.StatusForbidden)
			return
		}
		if r.Header.Get("Range") == "bytes=0-0" {
			g.probes.Add(1)
			w.Header().Set("Content-Range", fmt.Sprintf("bytes 0-0/%d", len(g.data)))
			w.WriteHeader(http.StatusPartialContent)
			w.Write(g.data[:1])
			return
		}
		g.files.Add(1)
		w.Write(g.data)
	default:
		http.NotFound(w, r)
	}
}

// fakeImages holds registered images in memory; corrupt flips a byte of
// what Open serves.
type fakeImages struct {
	mu        sync.Mutex
	data      []byte // the image's bytes, served by Register
	reg       map[string][]byte
	opens     atomic.Int64
	registers atomic.Int64
	corrupt   bool
}

func (f *fakeImages) Open(_ context.Context, m glancemirror.Meta) (glancemirror.Image, error) {
	f.opens.Add(1)
	f.mu.Lock()
	defer f.mu.Unlock()
	b, ok := f.reg[m.ID]
	if !ok {
		return nil, fmt.Errorf("image %s: %w", m.ID, glancemirror.ErrUnknown)
	}
	if f.corrupt {
		b = bytes.Clone(b)
		b[len(b)/2] ^= 1
	}
	return memImage(b), nil
}

func (f *fakeImages) Register(_ context.Context, m glancemirror.Meta) (io.ReadCloser, error) {
	f.registers.Add(1)
	f.mu.Lock()
	f.reg[m.ID] = f.data
	f.mu.Unlock()
	return io.NopCloser(bytes.NewReader(f.data)), nil
}

type memImage []byte

func (m memImage) Size() int64 { return int64(len(m)) }
func (m memImage) ReadAt(_ context.Context, p []byte, off int64) error {
	if off+int64(len(p)) > int64(len(m)) {
		return errors.New("read beyond the end")
	}
	copy(p, m[off:])
	return nil
}
func (m memImage) Close() error { return nil }

func setup(t *testing.T) (*fakeGlance, *fakeImages, *httptest.Server) {
	t.Helper()
	data := make([]byte, 3<<20+12345)
	rnd := rand.New(rand.NewPCG(1, 2))
	for i := range data {
		data[i] = byte(rnd.Uint32())
	}
	g := &fakeGlance{data: data}
	gs := httptest.NewServer(g)
	t.Cleanup(gs.Close)
	imgs := &fakeImages{data: data, reg: map[string][]byte{}}
	h, err := glancemirror.New(glancemirror.Config{GlanceURL: gs.URL, Images: imgs, AuthTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	ms := httptest.NewServer(h)
	t.Cleanup(ms.Close)
	return g, imgs, ms
}

func get(t *testing.T, url, project, rng string) (*http.Response, []byte, error) {
	t.Helper()
	return getAs(t, url, project, "member", rng)
}

// getAs is get with the caller's roles.
func getAs(t *testing.T, url, project, roles, rng string) (*http.Response, []byte, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if project != "" {
		req.Header.Set("X-Identity-Status", "Confirmed")
		req.Header.Set("X-Project-Id", project)
		req.Header.Set("X-Roles", roles)
		req.Header.Set("X-Auth-Token", "tok-"+project)
	}
	if rng != "" {
		req.Header.Set("Range", rng)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return resp, body, err
}

func TestDownloadRegistersThenServesFromHoard(t *testing.T) {
	t.Parallel()
	g, imgs, ms := setup(t)
	md := md5.Sum(g.data)
	for i := range 2 { // the first registers, the second is served by Open
		resp, body, err := get(t, ms.URL+"/v2/images/"+imageID+"/file", owner, "")
		if err != nil {
			t.Fatalf("download %d: %v", i, err)
		}
		if resp.StatusCode != http.StatusOK || !bytes.Equal(body, g.data) {
			t.Fatalf("download %d: HTTP %d, %d bytes (want 200, %d identical bytes)", i, resp.StatusCode, len(body), len(g.data))
		}
		if got := resp.Header.Get("Content-MD5"); got != hex.EncodeToString(md[:]) {
			t.Errorf("Content-MD5 %q, want Glance's checksum %x", got, md)
		}
		if resp.ContentLength != int64(len(g.data)) {
			t.Errorf("Content-Length %d, want %d", resp.ContentLength, len(g.data))
		}
	}
	if r := imgs.registers.Load(); r != 1 {
		t.Errorf("%d registrations, want 1", r)
	}
	if n := g.files.Load(); n != 0 {
		t.Errorf("Glance served %d file downloads itself, want 0", n)
	}
	h, _ := g.seen.Load().(http.Header)
	if h.Get("X-Auth-Token") != "tok-"+owner || h.Get("X-Project-Id") != owner || h.Get("X-Roles") != "member" {
		t.Errorf("Glance did not get the caller's identity headers: %v", h)
	}
}

func TestRefusalPassesThroughEvenWhenCached(t *testing.T) {
	t.Parallel()
	g, imgs, ms := setup(t)
	imgs.reg[imageID] = g.data // every byte is here
	for _, tc := range []struct {
		project string
		want    int
	}{{"project-b", http.StatusNotFound}, {"", http.StatusUnauthorized}} {
		resp, body, err := get(t, ms.URL+"/v2/images/"+imageID+"/file", tc.project, "")
		if err != nil {
			t.Fatal(err)
		}
		if resp.StatusCode != tc.want || bytes.Contains(body, g.data[:64]) {
			t.Errorf("project %q: HTTP %d (want %d), body %.80q", tc.project, resp.StatusCode, tc.want, body)
		}
		if tc.want == http.StatusNotFound && !strings.Contains(string(body), "No image found") {
			t.Errorf("project %q: body %q is not Glance's", tc.project, body)
		}
	}
	if n := imgs.opens.Load(); n != 0 {
		t.Errorf("the mirror opened the image %d times for refused callers, want 0", n)
	}
}

// TestDownloadPolicy: a caller Glance lets see the image (get_image) but not
// download it (download_image) gets Glance's 403 from the mirror, even with
// every byte cached, for a full download and a range; the owner's members
// are authorized by a one-byte read of the file.
func TestDownloadPolicy(t *testing.T) {
	t.Parallel()
	g, imgs, ms := setup(t)
	imgs.reg[imageID] = g.data // every byte is here
	url := ms.URL + "/v2/images/" + imageID + "/file"
	if resp, _, err := getAs(t, ms.URL+"/v2/images/"+imageID, owner, "viewer", ""); err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("the viewer cannot see the image record: %v %v", resp, err)
	}
	for _, rng := range []string{"", "bytes=10-99"} {
		resp, body, err := getAs(t, url, owner, "viewer", rng)
		if err != nil {
			t.Fatal(err)
		}
		if resp.StatusCode != http.StatusForbidden || bytes.Contains(body, g.data[:64]) || !strings.Contains(string(body), "download_image") {
			t.Errorf("viewer, range %q: HTTP %d (want Glance's 403), body %.100q", rng, resp.StatusCode, body)
		}
	}
	if n := imgs.opens.Load(); n != 0 {
		t.Errorf("the mirror opened the image %d times for a caller Glance does not let download it, want 0", n)
	}
	resp, body, err := get(t, url, owner, "")
	if err != nil || resp.StatusCode != http.StatusOK || !bytes.Equal(body, g.data) {
		t.Fatalf("member: HTTP %v, %d bytes, %v", resp, len(body), err)
	}
	if p, f := g.probes.Load(), g.files.Load(); p != 1 || f != 0 {
		t.Errorf("member's download: Glance served %d one-byte authorizations and %d downloads, want 1 and 0", p, f)
	}
}

func TestGlanceDownServesNothing(t *testing.T) {
	t.Parallel()
	g, imgs, ms := setup(t)
	imgs.reg[imageID] = g.data
	g.status.Store(http.StatusInternalServerError)
	resp, body, err := get(t, ms.URL+"/v2/images/"+imageID+"/file", owner, "")
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusServiceUnavailable || !strings.Contains(string(body), "500") {
		t.Errorf("Glance 500: HTTP %d %q, want 503 naming Glance's status", resp.StatusCode, body)
	}

	// Glance gone: 502.
	dead := httptest.NewServer(http.NotFoundHandler())
	deadURL := dead.URL
	dead.Close()
	h, _ := glancemirror.New(glancemirror.Config{GlanceURL: deadURL, Images: imgs, AuthTimeout: 2 * time.Second})
	ms2 := httptest.NewServer(h)
	defer ms2.Close()
	resp, body, err = get(t, ms2.URL+"/v2/images/"+imageID+"/file", owner, "")
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusBadGateway || !strings.Contains(string(body), "cannot reach Glance") {
		t.Errorf("Glance down: HTTP %d %q, want 502 saying so", resp.StatusCode, body)
	}
	if n := imgs.opens.Load(); n != 0 {
		t.Errorf("opened the image %d times without Glance's answer, want 0", n)
	}
}

func TestRange(t *testing.T) {
	t.Parallel()
	g, imgs, ms := setup(t)
	size := int64(len(g.data))
	for i, tc := range []struct {
		rng     string
		status  int
		lo, hi  int64
		content string
	}{
		{"bytes=0-99", 206, 0, 100, "bytes 0-99/"},
		{"bytes=1048570-2097160", 206, 1048570, 2097161, "bytes 1048570-2097160/"},
		{"bytes=-10", 206, size - 10, size, fmt.Sprintf("bytes %d-%d/", size-10, size-1)},
		{fmt.Sprintf("bytes=%d-", size-5), 206, size - 5, size, fmt.Sprintf("bytes %d-%d/", size-5, size-1)},
		{fmt.Sprintf("bytes=%d-", size), 416, 0, 0, "bytes */"},
		{"bytes=0-1,5-6", 416, 0, 0, "bytes */"},
	} {
		resp, body, err := get(t, ms.URL+"/v2/images/"+imageID+"/file", owner, tc.rng)
		if err != nil {
			t.Fatalf("%s: %v", tc.rng, err)
		}
		if resp.StatusCode != tc.status {
			t.Fatalf("%s: HTTP %d, want %d: %s", tc.rng, resp.StatusCode, tc.status, body)
		}
		if cr := resp.Header.Get("Content-Range"); cr != tc.content+fmt.Sprint(size) {
			t.Errorf("%s: Content-Range %q, want %q", tc.rng, cr, tc.content+fmt.Sprint(size))
		}
		if tc.status == 206 && !bytes.Equal(body, g.data[tc.lo:tc.hi]) {
			t.Errorf("%s: wrong bytes (%d of them)", tc.rng, len(body))
		}
		if i == 0 && imgs.registers.Load() != 1 {
			t.Errorf("a range of an unknown image did not register it")
		}
	}
}

func TestChecksumMismatchFailsTheDownload(t *testing.T) {
	t.Parallel()
	g, imgs, ms := setup(t)
	imgs.reg[imageID] = g.data
	imgs.corrupt = true
	resp, body, err := get(t, ms.URL+"/v2/images/"+imageID+"/file", owner, "")
	if err == nil {
		t.Fatalf("a download of wrong bytes completed: HTTP %d, %d bytes", resp.StatusCode, len(body))
	}
	if int64(len(body)) >= int64(len(g.data)) {
		t.Errorf("the client got all %d bytes of a wrong image", len(body))
	}
}

func TestPassThrough(t *testing.T) {
	t.Parallel()
	g, _, ms := setup(t)
	resp, body, err := get(t, ms.URL+"/", "", "")
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusMultipleChoices || !strings.Contains(string(body), "v2.16") {
		t.Errorf("version document: HTTP %d %q", resp.StatusCode, body)
	}
	resp, body, err = get(t, ms.URL+"/v2/images/"+imageID, owner, "")
	if err != nil {
		t.Fatal(err)
	}
	var m glancemirror.Meta
	if resp.StatusCode != http.StatusOK || json.Unmarshal(body, &m) != nil || m.ID != imageID {
		t.Errorf("image record: HTTP %d %q", resp.StatusCode, body)
	}
	resp, _, err = get(t, ms.URL+"/v2/images/"+imageID, "project-b", "")
	if err != nil || resp.StatusCode != http.StatusNotFound {
		t.Errorf("image record for another project: %v %v, want Glance's 404", resp.StatusCode, err)
	}
	req, _ := http.NewRequestWithContext(t.Context(), http.MethodDelete, ms.URL+"/v2/images/"+imageID, nil)
	resp, err = http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusMethodNotAllowed {
		t.Errorf("DELETE: HTTP %d, want 405", resp.StatusCode)
	}
	_ = g
}

// gatedImages serves data from Open; every ReadAt waits for gate to close.
type gatedImages struct {
	data  []byte
	gate  chan struct{}
	opens atomic.Int64
}

func (g *gatedImages) Open(context.Context, glancemirror.Meta) (glancemirror.Image, error) {
	g.opens.Add(1)
	return gatedImage{memImage(g.data), g.gate}, nil
}

func (g *gatedImages) Register(context.Context, glancemirror.Meta) (io.ReadCloser, error) {
	return nil, errors.New("gatedImages registers nothing")
}

type gatedImage struct {
	memImage
	gate chan struct{}
}

func (g gatedImage) ReadAt(ctx context.Context, p []byte, off int64) error {
	select {
	case <-g.gate:
	case <-ctx.Done():
		return ctx.Err()
	}
	return g.memImage.ReadAt(ctx, p, off)
}

// TestMaxDownloads: beyond MaxDownloads downloads under way, a download is
// answered 503 with Retry-After and a message; once they end, downloads are
// served again.
func TestMaxDownloads(t *testing.T) {
	t.Parallel()
	data := make([]byte, 3<<20+1)
	g := &fakeGlance{data: data}
	gs := httptest.NewServer(g)
	t.Cleanup(gs.Close)
	imgs := &gatedImages{data: data, gate: make(chan struct{})}
	h, err := glancemirror.New(glancemirror.Config{GlanceURL: gs.URL, Images: imgs, MaxDownloads: 2})
	if err != nil {
		t.Fatal(err)
	}
	ms := httptest.NewServer(h)
	t.Cleanup(ms.Close)
	url := ms.URL + "/v2/images/" + imageID + "/file"
	type result struct {
		code int
		n    int
		err  error
	}
	res := make(chan result, 2)
	for range 2 {
		go func() {
			resp, body, err := get(t, url, owner, "")
			if err != nil {
				res <- result{err: err}
				return
			}
			res <- result{code: resp.StatusCode, n: len(body)}
		}()
	}
	deadline := time.Now().Add(10 * time.Second)
	for imgs.opens.Load() < 2 {
		if time.Now().After(deadline) {
			t.Fatal("the two downloads did not open the image within 10s")
		}
		time.Sleep(5 * time.Millisecond)
	}
	resp, body, err := get(t, url, owner, "")
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusServiceUnavailable || resp.Header.Get("Retry-After") == "" || !strings.Contains(string(body), "retry") {
		t.Errorf("a third download with 2 under way: HTTP %d, Retry-After %q, body %q; want 503 with Retry-After and what to do", resp.StatusCode, resp.Header.Get("Retry-After"), body)
	}
	close(imgs.gate)
	for range 2 {
		if r := <-res; r.err != nil || r.code != http.StatusOK || r.n != len(data) {
			t.Errorf("a download under way: HTTP %d, %d bytes, %v", r.code, r.n, r.err)
		}
	}
	if resp, body, err := get(t, url, owner, ""); err != nil || resp.StatusCode != http.StatusOK || !bytes.Equal(body, data) {
		t.Errorf("a download after the others ended: %v, %d bytes, %v", resp, len(body), err)
	}
}
