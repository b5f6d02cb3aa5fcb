package node

import (
	"fmt"
	"log/slog"
	"testing"

	"github.com/hoardvm/hoard/chunkstore"
	"github.com/hoardvm/hoard/planner"
)

// testManifest stores a fixed-chunked manifest of the named chunks ("" is a
// zero run) and returns its ID and the manifest.
func testManifest(t *testing.T, st *chunkstore.Store, name string, chunks ...string) (chunkstore.ID, *chunkstore.Manifest) {
	t.Helper()
	b := chunkstore.NewBuilder(chunkstore.Fixed64K, "raw", chunkstore.Source{Kind: "file", Location: "/" + name})
	for _, c := range chunks {
		if c == "" {
			b.Add(64<<10, chunkstore.ID{}, true)
			continue
		}
		b.Add(64<<10, chunkstore.Sum([]byte(c)), false)
	}
	m := b.Manifest()
	id, err := st.PutManifest(t.Context(), m)
	if err != nil {
		t.Fatal(err)
	}
	return id, m
}

// TestEvictorWorkingSets: the policy gets, at start, the working set of every
// image with a stored profile (its profiled entries' chunks, zero runs left
// out), and on a profile save the new set, without the images removed since.
func TestEvictorWorkingSets(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	st, err := chunkstore.Open(t.TempDir(), chunkstore.WithSync(false))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	aID, _ := testManifest(t, st, "a", "base", "a1", "", "a2")
	bID, bM := testManifest(t, st, "b", "base", "b1")
	testManifest(t, st, "c", "c1") // no profile: no working set
	if err := st.PutProfile(ctx, aID, &chunkstore.Profile{Boots: 1, Chunks: []int{0, 2, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := st.PutProfile(ctx, bID, &chunkstore.Profile{Boots: 1, Chunks: []int{0}}); err != nil {
		t.Fatal(err)
	}
	sharing := planner.NewSharing()
	n := &Node{store: st, log: slog.New(slog.DiscardHandler), evict: newEvictor(sharing)}
	if err := n.evict.load(ctx, st, n.log); err != nil {
		t.Fatal(err)
	}
	shares := func(step string, want map[string]int) {
		t.Helper()
		for c, w := range want {
			if got := sharing.Shares(chunkstore.Sum([]byte(c))); got != w {
				t.Errorf("%s: chunk %q in %d working sets, want %d", step, c, got, w)
			}
		}
	}
	shares("start", map[string]int{"base": 2, "a1": 1, "a2": 0, "b1": 0, "c1": 0})
	if ws := n.evict.workingSets(); len(ws) != 2 || len(ws[aID]) != 2 {
		t.Errorf("start: working sets %v, want a's 2 chunks and b's 1", ws)
	}

	// A boot of b reads b1 too; a is removed meanwhile.
	if err := st.RemoveManifest(ctx, aID); err != nil {
		t.Fatal(err)
	}
	rec := newRecorder(1 << 62)
	rec.add(1)
	n.saveProfile(&image{id: bID, m: bM}, rec)
	shares("after save", map[string]int{"base": 1, "a1": 0, "b1": 1})
	if ws := n.evict.workingSets(); len(ws) != 1 || len(ws[bID]) != 2 {
		t.Errorf("after save: working sets %v, want only b's 2 chunks", ws)
	}
}

// TestEvictionTouchedByReads: every chunk read reaches the policy once (a miss of
// the memory cache and a hit alike), and liveFilter passes the store's Forget
// on, so ARC drops a deleted chunk.
func TestEvictionTouchedByReads(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	n, err := New(Config{DataDir: t.TempDir()}, nil)
	if err != nil {
		t.Fatal(err)
	}
	arc := planner.NewARC(0)
	st, err := chunkstore.Open(t.TempDir(), chunkstore.WithSync(false),
		chunkstore.WithEvictionPolicy(liveFilter{live: &n.live, next: arc}))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	n.store, n.evict = st, newEvictor(arc)
	var chunks []string
	for i := range 3 {
		c := fmt.Sprint("chunk ", i)
		chunks = append(chunks, c)
		if err := st.Put(ctx, chunkstore.Sum([]byte(c)), []byte(c)); err != nil {
			t.Fatal(err)
		}
	}
	id, _ := testManifest(t, st, "img", chunks...)
	img, err := n.image(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	tracked := func(step string, wantT1, wantT2 int) {
		t.Helper()
		if t1, t2, _, _, _ := arc.Tracked(); t1 != wantT1 || t2 != wantT2 {
			t.Errorf("%s: ARC tracks T1=%d T2=%d, want %d and %d", step, t1, t2, wantT1, wantT2)
		}
	}
	for i := range chunks {
		if _, _, err := n.chunk(ctx, img, i, forRead); err != nil {
			t.Fatal(err)
		}
	}
	tracked("first reads (store hits)", 3, 0)
	if _, _, err := n.chunk(ctx, img, 0, forRead); err != nil {
		t.Fatal(err)
	}
	tracked("second read of one (memory hit)", 2, 1)
	if err := st.Delete(ctx, chunkstore.Sum([]byte(chunks[0])), chunkstore.Sum([]byte(chunks[1]))); err != nil {
		t.Fatal(err)
	}
	tracked("after deleting two", 1, 0)
}
