package placement

import (
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/hoardvm/hoard/p2p"
	"github.com/hoardvm/hoard/planner"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
)

func newID(t *testing.T) peer.ID {
	t.Helper()
	_, pub, err := crypto.GenerateEd25519Key(nil)
	if err != nil {
		t.Fatal(err)
	}
	id, err := peer.IDFromPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// TestNodesExpire: a node drops out ExpireIntervals of its intervals after
// its last announcement; an older version does not replace a newer one.
func TestNodesExpire(t *testing.T) {
	t.Parallel()
	c := &clock{t: time.Unix(1000, 0)}
	ns := NewNodes(c.now)
	a, b := newID(t), newID(t)
	ns.Learn(p2p.NodeInfo{Node: a, Name: "a", Interval: time.Second, Version: 2})
	ns.Learn(p2p.NodeInfo{Node: b, Name: "b", Interval: 10 * time.Second, Version: 1})
	ns.Learn(p2p.NodeInfo{Node: a, Name: "a-old", Interval: time.Second, Version: 1})
	if l := ns.Live(); len(l) != 2 || l[0].Name != "a" || l[1].Name != "b" {
		t.Fatalf("live: %+v", l)
	}
	c.add(ExpireIntervals*time.Second + time.Millisecond)
	if l := ns.Live(); len(l) != 1 || l[0].Name != "b" {
		t.Fatalf("after a's expiry: %+v", l)
	}
	ns.Learn(p2p.NodeInfo{Node: a, Name: "a", Interval: time.Second, Version: 3})
	if l := ns.Live(); len(l) != 2 {
		t.Fatalf("a back: %+v", l)
	}
}

// TestRank: the holder ranks first; asked hosts that no node answers for
// are listed last with score 0; a host is named by its node.name.
func TestRank(t *testing.T) {
	t.Parallel()
	ns := NewNodes(nil)
	self, a, b := newID(t), newID(t), newID(t)
	ns.Learn(p2p.NodeInfo{Node: a, Name: "hv-a", FreeQuota: -1, Interval: time.Minute, Version: 1})
	ns.Learn(p2p.NodeInfo{Node: b, Name: "hv-b", FreeQuota: -1, Interval: time.Minute, Version: 1})
	img := planner.PlaceImage{Sizes: []int64{10, 10, 10, 10}, WorkingSet: []int{0, 1}}
	full := p2p.NewBitmap(4)
	for i := range 4 {
		full.Set(i)
	}
	r := Request{Image: img, Self: p2p.NodeInfo{Node: self, Name: "hv-self", FreeQuota: -1}, SelfBits: p2p.NewBitmap(4),
		Haves: map[peer.ID]p2p.Bitmap{b: full}}
	got := ns.Rank(r)
	if len(got) != 3 || got[0].Host != "hv-b" || got[0].Peer != b || got[0].Score != 1 {
		t.Fatalf("rank: %+v", got)
	}
	for _, h := range got {
		if (h.Host == "hv-self") != h.Self {
			t.Errorf("%s: self %v", h.Host, h.Self)
		}
	}
	r.Hosts = []string{"hv-a", "nope", "hv-b"}
	got = ns.Rank(r)
	if len(got) != 3 || got[0].Host != "hv-b" || got[2].Host != "nope" || got[2].Score != 0 || got[2].Peer != "" {
		t.Fatalf("rank of hosts: %+v", got)
	}
}

// BenchmarkRank100Hosts: the answer for 100 live nodes and a 2 GiB image
// of 64 KiB chunks (32768 entries, a 1600-chunk working set), each node
// holding a random half of it.
func BenchmarkRank100Hosts(b *testing.B) {
	const entries = 32768
	ns := NewNodes(nil)
	haves := map[peer.ID]p2p.Bitmap{}
	r := rand.New(rand.NewPCG(5, 6))
	for i := range 100 {
		_, pub, _ := crypto.GenerateEd25519Key(nil)
		id, _ := peer.IDFromPublicKey(pub)
		ns.Learn(p2p.NodeInfo{Node: id, Name: fmt.Sprintf("hv-%03d", i), OpenExports: i % 7, FreeQuota: int64(i) << 30, Interval: time.Hour, Version: 1})
		bm := p2p.NewBitmap(entries)
		for j := range bm {
			bm[j] = byte(r.Uint32())
		}
		haves[id] = bm
	}
	sizes := make([]int64, entries)
	for i := range sizes {
		sizes[i] = 64 << 10
	}
	req := Request{Image: planner.PlaceImage{Sizes: sizes, WorkingSet: r.Perm(entries)[:1600]},
		Self: p2p.NodeInfo{Name: "self", FreeQuota: -1}, SelfBits: p2p.NewBitmap(entries), Haves: haves}
	b.ResetTimer()
	for b.Loop() {
		if got := ns.Rank(req); len(got) != 101 {
			b.Fatalf("%d hosts ranked", len(got))
		}
	}
}
