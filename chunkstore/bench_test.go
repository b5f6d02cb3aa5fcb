package chunkstore

import (
	"context"
	"math/rand/v2"
	"testing"
)

// halfCompressible returns n bytes that zstd squeezes to about half, like
// the binaries and text of a root file system.
func halfCompressible(r *rand.Rand, n int) []byte {
	b := make([]byte, n)
	words := [][]byte{[]byte("libc.so.6 "), []byte("GLIBC_2.34 "), []byte("\x00\x00\x00\x00\x48\x89\xe5"), []byte("/usr/lib/x86_64-linux-gnu/")}
	for i := 0; i < n; {
		if r.IntN(2) == 0 {
			i += copy(b[i:], words[r.IntN(len(words))])
			continue
		}
		end := min(n, i+8+r.IntN(24))
		for ; i < end; i++ {
			b[i] = byte(r.Uint32())
		}
	}
	return b
}

// BenchmarkGet reads chunks of 64 KiB back from a warm store (pack files in
// the page cache): index lookup, pread, decode and sha256 verify.
func BenchmarkGet(b *testing.B) {
	for _, codec := range []string{"zstd", "s2", "none"} {
		b.Run(codec, func(b *testing.B) {
			s, err := Open(b.TempDir(), WithCodec(codec), WithSync(false))
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			r := rand.New(rand.NewPCG(1, 2))
			ids := make([]ID, 256)
			for i := range ids {
				c := halfCompressible(r, 64<<10)
				ids[i] = Sum(c)
				if err := s.Put(context.Background(), ids[i], c); err != nil {
					b.Fatal(err)
				}
			}
			b.SetBytes(64 << 10)
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				i := 0
				for pb.Next() {
					if _, err := s.Get(context.Background(), ids[i%len(ids)]); err != nil {
						b.Error(err)
						return
					}
					i++
				}
			})
		})
	}
}
