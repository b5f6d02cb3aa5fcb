package main

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hoardvm/hoard/chunkstore"
	"github.com/hoardvm/hoard/p2p"
)

// liar is a peer's backend that holds an image and serves every chunk with
// one byte flipped.
type liar struct {
	st *chunkstore.Store
	m  *chunkstore.Manifest
	id chunkstore.ID
}

func (l *liar) Manifest(ctx context.Context, id chunkstore.ID) ([]byte, error) {
	return l.st.GetManifestBytes(ctx, id)
}

func (l *liar) Have(ctx context.Context, id chunkstore.ID) ([]byte, error) {
	if id != l.id {
		return nil, chunkstore.ErrNotFound
	}
	bm := p2p.NewBitmap(len(l.m.Entries))
	for i, e := range l.m.Entries {
		if !e.Zero {
			bm.Set(i)
		}
	}
	return bm, nil
}

func (l *liar) Chunk(ctx context.Context, id chunkstore.ID, index int, _ bool) (chunkstore.Stored, error) {
	if id != l.id || index < 0 || index >= len(l.m.Entries) || l.m.Entries[index].Zero {
		return chunkstore.Stored{}, chunkstore.ErrNotFound
	}
	st, err := l.st.GetStored(ctx, l.m.Entries[index].ID)
	if err != nil {
		return st, err
	}
	st.Payload = append([]byte(nil), st.Payload...)
	st.Payload[len(st.Payload)/2] ^= 0x55
	return st, nil
}

// TestClusterCorruptPeer: a real daemon whose only peer (a libp2p host on
// loopback with the swarm key) serves the image with corrupt chunks still
// serves every byte right, from the origin, and marks that peer bad.
func TestClusterCorruptPeer(t *testing.T) {
	t.Parallel()
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Skip("qemu-img not installed (apt-get install qemu-utils)")
	}
	dir := t.TempDir()
	src := filepath.Join(dir, "disk.raw")
	os.WriteFile(src, imageBytes(17, 8<<20), 0o600)
	dataB, dataM := t.TempDir(), t.TempDir()
	mustHoard(t, dataB, nil, "cluster", "keygen")
	mustHoard(t, dataM, nil, "image", "add", src, "--name", "deb")

	st, err := chunkstore.Open(filepath.Join(dataM, "store"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	id, err := st.Resolve(ctx, "deb")
	if err != nil {
		t.Fatal(err)
	}
	m, err := st.GetManifest(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	key, err := p2p.LoadSwarmKey(filepath.Join(dataB, "swarm.key"))
	if err != nil {
		t.Fatal(err)
	}
	mp, err := p2p.New(ctx, p2p.WithSwarmKey(key), p2p.WithListenAddrs([]string{"/ip4/127.0.0.1/tcp/0"}),
		p2p.WithBackend(&liar{st: st, m: m, id: id}))
	if err != nil {
		t.Fatal(err)
	}
	defer mp.Close()
	go mp.Run(ctx)
	mp.Provide(ctx, id) // with no peers yet these fail and are retried every few seconds
	mp.ProvideName(ctx, "deb", id)

	b := startPeerDaemon(t, dataB, nil, "--p2p-bootstrap", mp.Addrs()[0].String())
	waitPeers(t, b, 1)
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, stderr, err := hoard(t, dataB, nil, "image", "pull", "deb")
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("image pull through the lying peer: %v\n%s", err, stderr)
		}
		time.Sleep(500 * time.Millisecond)
	}
	if out, err := exec.Command("qemu-img", "compare", "-f", "raw", "-F", "raw", src, b.uri("deb")).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img compare with a lying peer: %v\n%s", err, out)
	}
	s := b.status(t)
	if s.Counters.ReadBytes["peer"] != 0 || s.Counters.OriginBytes == 0 {
		t.Errorf("read %d bytes from peers and %d from the origin; want none from the lying peer, all from the origin",
			s.Counters.ReadBytes["peer"], s.Counters.OriginBytes)
	}
	var peers []p2p.PeerInfo
	if err := json.Unmarshal([]byte(mustHoard(t, dataB, nil, "peers", "--json")), &peers); err != nil {
		t.Fatal(err)
	}
	bad := false
	for _, pi := range peers {
		bad = bad || (pi.ID == mp.ID().String() && pi.Bad)
	}
	if !bad {
		t.Errorf("hoard peers --json does not mark the lying peer bad: %+v", peers)
	}
	if !strings.Contains(b.logs.String(), "peer sent bad data") {
		t.Error("the daemon did not log the bad peer")
	}
}
