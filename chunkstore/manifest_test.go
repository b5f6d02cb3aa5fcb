package chunkstore

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"testing"
)

func sampleManifest() *Manifest {
	b := NewBuilder(DefaultCDC, FormatQcow2, Source{Kind: "glance", Location: "3f1c", Checksum: "sha512:ab"})
	b.Add(4096, Sum([]byte("a")), false)
	b.Add(65536, ID{}, true)
	b.Add(65536, ID{}, true) // merged with the previous zero run
	b.Add(1000, Sum([]byte("b")), false)
	b.Add(1000, Sum([]byte("a")), false)
	return b.Manifest()
}

func TestManifestRoundTrip(t *testing.T) {
	t.Parallel()
	m := sampleManifest()
	if len(m.Entries) != 4 || m.Size != 4096+131072+2000 {
		t.Fatalf("builder: %d entries, size %d", len(m.Entries), m.Size)
	}
	enc := m.Encode()
	got, err := DecodeManifest(enc)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got.Encode(), enc) || got.ID() != m.ID() {
		t.Fatal("round trip changed the manifest")
	}
	for off, want := range map[int64]int{0: 0, 4095: 0, 4096: 1, 4096 + 131071: 1, 4096 + 131072: 2, m.Size - 1: 3, m.Size: -1, -1: -1} {
		if got := m.Find(off); got != want {
			t.Errorf("Find(%d) = %d, want %d", off, got, want)
		}
	}
	s := m.Summarize()
	if s.NonZeroBytes != 6096 || s.Chunks != 3 || s.UniqueChunks != 2 {
		t.Fatalf("summary %+v", s)
	}
}

func TestManifestStrictDecoding(t *testing.T) {
	t.Parallel()
	enc := sampleManifest().Encode()
	for i := 0; i < len(enc); i++ { // every truncation fails
		if _, err := DecodeManifest(enc[:i]); !errors.Is(err, ErrBadManifest) {
			t.Fatalf("truncated to %d bytes: %v", i, err)
		}
	}
	if _, err := DecodeManifest(append(bytes.Clone(enc), 0)); !errors.Is(err, ErrBadManifest) {
		t.Fatal("trailing byte accepted")
	}
	// Altering a size byte breaks the size/entries agreement.
	bad := bytes.Clone(enc)
	bad[len(manifestMagic)+1] ^= 0x01
	if _, err := DecodeManifest(bad); !errors.Is(err, ErrBadManifest) {
		t.Fatal("altered size accepted")
	}
}

// TestManifestContainer: a guest-view manifest records its container in a
// version 2 encoding, while a manifest without one keeps the version 1
// encoding (and so its CID) byte for byte.
func TestManifestContainer(t *testing.T) {
	t.Parallel()
	plain := sampleManifest()
	v1 := plain.Encode()
	if v1[len(manifestMagic)] != 1 {
		t.Fatalf("manifest without a container encoded as version %d, want 1", v1[len(manifestMagic)])
	}
	b := NewBuilder(DefaultCDC, FormatRaw, plain.Source)
	for _, e := range plain.Entries {
		b.Add(e.Length, e.ID, e.Zero)
	}
	b.SetContainer(ContainerQcow2)
	guest := b.Manifest()
	enc := guest.Encode()
	if enc[len(manifestMagic)] != 2 {
		t.Fatalf("manifest with a container encoded as version %d, want 2", enc[len(manifestMagic)])
	}
	got, err := DecodeManifest(enc)
	if err != nil {
		t.Fatal(err)
	}
	if got.Container != ContainerQcow2 || got.Format != FormatRaw || got.ID() != guest.ID() {
		t.Fatalf("decoded container %q format %q", got.Container, got.Format)
	}
	if guest.ID() == plain.ID() {
		t.Fatal("the container does not change the identity")
	}
	for i := range enc { // every truncation fails
		if _, err := DecodeManifest(enc[:i]); !errors.Is(err, ErrBadManifest) {
			t.Fatalf("truncated to %d bytes: %v", i, err)
		}
	}
	// Version 2 with an empty container is not canonical (that is version 1).
	empty := bytes.Clone(v1)
	empty[len(manifestMagic)] = 2
	i := bytes.Index(empty, []byte("sha512:ab")) + len("sha512:ab")
	empty = append(empty[:i:i], append([]byte{0}, empty[i:]...)...)
	if _, err := DecodeManifest(empty); !errors.Is(err, ErrBadManifest) {
		t.Fatal("version 2 with an empty container accepted")
	}
	bad := bytes.Clone(enc)
	bad[len(manifestMagic)] = 3
	if _, err := DecodeManifest(bad); !errors.Is(err, ErrBadManifest) {
		t.Fatal("version 3 accepted")
	}
}

func TestSplitters(t *testing.T) {
	t.Parallel()
	data := make([]byte, 3<<20+12345)
	r := rand.New(rand.NewPCG(1, 1))
	fillRandom(r, data)
	for _, c := range []Chunking{DefaultCDC, Fixed64K} {
		sp, err := NewSplitter(bytes.NewReader(data), c)
		if err != nil {
			t.Fatal(err)
		}
		var got []byte
		n := 0
		for {
			b, err := sp.Next()
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatal(err)
			}
			if len(b) > int(c.Max) {
				t.Fatalf("%s: chunk of %d bytes over max %d", c.Kind, len(b), c.Max)
			}
			got = append(got, b...)
			n++
		}
		if !bytes.Equal(got, data) {
			t.Fatalf("%s: chunks do not reassemble the input", c.Kind)
		}
		t.Logf("%s: %d chunks, average %d bytes", c.Kind, n, len(data)/n)
	}
	// Content-defined boundaries resynchronise after an insertion.
	ids := func(d []byte) map[ID]bool {
		sp, _ := NewSplitter(bytes.NewReader(d), DefaultCDC)
		m := map[ID]bool{}
		for {
			b, err := sp.Next()
			if err != nil {
				return m
			}
			m[Sum(b)] = true
		}
	}
	a := ids(data)
	b := ids(append([]byte("inserted bytes"), data...))
	shared := 0
	for id := range b {
		if a[id] {
			shared++
		}
	}
	if shared < len(a)*8/10 {
		t.Fatalf("only %d of %d chunks shared after a 14-byte insertion", shared, len(a))
	}
}

func TestIsZero(t *testing.T) {
	t.Parallel()
	b := make([]byte, 70000)
	if !IsZero(b) || !IsZero(nil) {
		t.Fatal("zeros not zero")
	}
	for _, i := range []int{0, 1, 4095, 69999} {
		b[i] = 1
		if IsZero(b) {
			t.Fatalf("byte %d set but IsZero", i)
		}
		b[i] = 0
	}
}

func TestProfile(t *testing.T) {
	t.Parallel()
	p := &Profile{}
	p.Merge([]int{5, 1, 9})
	p.Merge([]int{1, 7, 5, 2})
	if want := []int{5, 1, 9, 7, 2}; p.Boots != 2 || len(p.Chunks) != len(want) {
		t.Fatalf("merged profile %+v", p)
	}
	got, err := DecodeProfile(p.Encode(), 10)
	if err != nil || got.Boots != 2 || len(got.Chunks) != 5 || got.Chunks[3] != 7 {
		t.Fatalf("round trip: %+v, %v", got, err)
	}
	if _, err := DecodeProfile(p.Encode(), 8); !errors.Is(err, ErrBadProfile) {
		t.Fatal("index beyond the manifest accepted")
	}
}

func FuzzDecodeManifest(f *testing.F) {
	f.Add(sampleManifest().Encode())
	f.Add([]byte("HOARDMF\x01"))
	gb := NewBuilder(DefaultCDC, FormatRaw, Source{Kind: "file", Location: "/x"})
	gb.Add(4096, Sum([]byte("a")), false)
	gb.SetContainer(ContainerQcow2)
	f.Add(gb.Manifest().Encode())
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := DecodeManifest(b)
		if err != nil {
			return
		}
		if !bytes.Equal(m.Encode(), b) {
			t.Fatal("accepted a non-canonical encoding")
		}
		var sum int64
		for _, e := range m.Entries {
			if e.Offset != sum {
				t.Fatal("offsets not contiguous")
			}
			sum += e.Length
		}
		if sum != m.Size {
			t.Fatal("entries do not cover the size")
		}
	})
}

func FuzzDecodeProfile(f *testing.F) {
	p := &Profile{Boots: 1, Chunks: []int{3, 1, 2}}
	f.Add(p.Encode())
	f.Fuzz(func(t *testing.T, b []byte) {
		if p, err := DecodeProfile(b, 100); err == nil && !bytes.Equal(p.Encode(), b) {
			t.Fatal("accepted a non-canonical encoding")
		}
	})
}

func FuzzPutGet(f *testing.F) {
	f.Add([]byte("hello"))
	f.Add(make([]byte, 1000))
	s, err := Open(f.TempDir())
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { s.Close() })
	f.Fuzz(func(t *testing.T, b []byte) {
		id := Sum(b)
		if err := s.Put(t.Context(), id, b); err != nil {
			t.Fatal(err)
		}
		got, err := s.Get(t.Context(), id)
		if err != nil || !bytes.Equal(got, b) {
			t.Fatalf("get: %v", err)
		}
	})
}
