package node_test

import (
	"bytes"
	"context"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hoardvm/hoard/chunkstore"
	"github.com/hoardvm/hoard/nbd"
	"github.com/hoardvm/hoard/node"
	"github.com/hoardvm/hoard/node/api"
)

// hangingOrigin serves data normally until hang is set; from then on it
// accepts every request and never answers (until the test ends).
type hangingOrigin struct {
	*rangeServer
	hang    atomic.Bool
	waiting atomic.Int64 // requests held unanswered
}

func newHangingOrigin(t *testing.T, data []byte) *hangingOrigin {
	h := &hangingOrigin{rangeServer: newRangeServer(t, data)}
	serve := h.Server.Config.Handler
	release := make(chan struct{})
	h.Server.Config.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !h.hang.Load() {
			serve.ServeHTTP(w, r)
			return
		}
		h.waiting.Add(1)
		select {
		case <-r.Context().Done():
		case <-release:
		}
	})
	// Runs before newRangeServer's Close, which waits for the handlers.
	t.Cleanup(func() { close(release) })
	return h
}

// readWithin reads p at off from x and fails the test if that takes longer
// than limit (the read goes on in the background until ctx is done).
func readWithin(t *testing.T, ctx context.Context, x nbd.Export, p []byte, off int64, limit time.Duration, what string) {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- x.ReadAt(ctx, p, off) }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
	case <-time.After(limit):
		t.Fatalf("%s: no answer within %s while another origin hangs", what, limit)
	}
}

// TestHangingOriginStallsNothingElse (issue 7, item 9): while image A's
// origin accepts connections and never answers (the first miss is opening
// it: HEAD), reads of A's chunks that are stored locally and reads of image
// B, whose origin is healthy, are served at once. They used to wait: every
// read of A took the lock held across A's origin being opened, and A's
// misses took all the node's origin slots, which B's misses needed.
func TestHangingOriginStallsNothingElse(t *testing.T) {
	t.Parallel()
	dataA, dataB := randBytes(4<<20, 31), randBytes(4<<20, 32)
	originA, originB := newHangingOrigin(t, dataA), newRangeServer(t, dataB)
	tn := startNode(t, node.Config{OriginTimeout: 2 * time.Minute, OriginConcurrency: 4, HotCache: -1, MemCache: -1, Readahead: -1, NoProfilePrefetch: true})
	ctx, cancel := context.WithCancel(context.Background())
	var readers sync.WaitGroup
	t.Cleanup(func() { // before the node stops
		cancel()
		done := make(chan struct{})
		go func() { readers.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Error("reads of image A still blocked 10 s after their context was cancelled")
		}
	})

	resA := addImage(t, tn, api.ImportRequest{Source: originA.URL + "/a.raw", Name: "a"})
	addImage(t, tn, api.ImportRequest{Source: originB.URL + "/b.raw", Name: "b", Lazy: true})
	m, err := tn.Store().GetManifest(ctx, resA.Manifest)
	if err != nil {
		t.Fatal(err)
	}
	// Drop chunks of A from the store (as eviction would), more of them
	// than there are origin slots; the others stay local.
	var gone, kept []chunkstore.Entry
	for _, e := range m.Entries {
		switch {
		case e.Zero:
		case len(gone) < 6:
			gone = append(gone, e)
		default:
			kept = append(kept, e)
		}
	}
	if len(kept) == 0 {
		t.Fatal("image A has too few chunks for this test")
	}
	for _, e := range gone {
		if err := tn.Store().Delete(ctx, e.ID); err != nil {
			t.Fatal(err)
		}
	}
	xa, err := tn.Open(ctx, "a")
	if err != nil {
		t.Fatal(err)
	}
	defer xa.Close()
	xb, err := tn.Open(ctx, "b")
	if err != nil {
		t.Fatal(err)
	}
	defer xb.Close()

	// Generous for a loaded machine under -race, far from the 2 minutes
	// that the stalled reads used to wait (OriginTimeout).
	const limit = 20 * time.Second
	originA.hang.Store(true)
	for _, e := range gone {
		readers.Go(func() { xa.ReadAt(ctx, make([]byte, e.Length), e.Offset) })
	}
	eventually(t, 10*time.Second, func() bool { return originA.waiting.Load() > 0 }, "image A's origin never asked")

	for _, e := range kept[:min(len(kept), 8)] {
		p := make([]byte, e.Length)
		readWithin(t, ctx, xa, p, e.Offset, limit, "read of a stored chunk of image A")
		if !bytes.Equal(p, dataA[e.Offset:e.End()]) {
			t.Fatalf("image A at %d: wrong bytes", e.Offset)
		}
	}
	p := make([]byte, 4096)
	readWithin(t, ctx, xb, p, 1<<20, limit, "read of image B from its healthy origin")
	if !bytes.Equal(p, dataB[1<<20:1<<20+4096]) {
		t.Fatal("image B: wrong bytes")
	}
}
