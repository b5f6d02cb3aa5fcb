package p2p

import (
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/libp2p/go-libp2p/core/peer"
)

// TestMocknetNameConflict: two nodes that announce one name for different
// manifests make ResolveName fail with both CIDs and what to do, whichever
// answers first; nodes that agree on a name resolve it, all listed.
func TestMocknetNameConflict(t *testing.T) {
	t.Parallel()
	a, b := newTestImage(t, 2, 1024, 41), newTestImage(t, 2, 1024, 42)
	peers, _ := mockCluster(t, 8, func(int) Backend { return nil })
	ctx := t.Context()
	for _, p := range []*Peer{peers[2], peers[6]} {
		if err := p.ProvideName(ctx, "debian-12", a.id); err != nil {
			t.Fatal(err)
		}
	}
	if err := peers[4].ProvideName(ctx, "debian-12", b.id); err != nil {
		t.Fatal(err)
	}
	for _, asker := range []*Peer{peers[0], peers[5], peers[7]} {
		id, _, err := asker.ResolveName(ctx, "debian-12")
		if !errors.Is(err, ErrNameConflict) {
			t.Fatalf("ResolveName of a name claimed by two images = %s, %v; want ErrNameConflict", id, err)
		}
		for _, want := range []string{a.id.String(), b.id.String(), "hoard image pull", peers[4].ID().String()} {
			if !strings.Contains(err.Error(), want) {
				t.Errorf("conflict error %q does not name %s", err, want)
			}
		}
	}
	// The owners still resolve their own name to their own image.
	if id, _, err := peers[4].ResolveName(ctx, "debian-12"); err != nil || id != b.id {
		t.Fatalf("owner's ResolveName = %s, %v; want %s", id, err, b.id)
	}
	// Agreeing providers are all returned, first.
	for _, p := range []*Peer{peers[1], peers[3]} {
		if err := p.ProvideName(ctx, "ubuntu", a.id); err != nil {
			t.Fatal(err)
		}
	}
	id, from, err := peers[7].ResolveName(ctx, "ubuntu")
	if err != nil || id != a.id {
		t.Fatalf("ResolveName(ubuntu) = %s, %v; want %s", id, err, a.id)
	}
	for _, p := range []*Peer{peers[1], peers[3]} {
		if !slices.ContainsFunc(from[:2], func(ai peer.AddrInfo) bool { return ai.ID == p.ID() }) {
			t.Errorf("ResolveName(ubuntu) from %v, want %s among the first two", from, p.ID())
		}
	}
}
