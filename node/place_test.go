package node_test

import (
	"context"
	"fmt"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/hoardvm/hoard/node"
	"github.com/hoardvm/hoard/node/api"
	"github.com/hoardvm/hoard/p2p"
)

// TestPlaceRanksHolderFirst: of 4 mocknet nodes, one imported an image in
// full; asked on another node, placement ranks the holder first (by its
// node.name), every node is listed with a score in [0, 1], the image
// resolves by name and manifest CID; a node that stops drops out within a
// bounded time, and no answer waits for it.
func TestPlaceRanksHolderFirst(t *testing.T) {
	t.Parallel()
	const iv = 300 * time.Millisecond
	mn := func(i int, c *node.Config) {
		c.NodeName = fmt.Sprintf("hv-%d", i)
		c.HoardBudget = -1 // only the importer holds the image
		c.P2P.ViewTTL = time.Second
		c.P2P.Options = append(c.P2P.Options, p2p.WithNodeInfoInterval(iv), p2p.WithCatalogSyncInterval(2*time.Second))
	}
	cl, net := startMockNet(t, 3, mn)
	// A fourth node this test stops.
	h, err := net.GenPeer()
	if err != nil {
		t.Fatal(err)
	}
	if err := net.LinkAll(); err != nil {
		t.Fatal(err)
	}
	c4 := node.Config{MemCache: -1, Readahead: -1, NoProfilePrefetch: true, APIListen: "127.0.0.1:0", DataDir: t.TempDir()}
	c4.P2P.Host = h
	c4.P2P.Bootstrap = []string{cl[0].P2P().Addrs()[0].String() + "/p2p/" + cl[0].P2P().ID().String()}
	c4.NBDSocket = filepath.Join(t.TempDir(), "n.sock")
	mn(3, &c4)
	n4, err := node.New(c4, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx4, stop4 := context.WithCancel(context.Background())
	done4 := make(chan error, 1)
	go func() { done4 <- n4.Run(ctx4) }()
	wait4 := sync.OnceValue(func() error { return <-done4 })
	t.Cleanup(func() { stop4(); wait4() })
	<-n4.Ready()

	src := filepath.Join(t.TempDir(), "img.raw")
	writeImage(t, src, 2<<20, 5)
	res := addImage(t, cl[2], api.ImportRequest{Source: src, Name: "place-me"})
	asker := cl[0]
	place := func(image string, hosts ...string) api.Placement {
		t.Helper()
		start := time.Now()
		p, err := asker.client.Place(t.Context(), image, hosts)
		if err != nil {
			t.Fatalf("place %s: %v", image, err)
		}
		if d := time.Since(start); d > 2*time.Second {
			t.Errorf("place took %v: it waited for something", d)
		}
		return p
	}
	var p api.Placement
	waitFor(t, "hv-2 to rank first among 4 hosts", func() bool {
		if _, err := asker.Store().Resolve(t.Context(), "place-me"); err != nil {
			return false
		}
		p = place("place-me")
		return len(p.Hosts) == 4 && p.Hosts[0].Host == "hv-2" && p.Hosts[0].Score > 0.99 && !p.Partial
	})
	for _, h := range p.Hosts {
		if h.Score < 0 || h.Score > 1 || h.Reason == "" || h.PeerID == "" {
			t.Errorf("host %+v: want a score in [0,1], a reason and a peer ID", h)
		}
		if h.Host != "hv-2" && h.Score >= p.Hosts[0].Score {
			t.Errorf("host %s scores %v, not below the holder's %v", h.Host, h.Score, p.Hosts[0].Score)
		}
		if (h.Host == "hv-0") != h.Self {
			t.Errorf("host %s: self %v", h.Host, h.Self)
		}
	}
	t.Logf("ranking: %s %.3f (%s); last %s %.3f", p.Hosts[0].Host, p.Hosts[0].Score, p.Hosts[0].Reason, p.Hosts[3].Host, p.Hosts[3].Score)
	if byID := place(res.Manifest.String(), "hv-1", "hv-2", "nova-x"); len(byID.Hosts) != 3 || byID.Hosts[0].Host != "hv-2" ||
		byID.Hosts[2].Host != "nova-x" || byID.Hosts[2].Score != 0 {
		t.Errorf("by manifest for 3 hosts: %+v", byID.Hosts)
	}
	if _, err := asker.client.Place(t.Context(), "no-such-image", nil); err == nil {
		t.Error("placing an unknown image did not fail")
	}

	stop4()
	if err := wait4(); err != nil {
		t.Errorf("Run of the stopped node: %v", err)
	}
	stopped := time.Now()
	waitFor(t, "the stopped node to drop out", func() bool {
		for _, h := range place("place-me").Hosts {
			if h.Host == "hv-3" {
				return false
			}
		}
		return true
	})
	t.Logf("stopped node dropped out after %v", time.Since(stopped).Round(time.Millisecond))
	if d := time.Since(stopped); d > 3*iv+5*time.Second {
		t.Errorf("the stopped node dropped out after %v", d)
	}
	if p := place("place-me", "hv-3", "hv-2"); p.Hosts[0].Host != "hv-2" || p.Hosts[1].Score != 0 {
		t.Errorf("asked for the stopped node: %+v", p.Hosts)
	}
}
