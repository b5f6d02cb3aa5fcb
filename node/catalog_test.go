package node_test

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/hoardvm/hoard/chunkstore"
	"github.com/hoardvm/hoard/node"
	"github.com/hoardvm/hoard/node/api"
	"github.com/hoardvm/hoard/p2p"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
)

// TestCatalogReachesEveryNode (scatter hoarding, part 1): an image added on
// one node becomes known to every node without anyone naming it; a profile
// recorded on one node shows in every node's merged profile; image rm stays
// local, image rm --cluster removes it everywhere, also on a node that was
// down then and learns it when it comes back.
func TestCatalogReachesEveryNode(t *testing.T) {
	t.Parallel()
	data, _ := mockImage(1<<20, 21)
	srv := newRangeServer(t, data)
	syncOften := func(_ int, c *node.Config) {
		c.P2P.Options = append(c.P2P.Options, p2p.WithCatalogSyncInterval(2*time.Second))
	}
	cl, mn := startMockNet(t, 3, syncOften)
	boot := cl[0].P2P().Addrs()[0].String() + "/p2p/" + cl[0].P2P().ID().String()
	// Node 3 is stoppable and comes back on the same data dir (with a new
	// mocknet host: the catalog lives in the data dir, not in the identity).
	dir3 := t.TempDir()
	sock3 := filepath.Join(shortDir(t), "nbd.sock")
	start3 := func() (*testNode, func()) {
		h, err := mn.GenPeer()
		if err != nil {
			t.Fatal(err)
		}
		if err := mn.LinkAll(); err != nil {
			t.Fatal(err)
		}
		c := node.Config{DataDir: dir3, NBDSocket: sock3, MemCache: -1, Readahead: -1, NoProfilePrefetch: true}
		c.P2P.Host, c.P2P.Bootstrap = h, []string{boot}
		syncOften(3, &c)
		return startStoppable(t, c)
	}
	n3, stop3 := start3()
	cl = append(cl, n3)
	res := addImage(t, cl[0], api.ImportRequest{Source: srv.URL + "/cat.raw", Name: "cat", Lazy: true, Chunking: "fixed"})
	known := func(tn *testNode, name string) bool {
		id, err := tn.Store().Resolve(t.Context(), name)
		return err == nil && id == res.Manifest
	}
	for i, tn := range cl {
		waitFor(t, "node "+string(rune('0'+i))+" to learn the image", func() bool { return known(tn, "cat") })
	}

	// A boot on node 1 reads a few chunks: its profile reaches node 3.
	x, err := cl[1].Open(t.Context(), "cat")
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4096)
	for _, off := range []int64{0, 5 << 16, 9 << 16} {
		if err := x.ReadAt(t.Context(), buf, off); err != nil {
			t.Fatal(err)
		}
	}
	x.Close()
	waitFor(t, "node 3 to merge node 1's profile", func() bool {
		p, err := cl[3].Profile(t.Context(), "cat")
		return err == nil && p.Chunks == 3 && p.Contributors == 1 && p.Boots == 1
	})

	// A local rm stays local.
	if _, err := cl[2].RemoveImage(t.Context(), "cat", false); err != nil {
		t.Fatal(err)
	}
	time.Sleep(3 * time.Second) // a sync interval and more
	if known(cl[2], "cat") {
		t.Fatal("a locally removed image came back from the catalog")
	}
	if !known(cl[1], "cat") {
		t.Fatal("a local rm on node 2 removed the image on node 1")
	}

	// Node 3 goes down; rm --cluster on node 1 removes the image on node 0,
	// and on node 3 once it is back.
	stop3()
	if _, err := cl[1].RemoveImage(t.Context(), "cat", true); err != nil {
		t.Fatal(err)
	}
	gone := func(tn *testNode) bool {
		_, err := tn.Store().Resolve(t.Context(), "cat")
		return errors.Is(err, chunkstore.ErrNotFound)
	}
	waitFor(t, "rm --cluster to reach node 0", func() bool { return gone(cl[0]) })
	if !gone(cl[1]) {
		t.Fatal("rm --cluster left the image on the node it ran on")
	}
	n3, _ = start3()
	if gone(n3) {
		t.Fatal("node 3 lost the image while it was down: the test tests nothing")
	}
	waitFor(t, "node 3 to learn the removal when it is back", func() bool { return gone(n3) })
}

// TestCatalogForgedTombstoneBySync: a peer with the swarm key that serves,
// by catalog sync, a tombstone forged in the name of the node that added an
// image (carrying that node's real public key, signed with its own) removes
// the image on no node, and every node demotes it.
func TestCatalogForgedTombstoneBySync(t *testing.T) {
	t.Parallel()
	data, _ := mockImage(1<<20, 23)
	srv := newRangeServer(t, data)
	cl, mn := startMockNet(t, 3, func(_ int, c *node.Config) {
		c.P2P.Options = append(c.P2P.Options, p2p.WithCatalogSyncInterval(2*time.Second))
	})
	res := addImage(t, cl[0], api.ImportRequest{Source: srv.URL + "/img.raw", Name: "img", Lazy: true, Chunking: "fixed"})
	known := func(tn *testNode) bool {
		id, err := tn.Store().Resolve(t.Context(), "img")
		return err == nil && id == res.Manifest
	}
	for i, tn := range cl {
		waitFor(t, fmt.Sprint("node ", i, " to learn the image"), func() bool { return known(tn) })
	}
	rogue, err := mn.GenPeer()
	if err != nil {
		t.Fatal(err)
	}
	if err := mn.LinkAll(); err != nil {
		t.Fatal(err)
	}
	victim := cl[0].P2P()
	victimKey, err := crypto.MarshalPublicKey(victim.Host().Peerstore().PubKey(victim.ID()))
	if err != nil {
		t.Fatal(err)
	}
	// The rogue signs the tombstone as itself, then puts it in node 0's
	// name; its version (an hour ahead) supersedes the image's entry.
	forged, err := p2p.SignCatalogEntry(rogue.Peerstore().PrivKey(rogue.ID()),
		p2p.CatalogEntry{Manifest: res.Manifest, Removed: true, Version: p2p.NextVersion(0, time.Now().Add(time.Hour))})
	if err != nil {
		t.Fatal(err)
	}
	forged.Publisher, forged.Key = victim.ID(), victimKey
	body, err := p2p.AppendCatalogEntry(nil, forged)
	if err != nil {
		t.Fatal(err)
	}
	// A sync reply (p2p/doc.go): the entry's frame, then END (0x11, flags 0).
	reply := binary.AppendUvarint(nil, uint64(len(body)))
	reply = append(reply, body...)
	reply = append(reply, 2, 0x11, 0)
	rogue.SetStreamHandler(p2p.ProtocolCatalogSync, func(s network.Stream) {
		defer s.Close()
		s.Write(reply)
	})
	for _, tn := range cl {
		if err := rogue.Connect(t.Context(), peer.AddrInfo{ID: tn.P2P().ID(), Addrs: tn.P2P().Host().Addrs()}); err != nil {
			t.Fatal(err)
		}
	}
	for i, tn := range cl {
		waitFor(t, fmt.Sprint("node ", i, " to demote the rogue or lose the image"), func() bool { return tn.P2P().Bad(rogue.ID()) || !known(tn) })
	}
	time.Sleep(3 * time.Second) // a sync interval and more: nodes sync with one another
	for i, tn := range cl {
		if !known(tn) {
			t.Errorf("node %d lost the image to a forged tombstone", i)
		}
		if !tn.P2P().Bad(rogue.ID()) {
			t.Errorf("node %d did not demote the peer that served the forged tombstone", i)
		}
	}
}

// shortDir is a temp dir with a short path (unix socket paths are limited).
func shortDir(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp("", "hoard")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}
