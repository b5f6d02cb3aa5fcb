package chunkstore

import (
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// Starting a new pack (file create, directory fsync) does not hold up reads
// of other packs (before, it ran under the pack set's lock, which every
// read takes).
func TestReadsDoNotWaitForNewPack(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	s := openT(t, t.TempDir(), WithQuota(2<<20)) // 64 KiB packs
	r := rand.New(rand.NewPCG(4, 4))
	ids := putRandom(t, s, r, 3, 20000) // one full pack
	g := newGate()
	s.packs.faults.syncDir = g.wait
	d := make([]byte, 20000)
	fillRandom(r, d)
	put := make(chan error, 1)
	go func() { put <- s.Put(ctx, Sum(d), d) }()
	g.waitEntered(t, 10*time.Second, "the put that starts a pack")
	within(t, 5*time.Second, "reads while a new pack is synced", func() {
		for _, id := range ids {
			if got, err := s.Get(ctx, id); err != nil || !id.Verify(got) {
				t.Errorf("get while a new pack is synced: %v", err)
			}
		}
	})
	g.open()
	if err := returnsWithin(t, put, 10*time.Second, "the put"); err != nil {
		t.Fatal(err)
	}
	if got, err := s.Get(ctx, Sum(d)); err != nil || string(got) != string(d) {
		t.Fatalf("get of the chunk in the new pack: %v", err)
	}
	if _, err := os.Stat(filepath.Join(s.packs.dir, packName(1))); err != nil {
		t.Fatalf("the put did not start a new pack: %v", err)
	}
}
