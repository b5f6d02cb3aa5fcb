package node_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hoardvm/hoard/chunkstore"
	"github.com/hoardvm/hoard/nbd"
	"github.com/hoardvm/hoard/node"
	"github.com/hoardvm/hoard/node/api"
	"github.com/hoardvm/hoard/node/importer"
	"github.com/hoardvm/hoard/node/local"
	"github.com/hoardvm/hoard/node/origin"
	"github.com/hoardvm/hoard/p2p"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	mocknet "github.com/libp2p/go-libp2p/p2p/net/mock"
	"golang.org/x/sync/errgroup"
)

// mockImage is a raw image with zero runs: random 64 KiB blocks, every
// fourth block zero.
func mockImage(size int, seed uint64) (data []byte, nonZero int64) {
	data = randBytes(size, seed)
	for off := 0; off < size; off += 64 << 10 {
		if (off/(64<<10))%4 == 3 {
			clear(data[off:min(size, off+64<<10)])
		} else {
			nonZero += int64(min(size, off+64<<10) - off)
		}
	}
	return data, nonZero
}

// startMockCluster starts n nodes on one mocknet, all bootstrapping from the
// first.
func startMockCluster(t *testing.T, n int, cfg func(i int, c *node.Config)) []*testNode {
	nodes, _ := startMockNet(t, n, cfg)
	return nodes
}

// startMockNet is startMockCluster that also returns the mocknet.
func startMockNet(t *testing.T, n int, cfg func(i int, c *node.Config)) ([]*testNode, mocknet.Mocknet) {
	t.Helper()
	mn := mocknet.New()
	t.Cleanup(func() { mn.Close() })
	hosts := make([]host.Host, n)
	for i := range n {
		h, err := mn.GenPeer()
		if err != nil {
			t.Fatal(err)
		}
		hosts[i] = h
	}
	if err := mn.LinkAll(); err != nil {
		t.Fatal(err)
	}
	boot := hosts[0].Addrs()[0].String() + "/p2p/" + hosts[0].ID().String()
	nodes := make([]*testNode, n)
	var g errgroup.Group
	g.SetLimit(8) // 100 nodes at once on two cores miss their readiness bound
	for i, h := range hosts {
		c := node.Config{MemCache: -1, Readahead: -1, NoProfilePrefetch: true, APIListen: "127.0.0.1:0"}
		c.P2P.Host = h
		if i > 0 {
			c.P2P.Bootstrap = []string{boot}
		}
		if cfg != nil {
			cfg(i, &c)
		}
		g.Go(func() error {
			tn, err := tryStartNode(t, c)
			if err != nil {
				return fmt.Errorf("node %d: %w", i, err)
			}
			nodes[i] = tn // each goroutine writes its own element
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		t.Fatal(err)
	}
	// Until every node has joined (its routing table is not empty).
	eventually(t, 2*time.Minute, func() bool {
		for _, tn := range nodes {
			if len(tn.P2P().Peers()) == 0 {
				return false
			}
		}
		return true
	}, "every node to join the cluster")
	return nodes, mn
}

// openRetry opens an export, retrying while the cluster is still learning
// about the image.
func openRetry(t *testing.T, tn *testNode, name string) nbd.Export {
	t.Helper()
	// 50 mocknet nodes under -race on 2 loaded cores: name resolution can
	// take tens of seconds (it once missed 30 s in a full run).
	deadline := time.Now().Add(90 * time.Second)
	for {
		x, err := tn.Open(t.Context(), name)
		if err == nil {
			return x
		}
		if !errors.Is(err, nbd.ErrUnknownExport) || time.Now().After(deadline) {
			t.Fatalf("open %s on a node that never saw it: %v", name, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// TestClusterCoalescesOriginReads: an image is added (lazily) on one node of
// 50 on a mocknet; every node resolves it by name and reads all of it at
// once. Every byte is right, and the origin serves about the image's
// non-zero bytes once, not once per node.
func TestClusterCoalescesOriginReads(t *testing.T) {
	// Not parallel: 50 nodes under -race share two cores with nothing else of
	// this package, so that a designated fetcher's slowness is the code's.
	// 50 nodes with HOARD_SCALE=1 (the README's figure); 20 in make test,
	// where two cores also run cmd/hoard's daemons and guests meanwhile and
	// 50 nodes' Have requests time out (partial views then designate
	// differently: 4.7-5.5x in two CI runs, 1.00x alone).
	nodes := 20
	if os.Getenv("HOARD_SCALE") != "" {
		nodes = 50
	}
	data, nonZero := mockImage(3<<20, 11)
	srv := newRangeServer(t, data)
	// The designated fetcher's deadline is generous: 50 nodes under the race
	// detector on a small machine are slow, and a fallback to the origin is
	// what this test counts.
	cl := startMockCluster(t, nodes, func(_ int, c *node.Config) { c.P2P.DesignatedTimeout = 30 * time.Second })
	addImage(t, cl[0], api.ImportRequest{Source: srv.URL + "/coal.raw", Name: "coal", Lazy: true, Chunking: "fixed"})
	importBytes := srv.bytes.Load()

	exps := make([]nbd.Export, nodes)
	var wg sync.WaitGroup
	for i, tn := range cl {
		wg.Go(func() { exps[i] = openRetry(t, tn, "coal") })
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	for _, x := range exps {
		defer x.Close()
	}
	start := time.Now()
	readAllAtOnce(t, exps, data)
	var peerBytes, originBytes, fallbacks, fetchers int64
	for _, tn := range cl {
		c := tn.counters(t)
		peerBytes += c.ReadBytes["peer"]
		originBytes += c.OriginBytes
		fallbacks += c.DesignatedFallbacks
		if c.OriginBytes > 0 {
			fetchers++
		}
	}
	got := srv.bytes.Load() - importBytes
	t.Logf("%d nodes read %d non-zero bytes each in %v: origin served %d bytes (%.2fx the image's non-zero bytes; nodes counted %d, %d nodes fetched, %d designated fallbacks), peers %d",
		nodes, nonZero, time.Since(start).Round(time.Millisecond), got, float64(got)/float64(nonZero), originBytes, fetchers, fallbacks, peerBytes)
	if float64(got) > 1.1*float64(nonZero) {
		t.Errorf("origin served %d bytes for %d nodes reading %d non-zero bytes: want <= 1.1x", got, nodes, nonZero)
	}
	if peerBytes == 0 {
		t.Error("no chunk came from a peer")
	}
}

// readAllAtOnce has every export read all of data at once, in 256 KiB reads,
// each starting at a different place, and checks the bytes.
func readAllAtOnce(t *testing.T, exps []nbd.Export, data []byte) {
	t.Helper()
	var wg sync.WaitGroup
	errs := make(chan error, len(exps))
	for i, x := range exps {
		wg.Go(func() {
			const step = 256 << 10
			k := len(data) / step
			for j := range k {
				off := int64((j+i)%k) * step
				p := make([]byte, step)
				if err := x.ReadAt(t.Context(), p, off); err != nil {
					errs <- fmt.Errorf("node %d: read at %d: %w", i, off, err)
					return
				}
				if !bytes.Equal(p, data[off:off+step]) {
					errs <- fmt.Errorf("node %d: wrong bytes at %d", i, off)
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// TestClusterCoalescesWithStaleViews: nodes whose views of an image lack
// most of its other readers (their Have requests failed: a partition, or
// timeouts under load) still send each chunk to the origin about once when
// they all read it at once, because they designate over the cluster's
// members rather than over the peers that answered. Designating over the
// view, each node chose among itself and the one peer it saw: 2-3x.
func TestClusterCoalescesWithStaleViews(t *testing.T) {
	t.Parallel()
	const nodes = 6
	data, nonZero := mockImage(3<<20, 12)
	srv := newRangeServer(t, data)
	cl, mn := startMockNet(t, nodes, func(_ int, c *node.Config) {
		c.P2P.ViewTTL = 5 * time.Minute // the views taken during the partition stay
		c.P2P.DesignatedTimeout = 30 * time.Second
	})
	waitFor(t, "every node to know every other from its NodeInfo", func() bool {
		for _, tn := range cl {
			if tn.LiveMembers() < nodes-1 {
				return false
			}
		}
		return true
	})
	addImage(t, cl[0], api.ImportRequest{Source: srv.URL + "/stale.raw", Name: "stale", Lazy: true, Chunking: "fixed"})
	exps := make([]nbd.Export, nodes)
	for i, tn := range cl {
		exps[i] = openRetry(t, tn, "stale")
		defer exps[i].Close()
	}
	head := make([]byte, 64<<10)
	if err := exps[0].ReadAt(t.Context(), head, 0); err != nil {
		t.Fatal(err)
	}
	// Partition nodes 1..5 from each other; each reads the chunk node 0
	// holds, so its view of the image is node 0 alone.
	for i := 1; i < nodes; i++ {
		for j := i + 1; j < nodes; j++ {
			a, b := cl[i].P2P().ID(), cl[j].P2P().ID()
			if err := mn.UnlinkPeers(a, b); err != nil {
				t.Fatal(err)
			}
			if err := mn.DisconnectPeers(a, b); err != nil {
				t.Fatal(err)
			}
		}
	}
	for i := 1; i < nodes; i++ {
		if err := exps[i].ReadAt(t.Context(), head, 0); err != nil {
			t.Fatalf("node %d: %v", i, err)
		}
		if !bytes.Equal(head, data[:len(head)]) {
			t.Fatalf("node %d: wrong bytes", i)
		}
	}
	for i := 1; i < nodes; i++ {
		for j := i + 1; j < nodes; j++ {
			if _, err := mn.LinkPeers(cl[i].P2P().ID(), cl[j].P2P().ID()); err != nil {
				t.Fatal(err)
			}
		}
	}
	before := srv.bytes.Load()
	readAllAtOnce(t, exps, data)
	var fetchers, fallbacks int64
	for _, tn := range cl {
		c := tn.counters(t)
		fallbacks += c.DesignatedFallbacks
		if c.OriginBytes > 0 {
			fetchers++
		}
	}
	got := srv.bytes.Load() - before
	ratio := float64(got) / float64(nonZero-int64(len(head)))
	t.Logf("%d nodes with stale views read the image at once: origin served %d bytes, %.2fx the non-zero bytes left (%d nodes fetched, %d designated fallbacks)", nodes, got, ratio, fetchers, fallbacks)
	if ratio > 1.1 {
		t.Errorf("origin served %.2fx the image's non-zero bytes to %d nodes whose views were stale: want <= 1.1x", ratio, nodes)
	}
}

// TestClusterDesignatedLearnsManifest: a member asked as a chunk's
// designated fetcher for an image its catalog lists but it has not
// registered yet learns the manifest from the asker, CID-checked, and
// fetches the chunk instead of answering "not found", which sent the asker
// to the origin too. An image removed here is not learnt back that way.
func TestClusterDesignatedLearnsManifest(t *testing.T) {
	t.Parallel()
	data, _ := mockImage(1<<20, 13)
	srv := newRangeServer(t, data)
	cl := startMockCluster(t, 2, nil)
	res := addImage(t, cl[0], api.ImportRequest{Source: srv.URL + "/learn.raw", Name: "learn", Lazy: true, Chunking: "fixed"})
	waitFor(t, "node 1 to learn the image from the catalog", func() bool {
		_, err := cl[1].Store().Resolve(t.Context(), "learn")
		return err == nil
	})
	m, err := cl[0].Store().GetManifest(t.Context(), res.Manifest)
	if err != nil {
		t.Fatal(err)
	}
	if err := cl[1].UnregisterBehindCatalog(t.Context(), "learn"); err != nil {
		t.Fatal(err)
	}
	e := m.Entries[1]
	before := srv.bytes.Load()
	var got []byte
	fctx, fcancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer fcancel()
	nf, err := cl[0].P2P().Fetch(fctx, cl[1].P2P().ID(), res.Manifest, []p2p.Want{{Index: 1, ID: e.ID}}, true, func(c p2p.Chunk) error {
		got = c.Data
		return nil
	})
	if err == nil && len(nf) > 0 {
		err = chunkstore.ErrNotFound
	}
	if err != nil {
		t.Fatalf("designated fetch from a node that had not registered the image: %v", err)
	}
	if !bytes.Equal(got, data[e.Offset:e.Offset+int64(e.Length)]) {
		t.Fatalf("designated fetch: got %d bytes, not the chunk's", len(got))
	}
	if d := srv.bytes.Load() - before; d != int64(e.Length) {
		t.Errorf("the designated node read %d origin bytes for a %d-byte chunk", d, e.Length)
	}

	// A local rm: the node does not take an image back from an asker.
	data2, _ := mockImage(1<<20, 14)
	srv2 := newRangeServer(t, data2)
	res2 := addImage(t, cl[0], api.ImportRequest{Source: srv2.URL + "/gone.raw", Name: "gone", Lazy: true, Chunking: "fixed"})
	waitFor(t, "node 1 to learn the second image", func() bool {
		_, err := cl[1].Store().Resolve(t.Context(), "gone")
		return err == nil
	})
	if _, err := cl[1].RemoveImage(t.Context(), "gone", false); err != nil {
		t.Fatal(err)
	}
	m2, err := cl[0].Store().GetManifest(t.Context(), res2.Manifest)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	nf, err = cl[0].P2P().Fetch(ctx, cl[1].P2P().ID(), res2.Manifest, []p2p.Want{{Index: 1, ID: m2.Entries[1].ID}}, true, func(p2p.Chunk) error { return nil })
	if err != nil || len(nf) != 1 {
		t.Errorf("a node that removed the image served it as a designated fetcher (not found %v, err %v)", nf, err)
	}
	if _, err := cl[1].Store().GetManifest(t.Context(), res2.Manifest); !errors.Is(err, chunkstore.ErrNotFound) {
		t.Errorf("a designated request brought back the manifest removed here (err %v)", err)
	}
	if d := srv2.bytes.Load(); d != res2.Size {
		t.Errorf("the origin served %d bytes of a %d-byte image added lazily: a node that removed it read some for an asker", d, res2.Size)
	}
}

// TestClusterNameConflict: two nodes import different images under one name.
// A third node refuses the name, naming both manifests and how to choose,
// instead of taking whichever provider answers first; it can pull either by
// its CID.
func TestClusterNameConflict(t *testing.T) {
	t.Parallel()
	dataA, _ := mockImage(1<<20, 51)
	dataB, _ := mockImage(1<<20, 52)
	srvA, srvB := newRangeServer(t, dataA), newRangeServer(t, dataB)
	// The two nodes add their images before they join (with the cluster
	// catalog, a node that has joined learns the name and refuses to add
	// another image under it).
	res := make([]*importer.Result, 2)
	cl := startMockCluster(t, 3, func(i int, c *node.Config) {
		if i > 1 {
			return
		}
		c.DataDir = t.TempDir()
		st, err := chunkstore.Open(filepath.Join(c.DataDir, "store"))
		if err != nil {
			t.Fatal(err)
		}
		defer st.Close()
		src := []string{srvA.URL + "/a.raw", srvB.URL + "/b.raw"}[i]
		if res[i], err = local.Add(t.Context(), st, origin.Config{}, api.ImportRequest{Source: src, Name: "deb", Lazy: true}, nil); err != nil {
			t.Fatal(err)
		}
	})
	a, b := res[0], res[1]
	if a.Manifest == b.Manifest {
		t.Fatal("two different images have one manifest")
	}
	// Until both claims are announced.
	// (Both providers must be in the DHT: tens of seconds on a loaded CI.)
	eventually(t, 90*time.Second, func() bool {
		_, _, err := cl[2].P2P().ResolveName(t.Context(), "deb")
		return errors.Is(err, p2p.ErrNameConflict)
	}, "both claims on the name to be seen")
	// The catalog may have given the name to the first claim it learned;
	// once it knows both, it takes it back: it gives it to neither.
	eventually(t, 30*time.Second, func() bool {
		for _, id := range []chunkstore.ID{a.Manifest, b.Manifest} {
			if _, err := cl[2].Store().GetManifestBytes(t.Context(), id); err != nil {
				return false // the catalog has not registered both claims yet
			}
		}
		_, err := cl[2].Store().Resolve(t.Context(), "deb")
		return errors.Is(err, chunkstore.ErrNotFound)
	}, "the catalog to know both claims and give the name to neither")
	_, err := cl[2].PullImage(t.Context(), "deb")
	if err == nil {
		t.Fatal("pulled a name two images claim")
	}
	for _, want := range []string{a.Manifest.String(), b.Manifest.String(), "hoard image pull"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("pull of a conflicting name: %q does not say %s", err, want)
		}
	}
	if _, err := cl[2].Open(t.Context(), "deb"); err == nil || !strings.Contains(err.Error(), b.Manifest.String()) {
		t.Errorf("NBD open of a conflicting name: %v", err)
	}

	info, err := cl[2].PullImage(t.Context(), b.Manifest.String())
	if err != nil || info.Manifest != b.Manifest {
		t.Fatalf("pull by CID: %+v, %v", info, err)
	}
}

// TestClusterResolveSurvivesCancelledCaller: two callers resolve one unknown
// name at once and the first gives up; the shared resolution goes on for the
// second.
func TestClusterResolveSurvivesCancelledCaller(t *testing.T) {
	t.Parallel()
	data, _ := mockImage(1<<20, 53)
	srv := newRangeServer(t, data)
	cl, mn := startMockNet(t, 2, nil)
	res := addImage(t, cl[0], api.ImportRequest{Source: srv.URL + "/r.raw", Name: "shared", Lazy: true})
	waitFor(t, "the name to be announced", func() bool {
		id, _, err := cl[1].P2P().ResolveName(t.Context(), "shared")
		return err == nil && id == res.Manifest
	})
	// Slow links: the resolution (DHT lookup, RESOLVE, MANIFEST) takes many
	// round trips of 2 x 50 ms, long past the first caller's 100 ms.
	for _, l := range mn.LinksBetweenPeers(cl[0].P2P().ID(), cl[1].P2P().ID()) {
		l.SetOptions(mocknet.LinkOptions{Latency: 50 * time.Millisecond})
	}
	first, cancel := context.WithTimeout(t.Context(), 100*time.Millisecond)
	defer cancel()
	errs := make(chan error, 2)
	go func() {
		_, err := cl[1].PullImage(first, "shared")
		errs <- err
	}()
	time.Sleep(10 * time.Millisecond) // the first caller starts the flight
	info, err := cl[1].PullImage(t.Context(), "shared")
	if err != nil || info.Manifest != res.Manifest {
		t.Fatalf("second caller: %+v, %v (the first caller's cancel failed the shared resolution)", info, err)
	}
	if err := <-errs; !errors.Is(err, context.DeadlineExceeded) {
		t.Logf("first caller: %v", err)
	}
}

// TestClusterFirstReadWithStoppedPeer: a connected peer that stopped
// answering (its chunk streams accept and never reply) does not hold a
// node's first read of an image for the whole have-bitmap timeout (3 s, then
// 5 s): the first view is used once a holder answered and a short grace passed.
func TestClusterFirstReadWithStoppedPeer(t *testing.T) {
	t.Parallel()
	data, _ := mockImage(1<<20, 54)
	srv := newRangeServer(t, data)
	cl := startMockCluster(t, 3, nil)
	addImage(t, cl[0], api.ImportRequest{Source: srv.URL + "/s.raw", Name: "stopped"})
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
	cl[2].P2P().Host().SetStreamHandler(p2p.ProtocolChunks, func(s network.Stream) {
		mu.Lock()
		held = append(held, s)
		mu.Unlock()
		<-stop
	})
	x := openRetry(t, cl[1], "stopped")
	defer x.Close()
	start := time.Now()
	p := make([]byte, 64<<10)
	if err := x.ReadAt(t.Context(), p, 0); err != nil {
		t.Fatal(err)
	}
	d := time.Since(start)
	if !bytes.Equal(p, data[:len(p)]) {
		t.Fatal("wrong bytes")
	}
	t.Logf("first read with a stopped peer: %v", d)
	if d > 3*time.Second {
		t.Fatalf("first read took %v with a stopped peer in the view: it waited for the stopped peer's have-bitmap", d)
	}
	if c := cl[1].counters(t); c.ReadBytes["peer"] == 0 {
		t.Errorf("the read did not come from the holder: %+v", c.ReadBytes)
	}
}
