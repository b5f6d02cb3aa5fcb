package node

import (
	"fmt"
	"testing"

	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/test"
)

// TestChooseRegistrar: nodes connected to different peers of one cluster
// (all members they heard a NodeInfo from) choose the same registrar for
// every Glance image; a bad peer is never chosen.
func TestChooseRegistrar(t *testing.T) {
	ids := make([]peer.ID, 4)
	for i := range ids {
		id, err := test.RandPeerID()
		if err != nil {
			t.Fatal(err)
		}
		ids[i] = id
	}
	a, b, c, d := ids[0], ids[1], ids[2], ids[3]
	noBad := func(peer.ID) bool { return false }
	differ := 0
	for i := range 200 {
		id := fmt.Sprintf("77777777-0000-4000-8000-%012d", i)
		// a is connected to b only, c to d only.
		ra := chooseRegistrar(id, a, []peer.ID{b}, []peer.ID{b, c, d}, noBad)
		rc := chooseRegistrar(id, c, []peer.ID{d}, []peer.ID{a, b, d}, noBad)
		if ra != rc {
			differ++
		}
		if r := chooseRegistrar(id, a, []peer.ID{b}, []peer.ID{b, c, d}, func(p peer.ID) bool { return p == c }); r == c {
			t.Errorf("glance image %s: the bad peer was chosen", id)
		}
	}
	if differ > 0 {
		t.Errorf("nodes with different connections chose different registrars for %d of 200 images, want none", differ)
	}
}
