package p2p

import (
	"bufio"
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/hoardvm/hoard/chunkstore"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
)

func randomPeers(t testing.TB, n int) []peer.ID {
	out := make([]peer.ID, n)
	for i := range out {
		k, _, err := crypto.GenerateEd25519Key(nil)
		if err != nil {
			t.Fatal(err)
		}
		out[i], _ = peer.IDFromPrivateKey(k)
	}
	return out
}

func TestDesignatedStableUnderOrder(t *testing.T) {
	t.Parallel()
	peers := randomPeers(t, 20)
	r := rand.New(rand.NewPCG(1, 2))
	for c := range 200 {
		id := chunkstore.Sum(fmt.Append(nil, c))
		want := Designated(id, peers)
		shuffled := slices.Clone(peers)
		r.Shuffle(len(shuffled), func(i, j int) { shuffled[i], shuffled[j] = shuffled[j], shuffled[i] })
		if got := Designated(id, shuffled); got != want {
			t.Fatalf("chunk %d: designated %s, after shuffling %s", c, want, got)
		}
		if !slices.Contains(peers, want) {
			t.Fatalf("designated %s is not one of the peers", want)
		}
	}
	if Designated(chunkstore.Sum(nil), nil) != "" {
		t.Fatal("Designated of no peers is not empty")
	}
}

func TestDesignatedMinimalReshuffle(t *testing.T) {
	t.Parallel()
	peers := randomPeers(t, 10)
	const chunks = 5000
	gone := peers[3]
	rest := slices.DeleteFunc(slices.Clone(peers), func(p peer.ID) bool { return p == gone })
	counts := map[peer.ID]int{}
	moved := 0
	for c := range chunks {
		id := chunkstore.Sum(fmt.Append(nil, "chunk", c))
		before, after := Designated(id, peers), Designated(id, rest)
		counts[before]++
		if before != gone && before != after {
			t.Fatalf("chunk %d moved from %s to %s though its peer stayed", c, before, after)
		}
		if before == gone {
			moved++
		}
	}
	// Only the departed peer's share moves, and shares are roughly even.
	if moved < chunks/10/2 || moved > chunks/10*2 {
		t.Fatalf("%d of %d chunks moved when one of 10 peers left; want about %d", moved, chunks, chunks/10)
	}
	for p, n := range counts {
		if n < chunks/10/2 || n > chunks/10*2 {
			t.Errorf("peer %s designated for %d of %d chunks: uneven", p, n, chunks)
		}
	}
}

func TestBitmap(t *testing.T) {
	t.Parallel()
	b := NewBitmap(20)
	for _, i := range []int{0, 7, 8, 19} {
		b.Set(i)
	}
	if b.Count() != 4 || !b.Has(19) || b.Has(18) || b.Has(-1) || b.Has(100) || len(b) != 3 {
		t.Fatalf("bitmap %08b", b)
	}
}

var wireCases = []*message{
	{Type: msgHave, ReqID: 1, Manifest: chunkstore.Sum([]byte("m"))},
	{Type: msgGet, ReqID: 1 << 40, Manifest: chunkstore.Sum([]byte("m")), Fetch: true, Indices: []int{0, 1, 300, 1 << 30}},
	{Type: msgGet, ReqID: 2, Manifest: chunkstore.Sum([]byte("m")), Indices: []int{}},
	{Type: msgManifest, ReqID: 3, Manifest: chunkstore.Sum([]byte("m"))},
	{Type: msgResolve, ReqID: 4, Name: "ubuntu-24.04"},
	{Type: msgCancel, ReqID: 5},
	{Type: msgBitmap, ReqID: 6, Data: []byte{0xff, 1}},
	{Type: msgChunk, ReqID: 7, Index: 12, Stored: chunkstore.Stored{Codec: chunkstore.CodecZstd, RawLen: 65536, Payload: []byte("zzz")}},
	{Type: msgNotFound, ReqID: 8, Index: 9},
	{Type: msgData, ReqID: 9, Data: []byte("manifest part")},
	{Type: msgEnd, ReqID: 10},
	{Type: msgError, ReqID: 11, Data: []byte{errCodeNotFound, 'x'}},
	{Type: msgID, ReqID: 12, Manifest: chunkstore.Sum([]byte("m"))},
}

func TestWireRoundTrip(t *testing.T) {
	t.Parallel()
	var stream []byte
	for _, m := range wireCases {
		stream = appendMessage(stream, m)
	}
	// the server's zero-copy chunk writer frames identically
	var buf bytes.Buffer
	fw := &frameWriter{w: bufio.NewWriter(&buf)}
	for _, m := range wireCases {
		if err := fw.write(m, true); err != nil {
			t.Fatal(err)
		}
	}
	if !bytes.Equal(buf.Bytes(), stream) {
		t.Fatal("frameWriter and appendMessage disagree")
	}
	r := bufio.NewReader(bytes.NewReader(stream))
	for _, want := range wireCases {
		f, err := readFrame(r, nil)
		if err != nil {
			t.Fatal(err)
		}
		got, err := decodeMessage(f)
		if err != nil {
			t.Fatalf("decode %#x: %v", want.Type, err)
		}
		if want.Type == msgGet && len(want.Indices) == 0 {
			want.Indices = []int{}
		}
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("round trip:\n got %+v\nwant %+v", got, want)
		}
	}
	bad := [][]byte{
		{},                 // empty
		{0x42, 1},          // unknown type
		{msgHave, 1, 1, 2}, // short digest
		{msgEnd, 1, 0},     // trailing byte
		{msgResolve, 1},    // empty name
		append([]byte{msgGet, 1}, append(make([]byte, 32), 0, 0xff, 0xff, 0x03)...), // batch too large
	}
	for _, b := range bad {
		if _, err := decodeMessage(b); err == nil {
			t.Errorf("decodeMessage(%x) accepted a bad frame", b)
		}
	}
	if _, err := readFrame(bufio.NewReader(bytes.NewReader([]byte{0xff, 0xff, 0xff, 0x7f})), nil); err == nil {
		t.Error("readFrame accepted a frame over MaxMessageSize")
	}
}

func FuzzDecodeMessage(f *testing.F) {
	for _, m := range wireCases {
		f.Add(appendMessage(nil, m))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		frame, err := readFrame(bufio.NewReader(bytes.NewReader(b)), nil)
		if err != nil {
			return
		}
		m, err := decodeMessage(frame)
		if err != nil {
			return
		}
		// What decodes re-encodes to the same frame.
		again := appendMessage(nil, m)
		n := len(again)
		if !bytes.Equal(again, b[:min(n, len(b))]) {
			// uvarints may be non-minimal in the input; compare decoded forms.
			f2, err := readFrame(bufio.NewReader(bytes.NewReader(again)), nil)
			if err != nil {
				t.Fatal(err)
			}
			m2, err := decodeMessage(f2)
			if err != nil {
				t.Fatalf("re-encoded message does not decode: %v", err)
			}
			if !reflect.DeepEqual(m, m2) {
				t.Fatalf("round trip changed the message: %+v vs %+v", m, m2)
			}
		}
	})
}

func TestSwarmKeyAndIdentity(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	raw := GenerateSwarmKey()
	if !strings.HasPrefix(string(raw), "/key/swarm/psk/1.0.0/\n/base16/\n") {
		t.Fatalf("swarm key format: %q", raw)
	}
	path := filepath.Join(dir, "swarm.key")
	if err := os.WriteFile(path, raw, 0o600); err != nil {
		t.Fatal(err)
	}
	k, err := LoadSwarmKey(path)
	if err != nil || len(k) != 32 {
		t.Fatalf("LoadSwarmKey: %d bytes, %v", len(k), err)
	}
	if _, err := LoadSwarmKey(filepath.Join(dir, "nope")); err == nil || !strings.Contains(err.Error(), "hoard cluster keygen") {
		t.Fatalf("missing swarm key error does not say what to do: %v", err)
	}
	if _, err := DecodeSwarmKey([]byte("garbage")); err == nil {
		t.Fatal("DecodeSwarmKey accepted garbage")
	}
	if _, err := New(t.Context(), WithListenAddrs([]string{"/ip4/127.0.0.1/tcp/0"})); err == nil || !strings.Contains(err.Error(), "swarm key") {
		t.Fatalf("New without a swarm key: %v", err)
	}

	idPath := filepath.Join(dir, "sub", "identity.key")
	k1, err := loadIdentity(idPath)
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(idPath)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("identity file mode %v, %v", fi.Mode(), err)
	}
	k2, err := loadIdentity(idPath)
	if err != nil || !k1.Equals(k2) {
		t.Fatalf("identity not stable across loads: %v", err)
	}
	if k1.Type() != crypto.Ed25519 {
		t.Fatalf("identity key type %v", k1.Type())
	}
}
