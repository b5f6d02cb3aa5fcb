package p2p

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hoardvm/hoard/chunkstore"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	mocknet "github.com/libp2p/go-libp2p/p2p/net/mock"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/goleak"
)

// catBackend is a CatalogBackend keeping the entries that supersede.
type catBackend struct {
	mu      sync.Mutex
	cat     map[chunkstore.ID]CatalogEntry
	profs   map[string]ProfileEntry // manifest + node
	froms   map[peer.ID]int         // Learn* calls by from
	learned int
	block   chan struct{} // when set (before Run), Learn* waits for it to close
}

func newCatBackend() *catBackend {
	return &catBackend{cat: map[chunkstore.ID]CatalogEntry{}, profs: map[string]ProfileEntry{}, froms: map[peer.ID]int{}}
}

func (b *catBackend) Manifest(context.Context, chunkstore.ID) ([]byte, error) {
	return nil, chunkstore.ErrNotFound
}
func (b *catBackend) Have(context.Context, chunkstore.ID) ([]byte, error) {
	return nil, chunkstore.ErrNotFound
}
func (b *catBackend) Chunk(context.Context, chunkstore.ID, int, bool) (chunkstore.Stored, error) {
	return chunkstore.Stored{}, chunkstore.ErrNotFound
}

func (b *catBackend) Catalog(context.Context) ([]CatalogEntry, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	out := make([]CatalogEntry, 0, len(b.cat))
	for _, e := range b.cat {
		out = append(out, e)
	}
	return out, nil
}

func (b *catBackend) Profiles(context.Context) ([]ProfileEntry, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	out := make([]ProfileEntry, 0, len(b.profs))
	for _, e := range b.profs {
		out = append(out, e)
	}
	return out, nil
}

func (b *catBackend) LearnCatalog(from peer.ID, e CatalogEntry) {
	if b.block != nil {
		<-b.block
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.learned++
	b.froms[from]++
	if old, ok := b.cat[e.Manifest]; !ok || e.Supersedes(old) {
		b.cat[e.Manifest] = e
	}
}

func (b *catBackend) LearnProfile(from peer.ID, e ProfileEntry) {
	if b.block != nil {
		<-b.block
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.learned++
	b.froms[from]++
	k := e.Manifest.String() + "/" + e.Node.String()
	if old, ok := b.profs[k]; !ok || e.Supersedes(old) {
		b.profs[k] = e
	}
}

// put records e as this node's own (what the node does before publishing).
func (b *catBackend) put(e CatalogEntry) {
	b.mu.Lock()
	b.cat[e.Manifest] = e
	b.mu.Unlock()
}

func (b *catBackend) putProfile(e ProfileEntry) {
	b.mu.Lock()
	b.profs[e.Manifest.String()+"/"+e.Node.String()] = e
	b.mu.Unlock()
}

func (b *catBackend) entry(id chunkstore.ID) (CatalogEntry, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	e, ok := b.cat[id]
	return e, ok
}

func (b *catBackend) profile(id chunkstore.ID, node peer.ID) (ProfileEntry, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	e, ok := b.profs[id.String()+"/"+node.String()]
	return e, ok
}

func (b *catBackend) from(id peer.ID) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.froms[id]
}

// eventually polls cond every 20 ms until it holds or d passes.
func waitUntil(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("after %v: %s", d, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// runPeers runs every peer's Run until the test ends (or stop is called).
func runPeers(t *testing.T, peers ...*Peer) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for _, p := range peers {
		wg.Go(func() {
			if err := p.Run(ctx); err != nil {
				t.Errorf("Run: %v", err)
			}
		})
	}
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			done := make(chan struct{})
			go func() { wg.Wait(); close(done) }()
			select {
			case <-done:
			case <-time.After(20 * time.Second):
				t.Error("Run did not return within 20 s of its context's end")
			}
		})
	}
	t.Cleanup(stop)
	return stop
}

// waitGossipReady waits until every peer's catalog runs with a topic peer on
// both topics (gossipsub knows whom to send to).
func waitGossipReady(t *testing.T, peers ...*Peer) {
	t.Helper()
	waitUntil(t, 15*time.Second, "catalog topics have no peers", func() bool {
		for _, p := range peers {
			g := p.cat.gossip
			if g == nil || len(g.catalog.ListPeers()) == 0 || len(g.profiles.ListPeers()) == 0 {
				return false
			}
		}
		return true
	})
}

// waitInitialSyncs waits until every peer has synced with every peer it is
// connected to (the on-connect syncs) and no sync is under way.
func waitInitialSyncs(t *testing.T, peers ...*Peer) {
	t.Helper()
	waitUntil(t, 15*time.Second, "the on-connect syncs did not finish", func() bool {
		for _, p := range peers {
			conn := p.Host().Network().Peers()
			p.mu.Lock()
			done := len(p.cat.syncing) == 0
			for _, id := range conn {
				if _, ok := p.cat.lastSync[id]; !ok {
					done = false
				}
			}
			p.mu.Unlock()
			if !done {
				return false
			}
		}
		return true
	})
}

func catCluster(t *testing.T, n int, opts ...Option) ([]*Peer, []*catBackend, mocknet.Mocknet) {
	t.Helper()
	bs := make([]*catBackend, n)
	for i := range bs {
		bs[i] = newCatBackend()
	}
	peers, mn := mockCluster(t, n, func(i int) Backend { return bs[i] }, opts...)
	return peers, bs, mn
}

func testEntry(seed string, publisher peer.ID, version uint64, names ...string) CatalogEntry {
	return CatalogEntry{Manifest: chunkstore.Sum([]byte(seed)), Names: names, Version: version, Publisher: publisher}
}

// TestCatalogGossip: of 10 peers, one publishes an entry, a tombstone
// superseding it and a profile; every other peer's backend learns them all by
// pubsub (the sync interval is an hour), within a bounded time.
func TestCatalogGossip(t *testing.T) {
	t.Parallel()
	peers, bs, _ := catCluster(t, 10, WithCatalogSyncInterval(time.Hour))
	runPeers(t, peers...)
	waitGossipReady(t, peers...)
	waitInitialSyncs(t, peers...) // so that what they learn next comes by pubsub
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	pub := peers[4]
	e := testEntry("debian", "", NextVersion(0, time.Now()), "debian-12", "glance:1234")
	start := time.Now()
	if err := pub.PublishCatalog(ctx, e); err != nil {
		t.Fatal(err)
	}
	e.Publisher = pub.ID()
	prof := ProfileEntry{Manifest: e.Manifest, Profile: chunkstore.Profile{Boots: 2, Chunks: []int{7, 0, 3, 1 << 20}}, Version: 5}
	if err := pub.PublishProfile(ctx, prof); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 10*time.Second, "not every peer learned the entry and the profile", func() bool {
		for i, b := range bs {
			if i == 4 {
				continue
			}
			got, ok := b.entry(e.Manifest)
			if !ok || !slices.Equal(got.Names, e.Names) || got.Publisher != pub.ID() || got.Version != e.Version || got.Removed {
				return false
			}
			gp, ok := b.profile(e.Manifest, pub.ID())
			if !ok || gp.Version != 5 || !slices.Equal(gp.Profile.Chunks, prof.Profile.Chunks) || gp.Profile.Boots != 2 {
				return false
			}
		}
		return true
	})
	t.Logf("9 peers learned an entry and a profile in %v", time.Since(start).Round(time.Millisecond))

	rm := CatalogEntry{Manifest: e.Manifest, Removed: true, Version: NextVersion(e.Version, time.Now())}
	if err := pub.PublishCatalog(ctx, rm); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 10*time.Second, "not every peer learned the tombstone", func() bool {
		for i, b := range bs {
			if got, _ := b.entry(e.Manifest); i != 4 && !got.Removed {
				return false
			}
		}
		return true
	})
	waitUntil(t, 10*time.Second, "not every peer accepted the 3 messages by pubsub", func() bool {
		for i, p := range peers {
			if i != 4 && (testutil.ToFloat64(p.metrics.catalogMsgs.WithLabelValues("catalog", "accepted")) < 2 ||
				testutil.ToFloat64(p.metrics.catalogMsgs.WithLabelValues("profile", "accepted")) < 1) {
				return false
			}
		}
		return true
	})
	if bs[4].from(pub.ID()) != 0 {
		t.Error("the publisher learned its own message back from pubsub")
	}
	// Only this node's own changes can be published.
	if err := pub.PublishCatalog(ctx, testEntry("x", peers[1].ID(), 1)); err == nil {
		t.Error("PublishCatalog accepted an entry of another publisher")
	}
	if err := pub.PublishCatalog(ctx, testEntry("x", "", 1, strings.Repeat("n", MaxCatalogNameLen+1))); err == nil {
		t.Error("PublishCatalog accepted an oversized name")
	}
}

// TestCatalogSyncLateJoiner: a peer that joins after the announcements learns
// every entry, tombstone and profile by sync alone, including an entry that
// was never gossiped; and the peers it joins learn its own entries.
func TestCatalogSyncLateJoiner(t *testing.T) {
	t.Parallel()
	bs := []*catBackend{newCatBackend(), newCatBackend(), newCatBackend(), newCatBackend()}
	peers, mn := mockCluster(t, 3, func(i int) Backend { return bs[i] }, WithCatalogSyncInterval(time.Hour))
	runPeers(t, peers...)
	waitGossipReady(t, peers...)
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	live := testEntry("ubuntu", peers[0].ID(), 10, "ubuntu-24.04")
	gone := testEntry("centos", peers[0].ID(), 20, "centos-7")
	gone.Removed = true
	for _, e := range []CatalogEntry{live, gone} {
		bs[0].put(signedEntry(t, peers[0], e))
		if err := peers[0].PublishCatalog(ctx, e); err != nil {
			t.Fatal(err)
		}
	}
	prof := ProfileEntry{Manifest: live.Manifest, Node: peers[1].ID(), Version: 3, Profile: chunkstore.Profile{Boots: 1, Chunks: []int{4, 2}}}
	bs[1].putProfile(signedProfile(t, peers[1], prof))
	if err := peers[1].PublishProfile(ctx, prof); err != nil {
		t.Fatal(err)
	}
	// Known to peer 2 only (learned by it earlier, say): only sync carries it.
	quiet := testEntry("alpine", peers[2].ID(), 7, "alpine-3")
	bs[2].put(signedEntry(t, peers[2], quiet))
	waitUntil(t, 10*time.Second, "the cluster did not learn the announcements", func() bool {
		_, ok := bs[2].entry(gone.Manifest)
		_, ok2 := bs[0].profile(prof.Manifest, prof.Node)
		return ok && ok2
	})

	// The late joiner, with an entry of its own.
	h, err := mn.GenPeer()
	if err != nil {
		t.Fatal(err)
	}
	late, err := New(t.Context(), WithHost(h), WithBackend(bs[3]), WithCatalogSyncInterval(time.Hour),
		WithBootstrap([]string{peers[0].Addrs()[0].String()}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { late.Close() })
	own := testEntry("fedora", late.ID(), 1, "fedora-40")
	bs[3].put(signedEntry(t, late, own))
	if err := mn.LinkAll(); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	runPeers(t, late)
	waitUntil(t, 15*time.Second, "the late joiner did not learn every entry by sync", func() bool {
		l, ok1 := bs[3].entry(live.Manifest)
		g, ok2 := bs[3].entry(gone.Manifest)
		q, ok3 := bs[3].entry(quiet.Manifest)
		pr, ok4 := bs[3].profile(prof.Manifest, prof.Node)
		return ok1 && ok2 && ok3 && ok4 && !l.Removed && g.Removed && q.Version == 7 && slices.Equal(pr.Profile.Chunks, []int{4, 2})
	})
	t.Logf("late joiner learned 3 entries and a profile by sync in %v", time.Since(start).Round(time.Millisecond))
	if n := testutil.ToFloat64(late.metrics.catalogSyncs.WithLabelValues("ok")); n < 1 {
		t.Errorf("late joiner counted %v syncs", n)
	}
	waitUntil(t, 10*time.Second, "the peers did not learn the joiner's entry by sync", func() bool {
		_, ok := bs[0].entry(own.Manifest)
		return ok
	})
	// At most one sync per peer per interval: connecting again does not sync again.
	waitInitialSyncs(t, late)
	lastSync := func() time.Time {
		late.mu.Lock()
		defer late.mu.Unlock()
		return late.cat.lastSync[peers[0].ID()]
	}
	before := lastSync()
	late.Host().Network().ClosePeer(peers[0].ID())
	if err := late.Host().Connect(ctx, peer.AddrInfo{ID: peers[0].ID(), Addrs: peers[0].Host().Addrs()}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(3 * syncDebounce)
	if after := lastSync(); before.IsZero() || !after.Equal(before) {
		t.Errorf("reconnecting synced again within the interval: last sync %v, then %v", before, after)
	}
}

// TestCatalogRejects: malformed, oversized and forged messages from a rogue
// pubsub node never reach Learn; neither does a malformed sync reply.
func TestCatalogRejects(t *testing.T) {
	t.Parallel()
	peers, bs, mn := catCluster(t, 3, WithCatalogSyncInterval(time.Hour))
	// The rogue: a host with a raw gossipsub and no validation.
	h, err := mn.GenPeer()
	if err != nil {
		t.Fatal(err)
	}
	if err := mn.LinkAll(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	// A sync reply that is not one.
	h.SetStreamHandler(ProtocolCatalogSync, func(s network.Stream) {
		defer s.Close()
		s.Write(appendFrame(nil, []byte{entryCatalog, 1, 2, 3}))
	})
	runPeers(t, peers...)
	waitGossipReady(t, peers...)
	topics := rogueGossip(t, ctx, h, peers, TopicCatalog, TopicProfiles)
	cat, profs := topics[0], topics[1]
	// Signed by the rogue, so that only the checks under test reject them
	// (an entry whose signature is false demotes the rogue: see
	// TestCatalogGossipForgedSignature).
	key := h.Peerstore().PrivKey(h.ID())
	good := forgeEntry(t, key, testEntry("good", h.ID(), 1, "good"))
	forged := forgeEntry(t, key, testEntry("forged", peers[1].ID(), 1, "evil"))
	forgedProf := forgeProfile(t, key, ProfileEntry{Manifest: chunkstore.Sum([]byte("p")), Node: peers[2].ID(), Version: 1})
	oversized := append(slices.Clone(good), make([]byte, MaxCatalogEntrySize)...)
	bad := [][]byte{
		{0xff, 0x00},
		good[:len(good)-1],
		append(slices.Clone(good), 0),
		oversized,
		forged,
	}
	for _, b := range bad {
		if err := cat.Publish(ctx, b); err != nil {
			t.Fatal(err)
		}
	}
	if err := profs.Publish(ctx, forgedProf); err != nil {
		t.Fatal(err)
	}
	if err := profs.Publish(ctx, good); err != nil { // a catalog entry on the profiles topic
		t.Fatal(err)
	}
	if err := cat.Publish(ctx, good); err != nil {
		t.Fatal(err)
	}
	goodID := chunkstore.Sum([]byte("good"))
	waitUntil(t, 10*time.Second, "the valid message did not arrive, or not every bad one was rejected", func() bool {
		for _, p := range peers {
			rej := testutil.ToFloat64(p.metrics.catalogMsgs.WithLabelValues("catalog", "rejected")) +
				testutil.ToFloat64(p.metrics.catalogMsgs.WithLabelValues("profile", "rejected"))
			if rej < float64(len(bad)+2) {
				return false
			}
		}
		for _, b := range bs {
			if _, ok := b.entry(goodID); !ok {
				return false
			}
		}
		return true
	})
	for i, b := range bs {
		b.mu.Lock()
		n, np := len(b.cat), len(b.profs)
		b.mu.Unlock()
		if n != 1 || np != 0 {
			t.Errorf("peer %d learned %d entries and %d profiles, want only the valid entry", i, n, np)
		}
		if _, ok := b.entry(chunkstore.Sum([]byte("forged"))); ok {
			t.Errorf("peer %d learned the forged entry", i)
		}
	}
	// The rogue's sync reply is malformed: the sync fails, nothing learned.
	waitUntil(t, 10*time.Second, "no sync with the rogue failed", func() bool {
		for _, p := range peers {
			if testutil.ToFloat64(p.metrics.catalogSyncs.WithLabelValues("error")) < 1 {
				return false
			}
		}
		return true
	})
	for i, b := range bs {
		// At most the valid entry, when the rogue relayed it first.
		if n := b.from(h.ID()); n > 1 {
			t.Errorf("peer %d learned %d entries from the rogue, want at most 1", i, n)
		}
	}
}

// peerIDForTest returns a fresh Ed25519 peer ID.
func peerIDForTest(t testing.TB) peer.ID {
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

// TestCatalogCloseStops: Close ends the catalog's goroutines (gossip, sync,
// learn) without Run's context ending, refuses to publish afterwards, and
// once Run returns nothing of the node is left running.
func TestCatalogCloseStops(t *testing.T) {
	// Not parallel: goleak sees every goroutine of the process.
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	peers, bs, mn := catCluster(t, 3, WithCatalogSyncInterval(200*time.Millisecond))
	stop := runPeers(t, peers...)
	waitGossipReady(t, peers...)
	bs[0].put(signedEntry(t, peers[0], testEntry("a", peers[0].ID(), 1, "a")))
	if err := peers[0].PublishCatalog(t.Context(), testEntry("a", "", 1, "a")); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 10*time.Second, "peer 1 did not learn", func() bool { _, ok := bs[1].entry(chunkstore.Sum([]byte("a"))); return ok })
	for _, p := range peers {
		if err := p.Close(); err != nil {
			t.Fatal(err)
		}
	}
	buf := make([]byte, 1<<20)
	stacks := string(buf[:runtime.Stack(buf, true)])
	for _, fn := range []string{"runCatalog", "syncLoop", "learnLoop", "readTopic", "syncCatalog", "handleCatalogSync"} {
		if strings.Contains(stacks, "p2p.(*Peer)."+fn) {
			t.Errorf("after Close, a goroutine is still in %s", fn)
		}
	}
	if err := peers[0].PublishCatalog(t.Context(), testEntry("b", "", 1)); err == nil {
		t.Error("PublishCatalog after Close succeeded")
	}
	stop()
	mn.Close()
}

func TestCatalogReportBad(t *testing.T) {
	t.Parallel()
	peers, bs, _ := catCluster(t, 2, WithCatalogSyncInterval(time.Hour))
	bs[1].put(signedEntry(t, peers[1], testEntry("x", peers[1].ID(), 1, "x")))
	peers[0].ReportBad(peers[1].ID(), errors.New("manifest does not match its CID"))
	if !peers[0].Bad(peers[1].ID()) {
		t.Fatal("ReportBad did not mark the peer bad")
	}
	peers[0].ReportBad(peers[0].ID(), errors.New("self")) // ignored
	if peers[0].Bad(peers[0].ID()) {
		t.Fatal("ReportBad marked this node itself bad")
	}
	runPeers(t, peers...)
	waitGossipReady(t, peers...)
	// Peer 0 neither syncs from the bad peer nor serves it.
	if peers[0].claimSync(peers[1].ID()) {
		t.Error("a sync with a bad peer was allowed")
	}
	if err := peers[1].PublishCatalog(t.Context(), testEntry("y", "", 1, "y")); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 10*time.Second, "peer 0 did not ignore the bad peer's announcement", func() bool {
		return testutil.ToFloat64(peers[0].metrics.catalogMsgs.WithLabelValues("catalog", "ignored")) >= 1
	})
	time.Sleep(3 * syncDebounce)
	if _, ok := bs[0].entry(chunkstore.Sum([]byte("x"))); ok {
		t.Error("peer 0 learned an entry by sync from a peer it reported bad")
	}
	if _, ok := bs[0].entry(chunkstore.Sum([]byte("y"))); ok {
		t.Error("peer 0 learned an announcement of a peer it reported bad")
	}
	if n := testutil.ToFloat64(peers[1].metrics.catalogSyncs.WithLabelValues("error")); n < 1 {
		t.Errorf("the bad peer's sync with peer 0 was not refused (%v errors)", n)
	}
}

func TestCatalogEntryCodec(t *testing.T) {
	t.Parallel()
	key, pid := keyForTest(t)
	sign := func(e CatalogEntry) CatalogEntry {
		e, err := SignCatalogEntry(key, e)
		if err != nil {
			t.Fatal(err)
		}
		return e
	}
	e := sign(CatalogEntry{Manifest: chunkstore.Sum([]byte("m")), Names: []string{"a", "débian"}, Removed: true, Version: 1 << 60, Publisher: pid})
	b, err := AppendCatalogEntry(nil, e)
	if err != nil {
		t.Fatal(err)
	}
	got, err := DecodeCatalogEntry(b)
	if err != nil || got.Manifest != e.Manifest || !slices.Equal(got.Names, e.Names) || got.Removed != e.Removed || got.Version != e.Version || got.Publisher != e.Publisher || !bytes.Equal(got.Sig, e.Sig) {
		t.Fatalf("round trip: %+v, %v", got, err)
	}
	if err := VerifyCatalogEntry(got); err != nil {
		t.Fatalf("a signed entry does not verify after a round trip: %v", err)
	}
	pin := sign(CatalogEntry{Manifest: e.Manifest, Names: []string{"a"}, Pin: true, Full: true, Version: 2, Publisher: pid})
	if pb, err := AppendCatalogEntry(nil, pin); err != nil {
		t.Fatal(err)
	} else if got, err := DecodeCatalogEntry(pb); err != nil || !got.Pin || !got.Full || got.Removed {
		t.Fatalf("pinned entry round trip: %+v, %v", got, err)
	}
	if _, err := AppendCatalogEntry(nil, CatalogEntry{Manifest: e.Manifest, Removed: true, Pin: true, Version: 3, Publisher: pid, Sig: []byte{1}}); err == nil {
		t.Fatal("a pinned tombstone encoded")
	}
	pe, err := SignProfileEntry(key, ProfileEntry{Manifest: e.Manifest, Node: pid, Version: 9, Profile: chunkstore.Profile{Boots: 3, Chunks: []int{5, 1, 1 << 30}}})
	if err != nil {
		t.Fatal(err)
	}
	pb, err := AppendProfileEntry(nil, pe)
	if err != nil {
		t.Fatal(err)
	}
	gp, err := DecodeProfileEntry(pb)
	if err != nil || gp.Node != pid || gp.Version != 9 || gp.Profile.Boots != 3 || !slices.Equal(gp.Profile.Chunks, pe.Profile.Chunks) {
		t.Fatalf("profile round trip: %+v, %v", gp, err)
	}
	if err := VerifyProfileEntry(gp); err != nil {
		t.Fatalf("a signed profile does not verify after a round trip: %v", err)
	}

	many := make([]string, MaxCatalogNames+1)
	for i := range many {
		many[i] = fmt.Sprint(i)
	}
	for name, bad := range map[string]CatalogEntry{
		"no manifest":  {Publisher: pid},
		"no publisher": {Manifest: e.Manifest},
		"bad peer id":  {Manifest: e.Manifest, Publisher: "nope"},
		"many names":   {Manifest: e.Manifest, Publisher: pid, Names: many},
		"long name":    {Manifest: e.Manifest, Publisher: pid, Names: []string{strings.Repeat("x", MaxCatalogNameLen+1)}},
		"empty name":   {Manifest: e.Manifest, Publisher: pid, Names: []string{""}},
		"repeated":     {Manifest: e.Manifest, Publisher: pid, Names: []string{"a", "a"}},
		"not utf-8":    {Manifest: e.Manifest, Publisher: pid, Names: []string{"\xff"}},
		"unsigned":     {Manifest: e.Manifest, Publisher: pid, Names: []string{"a"}, Sig: []byte{}},
		"long sig":     {Manifest: e.Manifest, Publisher: pid, Names: []string{"a"}, Sig: make([]byte, maxSigLen+1)},
	} {
		if bad.Sig == nil {
			bad.Sig = []byte{1} // so that the bound under test is what fails
		}
		if out, err := AppendCatalogEntry([]byte{9}, bad); !errors.Is(err, ErrBadCatalogEntry) || !bytes.Equal(out, []byte{9}) {
			t.Errorf("%s: AppendCatalogEntry = %x, %v", name, out, err)
		}
	}
	tooMany := make([]int, MaxProfileChunks+1)
	for i := range tooMany {
		tooMany[i] = i
	}
	for name, bad := range map[string]ProfileEntry{
		"many chunks": {Manifest: e.Manifest, Node: pid, Profile: chunkstore.Profile{Chunks: tooMany}},
		"repeated":    {Manifest: e.Manifest, Node: pid, Profile: chunkstore.Profile{Chunks: []int{1, 1}}},
		"negative":    {Manifest: e.Manifest, Node: pid, Profile: chunkstore.Profile{Chunks: []int{-1}}},
		"no node":     {Manifest: e.Manifest, Profile: chunkstore.Profile{Chunks: []int{1}}},
		"unsigned":    {Manifest: e.Manifest, Node: pid, Profile: chunkstore.Profile{Chunks: []int{1}}, Sig: []byte{}},
	} {
		if bad.Sig == nil {
			bad.Sig = []byte{1}
		}
		if _, err := AppendProfileEntry(nil, bad); !errors.Is(err, ErrBadCatalogEntry) {
			t.Errorf("%s: AppendProfileEntry: %v", name, err)
		}
	}
	nonMinimal := slices.Concat(b[:34], []byte{0x80 | b[34]&0x7f}) // flags, then a broken version
	for name, in := range map[string][]byte{
		"empty":       nil,
		"wrong type":  pb,
		"short":       b[:20],
		"trailing":    append(slices.Clone(b), 0),
		"flags":       slices.Concat(b[:33], []byte{8}, b[34:]),
		"full no pin": slices.Concat(b[:33], []byte{4}, b[34:]),
		"non-minimal": nonMinimal,
		"huge":        make([]byte, MaxCatalogEntrySize+1),
		"unsigned":    slices.Concat(b[:len(b)-len(e.Sig)-1], []byte{0}),
		"short sig":   b[:len(b)-1],
	} {
		if _, err := DecodeCatalogEntry(in); !errors.Is(err, ErrBadCatalogEntry) {
			t.Errorf("%s: DecodeCatalogEntry accepted %d bytes (%v)", name, len(in), err)
		}
	}
	if _, err := DecodeProfileEntry(b); err == nil {
		t.Error("DecodeProfileEntry accepted a catalog entry")
	}
	if _, err := DecodeProfileEntry(append(slices.Clone(pb), 0)); err == nil {
		t.Error("DecodeProfileEntry accepted trailing bytes")
	}
}

func TestCatalogSupersedes(t *testing.T) {
	t.Parallel()
	a, b := peerIDForTest(t), peerIDForTest(t)
	if a > b {
		a, b = b, a
	}
	m := chunkstore.Sum([]byte("m"))
	live := func(v uint64, p peer.ID) CatalogEntry {
		return CatalogEntry{Manifest: m, Version: v, Publisher: p, Names: []string{"n"}}
	}
	rm := func(v uint64, p peer.ID) CatalogEntry { e := live(v, p); e.Removed = true; return e }
	for _, c := range []struct {
		name     string
		new, old CatalogEntry
		want     bool
	}{
		{"newer version", live(2, a), rm(1, b), true},
		{"older version", rm(1, b), live(2, a), false},
		{"tombstone at a tie", rm(2, a), live(2, b), true},
		{"live at a tie", live(2, b), rm(2, a), false},
		{"greater publisher at a tie", live(2, b), live(2, a), true},
		{"lesser publisher at a tie", live(2, a), live(2, b), false},
		{"itself", live(2, a), live(2, a), false},
	} {
		if got := c.new.Supersedes(c.old); got != c.want {
			t.Errorf("%s: Supersedes = %v, want %v", c.name, got, c.want)
		}
	}
	x, y := live(3, a), live(3, a)
	y.Names = []string{"other"}
	if x.Supersedes(y) == y.Supersedes(x) {
		t.Error("two different entries of one version and publisher: no single winner")
	}
	p1 := ProfileEntry{Manifest: m, Node: a, Version: 2}
	p2 := ProfileEntry{Manifest: m, Node: a, Version: 1, Profile: chunkstore.Profile{Chunks: []int{1}}}
	if !p1.Supersedes(p2) || p2.Supersedes(p1) {
		t.Error("profile versions do not order")
	}
	now := time.UnixMilli(1_700_000_000_000)
	v1 := NextVersion(0, now)
	if v2 := NextVersion(v1, now); v2 <= v1 {
		t.Errorf("NextVersion(%d, same time) = %d, not greater", v1, v2)
	}
	if v3 := NextVersion(v1, now.Add(-time.Hour)); v3 <= v1 {
		t.Errorf("NextVersion with a clock behind = %d, not greater than %d", v3, v1)
	}
	if v4 := NextVersion(v1, now.Add(time.Millisecond)); v4 <= v1 {
		t.Errorf("NextVersion a millisecond later = %d, not greater than %d", v4, v1)
	}
}

func FuzzDecodeCatalog(f *testing.F) {
	// A fixed key: the fuzzing workers, other processes, make the same seeds.
	key, _, err := crypto.GenerateEd25519Key(bytes.NewReader(bytes.Repeat([]byte{7}, 64)))
	if err != nil {
		f.Fatal(err)
	}
	pid, err := peer.IDFromPrivateKey(key)
	if err != nil {
		f.Fatal(err)
	}
	e := forgeEntry(f, key, CatalogEntry{Manifest: chunkstore.Sum([]byte("m")), Names: []string{"a", "b"}, Version: 3, Publisher: pid})
	r := forgeEntry(f, key, CatalogEntry{Manifest: chunkstore.Sum([]byte("m")), Removed: true, Version: 4, Publisher: pid})
	p := forgeProfile(f, key, ProfileEntry{Manifest: chunkstore.Sum([]byte("m")), Node: pid, Version: 1, Profile: chunkstore.Profile{Boots: 1, Chunks: []int{3, 1, 2}}})
	seeds := [][]byte{e, r, p, {entryCatalog}, {entryProfile}, {syncEnd, 0}}
	for _, b := range seeds {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		seed := slices.ContainsFunc(seeds[:3], func(s []byte) bool { return bytes.Equal(s, b) })
		if e, err := DecodeCatalogEntry(b); err == nil {
			again, err := AppendCatalogEntry(nil, e)
			if err != nil || !bytes.Equal(again, b) {
				t.Fatalf("decoded catalog entry does not re-encode to its input: %v", err)
			}
			if e.Supersedes(e) {
				t.Fatal("an entry supersedes itself")
			}
			// Only the signed seeds verify: anything else the fuzzer
			// makes of them is an entry the publisher did not sign.
			if err := VerifyCatalogEntry(e); (err == nil) != seed {
				t.Fatalf("VerifyCatalogEntry = %v (a seed: %v)", err, seed)
			}
		}
		if e, err := DecodeProfileEntry(b); err == nil {
			again, err := AppendProfileEntry(nil, e)
			if err != nil || !bytes.Equal(again, b) {
				t.Fatalf("decoded profile entry does not re-encode to its input: %v", err)
			}
			if len(e.Profile.Chunks) > MaxProfileChunks {
				t.Fatal("profile over the bound")
			}
			if err := VerifyProfileEntry(e); (err == nil) != seed {
				t.Fatalf("VerifyProfileEntry = %v (a seed: %v)", err, seed)
			}
		}
	})
}

// TestRealCatalog: two real hosts on a swarm key (TCP, Noise) gossip and sync.
func TestRealCatalog(t *testing.T) {
	t.Parallel()
	key, _ := DecodeSwarmKey(GenerateSwarmKey())
	ba, bb := newCatBackend(), newCatBackend()
	a := realPeer(t, WithSwarmKey(key), WithBackend(ba))
	old := testEntry("old", a.ID(), 1, "old")
	ba.put(signedEntry(t, a, old))
	b := realPeer(t, WithSwarmKey(key), WithBackend(bb), WithBootstrap([]string{a.Addrs()[0].String()}))
	runPeers(t, a, b)
	waitUntil(t, 15*time.Second, "b did not sync a's entry", func() bool { _, ok := bb.entry(old.Manifest); return ok })
	waitGossipReady(t, a, b)
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	e := testEntry("new", "", 2, "new")
	if err := a.PublishCatalog(ctx, e); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 10*time.Second, "b did not learn a's announcement", func() bool { _, ok := bb.entry(e.Manifest); return ok })
}

// TestCatalogQueueFull: a backend that stops in Learn holds up neither
// pubsub (messages are still validated) nor its peers; what does not fit the
// queue is dropped and counted.
func TestCatalogQueueFull(t *testing.T) {
	t.Parallel()
	peers, bs, _ := catCluster(t, 2, WithCatalogSyncInterval(time.Hour))
	peers[1].learnQueue = 2
	bs[1].block = make(chan struct{})
	runPeers(t, peers...)
	waitGossipReady(t, peers...)
	waitInitialSyncs(t, peers...)
	const n = 12
	for i := range n {
		if err := peers[0].PublishCatalog(t.Context(), testEntry(fmt.Sprint(i), "", 1, fmt.Sprint("img-", i))); err != nil {
			t.Fatal(err)
		}
	}
	accepted := func() float64 {
		return testutil.ToFloat64(peers[1].metrics.catalogMsgs.WithLabelValues("catalog", "accepted"))
	}
	dropped := func() float64 { return testutil.ToFloat64(peers[1].metrics.catalogDropped) }
	waitUntil(t, 10*time.Second, "the blocked node did not validate every message", func() bool { return accepted() == n })
	// One entry in Learn, two in the queue, the rest dropped.
	waitUntil(t, 5*time.Second, "no message was dropped", func() bool { return dropped() == n-3 })
	close(bs[1].block)
	waitUntil(t, 5*time.Second, "the queued entries did not reach Learn", func() bool {
		bs[1].mu.Lock()
		defer bs[1].mu.Unlock()
		return bs[1].learned == 3
	})
}
