package cluster

import (
	"fmt"
	"testing"
	"time"

	"github.com/hoardvm/hoard/chunkstore"
)

// TestClusterViewsBounded: the views of images no read uses go after
// viewIdle, and beyond maxViews the least recently used go first.
func TestClusterViewsBounded(t *testing.T) {
	t.Parallel()
	c := &Cluster{views: map[chunkstore.ID]*view{}}
	now := time.Now()
	id := func(i int) chunkstore.ID { return chunkstore.Sum(fmt.Append(nil, "image", i)) }
	// More images than the bound, each used one second after the last.
	for i := range maxViews + 100 {
		c.putView(id(i), &view{at: now}, now.Add(time.Duration(i)*time.Millisecond))
	}
	if len(c.views) != maxViews {
		t.Fatalf("%d views kept for %d images, want at most %d", len(c.views), maxViews+100, maxViews)
	}
	for i := range 100 {
		if c.views[id(i)] != nil {
			t.Fatalf("view %d of the oldest 100 kept", i)
		}
	}
	// A view in use is kept over newer ones that are not.
	c.views[id(100)].used = now.Add(time.Hour - time.Minute)
	c.putView(id(-1), &view{at: now}, now.Add(time.Hour))
	if c.views[id(100)] == nil {
		t.Fatal("a view used a minute ago was dropped")
	}
	// Idle views go.
	if len(c.views) != 2 {
		t.Fatalf("%d views after an hour, want the 2 used in the last %v", len(c.views), viewIdle)
	}
}
