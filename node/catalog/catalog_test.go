package catalog

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hoardvm/hoard/chunkstore"
	"github.com/hoardvm/hoard/p2p"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
)

// fakePeer serves manifests from a map; lie makes it send other bytes.
type fakePeer struct {
	id   peer.ID
	mu   sync.Mutex
	mfs  map[chunkstore.ID][]byte
	lie  bool
	bad  []peer.ID
	pubs []p2p.CatalogEntry
	prof []p2p.ProfileEntry
	asks atomic.Int64
	// gate, when set, holds every Manifest call until it is closed.
	gate chan struct{}
	// delay is every Manifest call's latency (a slow peer); inflight and
	// maxInflight count the calls under way at once.
	delay                 time.Duration
	inflight, maxInflight atomic.Int64
}

func (f *fakePeer) ID() peer.ID { return f.id }
func (f *fakePeer) Manifest(_ context.Context, _ peer.ID, id chunkstore.ID) ([]byte, error) {
	f.asks.Add(1)
	n := f.inflight.Add(1)
	defer f.inflight.Add(-1)
	for m := f.maxInflight.Load(); n > m && !f.maxInflight.CompareAndSwap(m, n); m = f.maxInflight.Load() {
	}
	if f.gate != nil {
		<-f.gate
	}
	time.Sleep(f.delay)
	f.mu.Lock()
	defer f.mu.Unlock()
	b, ok := f.mfs[id]
	if !ok {
		return nil, chunkstore.ErrNotFound
	}
	if f.lie {
		return append([]byte(nil), b[:len(b)-1]...), nil
	}
	return b, nil
}
func (f *fakePeer) ReportBad(id peer.ID, _ error) {
	f.mu.Lock()
	f.bad = append(f.bad, id)
	f.mu.Unlock()
}
func (f *fakePeer) PublishCatalog(_ context.Context, e p2p.CatalogEntry) error {
	f.mu.Lock()
	f.pubs = append(f.pubs, e)
	f.mu.Unlock()
	return nil
}
func (f *fakePeer) PublishProfile(_ context.Context, e p2p.ProfileEntry) error {
	f.mu.Lock()
	f.prof = append(f.prof, e)
	f.mu.Unlock()
	return nil
}

// SignCatalog and SignProfile mark the entry as signed by f (the catalog
// does not check signatures: p2p does, before LearnCatalog).
func (f *fakePeer) SignCatalog(e p2p.CatalogEntry) (p2p.CatalogEntry, error) {
	var err error
	e.Sig, err = f.sign(&e.Publisher)
	return e, err
}
func (f *fakePeer) SignProfile(e p2p.ProfileEntry) (p2p.ProfileEntry, error) {
	var err error
	e.Sig, err = f.sign(&e.Node)
	return e, err
}

// sign fills *who in when empty and returns a signature, if *who is f.
func (f *fakePeer) sign(who *peer.ID) ([]byte, error) {
	if *who == "" {
		*who = f.id
	}
	if *who != f.id {
		return nil, fmt.Errorf("entry of %s signed by %s", *who, f.id)
	}
	return []byte("signed by " + f.id), nil
}

// pid returns a real peer ID for name (peer IDs round-trip through the
// catalog file only when they are real).
func pid(t *testing.T, name string) peer.ID {
	t.Helper()
	seed := sha256.Sum256([]byte(name))
	priv, _, err := crypto.GenerateEd25519Key(bytes.NewReader(append(seed[:], seed[:]...)))
	if err != nil {
		t.Fatal(err)
	}
	id, err := peer.IDFromPrivateKey(priv)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

func testManifest(t *testing.T, seed int) (*chunkstore.Manifest, []byte, chunkstore.ID) {
	t.Helper()
	b := chunkstore.NewBuilder(chunkstore.Fixed64K, "raw", chunkstore.Source{Kind: "http", Location: fmt.Sprintf("http://origin/%d.raw", seed)})
	for i := range 8 {
		b.Add(64<<10, chunkstore.Sum(fmt.Append(nil, seed, i)), false)
	}
	m := b.Manifest()
	enc := m.Encode()
	return m, enc, chunkstore.Sum(enc)
}

func newCatalog(t *testing.T, path string, o Options) (*Catalog, *chunkstore.Store) {
	t.Helper()
	st, err := chunkstore.Open(filepath.Join(t.TempDir(), "store"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	o.Path = path
	c, err := Open(st, o)
	if err != nil {
		t.Fatal(err)
	}
	return c, st
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within 10 s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func run(t *testing.T, c *Catalog) {
	t.Helper()
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Error("Run did not return within 10 s of cancel")
		}
	})
}

// A live entry registers the image lazily under its names; a manifest that
// fails its CID check registers nothing and demotes the peer that sent it.
func TestLearnRegistersVerifiedManifests(t *testing.T) {
	t.Parallel()
	_, enc, id := testManifest(t, 1)
	fp := &fakePeer{id: pid(t, "self"), mfs: map[chunkstore.ID][]byte{id: enc}}
	var registered atomic.Int64
	c, st := newCatalog(t, "", Options{Registered: func(string, chunkstore.ID) { registered.Add(1) }})
	c.Attach(fp)
	run(t, c)

	fp.lie = true
	c.LearnCatalog(pid(t, "liar"), p2p.CatalogEntry{Manifest: id, Names: []string{"debian"}, Version: 10, Publisher: pid(t, "liar")})
	eventually(t, "the liar demoted", func() bool { fp.mu.Lock(); defer fp.mu.Unlock(); return len(fp.bad) > 0 })
	if _, err := st.Resolve(t.Context(), "debian"); !errors.Is(err, chunkstore.ErrNotFound) {
		t.Fatalf("a manifest failing its CID check was registered: %v", err)
	}
	fp.mu.Lock()
	fp.lie = false
	fp.mu.Unlock()
	// The next retry (or a sync bringing the entry again) registers it.
	c.LearnCatalog(pid(t, "honest"), p2p.CatalogEntry{Manifest: id, Names: []string{"debian", "glance-1234"}, Version: 11, Publisher: pid(t, "honest")})
	eventually(t, "image registered", func() bool {
		got, err := st.Resolve(t.Context(), "glance-1234")
		return err == nil && got == id
	})
	eventually(t, "Registered called once per name", func() bool { return registered.Load() == 2 })
	// An older entry changes nothing.
	c.LearnCatalog(pid(t, "honest"), p2p.CatalogEntry{Manifest: id, Removed: true, Version: 5, Publisher: pid(t, "x")})
	if e, _ := c.Entry(id); e.Removed {
		t.Fatal("an older tombstone superseded a newer entry")
	}
}

// A tombstone removes the image, but only once no export of it is open; a
// local rm is not undone by the entry it removed, only by a newer one.
func TestTombstonesAndLocalRemoval(t *testing.T) {
	t.Parallel()
	m, enc, id := testManifest(t, 2)
	fp := &fakePeer{id: pid(t, "self"), mfs: map[chunkstore.ID][]byte{id: enc}}
	var inUse atomic.Bool
	var removed atomic.Int64
	c, st := newCatalog(t, "", Options{InUse: func(chunkstore.ID) bool { return inUse.Load() },
		Removed: func(string, chunkstore.ID, bool) { removed.Add(1) }})
	c.Attach(fp)
	run(t, c)
	if _, err := st.PutNamedManifest(t.Context(), "img", m); err != nil {
		t.Fatal(err)
	}
	c.Added(t.Context(), id, []string{"img"})
	if len(fp.pubs) != 1 || fp.pubs[0].Removed || fp.pubs[0].Publisher != pid(t, "self") {
		t.Fatalf("Added published %+v", fp.pubs)
	}
	inUse.Store(true)
	c.LearnCatalog(pid(t, "p1"), p2p.CatalogEntry{Manifest: id, Removed: true, Version: fp.pubs[0].Version + 1, Publisher: pid(t, "p1")})
	time.Sleep(100 * time.Millisecond)
	if _, err := st.Resolve(t.Context(), "img"); err != nil {
		t.Fatalf("an image in use was removed by a tombstone: %v", err)
	}
	inUse.Store(false)
	eventually(t, "tombstone applied once the image is free", func() bool {
		_, err := st.Resolve(t.Context(), "img")
		return errors.Is(err, chunkstore.ErrNotFound)
	})
	eventually(t, "Removed called", func() bool { return removed.Load() == 1 })

	// Re-added elsewhere: registered again. Removed locally: stays removed
	// for that entry, and comes back with a newer one.
	c.LearnCatalog(pid(t, "p2"), p2p.CatalogEntry{Manifest: id, Names: []string{"img"}, Version: 1 << 60, Publisher: pid(t, "p2")})
	eventually(t, "re-added image registered", func() bool { _, err := st.Resolve(t.Context(), "img"); return err == nil })
	if _, err := st.RemoveName(t.Context(), "img"); err != nil {
		t.Fatal(err)
	}
	c.RemovedLocal(id)
	c.LearnCatalog(pid(t, "p3"), p2p.CatalogEntry{Manifest: id, Names: []string{"img"}, Version: 1 << 60, Publisher: pid(t, "p2")})
	c.poke()
	time.Sleep(100 * time.Millisecond)
	if _, err := st.Resolve(t.Context(), "img"); err == nil {
		t.Fatal("a locally removed image came back with the entry it was removed under")
	}
	c.LearnCatalog(pid(t, "p3"), p2p.CatalogEntry{Manifest: id, Names: []string{"img"}, Version: 1<<60 + 1, Publisher: pid(t, "p3")})
	eventually(t, "newer entry registers again", func() bool { _, err := st.Resolve(t.Context(), "img"); return err == nil })
}

// The catalog survives a restart: tombstones and profiles come back from its
// file, and a damaged file is set aside rather than failing the daemon.
func TestCatalogPersists(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "catalog.json")
	_, _, id := testManifest(t, 3)
	c, _ := newCatalog(t, path, Options{})
	c.LearnCatalog(pid(t, "p"), p2p.CatalogEntry{Manifest: id, Removed: true, Version: 7, Publisher: pid(t, "p")})
	c.LearnProfile(pid(t, "p"), p2p.ProfileEntry{Manifest: id, Node: pid(t, "p"), Profile: chunkstore.Profile{Boots: 2, Chunks: []int{3, 1}}, Version: 1})
	c.save()
	c2, _ := newCatalog(t, path, Options{})
	if e, ok := c2.Entry(id); !ok || !e.Removed || e.Version != 7 {
		t.Fatalf("tombstone after reopen: %+v %v", e, ok)
	}
	ws := c2.WorkingSet(id, nil, 8)
	if ws.Contributors != 1 || len(ws.Chunks) != 2 || ws.Boots != 2 {
		t.Fatalf("working set after reopen: %+v", ws)
	}
	if err := writeFileAtomic(path, []byte("{not json")); err != nil {
		t.Fatal(err)
	}
	c3, _ := newCatalog(t, path, Options{})
	if l, _ := c3.Catalog(t.Context()); len(l) != 0 {
		t.Fatalf("damaged file: %d entries", len(l))
	}
}

// The working set merges every node's profile with this node's own; indices
// past the manifest are dropped.
func TestWorkingSetMerges(t *testing.T) {
	t.Parallel()
	_, _, id := testManifest(t, 4)
	fp := &fakePeer{id: pid(t, "self")}
	c, _ := newCatalog(t, "", Options{})
	c.Attach(fp)
	c.LearnProfile(pid(t, "a"), p2p.ProfileEntry{Manifest: id, Node: pid(t, "a"), Profile: chunkstore.Profile{Boots: 1, Chunks: []int{0, 1, 99}}, Version: 1})
	c.LearnProfile(pid(t, "b"), p2p.ProfileEntry{Manifest: id, Node: pid(t, "b"), Profile: chunkstore.Profile{Boots: 1, Chunks: []int{2}}, Version: 1})
	own := &chunkstore.Profile{Boots: 3, Chunks: []int{5}}
	ws := c.WorkingSet(id, own, 8)
	if ws.Contributors != 3 || ws.Boots != 5 || len(ws.Chunks) != 4 {
		t.Fatalf("merged working set %+v, want 3 contributors, 5 boots, chunks {0,1,2,5}", ws)
	}
	c.ProfileSaved(t.Context(), id, chunkstore.Profile{Boots: 1, Chunks: []int{7}})
	if len(fp.prof) != 1 || fp.prof[0].Node != pid(t, "self") {
		t.Fatalf("own profile not published: %+v", fp.prof)
	}
}

// Changed is called once the image a live entry names is registered (the
// manifest fetched, the name set), not only when the entry is learned: the
// hoarder lists the store's images, so a call before the registration alone
// would leave a new node idle until its next tick. Likewise once a
// tombstone deferred by an open export is applied.
func TestChangedAfterRegistrationAndRemoval(t *testing.T) {
	t.Parallel()
	_, enc, id := testManifest(t, 4)
	fp := &fakePeer{id: pid(t, "self"), mfs: map[chunkstore.ID][]byte{id: enc}, gate: make(chan struct{})}
	var st *chunkstore.Store
	var inUse, sawKnown, sawGone atomic.Bool
	var calls atomic.Int64
	c, st := newCatalog(t, "", Options{InUse: func(chunkstore.ID) bool { return inUse.Load() },
		Changed: func() {
			calls.Add(1)
			_, err := st.Resolve(context.Background(), "debian")
			if err == nil {
				sawKnown.Store(true)
			} else if sawKnown.Load() {
				sawGone.Store(true)
			}
		}})
	c.Attach(fp)
	run(t, c)
	c.LearnCatalog(pid(t, "p1"), p2p.CatalogEntry{Manifest: id, Names: []string{"debian"}, Version: 1, Publisher: pid(t, "p1")})
	eventually(t, "Changed called on learning the entry", func() bool { return calls.Load() > 0 })
	if sawKnown.Load() {
		t.Fatal("the image was registered before its manifest was fetched")
	}
	close(fp.gate)
	eventually(t, "Changed called once the image is registered", sawKnown.Load)

	inUse.Store(true)
	c.LearnCatalog(pid(t, "p1"), p2p.CatalogEntry{Manifest: id, Removed: true, Version: 2, Publisher: pid(t, "p1")})
	time.Sleep(50 * time.Millisecond)
	inUse.Store(false)
	c.poke()
	eventually(t, "Changed called once the tombstone is applied", sawGone.Load)
}

// This node's own entries are signed: those made standalone when the node
// joins a cluster (Attach), the others when they are made; an unsigned entry
// kept from before gives way to its signed copy.
func TestOwnEntriesSigned(t *testing.T) {
	t.Parallel()
	_, _, id := testManifest(t, 5)
	_, _, id2 := testManifest(t, 6)
	_, _, id3 := testManifest(t, 7)
	fp := &fakePeer{id: pid(t, "self")}
	c, _ := newCatalog(t, "", Options{})
	c.Added(t.Context(), id, []string{"standalone"})
	if e, _ := c.Entry(id); len(e.Sig) != 0 || e.Publisher != "" {
		t.Fatalf("standalone entry %+v", e)
	}
	other := p2p.CatalogEntry{Manifest: id3, Names: []string{"x"}, Version: 3, Publisher: pid(t, "other")}
	c.LearnCatalog(pid(t, "other"), other) // kept from before signatures
	c.Attach(fp)
	if e, _ := c.Entry(id); len(e.Sig) == 0 || e.Publisher != fp.id {
		t.Fatalf("Attach left this node's entry unsigned: %+v", e)
	}
	if e, _ := c.Entry(id3); len(e.Sig) != 0 {
		t.Fatalf("Attach signed another publisher's entry: %+v", e)
	}
	c.Added(t.Context(), id2, []string{"joined"})
	e, _ := c.Entry(id2)
	if len(e.Sig) == 0 || len(fp.pubs) != 1 || !bytes.Equal(fp.pubs[0].Sig, e.Sig) {
		t.Fatalf("entry %+v recorded, %+v published: want both signed alike", e, fp.pubs)
	}
	c.ProfileSaved(t.Context(), id2, chunkstore.Profile{Boots: 1, Chunks: []int{1}})
	if len(fp.prof) != 1 || len(fp.prof[0].Sig) == 0 {
		t.Fatalf("own profile published unsigned: %+v", fp.prof)
	}
	other.Sig = []byte("signed by other")
	c.LearnCatalog(pid(t, "other"), other)
	if e, _ := c.Entry(id3); !bytes.Equal(e.Sig, other.Sig) {
		t.Fatalf("the signed copy of an unsigned entry was not kept: %+v", e)
	}
}
