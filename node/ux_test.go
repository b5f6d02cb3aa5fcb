package node_test

import (
	"bytes"
	"context"
	"encoding/json"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hoardvm/hoard/chunkstore"
	"github.com/hoardvm/hoard/node"
	"github.com/hoardvm/hoard/node/api"
	"github.com/hoardvm/hoard/p2p"
)

// TestLazyAddRefusedWithoutRanges: a lazy add from a server that ignores
// Range requests (python3 -m http.server) is refused at add time with the
// reason and what to do, instead of registering an image every read of
// which fails; the same source imports whole.
func TestLazyAddRefusedWithoutRanges(t *testing.T) {
	t.Parallel()
	data := make([]byte, 300_000)
	for i := range data {
		data[i] = byte(i * 7)
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", strconv.Itoa(len(data)))
		if r.Method != http.MethodHead {
			w.Write(data) // the whole image, whatever the Range header says
		}
	}))
	t.Cleanup(srv.Close)
	tn := startNode(t, node.Config{})
	_, err := tn.client.AddImage(t.Context(), api.ImportRequest{Source: srv.URL + "/disk.raw", Name: "lazy", Lazy: true})
	if err == nil {
		t.Fatal("lazy add from a server without Range support was accepted")
	}
	for _, want := range []string{"Range", "without --lazy"} {
		if !strings.Contains(err.Error(), want) {
			t.Fatalf("error %q does not mention %q", err, want)
		}
	}
	if imgs, err := tn.client.Images(t.Context()); err != nil || len(imgs) != 0 {
		t.Fatalf("images after the refused add: %+v, %v", imgs, err)
	}
	res := addImage(t, tn, api.ImportRequest{Source: srv.URL + "/disk.raw", Name: "whole"})
	if res.Size != int64(len(data)) {
		t.Fatalf("whole import: size %d, want %d", res.Size, len(data))
	}
}

// TestPullWithNoPeerSaysHowToJoin: a node with a swarm key but no peer (its
// key differs from the cluster's, or no p2p.bootstrap) says it is not in a
// cluster yet and how to join, instead of only that no peer knows the image.
func TestPullWithNoPeerSaysHowToJoin(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "swarm.key"), p2p.GenerateSwarmKey(), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := node.Config{DataDir: dir}
	cfg.P2P.Listen = []string{"/ip4/127.0.0.1/tcp/0"}
	tn := startNode(t, cfg)
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	_, err := tn.client.PullImage(ctx, "debian-12")
	if err == nil {
		t.Fatal("pull of an unknown image on a node without peers succeeded")
	}
	for _, want := range []string{"connected to no peer", "not in a cluster", "hoard cluster keygen", "p2p.bootstrap"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("pull error %q does not mention %q", err, want)
		}
	}
}

// slowOrigin serves size bytes of data 256 KiB at a time with a pause in
// between, so that an import of it takes about size/256KiB*pause.
func slowOrigin(t *testing.T, data []byte, pause time.Duration) *httptest.Server {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Accept-Ranges", "bytes")
		w.Header().Set("Content-Length", strconv.Itoa(len(data)))
		if r.Method == http.MethodHead {
			return
		}
		if r.Header.Get("Range") != "" {
			http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(data))
			return
		}
		for off := 0; off < len(data); off += 256 << 10 {
			if _, err := w.Write(data[off:min(len(data), off+256<<10)]); err != nil {
				return
			}
			w.(http.Flusher).Flush()
			select {
			case <-time.After(pause):
			case <-r.Context().Done():
				return
			}
		}
	}))
	t.Cleanup(srv.Close)
	return srv
}

// TestAddImageStreamsProgress: a client that asks for progress gets the
// import's bytes as they are read, increasing, ending at the image size,
// then the result; one that does not gets the plain JSON answer.
func TestAddImageStreamsProgress(t *testing.T) {
	t.Parallel()
	const size = 8 << 20
	data := make([]byte, size)
	rand.NewChaCha8([32]byte{9}).Read(data)
	srv := slowOrigin(t, data, 20*time.Millisecond)
	tn := startNode(t, node.Config{})
	var seen []api.Progress
	res, err := tn.client.AddImageProgress(t.Context(), api.ImportRequest{Source: srv.URL + "/slow.raw", Name: "slow"},
		func(p api.Progress) { seen = append(seen, p) })
	if err != nil {
		t.Fatal(err)
	}
	if res.Size != size || res.Name != "slow" {
		t.Fatalf("result: %+v", res)
	}
	var distinct int
	var last int64 = -1
	for i, p := range seen {
		if p.Phase != "import" || p.Unit != "bytes" {
			t.Fatalf("event %d: %+v, want phase import in bytes", i, p)
		}
		if p.Done < last {
			t.Fatalf("progress went back: %+v", seen)
		}
		if p.Done > last {
			distinct++
		}
		if p.Done > 0 && p.Total != size {
			t.Fatalf("event %d: total %d, want %d", i, p.Total, size)
		}
		last = p.Done
	}
	if distinct < 3 || last != size || seen[len(seen)-1].Total != size {
		t.Fatalf("progress: %d distinct values, last %d of %d; want several, ending at the total: %+v", distinct, last, size, seen)
	}

	// An old client (no Accept header) gets the plain JSON answer.
	req, _ := http.NewRequestWithContext(t.Context(), http.MethodPost, "http://"+tn.APIAddr().String()+"/v1/store/verify", nil)
	req.Header.Set("Authorization", "Bearer "+tn.APIToken())
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var v chunkstore.VerifyResult
	if ct := resp.Header.Get("Content-Type"); ct != "application/json" || json.NewDecoder(resp.Body).Decode(&v) != nil || v.Chunks == 0 {
		t.Fatalf("plain verify: Content-Type %q, %+v", ct, v)
	}
	// The store routes stream too.
	var verified []api.Progress
	vr, err := tn.client.StoreVerifyProgress(t.Context(), func(p api.Progress) { verified = append(verified, p) })
	if err != nil || vr.Chunks != v.Chunks || len(verified) == 0 {
		t.Fatalf("streamed verify: %+v, %v, progress %+v", vr, err, verified)
	}
	if p := verified[len(verified)-1]; p.Unit != "chunks" || p.Done != int64(vr.Chunks) {
		t.Fatalf("verify progress ends at %+v, want %d chunks", p, vr.Chunks)
	}
	if _, err := tn.client.StoreGCProgress(t.Context(), func(api.Progress) {}); err != nil {
		t.Fatalf("streamed gc: %v", err)
	}
}

// TestClientGoneCancelsImport: a client that disconnects from a streamed
// import cancels it: the daemon stops reading the origin, and no image is
// registered.
func TestClientGoneCancelsImport(t *testing.T) {
	t.Parallel()
	const size = 64 << 20
	head := make([]byte, 1<<20)
	rand.NewChaCha8([32]byte{4}).Read(head)
	started := make(chan struct{})
	stopped := make(chan struct{})
	var once, stopOnce sync.Once
	release := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Accept-Ranges", "bytes")
		w.Header().Set("Content-Length", strconv.Itoa(size))
		if r.Method == http.MethodHead {
			return
		}
		w.Write(head)
		w.(http.Flusher).Flush()
		once.Do(func() { close(started) })
		select { // then nothing more, until the importer goes away
		case <-r.Context().Done():
			stopOnce.Do(func() { close(stopped) })
		case <-release:
		}
	}))
	t.Cleanup(func() { close(release); srv.Close() })
	tn := startNode(t, node.Config{})

	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	errc := make(chan error, 1)
	var events atomic.Int64
	go func() {
		_, err := tn.client.AddImageProgress(ctx, api.ImportRequest{Source: srv.URL + "/big.raw", Name: "big"},
			func(api.Progress) { events.Add(1) })
		errc <- err
	}()
	select {
	case <-started: // mid-import: the origin is streaming
	case <-time.After(30 * time.Second):
		t.Fatal("the import did not start reading the origin")
	}
	cancel()
	select {
	case <-stopped:
	case <-time.After(30 * time.Second):
		t.Fatal("the import still reads the origin 30 s after its client went away")
	}
	select {
	case err := <-errc:
		if err == nil {
			t.Fatal("cancelled import succeeded")
		}
	case <-time.After(30 * time.Second):
		t.Fatal("AddImageProgress did not return after its context was cancelled")
	}
	if events.Load() == 0 {
		t.Error("no progress event before the client went away")
	}
	waitFor(t, "the cancelled import to leave no image", func() bool {
		imgs, err := tn.client.Images(t.Context())
		return err == nil && len(imgs) == 0
	})
}
