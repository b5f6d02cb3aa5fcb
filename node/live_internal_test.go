package node

import (
	"testing"

	"github.com/hoardvm/hoard/chunkstore"
)

// liveManifest is a manifest of n distinct chunks, the i-th Sum(i, tag).
func liveManifest(n int, tag byte) (*chunkstore.Manifest, []chunkstore.ID) {
	m := &chunkstore.Manifest{}
	ids := make([]chunkstore.ID, n)
	for i := range n {
		ids[i] = chunkstore.Sum([]byte{byte(i), byte(i >> 8), byte(i >> 16), tag})
		m.Entries = append(m.Entries, chunkstore.Entry{Offset: int64(i) << 20, Length: 1 << 20, ID: ids[i]})
	}
	m.Size = int64(n) << 20
	return m, ids
}

// TestLiveSetOpenIsO1: once an image is open, opening and closing it again
// (a mirror download, each Range request) does not walk its chunks: no
// allocation, whatever the image's size. Chunks stay live until the last
// close; a chunk two images share stays live while either is open.
func TestLiveSetOpenIsO1(t *testing.T) {
	var l liveSet
	a, aIDs := liveManifest(50000, 1)
	b, bIDs := liveManifest(10, 2)
	b.Entries[0].ID = aIDs[0] // shared
	bIDs[0] = aIDs[0]
	l.add(a)
	if allocs := testing.AllocsPerRun(100, func() { l.add(a); l.remove(a) }); allocs != 0 {
		t.Errorf("re-opening an open 50000-chunk image: %v allocations per open and close, want 0 (no walk of its chunks)", allocs)
	}
	l.add(a)
	l.add(b)
	l.remove(a)
	if !l.has(aIDs[7]) || !l.has(bIDs[3]) {
		t.Error("an image still open lost its chunks' liveness")
	}
	l.remove(a)
	if l.has(aIDs[7]) {
		t.Error("a closed image's chunk is still live")
	}
	if !l.has(aIDs[0]) {
		t.Error("a chunk shared with an open image is no longer live")
	}
	l.remove(b)
	if l.has(aIDs[0]) || l.has(bIDs[3]) {
		t.Error("chunks live after every image was closed")
	}
	l.remove(b) // an extra close is harmless
	if l.has(aIDs[0]) {
		t.Error("an extra close made a chunk live")
	}
}
