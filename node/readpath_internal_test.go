package node

import (
	"context"
	"testing"
	"time"

	"github.com/hoardvm/hoard/chunkstore"
)

// TestOriginSlotsPerOrigin: each origin has its own Config.OriginConcurrency
// slots; a full origin makes only its own requests wait (bounded by their
// context), and the slots of an origin nobody uses are dropped.
func TestOriginSlotsPerOrigin(t *testing.T) {
	t.Parallel()
	o := &originSlots{per: 2}
	a := originKey(chunkstore.Source{Kind: "http", Location: "http://a.example:8080/x.raw?sig=1"})
	if b := originKey(chunkstore.Source{Kind: "http", Location: "http://a.example:8080/y.raw"}); b != a {
		t.Fatalf("two images on one HTTP host have origin keys %q and %q; want one", a, b)
	}
	b := originKey(chunkstore.Source{Kind: "http", Location: "http://b.example/x.raw"})
	var releases []func()
	for range 2 {
		r, err := o.acquire(t.Context(), a)
		if err != nil {
			t.Fatal(err)
		}
		releases = append(releases, r)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 50*time.Millisecond)
	defer cancel()
	if _, err := o.acquire(ctx, a); err == nil {
		t.Fatal("a third request to an origin with 2 slots did not wait")
	}
	bctx, bcancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer bcancel()
	rb, err := o.acquire(bctx, b)
	if err != nil {
		t.Fatalf("another origin waited for the full one: %v", err)
	}
	rb()
	releases[0]()
	r, err := o.acquire(t.Context(), a)
	if err != nil {
		t.Fatalf("slot given back not reusable: %v", err)
	}
	r()
	releases[1]()
	o.mu.Lock()
	left := len(o.m)
	o.mu.Unlock()
	if left != 0 {
		t.Fatalf("%d origins keep slots after every request ended", left)
	}
}
