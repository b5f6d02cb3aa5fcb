package p2p

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/hoardvm/hoard/chunkstore"
	pubsub "github.com/libp2p/go-libp2p-pubsub"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/host"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// TestCatalogSyncForgedTombstone: a peer with the swarm key that serves, by
// sync, a tombstone it forged for another publisher's image removes the image
// nowhere, and every node that synced with it demotes it.
func TestCatalogSyncForgedTombstone(t *testing.T) {
	t.Parallel()
	peers, bs, mn := catCluster(t, 3, WithCatalogSyncInterval(time.Hour))
	runPeers(t, peers...)
	waitGossipReady(t, peers...)
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	live := testEntry("victim", "", NextVersion(0, time.Now()), "victim")
	if err := peers[0].PublishCatalog(ctx, live); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 10*time.Second, "the cluster did not learn the image", func() bool {
		for _, b := range bs[1:] {
			if _, ok := b.entry(live.Manifest); !ok {
				return false
			}
		}
		return true
	})

	// The rogue serves a tombstone in peer 0's name, newer than the image.
	h, err := mn.GenPeer()
	if err != nil {
		t.Fatal(err)
	}
	if err := mn.LinkAll(); err != nil {
		t.Fatal(err)
	}
	// It carries peer 0's real public key (mocknet IDs do not embed theirs).
	victimKey, err := crypto.MarshalPublicKey(peers[0].Host().Peerstore().PubKey(peers[0].ID()))
	if err != nil {
		t.Fatal(err)
	}
	forged := forgeEntry(t, h.Peerstore().PrivKey(h.ID()), CatalogEntry{Manifest: live.Manifest, Removed: true,
		Version: NextVersion(live.Version, time.Now()), Publisher: peers[0].ID(), Key: victimKey})
	h.SetStreamHandler(ProtocolCatalogSync, func(s network.Stream) {
		defer s.Close()
		s.Write(appendFrame(appendFrame(nil, forged), []byte{syncEnd, 0}))
	})
	for _, p := range peers {
		if err := h.Connect(ctx, peer.AddrInfo{ID: p.ID(), Addrs: p.Host().Addrs()}); err != nil {
			t.Fatal(err)
		}
	}
	waitUntil(t, 15*time.Second, "not every peer synced with the rogue", func() bool {
		for _, p := range peers {
			p.mu.Lock()
			_, asked := p.cat.lastSync[h.ID()]
			busy := p.cat.syncing[h.ID()]
			p.mu.Unlock()
			if !asked || busy {
				return false
			}
		}
		return true
	})
	for i, b := range bs {
		if e, _ := b.entry(live.Manifest); e.Removed {
			t.Errorf("peer %d learned the forged tombstone", i)
		}
	}
	waitUntil(t, 5*time.Second, "not every peer demoted the rogue", func() bool {
		for _, p := range peers {
			if !p.Bad(h.ID()) {
				return false
			}
		}
		return true
	})
}

// TestCatalogGossipForgedSignature: an announcement pubsub-signed by its
// publisher but whose entry signature is false (made with another key) is
// rejected, never learned, and its author demoted.
func TestCatalogGossipForgedSignature(t *testing.T) {
	t.Parallel()
	peers, bs, mn := catCluster(t, 2, WithCatalogSyncInterval(time.Hour))
	h, err := mn.GenPeer()
	if err != nil {
		t.Fatal(err)
	}
	if err := mn.LinkAll(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	runPeers(t, peers...)
	waitGossipReady(t, peers...)
	cat := rogueGossip(t, ctx, h, peers, TopicCatalog)[0]
	other, _ := keyForTest(t)
	e := testEntry("forged-sig", h.ID(), 1, "evil")
	if err := cat.Publish(ctx, forgeEntry(t, other, e)); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 10*time.Second, "the announcement was not rejected, or its author not demoted", func() bool {
		for _, p := range peers {
			if !p.Bad(h.ID()) || testutil.ToFloat64(p.metrics.catalogMsgs.WithLabelValues("catalog", "rejected")) < 1 {
				return false
			}
		}
		return true
	})
	for i, b := range bs {
		if _, ok := b.entry(e.Manifest); ok {
			t.Errorf("peer %d learned an entry with a false signature", i)
		}
	}
}

func TestVerifyCatalogEntry(t *testing.T) {
	t.Parallel()
	key, pid := keyForTest(t)
	e, err := SignCatalogEntry(key, testEntry("m", "", 7, "a"))
	if err != nil || e.Publisher != pid {
		t.Fatalf("SignCatalogEntry = %+v, %v", e, err)
	}
	if err := VerifyCatalogEntry(e); err != nil {
		t.Fatal(err)
	}
	if _, err := SignCatalogEntry(key, testEntry("m", peerIDForTest(t), 7)); err == nil {
		t.Error("signed an entry of another publisher")
	}
	// A peer ID that does not embed its key: the entry carries it.
	ecdsa, _, err := crypto.GenerateECDSAKeyPair(nil)
	if err != nil {
		t.Fatal(err)
	}
	hashed, err := SignCatalogEntry(ecdsa, testEntry("m", "", 7, "a"))
	if err != nil || len(hashed.Key) == 0 {
		t.Fatalf("SignCatalogEntry with an ECDSA key = %+v, %v", hashed, err)
	}
	if b, err := AppendCatalogEntry(nil, hashed); err != nil {
		t.Fatal(err)
	} else if got, err := DecodeCatalogEntry(b); err != nil || VerifyCatalogEntry(got) != nil {
		t.Fatalf("an entry carrying its publisher's key: decoded %v, verified %v", err, VerifyCatalogEntry(got))
	}
	noKey := hashed
	noKey.Key = nil
	ecdsa2, _, _ := crypto.GenerateECDSAKeyPair(nil)
	otherKey := hashed
	otherKey.Key, _ = crypto.MarshalPublicKey(ecdsa2.GetPublic())
	if _, err := AppendCatalogEntry(nil, CatalogEntry{Manifest: e.Manifest, Publisher: pid, Sig: e.Sig, Key: otherKey.Key}); err == nil {
		t.Error("an entry carrying a key its ed25519 publisher ID embeds encoded")
	}
	other, _ := keyForTest(t)
	byOther, _ := DecodeCatalogEntry(forgeEntry(t, other, testEntry("m", pid, 7, "a")))
	altered := e
	altered.Names = []string{"b"}
	older := e
	older.Version--
	tomb := e
	tomb.Removed, tomb.Names = true, nil
	for name, bad := range map[string]CatalogEntry{
		"other key":        byOther,
		"names altered":    altered,
		"version altered":  older,
		"made a tombstone": tomb,
		"key not had":      noKey,
		"key not the id's": otherKey,
		"unsigned":         {Manifest: e.Manifest, Version: 7, Publisher: pid},
	} {
		if err := VerifyCatalogEntry(bad); !errors.Is(err, ErrBadCatalogEntry) {
			t.Errorf("%s: VerifyCatalogEntry = %v", name, err)
		}
	}
	if !e.SameChange(byOther) || e.SameChange(altered) {
		t.Error("SameChange does not leave out the signature alone")
	}
	if e.Supersedes(byOther) || byOther.Supersedes(e) {
		t.Error("an entry and its copy with another signature supersede each other")
	}

	pe, err := SignProfileEntry(key, ProfileEntry{Manifest: e.Manifest, Version: 2, Profile: chunkstore.Profile{Boots: 1, Chunks: []int{1, 2}}})
	if err != nil || pe.Node != pid {
		t.Fatalf("SignProfileEntry = %+v, %v", pe, err)
	}
	if err := VerifyProfileEntry(pe); err != nil {
		t.Fatal(err)
	}
	pe.Profile.Chunks = []int{1, 3}
	if err := VerifyProfileEntry(pe); !errors.Is(err, ErrBadCatalogEntry) {
		t.Errorf("an altered profile verified: %v", err)
	}
}

// rogueGossip starts a raw gossipsub on h, with no validation, joins
// topics, connects h to every peer and waits until each topic has them all.
// The peers' gossipsub runs before they connect, so each side opens its
// stream to the other at once.
func rogueGossip(t *testing.T, ctx context.Context, h host.Host, peers []*Peer, topics ...string) []*pubsub.Topic {
	t.Helper()
	ps, err := pubsub.NewGossipSub(ctx, h, pubsub.WithMaxMessageSize(4<<20))
	if err != nil {
		t.Fatal(err)
	}
	var out []*pubsub.Topic
	for _, name := range topics {
		topic, err := ps.Join(name)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, topic)
	}
	for _, p := range peers {
		if err := h.Connect(ctx, peer.AddrInfo{ID: p.ID(), Addrs: p.Host().Addrs()}); err != nil {
			t.Fatal(err)
		}
	}
	waitUntil(t, 15*time.Second, "the rogue found no topic peers", func() bool {
		for _, topic := range out {
			if len(topic.ListPeers()) != len(peers) {
				return false
			}
		}
		return true
	})
	return out
}

// signedEntry is e signed by p (what a node records before it publishes).
func signedEntry(t testing.TB, p *Peer, e CatalogEntry) CatalogEntry {
	t.Helper()
	e, err := p.SignCatalog(e)
	if err != nil {
		t.Fatal(err)
	}
	return e
}

func signedProfile(t testing.TB, p *Peer, e ProfileEntry) ProfileEntry {
	t.Helper()
	e, err := p.SignProfile(e)
	if err != nil {
		t.Fatal(err)
	}
	return e
}

// forgeEntry encodes e signed with priv, whoever e's publisher is.
func forgeEntry(t testing.TB, priv crypto.PrivKey, e CatalogEntry) []byte {
	t.Helper()
	body, err := appendCatalogBody([]byte(catalogSigDomain), e)
	if err != nil {
		t.Fatal(err)
	}
	if e.Sig, err = priv.Sign(body); err != nil {
		t.Fatal(err)
	}
	e.Key = forgerKey(t, priv, e.Publisher, e.Key)
	b, err := AppendCatalogEntry(nil, e)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// forgeProfile encodes e signed with priv, whoever e's node is.
func forgeProfile(t testing.TB, priv crypto.PrivKey, e ProfileEntry) []byte {
	t.Helper()
	body, err := appendProfileBody([]byte(profileSigDomain), e)
	if err != nil {
		t.Fatal(err)
	}
	if e.Sig, err = priv.Sign(body); err != nil {
		t.Fatal(err)
	}
	e.Key = forgerKey(t, priv, e.Node, e.Key)
	b, err := AppendProfileEntry(nil, e)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// forgerKey is the public key a forged entry of id carries: key when set,
// else none when id embeds its key, else priv's.
func forgerKey(t testing.TB, priv crypto.PrivKey, id peer.ID, key []byte) []byte {
	t.Helper()
	if key != nil || embedsKey(id) {
		return key
	}
	k, err := crypto.MarshalPublicKey(priv.GetPublic())
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// keyForTest returns a fresh ed25519 key and its peer ID.
func keyForTest(t testing.TB) (crypto.PrivKey, peer.ID) {
	t.Helper()
	priv, _, err := crypto.GenerateEd25519Key(nil)
	if err != nil {
		t.Fatal(err)
	}
	id, err := peer.IDFromPrivateKey(priv)
	if err != nil {
		t.Fatal(err)
	}
	return priv, id
}
