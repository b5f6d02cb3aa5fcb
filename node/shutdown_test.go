package node_test

import (
	"context"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hoardvm/hoard/chunkstore"
	"github.com/hoardvm/hoard/node"
	"github.com/hoardvm/hoard/node/api"
	"github.com/hoardvm/hoard/node/importer"
	"github.com/hoardvm/hoard/node/origin"
)

// TestRunCancelsAndWaitsForImports (issue 7, item 8): stopping the daemon
// while POST /v1/images streams from a slow origin cancels the import and
// waits for it: the request ends with an error before Run returns, and the
// store is never used after Run closed it (that used to panic: "pebble:
// closed"). The origin never finishes by itself: only the daemon's
// cancellation can end the import.
func TestRunCancelsAndWaitsForImports(t *testing.T) {
	t.Parallel()
	const size = 64 << 20
	head := make([]byte, 1<<20)
	rand.NewChaCha8([32]byte{42}).Read(head)
	started := make(chan struct{})
	var once sync.Once
	release := make(chan struct{})
	origin := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Accept-Ranges", "bytes")
		w.Header().Set("Content-Length", strconv.Itoa(size))
		if r.Method == http.MethodHead {
			return
		}
		w.Write(head)
		w.(http.Flusher).Flush()
		once.Do(func() { close(started) })
		select { // then nothing more, until the client goes away
		case <-r.Context().Done():
		case <-release:
		}
	}))
	t.Cleanup(func() { close(release); origin.Close() })

	n, err := node.New(node.Config{DataDir: t.TempDir(), NBDSocket: "-", APIListen: "127.0.0.1:0", HotCache: -1}, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ran := make(chan error, 1)
	go func() { ran <- n.Run(ctx) }()
	select {
	case <-n.Ready():
	case err := <-ran:
		t.Fatalf("Run: %v", err)
	case <-time.After(10 * time.Second):
		t.Fatal("node not ready after 10 s")
	}
	added := make(chan error, 1)
	go func() {
		_, err := api.NewClient(n.APIAddr().String(), n.APIToken()).AddImage(context.Background(), api.ImportRequest{Source: origin.URL + "/slow.raw", Name: "slow"})
		added <- err
	}()
	select {
	case <-started:
	case err := <-added:
		t.Fatalf("import ended before the origin sent its first bytes: %v", err)
	case <-time.After(20 * time.Second):
		t.Fatal("the import never reached the origin")
	}

	cancel()
	select {
	case err := <-ran:
		if err != nil {
			t.Errorf("Run: %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("Run still running 20 s after its context was cancelled")
	}
	select {
	case err := <-added:
		if err == nil {
			t.Fatal("the import succeeded although the daemon stopped in the middle")
		}
		t.Logf("the import's client saw: %v", err)
	case <-time.After(10 * time.Second):
		t.Fatal("the import request is still running after Run returned: Run did not cancel it and wait for it")
	}
}

// lateFetcher answers a fetch only after the node began to stop: it waits
// for ctx, then for release (or 2 s), and then returns the right bytes, as a
// peer whose answer was on the wire when the daemon was told to stop.
type lateFetcher struct {
	data     []byte
	m        *chunkstore.Manifest
	asked    chan struct{}
	once     sync.Once
	release  chan struct{}
	answered atomic.Bool
}

func (f *lateFetcher) Fetch(ctx context.Context, _ chunkstore.ID, index int, _ chunkstore.ID) ([]byte, error) {
	f.once.Do(func() { close(f.asked) })
	<-ctx.Done()
	select {
	case <-f.release:
	case <-time.After(2 * time.Second):
	}
	e := f.m.Entries[index]
	f.answered.Store(true)
	return f.data[e.Offset:e.End()], nil
}

// TestRunWaitsForFetches (issue 7, item 8): a chunk fetch under way when the
// daemon stops stores what it got before Run closes the store: Run returns
// only after the fetch ended. It used to close the store under it (then the
// store's Put panicked: "pebble: closed").
func TestRunWaitsForFetches(t *testing.T) {
	t.Parallel()
	data := randBytes(1<<20, 51)
	path := filepath.Join(t.TempDir(), "lazy.raw")
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	f := &lateFetcher{data: data, asked: make(chan struct{}), release: make(chan struct{})}
	n, err := node.New(node.Config{DataDir: t.TempDir(), NBDSocket: "-", APIListen: "127.0.0.1:0", HotCache: -1, Readahead: -1,
		NoProfilePrefetch: true, Fetcher: f}, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ran := make(chan error, 1)
	go func() { ran <- n.Run(ctx) }()
	select {
	case <-n.Ready():
	case err := <-ran:
		t.Fatalf("Run: %v", err)
	case <-time.After(10 * time.Second):
		t.Fatal("node not ready after 10 s")
	}
	src, err := origin.Open(ctx, path, origin.Config{})
	if err != nil {
		t.Fatal(err)
	}
	res, err := importer.Import(ctx, n.Store(), src, importer.Options{Name: "lazy", Lazy: true})
	src.Close()
	if err != nil {
		t.Fatal(err)
	}
	if f.m, err = n.Store().GetManifest(ctx, res.Manifest); err != nil {
		t.Fatal(err)
	}
	x, err := n.Open(ctx, "lazy")
	if err != nil {
		t.Fatal(err)
	}
	rctx, rcancel := context.WithCancel(context.Background())
	defer rcancel()
	go x.ReadAt(rctx, make([]byte, 4096), 0)
	select {
	case <-f.asked:
	case <-time.After(10 * time.Second):
		t.Fatal("the read never asked the fetcher")
	}

	cancel()
	select {
	case err := <-ran:
		if err != nil {
			t.Errorf("Run: %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("Run still running 20 s after its context was cancelled")
	}
	answered := f.answered.Load()
	close(f.release)
	if !answered {
		t.Fatal("Run returned, and closed the store, while a chunk fetch was still under way")
	}
}
