package p2p

import (
	"context"
	"errors"
	"io"
	"os"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hoardvm/hoard/chunkstore"
	"github.com/libp2p/go-libp2p/core/network"
	mocknet "github.com/libp2p/go-libp2p/p2p/net/mock"
)

// eventually polls cond every 10 ms until it holds, failing the test after d.
func eventually(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("after %v: %s", d, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// within runs f and fails the test when it has not returned after d; f's
// goroutine is left to the test's cleanups (which close the peers) then.
func within(t testing.TB, d time.Duration, what string, f func()) {
	t.Helper()
	done := make(chan struct{})
	go func() { defer close(done); f() }()
	select {
	case <-done:
	case <-time.After(d):
		t.Fatalf("%s did not return within %v; this package's goroutines:\n%s", what, d, ourStacks())
	}
}

// ourStacks returns the stacks of the goroutines running this package's code.
func ourStacks() string {
	buf := make([]byte, 8<<20)
	buf = buf[:runtime.Stack(buf, true)]
	var out []string
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, "hoard/p2p.(*") {
			out = append(out, g)
		}
	}
	return strings.Join(out, "\n\n")
}

// mute makes p accept chunk streams and never read or answer them (a peer
// whose process stopped), until the test ends.
func mute(t testing.TB, p *Peer) {
	stop := make(chan struct{})
	var mu sync.Mutex
	var held []network.Stream
	t.Cleanup(func() {
		close(stop)
		mu.Lock()
		defer mu.Unlock()
		for _, s := range held {
			s.Reset()
		}
	})
	p.host.SetStreamHandler(ProtocolChunks, func(s network.Stream) {
		mu.Lock()
		held = append(held, s)
		mu.Unlock()
		<-stop
	})
}

// farWants are wants whose indices take 6 bytes each on the wire, so a batch
// request is about 1.5 KiB.
func farWants(n int) []Want {
	w := make([]Want, n)
	for i := range w {
		w[i] = Want{Index: 1<<36 + i, ID: chunkstore.Sum([]byte{byte(i)})}
	}
	return w
}

// allIndices returns 0..n-1.
func allIndices(n int) []int {
	idx := make([]int, n)
	for i := range idx {
		idx[i] = i
	}
	return idx
}

// TestRealClientWriteDeadline: a peer that never reads its chunk stream lets
// the requester's writes fill the stream's flow-control window; the requests
// then fail within the write timeout instead of wedging the fetch for good.
func TestRealClientWriteDeadline(t *testing.T) {
	t.Parallel()
	key, _ := DecodeSwarmKey(GenerateSwarmKey())
	a := realPeer(t, WithSwarmKey(key), WithStreamsPerPeer(1), WithWriteTimeout(300*time.Millisecond))
	b := realPeer(t, WithSwarmKey(key))
	mute(t, b)
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	if err := a.host.Connect(ctx, info(b)); err != nil {
		t.Fatal(err)
	}
	// 400 requests of 1.5 KiB: well past the 256 KiB a yamux stream takes
	// unread.
	var err error
	start := time.Now()
	within(t, 15*time.Second, "Fetch from a peer that never reads", func() {
		_, err = a.Fetch(ctx, b.ID(), chunkstore.Sum([]byte("m")), farWants(400*MaxBatch), false, func(Chunk) error { return nil })
	})
	if err == nil || ctx.Err() != nil {
		t.Fatalf("Fetch from a peer that never reads: %v (ctx %v), want a write error", err, ctx.Err())
	}
	t.Logf("fetch failed after %v: %v", time.Since(start).Round(time.Millisecond), err)
}

// TestRealServerWriteDeadline: a requester that asks for chunks and never
// reads the replies has its stream reset by the server within the write
// timeout; the server's goroutines for it end.
func TestRealServerWriteDeadline(t *testing.T) {
	t.Parallel()
	img := newTestImage(t, 64, 64<<10, 21) // about 2.5 MiB stored
	key, _ := DecodeSwarmKey(GenerateSwarmKey())
	be := &fakeBackend{img: img}
	a := realPeer(t, WithSwarmKey(key), WithBackend(be), WithWriteTimeout(300*time.Millisecond))
	b := realPeer(t, WithSwarmKey(key))
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	if err := b.host.Connect(ctx, info(a)); err != nil {
		t.Fatal(err)
	}
	s, err := b.host.NewStream(ctx, a.ID(), ProtocolChunks)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Reset()
	if _, err := s.Write(appendMessage(nil, &message{Type: msgGet, ReqID: 1, Manifest: img.id, Indices: allIndices(64)})); err != nil {
		t.Fatal(err)
	}
	// Read nothing: the server's writes fill the window and stall, and the
	// server gives the stream up.
	nserved := func() int {
		a.mu.Lock()
		defer a.mu.Unlock()
		return len(a.served)
	}
	// It may take the stream and give it up (after the write timeout)
	// between two polls on a busy machine: a chunk read from its backend
	// shows it took the stream.
	eventually(t, 10*time.Second, "the server to take the stream", func() bool { return nserved() == 1 || be.served.Load() > 0 })
	eventually(t, 10*time.Second, "the server to give up a stream whose reader stalled", func() bool { return nserved() == 0 })
	// What was sent ends in a reset, not in a wait for more.
	s.SetReadDeadline(time.Now().Add(10 * time.Second))
	n, err := io.Copy(io.Discard, s)
	if errors.Is(err, os.ErrDeadlineExceeded) || err == nil {
		t.Fatalf("after %d bytes: %v; want the server to reset a stream whose reader stalled", n, err)
	}
	t.Logf("server sent %d bytes, then: %v", n, err)
}

// TestCloseWithStuckStreams: Close returns promptly, and ends its server
// goroutines, while it has many requests out to a peer that stopped reading
// and serves a peer that stopped reading its replies (on mocknet, whose
// streams have no deadlines: only the resets of Close can end them).
func TestCloseWithStuckStreams(t *testing.T) {
	t.Parallel()
	img := newTestImage(t, 64, 64<<10, 22)
	peers, _ := mockCluster(t, 3, func(i int) Backend {
		if i == 0 {
			return &fakeBackend{img: img}
		}
		return nil
	}, WithStreamsPerPeer(8))
	a, stuck, reader := peers[0], peers[1], peers[2]
	mute(t, stuck)
	ctx := t.Context()
	// Requests to the mute peer: writes block once mocknet's pipe is full.
	var wg sync.WaitGroup
	for range 64 {
		wg.Go(func() {
			a.Fetch(ctx, stuck.ID(), img.id, farWants(2*MaxBatch), false, func(Chunk) error { return nil })
		})
	}
	// Requests to a whose replies the requester never reads.
	var streams []network.Stream
	for range 16 {
		s, err := reader.host.NewStream(ctx, a.ID(), ProtocolChunks)
		if err != nil {
			t.Fatal(err)
		}
		streams = append(streams, s)
		if _, err := s.Write(appendMessage(nil, &message{Type: msgGet, ReqID: 1, Manifest: img.id, Indices: allIndices(64)})); err != nil {
			t.Fatal(err)
		}
	}
	eventually(t, 20*time.Second, "the peer to have its streams open", func() bool {
		a.mu.Lock()
		defer a.mu.Unlock()
		return len(a.conns) >= 8 && len(a.served) == 16
	})
	within(t, 10*time.Second, "Close", func() { a.Close() })
	within(t, 20*time.Second, "the requests to the mute peer", wg.Wait)
	// Every served stream was reset: its reader gets the buffered bytes, then
	// an error, never a wait.
	for i, s := range streams {
		within(t, 10*time.Second, "draining a served stream after Close", func() {
			// A stream the server finished before Close (everything fit
			// in mocknet's buffers) may end cleanly; any other must not.
			if n, err := io.Copy(io.Discard, s); err == nil && n < 64*(64<<10) {
				t.Errorf("stream %d: closed cleanly after %d bytes of a 4 MiB answer, want a reset", i, n)
			}
		})
	}
}

// TestCloseAfterBadPeerRace: streams that were opening while their peer was
// marked bad (and its pool closed) are not left to readers Close does not
// know of. This was the make-test hang: Close waiting on readLoops forever.
func TestCloseAfterBadPeerRace(t *testing.T) {
	t.Parallel()
	img := newTestImage(t, 32, 4<<10, 23)
	peers, _ := mockCluster(t, 2, func(i int) Backend {
		if i == 1 {
			return &fakeBackend{img: img, corrupt: true}
		}
		return nil
	}, WithStreamsPerPeer(16))
	a, bad := peers[0], peers[1]
	ctx := t.Context()
	for range 30 {
		var wg sync.WaitGroup
		for i := range 16 {
			wg.Go(func() {
				a.Fetch(ctx, bad.ID(), img.id, img.wants()[i:i+1], false, func(Chunk) error { return nil })
			})
		}
		wg.Wait()
		a.mu.Lock()
		delete(a.bad, bad.ID())
		a.mu.Unlock()
	}
	within(t, 10*time.Second, "Close", func() { a.Close() })
}

// TestPoolsDropWithTheirStreams: Peer.pools keeps only peers with live
// streams: when peers go away (or their streams idle out), so do their pools.
func TestPoolsDropWithTheirStreams(t *testing.T) {
	t.Parallel()
	img := newTestImage(t, 4, 4<<10, 24)
	peers, mn := mockCluster(t, 6, func(i int) Backend { return &fakeBackend{img: img} })
	a := peers[0]
	ctx := t.Context()
	npools := func() int {
		a.mu.Lock()
		defer a.mu.Unlock()
		return len(a.pools)
	}
	for _, p := range peers[1:] {
		if _, err := a.Fetch(ctx, p.ID(), img.id, img.wants(), false, func(Chunk) error { return nil }); err != nil {
			t.Fatal(err)
		}
	}
	if n := npools(); n != 5 {
		t.Fatalf("%d pools after fetching from 5 peers", n)
	}
	// Three peers go away.
	for _, p := range peers[1:4] {
		if err := mn.DisconnectPeers(a.ID(), p.ID()); err != nil {
			t.Fatal(err)
		}
	}
	eventually(t, 10*time.Second, "the pools of disconnected peers to go", func() bool { return npools() == 2 })
	// The other two idle out.
	if n := a.closeIdle(time.Now().Add(time.Second)); n == 0 {
		t.Fatal("closeIdle closed no stream")
	}
	eventually(t, 10*time.Second, "the pools of idle peers to go", func() bool {
		a.mu.Lock()
		defer a.mu.Unlock()
		return len(a.pools) == 0 && len(a.conns) == 0
	})
	// A peer that cannot be reached leaves no pool either.
	if err := mn.UnlinkPeers(a.ID(), peers[1].ID()); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Have(ctx, peers[1].ID(), img.id); err == nil {
		t.Fatal("Have from an unlinked peer succeeded")
	}
	if n := npools(); n != 0 {
		t.Fatalf("%d pools after a failed dial", n)
	}
	// And a peer asked again gets a fresh stream.
	if _, err := a.Fetch(ctx, peers[5].ID(), img.id, img.wants(), false, func(Chunk) error { return nil }); err != nil {
		t.Fatal(err)
	}
}

// TestRequestsEndWithTheirContext: on a stream to a peer that stopped
// reading, a request's caller gets its answer (an error) when its context
// ends, though its write is stuck (mocknet streams have no deadlines: only
// the context can end it), and so does the next caller on that stream.
func TestRequestsEndWithTheirContext(t *testing.T) {
	t.Parallel()
	img := newTestImage(t, 2, 1024, 25)
	peers, _ := mockCluster(t, 2, func(int) Backend { return nil })
	mute(t, peers[1])
	for try := range 3 {
		ctx, cancel := context.WithTimeout(t.Context(), 500*time.Millisecond)
		within(t, 10*time.Second, "Have to a peer that stopped reading", func() {
			if _, err := peers[0].Have(ctx, peers[1].ID(), img.id); err == nil {
				t.Errorf("Have %d to a mute peer succeeded", try)
			}
		})
		cancel()
	}
}

// TestStreamsPerPeerWhileOpening: many requests at once to a peer with no
// stream yet open at most WithStreamsPerPeer streams (they used to open one
// each while the first were opening: a never-reading peer then took every
// request unread, no window filled, and no write deadline could fire).
func TestStreamsPerPeerWhileOpening(t *testing.T) {
	t.Parallel()
	img := newTestImage(t, 4, 1024, 26)
	peers, mn := mockCluster(t, 2, func(int) Backend { return &fakeBackend{img: img} }, WithStreamsPerPeer(2))
	// Opening a stream takes a while: a protocol negotiation round trip on a
	// slow link.
	for _, l := range mn.LinksBetweenPeers(peers[0].ID(), peers[1].ID()) {
		l.SetOptions(mocknet.LinkOptions{Latency: 50 * time.Millisecond})
	}
	if err := peers[0].host.Peerstore().RemoveProtocols(peers[1].ID(), ProtocolChunks); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for range 64 {
		wg.Go(func() {
			if _, err := peers[0].Have(t.Context(), peers[1].ID(), img.id); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	peers[0].mu.Lock()
	n := len(peers[0].conns)
	peers[0].mu.Unlock()
	if n > 2 {
		t.Fatalf("%d streams to one peer, want at most 2", n)
	}
}
