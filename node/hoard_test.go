package node_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hoardvm/hoard/chunkstore"
	"github.com/hoardvm/hoard/node"
	"github.com/hoardvm/hoard/node/api"
	"github.com/hoardvm/hoard/node/cluster"
	"github.com/hoardvm/hoard/p2p"
)

// TestHoardingSpreadsWorkingSets (scatter hoarding, part 3): an image is
// added lazily on node 0 of 4 and booted there once (a read of part of it);
// its working set then reaches every node before any of them reads it, the
// origin sends it about once for the whole cluster, and later "boots" on the
// other nodes read nothing from peers or the origin.
func TestHoardingSpreadsWorkingSets(t *testing.T) {
	t.Parallel()
	data, _ := mockImage(4<<20, 31)
	srv := newRangeServer(t, data)
	cl := startMockCluster(t, 4, func(_ int, c *node.Config) {
		c.P2P.Options = append(c.P2P.Options, p2p.WithCatalogSyncInterval(2*time.Second))
		c.HoardInterval = time.Second
		c.P2P.DesignatedTimeout = 15 * time.Second
	})
	addImage(t, cl[0], api.ImportRequest{Source: srv.URL + "/ws.raw", Name: "ws", Lazy: true, Chunking: "fixed"})
	imported := srv.bytes.Load() // a lazy add reads the image once, to cut and hash it
	for _, tn := range cl {
		waitFor(t, "every node to learn the image", func() bool { _, err := tn.Store().Resolve(t.Context(), "ws"); return err == nil })
	}
	// The boot: 16 chunks of 64 KiB, a quarter of the image, non-zero ones.
	var bootOffs []int64
	for blk := int64(0); len(bootOffs) < 16; blk += 3 {
		if blk%4 != 3 { // mockImage zeroes every fourth block
			bootOffs = append(bootOffs, blk<<16)
		}
	}
	boot := func(tn *testNode) {
		t.Helper()
		x, err := tn.Open(t.Context(), "ws")
		if err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 64<<10)
		for _, off := range bootOffs {
			if err := x.ReadAt(t.Context(), buf, off); err != nil {
				t.Fatal(err)
			}
		}
		x.Close()
	}
	boot(cl[0])
	wsBytes := int64(len(bootOffs)) << 16
	start := time.Now()
	for i, tn := range cl {
		waitFor(t, fmt.Sprintf("node %d to hoard the working set", i), func() bool {
			l, err := tn.client.Images(t.Context())
			if err != nil || len(l) != 1 {
				return false
			}
			return l[0].WorkingSetBytes == wsBytes && l[0].WorkingSetLocalBytes == wsBytes
		})
	}
	t.Logf("working set of %d KiB on 4 nodes in %v; origin sent %d KiB (%.2fx)", wsBytes>>10, time.Since(start).Round(time.Millisecond),
		(srv.bytes.Load()-imported)>>10, float64(srv.bytes.Load()-imported)/float64(wsBytes))
	if got := srv.bytes.Load() - imported; got > wsBytes*11/10 {
		t.Errorf("origin sent %d bytes for a working set of %d on 4 nodes: more than 1.1x", got, wsBytes)
	}
	for i, tn := range cl[1:] {
		before := tn.counters(t)
		boot(tn)
		after := tn.counters(t)
		if p, o := after.ReadBytes["peer"]-before.ReadBytes["peer"], after.ReadBytes["origin"]-before.ReadBytes["origin"]; p != 0 || o != 0 {
			t.Errorf("boot on node %d read %d bytes from peers and %d from the origin, want 0: the working set was not hoarded", i+1, p, o)
		}
	}
}

// TestHoardingLateNodeStartsAtOnce: a node that joins after an image was
// added and booted hoards its working set as soon as it has learned both,
// not at its next hoarder tick (an hour here). The catalog learns the image
// before it has fetched the manifest, so its first kick finds nothing to
// plan; the registration must kick the hoarder again.
func TestHoardingLateNodeStartsAtOnce(t *testing.T) {
	t.Parallel()
	data, _ := mockImage(2<<20, 33)
	srv := newRangeServer(t, data)
	rare := func(_ int, c *node.Config) {
		c.HoardInterval = time.Hour
		c.P2P.DesignatedTimeout = 15 * time.Second
	}
	cl, mn := startMockNet(t, 2, rare)
	addImage(t, cl[0], api.ImportRequest{Source: srv.URL + "/late.raw", Name: "late", Lazy: true, Chunking: "fixed"})
	x, err := cl[0].Open(t.Context(), "late")
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 64<<10)
	var wsBytes int64
	for blk := int64(0); blk < 24; blk++ {
		if blk%4 == 3 { // mockImage zeroes every fourth block
			continue
		}
		if err := x.ReadAt(t.Context(), buf, blk<<16); err != nil {
			t.Fatal(err)
		}
		wsBytes += 64 << 10
	}
	x.Close()
	waitFor(t, "node 1 to merge node 0's profile", func() bool {
		p, err := cl[1].Profile(t.Context(), "late")
		return err == nil && p.Boots == 1
	})

	h, err := mn.GenPeer()
	if err != nil {
		t.Fatal(err)
	}
	if err := mn.LinkAll(); err != nil {
		t.Fatal(err)
	}
	c := node.Config{MemCache: -1, Readahead: -1, NoProfilePrefetch: true}
	c.P2P.Host = h
	c.P2P.Bootstrap = []string{cl[0].P2P().Addrs()[0].String() + "/p2p/" + cl[0].P2P().ID().String()}
	rare(2, &c)
	late := startNode(t, c)
	start := time.Now()
	eventually(t, 20*time.Second, func() bool {
		l, err := late.client.Images(t.Context())
		return err == nil && len(l) == 1 && l[0].WorkingSetBytes == wsBytes && l[0].WorkingSetLocalBytes == wsBytes
	}, "the late node did not hoard the working set (%d bytes) long before its next hoarder tick", wsBytes)
	t.Logf("late node: working set of %d KiB local %v after it started", wsBytes>>10, time.Since(start).Round(time.Millisecond))
	if c := late.counters(t); c.OriginBytes != 0 {
		t.Errorf("the late node fetched %d bytes from the origin; want all from peers", c.OriginBytes)
	}
}

// TestPrefetchCluster: hoard image prefetch --cluster fetches and pins the
// image's working set on every node, also on one that joins afterwards;
// removing the image unpins it.
func TestPrefetchCluster(t *testing.T) {
	t.Parallel()
	data, _ := mockImage(2<<20, 41)
	srv := newRangeServer(t, data)
	cl, mn := startMockNet(t, 3, func(_ int, c *node.Config) {
		c.P2P.Options = append(c.P2P.Options, p2p.WithCatalogSyncInterval(2*time.Second))
		c.HoardBudget = -1 // hoarding off: only the prefetch fetches
	})
	res := addImage(t, cl[0], api.ImportRequest{Source: srv.URL + "/pf.raw", Name: "pf", Lazy: true, Chunking: "fixed"})
	for _, tn := range cl {
		waitFor(t, "every node to learn the image", func() bool { _, err := tn.Store().Resolve(t.Context(), "pf"); return err == nil })
	}
	m, err := cl[0].Store().GetManifest(t.Context(), res.Manifest)
	if err != nil {
		t.Fatal(err)
	}
	held := func(tn *testNode) (have, pinned int) {
		for _, id := range m.ChunkIDs() {
			if ok, _ := tn.Store().Has(t.Context(), id); ok {
				have++
			}
			if ok, _ := tn.Store().Pinned(t.Context(), id); ok {
				pinned++
			}
		}
		return
	}
	if _, err := cl[1].Prefetch(t.Context(), "pf", true, true, nil); err != nil {
		t.Fatal(err)
	}
	want := len(m.ChunkIDs())
	for i, tn := range cl {
		waitFor(t, fmt.Sprintf("node %d to fetch and pin the whole image", i), func() bool { h, p := held(tn); return h == want && p == want })
	}
	// A node that joins afterwards does it too.
	h, err := mn.GenPeer()
	if err != nil {
		t.Fatal(err)
	}
	if err := mn.LinkAll(); err != nil {
		t.Fatal(err)
	}
	c := node.Config{MemCache: -1, Readahead: -1, NoProfilePrefetch: true, HoardBudget: -1}
	c.P2P.Host, c.P2P.Bootstrap = h, []string{cl[0].P2P().Addrs()[0].String() + "/p2p/" + cl[0].P2P().ID().String()}
	late := startNode(t, c)
	waitFor(t, "the late node to fetch and pin the whole image", func() bool { h, p := held(late); return h == want && p == want })
	// Removing the image unpins its chunks.
	if _, err := cl[2].RemoveImage(t.Context(), "pf", false); err != nil {
		t.Fatal(err)
	}
	if _, p := held(cl[2]); p != 0 {
		t.Fatalf("%d chunks still pinned after image rm", p)
	}
}

// slowDesignated is a Fetcher whose designated fetcher never delivers in
// time (a peer under load).
type slowDesignated struct{ asked atomic.Int64 }

func (f *slowDesignated) Fetch(context.Context, chunkstore.ID, int, chunkstore.ID) ([]byte, error) {
	f.asked.Add(1)
	return nil, fmt.Errorf("chunk: designated fetcher busy: %w", cluster.ErrNotDelivered)
}

// TestHoardNeverFallsBackToOrigin: a hoard fetch whose designated fetcher
// did not deliver leaves the chunk for a later pass instead of going to the
// origin beside it (under load every node's hoarder did: 2x the working sets
// at 100 nodes). A VM read of the same chunk still falls back and is served.
func TestHoardNeverFallsBackToOrigin(t *testing.T) {
	t.Parallel()
	data, _ := mockImage(1<<20, 15)
	srv := newRangeServer(t, data)
	f := &slowDesignated{}
	tn := startNode(t, node.Config{MemCache: -1, Readahead: -1, NoProfilePrefetch: true, HotCache: -1, Fetcher: f})
	res := addImage(t, tn, api.ImportRequest{Source: srv.URL + "/h.raw", Name: "h", Lazy: true, Chunking: "fixed"})
	before := srv.bytes.Load()
	if _, err := tn.Prefetch(t.Context(), "h", true, false, nil); err == nil {
		t.Fatal("prefetch succeeded although no chunk could be fetched from peers")
	} else if !errors.Is(err, cluster.ErrNotDelivered) && !strings.Contains(err.Error(), "designated") {
		t.Logf("prefetch error: %v", err)
	}
	if d := srv.bytes.Load() - before; d != 0 {
		t.Fatalf("hoarding read %d origin bytes beside a designated fetcher that was still at work", d)
	}
	if f.asked.Load() == 0 {
		t.Fatal("the hoarder never asked the peers")
	}
	x, err := tn.Open(t.Context(), "h")
	if err != nil {
		t.Fatal(err)
	}
	defer x.Close()
	p := make([]byte, res.Size)
	if err := x.ReadAt(t.Context(), p, 0); err != nil {
		t.Fatalf("a VM read after the designated fetcher failed: %v", err)
	}
	if !bytes.Equal(p, data) {
		t.Fatal("wrong bytes")
	}
	if srv.bytes.Load() == before {
		t.Fatal("the VM read did not go to the origin")
	}
}
