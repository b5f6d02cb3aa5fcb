package node_test

import (
	"bytes"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/hoardvm/hoard/nbd"
	"github.com/hoardvm/hoard/node"
	"github.com/libp2p/go-libp2p/core/host"
	mocknet "github.com/libp2p/go-libp2p/p2p/net/mock"
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
	var wg sync.WaitGroup
	var mu sync.Mutex
	for i, h := range hosts {
		c := node.Config{MemCache: -1, Readahead: -1, NoProfilePrefetch: true, APIListen: "127.0.0.1:0"}
		c.P2P.Host = h
		if i > 0 {
			c.P2P.Bootstrap = []string{boot}
		}
		if cfg != nil {
			cfg(i, &c)
		}
		wg.Go(func() {
			tn := startNode(t, c)
			mu.Lock()
			nodes[i] = tn
			mu.Unlock()
		})
	}
	wg.Wait()
	// Until every node has joined (its routing table is not empty).
	waitFor(t, "every node to join the cluster", func() bool {
		for _, tn := range nodes {
			if len(tn.P2P().Peers()) == 0 {
				return false
			}
		}
		return true
	})
	return nodes
}

// openRetry opens an export, retrying while the cluster is still learning
// about the image.
func openRetry(t *testing.T, tn *testNode, name string) nbd.Export {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
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
	t.Parallel()
	const nodes = 50
	data, nonZero := mockImage(3<<20, 11)
	srv := newRangeServer(t, data)
	// The designated fetcher's deadline is generous: 50 nodes under the race
	// detector on a small machine are slow, and a fallback to the origin is
	// what this test counts.
	cl := startMockCluster(t, nodes, func(_ int, c *node.Config) { c.P2P.DesignatedTimeout = 15 * time.Second })
	addImage(t, cl[0], node.ImportRequest{Source: srv.URL + "/coal.raw", Name: "coal", Lazy: true, Chunking: "fixed"})
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
	errs := make(chan error, nodes)
	for i, x := range exps {
		wg.Go(func() {
			// Every node reads it all, each starting at a different place.
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
