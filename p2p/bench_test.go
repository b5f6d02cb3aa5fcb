package p2p

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/hoardvm/hoard/chunkstore"
	"github.com/ipfs/go-datastore/query"
)

func benchGate(t *testing.T) {
	if os.Getenv("HOARD_BENCH_P2P") != "1" {
		t.Skip("set HOARD_BENCH_P2P=1 to run the p2p benchmarks")
	}
}

// incompressible returns n random chunks of size bytes stored raw.
func incompressible(t testing.TB, n, size int) *testImage {
	img := newTestImage(t, n, size, 9)
	r := rand.New(rand.NewPCG(3, 4))
	b := chunkstore.NewBuilder(img.m.Chunking, chunkstore.FormatRaw, chunkstore.Source{})
	for i := range img.chunks {
		for j := range img.chunks[i] {
			img.chunks[i][j] = byte(r.Uint32())
		}
		img.stored[i] = chunkstore.Stored{Codec: chunkstore.CodecRaw, RawLen: size, Payload: img.chunks[i]}
		b.Add(int64(size), chunkstore.Sum(img.chunks[i]), false)
	}
	img.m = b.Manifest()
	img.enc = img.m.Encode()
	img.id = chunkstore.Sum(img.enc)
	return img
}

// TestBenchTransfer: peer chunk transfer between two hosts on loopback (swarm
// key, Noise, yamux, TCP), against a plain TCP stream of the same chunks; both
// sides verify every chunk's sha256.
func TestBenchTransfer(t *testing.T) {
	benchGate(t)
	const n, size, rounds = 2048, 64 << 10, 3 // 128 MiB per round
	img := incompressible(t, n, size)
	key, _ := DecodeSwarmKey(GenerateSwarmKey())
	secure := []Option{WithSwarmKey(key)}
	if os.Getenv("HOARD_BENCH_NO_PSK") == "1" { // Noise only, to see what the PSK costs
		secure = []Option{WithInsecureNoSwarmKey(), WithListenAddrs([]string{"/ip4/127.0.0.1/tcp/0"})}
	}
	a := realPeer(t, append(secure, WithBackend(&fakeBackend{img: img}))...)
	b := realPeer(t, secure...)
	ctx := t.Context()
	if err := b.host.Connect(ctx, info(a)); err != nil {
		t.Fatal(err)
	}
	total := float64(n*size) / (1 << 20)
	var p2pRates, tcpRates []float64
	for range rounds {
		start := time.Now()
		got := 0
		if _, err := b.Fetch(ctx, a.ID(), img.id, img.wants(), false, func(c Chunk) error { got++; return nil }); err != nil || got != n {
			t.Fatalf("fetch: %d chunks, %v", got, err)
		}
		p2pRates = append(p2pRates, total/time.Since(start).Seconds())
		tcpRates = append(tcpRates, total/plainTCP(t, img).Seconds())
	}
	p, q := slices.Max(p2pRates), slices.Max(tcpRates)
	t.Logf("p2p fetch %v MiB/s, plain TCP %v MiB/s (best: %.0f vs %.0f, ratio %.2f)", fmtRates(p2pRates), fmtRates(tcpRates), p, q, p/q)
}

func fmtRates(r []float64) string {
	s := ""
	for _, x := range r {
		s += fmt.Sprintf("%.0f ", x)
	}
	return s
}

// plainTCP sends img's chunks, length-prefixed, over one loopback TCP
// connection and verifies each on receipt.
func plainTCP(t *testing.T, img *testImage) time.Duration {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		w := bufio.NewWriterSize(c, 256<<10)
		for _, ch := range img.chunks {
			var hdr [binary.MaxVarintLen64]byte
			w.Write(hdr[:binary.PutUvarint(hdr[:], uint64(len(ch)))])
			w.Write(ch)
		}
		w.Flush()
	}()
	start := time.Now()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	r := bufio.NewReaderSize(c, 256<<10)
	for i, e := range img.m.Entries {
		n, err := binary.ReadUvarint(r)
		if err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, n)
		if _, err := io.ReadFull(r, buf); err != nil {
			t.Fatal(err)
		}
		if sha256.Sum256(buf) != e.ID.Digest() {
			t.Fatalf("chunk %d corrupt", i)
		}
	}
	return time.Since(start)
}

// TestBenchDHT: lookup latency and provider records per node in a 200-peer
// mocknet where every node provides 5 images.
func TestBenchDHT(t *testing.T) {
	benchGate(t)
	const nodes, perNode, lookups = 200, 5, 400
	start := time.Now()
	peers, _ := mockCluster(t, nodes, func(int) Backend { return nil })
	t.Logf("%d peers joined in %v", nodes, time.Since(start))
	ctx := t.Context()
	var keys []chunkstore.ID
	start = time.Now()
	for i, p := range peers {
		for k := range perNode {
			id := chunkstore.Sum(fmt.Append(nil, "image", i, k))
			keys = append(keys, id)
			if err := p.Provide(ctx, id); err != nil {
				t.Fatal(err)
			}
		}
	}
	t.Logf("%d provides in %v (%.0f/s)", len(keys), time.Since(start), float64(len(keys))/time.Since(start).Seconds())
	r := rand.New(rand.NewPCG(5, 6))
	var lat []time.Duration
	misses := 0
	for range lookups {
		p := peers[r.IntN(nodes)]
		k := r.IntN(len(keys))
		s := time.Now()
		provs, err := p.FindProviders(ctx, keys[k])
		lat = append(lat, time.Since(s))
		if err != nil || (len(provs) == 0 && peers[k/perNode] != p) {
			misses++
		}
	}
	slices.Sort(lat)
	var recs []int
	for _, p := range peers {
		res, err := p.dstore.Query(context.Background(), query.Query{Prefix: "/providers/", KeysOnly: true})
		if err != nil {
			t.Fatal(err)
		}
		all, _ := res.Rest()
		recs = append(recs, len(all))
	}
	slices.Sort(recs)
	sum := 0
	for _, x := range recs {
		sum += x
	}
	t.Logf("lookup p50 %v p99 %v max %v over %d lookups, %d misses; provider records per node: mean %.1f, median %d, max %d (%d keys)",
		lat[len(lat)/2], lat[len(lat)*99/100], lat[len(lat)-1], lookups, misses, float64(sum)/nodes, recs[nodes/2], recs[nodes-1], len(keys))
}
