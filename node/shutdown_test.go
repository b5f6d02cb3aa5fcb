package node_test

import (
	"context"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/hoardvm/hoard/node"
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
		_, err := node.NewClient(n.APIAddr().String(), "").AddImage(context.Background(), node.ImportRequest{Source: origin.URL + "/slow.raw", Name: "slow"})
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
