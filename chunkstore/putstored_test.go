package chunkstore

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"testing"
)

// PutStored keeps a chunk in the form another store (a peer) sent it, and
// reads verify it as any other.
func TestPutStored(t *testing.T) {
	ctx := context.Background()
	r := rand.New(rand.NewPCG(4, 4))
	src, err := Open(t.TempDir(), WithCodec("zstd"))
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	dst, err := Open(t.TempDir(), WithCodec("s2"))
	if err != nil {
		t.Fatal(err)
	}
	defer dst.Close()
	data := halfCompressible(r, 60000)
	id := Sum(data)
	if err := src.Put(ctx, id, data); err != nil {
		t.Fatal(err)
	}
	st, err := src.GetStored(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	if st.Codec != CodecZstd {
		t.Fatalf("codec %d, want zstd", st.Codec)
	}
	if err := dst.PutStored(ctx, id, st); err != nil {
		t.Fatal(err)
	}
	got, err := dst.Get(ctx, id)
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("Get after PutStored: %v", err)
	}
	again, _ := dst.GetStored(ctx, id)
	if !bytes.Equal(again.Payload, st.Payload) {
		t.Fatal("the stored form was recompressed")
	}
	if u := dst.Usage(); u.Chunks != 1 || u.RawBytes != int64(len(data)) {
		t.Fatalf("usage %+v", u)
	}
	// A second PutStored of the same chunk adds nothing.
	if err := dst.PutStored(ctx, id, st); err != nil || dst.Usage().DiskBytes != dst.Usage().StoredBytes {
		t.Fatalf("duplicate PutStored: %v, usage %+v", err, dst.Usage())
	}

	if err := dst.PutStored(ctx, Sum([]byte("x")), Stored{Codec: 9, RawLen: 1, Payload: []byte("x")}); err == nil {
		t.Error("unknown codec accepted")
	}
	if err := dst.PutStored(ctx, Sum([]byte("xy")), Stored{Codec: CodecRaw, RawLen: 2, Payload: []byte("x")}); err == nil {
		t.Error("raw payload of the wrong length accepted")
	}
	// A caller that did not verify: the lie is caught on read and dropped.
	other := halfCompressible(r, 5000)
	lie := Sum([]byte("something else"))
	if err := dst.PutStored(ctx, lie, Stored{Codec: CodecRaw, RawLen: len(other), Payload: other}); err != nil {
		t.Fatal(err)
	}
	if _, err := dst.Get(ctx, lie); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("Get of a mislabelled chunk: %v, want ErrCorrupt", err)
	}
	if ok, _ := dst.Has(ctx, lie); ok {
		t.Fatal("the mislabelled chunk was not dropped")
	}
}
