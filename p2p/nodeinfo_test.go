package p2p

import (
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
)

// nodeBackend is a catBackend that also takes part in placement.
type nodeBackend struct {
	*catBackend
	name string

	mu    sync.Mutex
	open  int
	nodes map[peer.ID]NodeInfo
}

func (b *nodeBackend) NodeInfo() NodeInfo {
	b.mu.Lock()
	defer b.mu.Unlock()
	return NodeInfo{Name: b.name, OpenExports: b.open, FreeQuota: -1}
}

func (b *nodeBackend) LearnNode(_ peer.ID, e NodeInfo) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if old, ok := b.nodes[e.Node]; !ok || e.Version >= old.Version {
		b.nodes[e.Node] = e
	}
}

func (b *nodeBackend) node(id peer.ID) (NodeInfo, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	e, ok := b.nodes[id]
	return e, ok
}

// TestNodeInfoCodec: encodings round-trip; out-of-bounds infos are refused
// both ways; non-canonical encodings are refused.
func TestNodeInfoCodec(t *testing.T) {
	t.Parallel()
	id := peerIDForTest(t)
	e := NodeInfo{Node: id, Name: "compute-7", OpenExports: 3, FreeQuota: 5 << 30, Interval: 10 * time.Second, Version: 99}
	b, err := AppendNodeInfo(nil, e)
	if err != nil {
		t.Fatal(err)
	}
	got, err := DecodeNodeInfo(b)
	if err != nil || got != e {
		t.Fatalf("round trip: %+v, %v; want %+v", got, err, e)
	}
	e.FreeQuota = -1
	b, _ = AppendNodeInfo(nil, e)
	if got, err := DecodeNodeInfo(b); err != nil || got.FreeQuota != -1 {
		t.Fatalf("no quota: %+v, %v", got, err)
	}
	for _, bad := range []NodeInfo{
		{Node: id},
		{Node: id, Name: string(make([]byte, MaxNodeNameLen+1))},
		{Node: id, Name: "\xff"},
		{Node: "", Name: "x"},
		{Node: id, Name: "x", OpenExports: -1},
		{Node: id, Name: "x", FreeQuota: -2},
	} {
		if _, err := AppendNodeInfo(nil, bad); err == nil {
			t.Errorf("AppendNodeInfo(%+v) accepted", bad)
		}
	}
	if _, err := DecodeNodeInfo(append(b, 0)); err == nil {
		t.Error("trailing byte accepted")
	}
	if _, err := DecodeNodeInfo(b[:len(b)-1]); err == nil {
		t.Error("short info accepted")
	}
}

// TestNodeInfoGossip: on 4 peers, every peer learns every other's info (by
// the on-connect ask or pubsub) and a change of open exports within a
// bounded time, with the sender's interval.
func TestNodeInfoGossip(t *testing.T) {
	t.Parallel()
	const n = 4
	bs := make([]*nodeBackend, n)
	for i := range bs {
		bs[i] = &nodeBackend{catBackend: newCatBackend(), name: fmt.Sprintf("host-%d", i), nodes: map[peer.ID]NodeInfo{}}
	}
	peers, _ := mockCluster(t, n, func(i int) Backend { return bs[i] }, WithNodeInfoInterval(300*time.Millisecond))
	runPeers(t, peers...)
	waitUntil(t, 15*time.Second, "not every peer learned every other's info", func() bool {
		for i, b := range bs {
			for j, p := range peers {
				if i == j {
					continue
				}
				if e, ok := b.node(p.ID()); !ok || e.Name != fmt.Sprintf("host-%d", j) || e.Interval != 300*time.Millisecond {
					return false
				}
			}
		}
		return true
	})
	bs[2].mu.Lock()
	bs[2].open = 5
	bs[2].mu.Unlock()
	waitUntil(t, 10*time.Second, "a change of open exports did not spread", func() bool {
		for i, b := range bs {
			if e, _ := b.node(peers[2].ID()); i != 2 && e.OpenExports != 5 {
				return false
			}
		}
		return true
	})
	if _, ok := bs[0].node(peers[0].ID()); ok {
		t.Error("a peer learned its own info")
	}
}
