package p2p

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
)

func realPeer(t testing.TB, opts ...Option) *Peer {
	t.Helper()
	o := append([]Option{WithListenAddrs([]string{"/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/udp/0/quic-v1"})}, opts...)
	p, err := New(context.Background(), o...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

func info(p *Peer) peer.AddrInfo { return peer.AddrInfo{ID: p.ID(), Addrs: p.host.Addrs()} }

func TestRealPrivateNetwork(t *testing.T) {
	t.Parallel()
	img := newTestImage(t, 4, 8<<10, 5)
	key, _ := DecodeSwarmKey(GenerateSwarmKey())
	other, _ := DecodeSwarmKey(GenerateSwarmKey())
	a := realPeer(t, WithSwarmKey(key), WithBackend(&fakeBackend{img: img}))
	b := realPeer(t, WithSwarmKey(key))
	wrong := realPeer(t, WithSwarmKey(other))
	open := realPeer(t, WithInsecureNoSwarmKey())
	for _, addr := range a.Addrs() {
		if strings.Contains(addr.String(), "quic") {
			t.Fatalf("a private node listens on QUIC: %s", addr)
		}
		if !strings.Contains(addr.String(), "/p2p/"+a.ID().String()) {
			t.Fatalf("Addrs() entry without /p2p/ID: %s", addr)
		}
	}
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	if err := b.host.Connect(ctx, info(a)); err != nil {
		t.Fatalf("same swarm key: %v", err)
	}
	n := 0
	if _, err := b.Fetch(ctx, a.ID(), img.id, img.wants(), false, func(Chunk) error { n++; return nil }); err != nil || n != 4 {
		t.Fatalf("fetch with the swarm key: %d chunks, %v", n, err)
	}
	for name, p := range map[string]*Peer{"another swarm key": wrong, "no swarm key": open} {
		cctx, ccancel := context.WithTimeout(ctx, 5*time.Second)
		if err := p.host.Connect(cctx, info(a)); err == nil {
			t.Errorf("a node with %s connected", name)
		}
		if _, err := p.Fetch(cctx, a.ID(), img.id, img.wants(), false, func(Chunk) error { return nil }); err == nil {
			t.Errorf("a node with %s fetched", name)
		}
		ccancel()
	}
	// Bootstrap through a wrong key says what to do.
	wrong.o.bootstrap = []string{a.Addrs()[0].String()}
	wrong.o.pskPath = "/etc/hoard/swarm.key"
	bctx, bcancel := context.WithTimeout(ctx, 5*time.Second)
	defer bcancel()
	if err := wrong.Bootstrap(bctx); err == nil || !strings.Contains(err.Error(), "swarm key") {
		t.Errorf("bootstrap with another swarm key: %v", err)
	}
}

func TestRealAllowList(t *testing.T) {
	t.Parallel()
	key, _ := DecodeSwarmKey(GenerateSwarmKey())
	b := realPeer(t, WithSwarmKey(key))
	a := realPeer(t, WithSwarmKey(key), WithAllowList([]peer.ID{b.ID()}))
	c := realPeer(t, WithSwarmKey(key))
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	if err := b.host.Connect(ctx, info(a)); err != nil {
		t.Fatalf("allowed peer: %v", err)
	}
	if err := c.host.Connect(ctx, info(a)); err == nil {
		// the gater may close the connection just after the handshake
		eventually(t, 10*time.Second, "a peer not on the allow-list to be disconnected", func() bool { return !c.connected(a.ID()) })
	}
	if err := a.host.Connect(ctx, info(c)); err == nil {
		t.Fatal("the allow-listed node dialled a peer not on its list")
	}
}

func TestRealDNSBootstrap(t *testing.T) {
	t.Parallel()
	key, _ := DecodeSwarmKey(GenerateSwarmKey())
	a := realPeer(t, WithSwarmKey(key))
	port := tcpPortOf(a.host.Addrs(), nil)
	b := realPeer(t, WithSwarmKey(key), WithBootstrap([]string{"dns:localhost:" + port}))
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	if err := b.Bootstrap(ctx); err != nil {
		t.Fatal(err)
	}
	if !b.connected(a.ID()) {
		t.Fatal("not connected to the peer behind the DNS name")
	}
	found := false
	for _, pi := range b.Peers() {
		found = found || (pi.ID == a.ID().String() && pi.Connected)
	}
	if !found {
		t.Fatalf("Peers() = %+v, want %s connected", b.Peers(), a.ID())
	}
}

// TestRealUploadLimit: a node capped at 2 MiB/s takes about 2 s to serve 4 MiB.
func TestRealUploadLimit(t *testing.T) {
	t.Parallel()
	img := newTestImage(t, 64, 64<<10, 6) // 4 MiB raw, about 2.5 MiB stored
	stored := 0
	for _, st := range img.stored {
		stored += len(st.Payload)
	}
	const limit = 1 << 20
	key, _ := DecodeSwarmKey(GenerateSwarmKey())
	a := realPeer(t, WithSwarmKey(key), WithBackend(&fakeBackend{img: img}), WithUploadLimit(limit))
	b := realPeer(t, WithSwarmKey(key))
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	if err := b.host.Connect(ctx, info(a)); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if _, err := b.Fetch(ctx, a.ID(), img.id, img.wants(), false, func(Chunk) error { return nil }); err != nil {
		t.Fatal(err)
	}
	d := time.Since(start)
	burst := a.limiter.Burst()
	want := time.Duration(float64(stored-burst) / limit * float64(time.Second))
	rate := float64(stored) / d.Seconds() / (1 << 20)
	t.Logf("served %d bytes in %v (%.2f MiB/s; limit 1 MiB/s, burst %d)", stored, d, rate, burst)
	if d < want*8/10 {
		t.Fatalf("served %d bytes in %v, want at least %v at %d B/s", stored, d, want, limit)
	}
}
