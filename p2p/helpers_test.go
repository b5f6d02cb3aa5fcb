package p2p

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hoardvm/hoard/chunkstore"
	"github.com/klauspost/compress/zstd"
	mocknet "github.com/libp2p/go-libp2p/p2p/net/mock"
)

// testImage is an image cut into fixed chunks, each kept in stored form.
type testImage struct {
	m      *chunkstore.Manifest
	id     chunkstore.ID
	enc    []byte
	chunks [][]byte
	stored []chunkstore.Stored
}

var testEnc, _ = zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest))

// newTestImage makes n chunks of size bytes: the first half of each random, the
// rest zeros, stored zstd-compressed (even entries) or raw (odd).
func newTestImage(t testing.TB, n, size int, seed uint64) *testImage {
	t.Helper()
	r := rand.New(rand.NewPCG(seed, seed))
	c := chunkstore.Chunking{Kind: chunkstore.ChunkingFixed, Min: uint32(size), Avg: uint32(size), Max: uint32(size)}
	b := chunkstore.NewBuilder(c, chunkstore.FormatRaw, chunkstore.Source{Kind: "file", Location: fmt.Sprint(seed)})
	img := &testImage{}
	for i := range n {
		data := make([]byte, size)
		for j := 0; j < size/2; j += 8 {
			v := r.Uint64()
			for k := 0; k < 8 && j+k < size/2; k++ {
				data[j+k] = byte(v >> (8 * k))
			}
		}
		st := chunkstore.Stored{Codec: chunkstore.CodecRaw, RawLen: size, Payload: data}
		if i%2 == 0 {
			st = chunkstore.Stored{Codec: chunkstore.CodecZstd, RawLen: size, Payload: testEnc.EncodeAll(data, nil)}
		}
		img.chunks = append(img.chunks, data)
		img.stored = append(img.stored, st)
		b.Add(int64(size), chunkstore.Sum(data), false)
	}
	img.m = b.Manifest()
	img.enc = img.m.Encode()
	img.id = chunkstore.Sum(img.enc)
	return img
}

func (img *testImage) wants() []Want {
	w := make([]Want, len(img.chunks))
	for i, e := range img.m.Entries {
		w[i] = Want{Index: i, ID: e.ID}
	}
	return w
}

// fakeBackend serves one image, optionally only some entries, corrupted, slow,
// or with a hook run before each chunk.
type fakeBackend struct {
	img     *testImage
	have    Bitmap // nil: every entry
	corrupt bool
	delay   time.Duration
	hook    func(index int)
	served  atomic.Int64
	fetches atomic.Int64
}

func (b *fakeBackend) Manifest(ctx context.Context, id chunkstore.ID) ([]byte, error) {
	if id != b.img.id {
		return nil, chunkstore.ErrNotFound
	}
	if b.corrupt {
		return append(bytes.Clone(b.img.enc), 0), nil
	}
	return b.img.enc, nil
}

func (b *fakeBackend) Have(ctx context.Context, id chunkstore.ID) ([]byte, error) {
	if id != b.img.id {
		return nil, chunkstore.ErrNotFound
	}
	if b.have != nil {
		return b.have, nil
	}
	bm := NewBitmap(len(b.img.chunks))
	for i := range b.img.chunks {
		bm.Set(i)
	}
	return bm, nil
}

func (b *fakeBackend) Chunk(ctx context.Context, id chunkstore.ID, index int, fetch bool) (chunkstore.Stored, error) {
	if fetch {
		b.fetches.Add(1)
	}
	if id != b.img.id || index < 0 || index >= len(b.img.chunks) || (b.have != nil && !b.have.Has(index)) {
		return chunkstore.Stored{}, chunkstore.ErrNotFound
	}
	if b.hook != nil {
		b.hook(index)
	}
	if b.delay > 0 {
		select {
		case <-time.After(b.delay):
		case <-ctx.Done():
			return chunkstore.Stored{}, ctx.Err()
		}
	}
	st := b.img.stored[index]
	if b.corrupt {
		st.Codec = chunkstore.CodecRaw
		st.Payload = bytes.Clone(b.img.chunks[index])
		st.Payload[len(st.Payload)/3] ^= 0xff
	}
	b.served.Add(1)
	return st, nil
}

// mockCluster builds n peers on a fully linked mocknet, each joined through
// peer 0. backend(i) may return nil.
func mockCluster(t *testing.T, n int, backend func(i int) Backend, opts ...Option) ([]*Peer, mocknet.Mocknet) {
	t.Helper()
	mn := mocknet.New()
	t.Cleanup(func() { mn.Close() })
	hosts := make([]*Peer, n)
	for i := range n {
		h, err := mn.GenPeer()
		if err != nil {
			t.Fatal(err)
		}
		o := append([]Option{WithHost(h), WithHedging(500*time.Millisecond, 3*time.Second)}, opts...)
		if b := backend(i); b != nil {
			o = append(o, WithBackend(b))
		}
		p, err := New(t.Context(), o...)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { p.Close() })
		hosts[i] = p
	}
	if err := mn.LinkAll(); err != nil {
		t.Fatal(err)
	}
	boot := hosts[0].Addrs()[0].String()
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for _, p := range hosts[1:] {
		p.o.bootstrap = []string{boot}
		wg.Go(func() {
			if err := p.Bootstrap(t.Context()); err != nil {
				errs <- err
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	return hosts, mn
}
