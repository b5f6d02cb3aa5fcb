package p2p

import (
	"context"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hoardvm/hoard/chunkstore"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
)

// glanceBackend is a fakeBackend that registers Glance images: it takes
// took, reporting progress (growing, or stuck at one value when stuck is
// set), and answers manifest/name or err.
type glanceBackend struct {
	*fakeBackend
	took     time.Duration
	stuck    bool
	manifest chunkstore.ID
	name     string
	err      error
	calls    atomic.Int64
	from     atomic.Value
}

func (b *glanceBackend) RegisterGlance(ctx context.Context, from peer.ID, id string, progress func(done, total int64)) (chunkstore.ID, string, error) {
	b.calls.Add(1)
	b.from.Store(from)
	begin := time.Now()
	end := begin.Add(b.took)
	for time.Now().Before(end) {
		done := int64(time.Since(begin) / time.Millisecond)
		if b.stuck {
			done = 42
		}
		progress(done, int64(b.took/time.Millisecond))
		select {
		case <-ctx.Done():
			return chunkstore.ID{}, "", ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
	return b.manifest, b.name, b.err
}

// TestGlanceRegister: a registrar answers the manifest and name after a
// registration longer than the asker's stall bound (progress frames whose
// done grows keep it waiting), or its error; an asker whose registrar
// reports progress that does not grow gives up after the stall bound; a peer
// without a GlanceBackend is
// ErrGlanceRegisterOff; bad IDs are refused before anything is sent; a
// registrar that answers garbage is marked bad.
func TestGlanceRegister(t *testing.T) {
	t.Parallel()
	const id = "0b4b5e5a-3f8e-4a39-9d41-5f2d4f1b7c10"
	img := newTestImage(t, 2, 1024, 7)
	ok := &glanceBackend{fakeBackend: &fakeBackend{img: img}, took: 5 * time.Second, manifest: img.id, name: GlanceFileViewPrefix + id}
	failing := &glanceBackend{fakeBackend: &fakeBackend{img: img}, err: errors.New("glance said 404: check origin.glance.token")}
	stuck := &glanceBackend{fakeBackend: &fakeBackend{img: img}, took: 20 * time.Second, stuck: true, manifest: img.id, name: id}
	peers, _ := mockCluster(t, 5, func(i int) Backend {
		switch i {
		case 1:
			return ok
		case 2:
			return failing
		case 4:
			return stuck
		}
		return &fakeBackend{img: img}
	})
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()

	var reports atomic.Int64
	start := time.Now()
	m, name, err := peers[0].AskGlanceRegister(ctx, peers[1].ID(), id, 3*time.Second, func(done, total int64) { reports.Add(1) })
	if err != nil || m != img.id || name != GlanceFileViewPrefix+id {
		t.Fatalf("AskGlanceRegister: %v %q %v, want %v %s", m, name, err, img.id, GlanceFileViewPrefix+id)
	}
	if took := time.Since(start); took < 5*time.Second || reports.Load() < 2 {
		t.Errorf("answered after %v with %d progress reports, want >= 5s and >= 2 reports", took, reports.Load())
	}
	if from, _ := ok.from.Load().(peer.ID); from != peers[0].ID() {
		t.Errorf("the backend was told the request came from %s, want %s", from, peers[0].ID())
	}

	// Progress frames keep coming, but done does not grow: a stall.
	start = time.Now()
	_, _, err = peers[0].AskGlanceRegister(ctx, peers[4].ID(), id, 3*time.Second, nil)
	took := time.Since(start)
	t.Logf("a registrar stuck at one progress value: the asker gave up after %v: %v", took.Round(time.Millisecond), err)
	if err == nil || took > 10*time.Second {
		t.Errorf("a registrar whose progress does not grow: %v after %v, want an error within about 3s", err, took)
	}

	if _, _, err := peers[0].AskGlanceRegister(ctx, peers[2].ID(), id, 3*time.Second, nil); err == nil || !strings.Contains(err.Error(), "check origin.glance.token") {
		t.Errorf("failing registrar: %v, want its error", err)
	}
	if _, _, err := peers[0].AskGlanceRegister(ctx, peers[3].ID(), id, 3*time.Second, nil); !errors.Is(err, ErrGlanceRegisterOff) {
		t.Errorf("peer without a GlanceBackend: %v, want ErrGlanceRegisterOff", err)
	}
	calls := ok.calls.Load()
	for _, bad := range []string{"", "a/b", strings.Repeat("x", MaxGlanceIDLen+1), "a b", "\xff"} {
		if _, _, err := peers[0].AskGlanceRegister(ctx, peers[1].ID(), bad, time.Second, nil); err == nil {
			t.Errorf("glance id %q accepted", bad)
		}
		// The registrar checks it too: sent as it is, on a raw stream.
		if n, err := rawGlanceRegister(ctx, t, peers[0], peers[1], append([]byte{glanceRegRequest}, bad...)); err == nil || n > 0 {
			t.Errorf("glance id %q sent on a raw stream answered: %d bytes, %v", bad, n, err)
		}
	}
	if ok.calls.Load() != calls {
		t.Error("a bad glance id reached the backend")
	}

	// A registrar that answers an unknown frame is marked bad.
	peers[2].host.SetStreamHandler(ProtocolGlanceRegister, func(s network.Stream) {
		s.Write(appendFrame(nil, []byte{0x7f, 1, 2}))
		s.Close()
	})
	if _, _, err := peers[0].AskGlanceRegister(ctx, peers[2].ID(), id, 3*time.Second, nil); !errors.Is(err, errProtocol) {
		t.Errorf("garbage answer: %v, want a protocol error", err)
	}
	if !peers[0].Bad(peers[2].ID()) {
		t.Error("a registrar that sent garbage was not marked bad")
	}
	if _, _, err := peers[0].AskGlanceRegister(ctx, peers[2].ID(), id, 3*time.Second, nil); err == nil {
		t.Error("a bad peer was asked again")
	}
}

// TestGlanceRegisterBadRequest: an oversized request frame is reset without
// reaching the backend.
func TestGlanceRegisterBadRequest(t *testing.T) {
	t.Parallel()
	img := newTestImage(t, 1, 1024, 8)
	b := &glanceBackend{fakeBackend: &fakeBackend{img: img}, manifest: img.id, name: "x"}
	peers, _ := mockCluster(t, 2, func(i int) Backend { return b })
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	big := make([]byte, maxGlanceRegFrame+1)
	big[0] = glanceRegRequest
	if n, err := rawGlanceRegister(ctx, t, peers[0], peers[1], big); err == nil || n > 0 {
		t.Errorf("oversized request answered: %d bytes, %v", n, err)
	}
	if b.calls.Load() != 0 {
		t.Error("an oversized request reached the backend")
	}
}

// rawGlanceRegister sends frame to to's ProtocolGlanceRegister from from,
// without AskGlanceRegister's checks, and reads the first bytes of the
// answer (within 10s): how many, and the read's error.
func rawGlanceRegister(ctx context.Context, t *testing.T, from, to *Peer, frame []byte) (int, error) {
	t.Helper()
	s, err := from.host.NewStream(ctx, to.ID(), ProtocolGlanceRegister)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Reset()
	s.Write(appendFrame(nil, frame))
	s.CloseWrite()
	s.SetReadDeadline(time.Now().Add(10 * time.Second))
	var buf [16]byte
	return s.Read(buf[:])
}

// TestGlanceRegisterLimits: a registrar serves at most maxGlanceRegPerPeer
// requests of one peer at once (another peer is served meanwhile); a
// registrar that answers a name other than the image's or its file view's
// is refused and marked bad.
func TestGlanceRegisterLimits(t *testing.T) {
	t.Parallel()
	const id = "7c0e7a7e-1d2b-4c3a-9e8f-0a1b2c3d4e5f"
	img := newTestImage(t, 1, 1024, 9)
	slow := &glanceBackend{fakeBackend: &fakeBackend{img: img}, took: 4 * time.Second, manifest: img.id, name: id}
	peers, _ := mockCluster(t, 4, func(i int) Backend {
		if i == 1 {
			return slow
		}
		return &fakeBackend{img: img}
	})
	// A registrar that plants another image's name (an honest one refuses
	// to answer it).
	const planted = "ubuntu-24.04"
	peers[3].host.SetStreamHandler(ProtocolGlanceRegister, func(s network.Stream) {
		d := img.id.Digest()
		s.Write(appendFrame(nil, append(append([]byte{glanceRegDone}, d[:]...), planted...)))
		s.Close()
	})
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()

	askers := []int{0, 0, 0, 2}
	errs := make([]error, len(askers))
	var wg sync.WaitGroup
	for i, a := range askers {
		wg.Go(func() {
			_, _, errs[i] = peers[a].AskGlanceRegister(ctx, peers[1].ID(), id, 10*time.Second, nil)
		})
	}
	wg.Wait()
	var failed0 int
	for i, a := range askers {
		switch {
		case a == 2 && errs[i] != nil:
			t.Errorf("another peer's request while peer 0 holds its slots: %v", errs[i])
		case a == 0 && errs[i] != nil:
			failed0++
		}
	}
	t.Logf("3 concurrent requests of one peer: %d refused (errors %v)", failed0, errs)
	if failed0 != len(askers)-1-maxGlanceRegPerPeer {
		t.Errorf("%d of peer 0's 3 concurrent requests refused, want %d", failed0, len(askers)-1-maxGlanceRegPerPeer)
	}

	if _, _, err := peers[0].AskGlanceRegister(ctx, peers[3].ID(), id, 5*time.Second, nil); !errors.Is(err, errProtocol) {
		t.Errorf("a registrar that answers the name %q: %v, want a protocol error", planted, err)
	}
	if !peers[0].Bad(peers[3].ID()) {
		t.Error("a registrar that answered another image's name was not marked bad")
	}
}
