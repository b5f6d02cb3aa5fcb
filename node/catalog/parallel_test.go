package catalog

import (
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/hoardvm/hoard/chunkstore"
	"github.com/hoardvm/hoard/p2p"
)

// learnFromSlowPeer has a catalog learn n images from a peer whose every
// manifest fetch takes delay, and returns how long until all were
// registered and how many fetches ran at once at most.
func learnFromSlowPeer(t *testing.T, n int, delay time.Duration) (time.Duration, int64) {
	fp := &fakePeer{id: pid(t, "self"), mfs: map[chunkstore.ID][]byte{}, delay: delay}
	c, st := newCatalog(t, "", Options{})
	c.Attach(fp)
	ids := make([]chunkstore.ID, n)
	for i := range n {
		_, enc, id := testManifest(t, 1000+i)
		fp.mfs[id] = enc
		ids[i] = id
	}
	pub := pid(t, "publisher")
	start := time.Now()
	run(t, c)
	for i, id := range ids {
		c.LearnCatalog(pub, p2p.CatalogEntry{Manifest: id, Names: []string{fmt.Sprint("img-", i)}, Version: 1, Publisher: pub})
	}
	deadline := time.Now().Add(time.Duration(n)*delay + 30*time.Second)
	for i := range ids {
		for {
			if got, err := st.Resolve(t.Context(), fmt.Sprint("img-", i)); err == nil && got == ids[i] {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("image %d not registered after %v", i, time.Since(start))
			}
			time.Sleep(2 * time.Millisecond)
		}
	}
	return time.Since(start), fp.maxInflight.Load()
}

// TestRegistrationsInParallel: 50 images learned from a slow peer (100 ms a
// manifest) register with up to maxRegistrations fetches at once, not one
// at a time (5 s one at a time).
func TestRegistrationsInParallel(t *testing.T) {
	t.Parallel()
	took, most := learnFromSlowPeer(t, 50, 100*time.Millisecond)
	t.Logf("50 images from a peer with 100 ms manifest fetches: registered in %v, %d fetches at once at most", took.Round(time.Millisecond), most)
	if most < 2 || most > maxRegistrations {
		t.Fatalf("%d manifest fetches at once, want 2 to %d", most, maxRegistrations)
	}
}

// An add then a remove of one manifest apply in order, even when the remove
// arrives while the add's manifest fetch is under way; no two jobs of one
// manifest run at once.
func TestAddThenRemoveInOrder(t *testing.T) {
	t.Parallel()
	_, enc, id := testManifest(t, 2000)
	_, enc2, id2 := testManifest(t, 2001)
	fp := &fakePeer{id: pid(t, "self"), mfs: map[chunkstore.ID][]byte{id: enc, id2: enc2}, gate: make(chan struct{})}
	var mu sync.Mutex
	var events []string
	note := func(s string) { mu.Lock(); events = append(events, s); mu.Unlock() }
	c, st := newCatalog(t, "", Options{
		Registered: func(name string, _ chunkstore.ID) { note("registered " + name) },
		Removed:    func(name string, _ chunkstore.ID, _ bool) { note("removed " + name) },
	})
	c.Attach(fp)
	run(t, c)
	pub := pid(t, "p")
	c.LearnCatalog(pub, p2p.CatalogEntry{Manifest: id, Names: []string{"img"}, Version: 1, Publisher: pub})
	eventually(t, "the add's fetch started", func() bool { return fp.asks.Load() == 1 })
	c.LearnCatalog(pub, p2p.CatalogEntry{Manifest: id, Removed: true, Version: 2, Publisher: pub})
	// Another image's registration is not held up by the first.
	c.LearnCatalog(pub, p2p.CatalogEntry{Manifest: id2, Names: []string{"other"}, Version: 1, Publisher: pub})
	eventually(t, "the other image's fetch started", func() bool { return fp.asks.Load() == 2 })
	c.poke()
	time.Sleep(50 * time.Millisecond)
	if _, err := st.Resolve(t.Context(), "img"); err == nil {
		t.Fatal("registered before its fetch finished")
	}
	close(fp.gate)
	eventually(t, "the add then the remove applied", func() bool {
		mu.Lock()
		defer mu.Unlock()
		i := slicesIndex(events, "registered img")
		return i >= 0 && slicesIndex(events[i:], "removed img") > 0
	})
	eventually(t, "the other image registered", func() bool {
		got, err := st.Resolve(t.Context(), "other")
		return err == nil && got == id2
	})
	if _, err := st.Resolve(t.Context(), "img"); err == nil {
		t.Fatal("the image is named after its tombstone")
	}
	if m := fp.maxInflight.Load(); m > 2 {
		t.Fatalf("%d fetches at once for 2 manifests: two jobs of one manifest ran together", m)
	}
}

func slicesIndex(s []string, v string) int {
	for i, x := range s {
		if x == v {
			return i
		}
	}
	return -1
}
