package p2p

import (
	"bytes"
	"context"
	"errors"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hoardvm/hoard/chunkstore"
	"github.com/libp2p/go-libp2p/core/peer"
	"golang.org/x/sync/errgroup"
)

func TestMocknetDHTProvideFind(t *testing.T) {
	t.Parallel()
	img := newTestImage(t, 4, 1024, 1)
	peers, _ := mockCluster(t, 50, func(int) Backend { return nil })
	ctx := t.Context()
	holder := peers[7]
	if err := holder.Provide(ctx, img.id); err != nil {
		t.Fatal(err)
	}
	if err := holder.ProvideName(ctx, "debian-12", img.id); err != nil {
		t.Fatal(err)
	}
	for _, asker := range []*Peer{peers[42], peers[0], peers[19]} {
		provs, err := asker.FindProviders(ctx, img.id)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.ContainsFunc(provs, func(ai peer.AddrInfo) bool { return ai.ID == holder.ID() }) {
			t.Fatalf("providers of the manifest seen from %s: %v, want %s", asker.ID(), provs, holder.ID())
		}
		id, from, err := asker.ResolveName(ctx, "debian-12")
		if err != nil {
			t.Fatal(err)
		}
		if id != img.id || len(from) == 0 || from[0].ID != holder.ID() {
			t.Fatalf("ResolveName = %s from %v, want %s from %s", id, from, img.id, holder.ID())
		}
	}
	if _, _, err := peers[3].ResolveName(ctx, "no-such-image"); !errors.Is(err, chunkstore.ErrNotFound) {
		t.Fatalf("ResolveName of an unknown name: %v, want ErrNotFound", err)
	}
	// The manifest itself, verified by CID.
	holder.o.backend = &fakeBackend{img: img}
	enc, err := peers[30].Manifest(ctx, holder.ID(), img.id)
	if err != nil || !bytes.Equal(enc, img.enc) {
		t.Fatalf("Manifest: %v", err)
	}
	if n := holder.Reprovide(ctx); n != 0 {
		t.Fatalf("Reprovide: %d failures", n)
	}
	holder.Withdraw(img.id)
	if holder.Provided() != 0 {
		t.Fatalf("after Withdraw, %d keys still provided", holder.Provided())
	}
}

// TestMocknetFetchMany: 10 of 50 peers hold an image, one of them serves
// corrupt bytes, one dies mid-transfer; the other 40 fetch it all at once and
// every byte arrives right.
func TestMocknetFetchMany(t *testing.T) {
	t.Parallel()
	img := newTestImage(t, 96, 16<<10, 2)
	const holders = 10
	backends := make([]*fakeBackend, holders)
	var dying *Peer
	var died atomic.Bool
	for i := range backends {
		backends[i] = &fakeBackend{img: img}
	}
	backends[1].corrupt = true
	peers, _ := mockCluster(t, 50, func(i int) Backend {
		if i < holders {
			return backends[i]
		}
		return nil
	})
	dying = peers[2]
	backends[2].hook = func(int) {
		if backends[2].served.Load() >= 5 && died.CompareAndSwap(false, true) {
			go dying.Host().Close()
		}
	}
	ctx := t.Context()
	for _, p := range peers[:holders] {
		if err := p.Provide(ctx, img.id); err != nil {
			t.Fatal(err)
		}
	}
	var g errgroup.Group
	var badSeen atomic.Int64
	for _, p := range peers[holders:] {
		g.Go(func() error {
			provs, err := p.FindProviders(ctx, img.id)
			if err != nil {
				return err
			}
			haves := map[peer.ID]Bitmap{}
			for _, ai := range provs {
				bm, err := p.Have(ctx, ai.ID, img.id)
				if err == nil {
					haves[ai.ID] = bm
				}
			}
			got := make([][]byte, len(img.chunks))
			missing, err := p.FetchFrom(ctx, img.id, img.wants(), haves, 16, func(c Chunk) error {
				if got[c.Index] != nil {
					return errors.New("chunk delivered twice")
				}
				got[c.Index] = c.Data
				return nil
			})
			if err != nil {
				return err
			}
			if len(missing) > 0 {
				return errors.New("missing chunks: " + p.ID().String())
			}
			for i := range got {
				if !bytes.Equal(got[i], img.chunks[i]) {
					return errors.New("wrong bytes")
				}
			}
			if p.Bad(peers[1].ID()) {
				badSeen.Add(1)
			}
			if _, ok := p.Pick(haves, 0); ok {
				if id, _ := p.Pick(map[peer.ID]Bitmap{peers[1].ID(): haves[peers[1].ID()]}, 0); id != "" && p.Bad(peers[1].ID()) {
					return errors.New("Pick chose a bad peer")
				}
			}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		t.Fatal(err)
	}
	if !died.Load() {
		t.Fatal("the dying peer never died: test did not exercise fail-over")
	}
	if badSeen.Load() == 0 {
		t.Fatal("no fetcher marked the corrupt peer bad")
	}
	var served []int64
	for _, b := range backends {
		served = append(served, b.served.Load())
	}
	t.Logf("chunks served per holder: %v; fetchers that met the corrupt peer: %d/40", served, badSeen.Load())
	// Load is spread: every healthy holder served a share.
	for i, n := range served {
		if i != 1 && i != 2 && n < int64(len(img.chunks)) {
			t.Errorf("holder %d served only %d chunks: load not spread", i, n)
		}
	}
}

// TestFetchHedgesSlowPeer: a holder that stalls does not hold the fetch up.
func TestFetchHedgesSlowPeer(t *testing.T) {
	t.Parallel()
	img := newTestImage(t, 8, 4<<10, 3)
	slow := &fakeBackend{img: img, delay: time.Hour}
	fast := &fakeBackend{img: img}
	peers, _ := mockCluster(t, 3, func(i int) Backend { return []Backend{nil, slow, fast}[i] })
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	all := NewBitmap(len(img.chunks))
	for i := range img.chunks {
		all.Set(i)
	}
	// Only the slow peer first: make it the one Pick prefers by load.
	peers[0].addLoad(peers[2].ID(), 1000)
	start := time.Now()
	var n int
	var mu sync.Mutex
	missing, err := peers[0].FetchFrom(ctx, img.id, img.wants(), map[peer.ID]Bitmap{peers[1].ID(): all, peers[2].ID(): all}, 0,
		func(c Chunk) error { mu.Lock(); n++; mu.Unlock(); return nil })
	peers[0].addLoad(peers[2].ID(), -1000)
	if err != nil || len(missing) > 0 || n != len(img.chunks) {
		t.Fatalf("FetchFrom: %d chunks, missing %v, %v", n, missing, err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("fetch took %v: hedging did not kick in", d)
	}
	if fast.served.Load() == 0 {
		t.Fatal("the fast peer served nothing")
	}
}

// TestFetchDesignatedAndNotFound: the fetch flag reaches the backend, entries a
// peer lacks come back as not found.
func TestFetchDesignatedAndNotFound(t *testing.T) {
	t.Parallel()
	img := newTestImage(t, 10, 4<<10, 4)
	half := NewBitmap(10)
	for i := 0; i < 10; i += 2 {
		half.Set(i)
	}
	b := &fakeBackend{img: img, have: half}
	peers, _ := mockCluster(t, 2, func(i int) Backend { return []Backend{nil, b}[i] })
	ctx := t.Context()
	bm, err := peers[0].Have(ctx, peers[1].ID(), img.id)
	if err != nil || !bytes.Equal(bm, half) {
		t.Fatalf("Have = %v, %v", bm, err)
	}
	if bm, err := peers[0].Have(ctx, peers[1].ID(), chunkstore.Sum([]byte("other"))); err != nil || bm.Count() != 0 {
		t.Fatalf("Have of an unknown manifest = %v, %v; want empty", bm, err)
	}
	var got []int
	nf, err := peers[0].Fetch(ctx, peers[1].ID(), img.id, img.wants(), true, func(c Chunk) error {
		got = append(got, c.Index)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(got)
	slices.Sort(nf)
	if !slices.Equal(got, []int{0, 2, 4, 6, 8}) || !slices.Equal(nf, []int{1, 3, 5, 7, 9}) {
		t.Fatalf("got %v, not found %v", got, nf)
	}
	if b.fetches.Load() != 10 {
		t.Fatalf("backend saw fetch=true %d times, want 10", b.fetches.Load())
	}
	if _, err := peers[0].Manifest(ctx, peers[1].ID(), chunkstore.Sum([]byte("x"))); !errors.Is(err, chunkstore.ErrNotFound) {
		t.Fatalf("Manifest of an unknown id: %v", err)
	}
	// A manifest that does not match its ID marks the peer bad.
	b.corrupt = true
	if _, err := peers[0].Manifest(ctx, peers[1].ID(), img.id); !errors.Is(err, ErrBadPeer) || !peers[0].Bad(peers[1].ID()) {
		t.Fatalf("corrupt manifest: %v, bad=%v", err, peers[0].Bad(peers[1].ID()))
	}
}
