package origin_test

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/hoardvm/hoard/node/origin"
)

func writeImage(t *testing.T, data []byte) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "image.raw")
	if err := os.WriteFile(p, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestFileSource(t *testing.T) {
	t.Parallel()
	data := randomData(t, 1<<20+7)
	path := writeImage(t, data)
	for _, ref := range []string{path, "file://" + path} {
		src := open(t, ref, origin.Config{})
		if src.Size() != int64(len(data)) {
			t.Fatalf("%s: Size = %d, want %d", ref, src.Size(), len(data))
		}
		if got, want := src.Ref(), (origin.Ref{Kind: "file", Location: path}); got != want {
			t.Fatalf("%s: Ref = %+v, want %+v", ref, got, want)
		}
		checkRandomReads(t, src, data, 20)
		got, err := readAll(t, src)
		if err != nil || !bytes.Equal(got, data) {
			t.Fatalf("%s: Stream: %d bytes, %v", ref, len(got), err)
		}
	}
}

func TestFileRelativePath(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "rel.raw"), []byte("hello"), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Chdir(dir)
	src := open(t, "rel.raw", origin.Config{})
	if src.Ref().Location != filepath.Join(dir, "rel.raw") || src.Size() != 5 {
		t.Fatalf("Ref = %+v, Size = %d", src.Ref(), src.Size())
	}
}

func TestFileOpenErrors(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	_, err := origin.Open(t.Context(), filepath.Join(dir, "nope.raw"), origin.Config{})
	wantErr(t, err, origin.ErrNotFound, "no such file; check the path", "nope.raw")

	_, err = origin.Open(t.Context(), dir, origin.Config{})
	wantErr(t, err, nil, "is a directory", "give the path of an image file")

	_, err = origin.Open(t.Context(), "file://otherhost/x", origin.Config{})
	wantErr(t, err, nil, "file:///absolute/path")
}

func TestFileChangesUnderneath(t *testing.T) {
	t.Parallel()
	data := randomData(t, 100_000)

	path := writeImage(t, data)
	src := open(t, path, origin.Config{})
	if err := os.Truncate(path, 60_000); err != nil {
		t.Fatal(err)
	}
	_, err := readAll(t, src)
	wantErr(t, err, origin.ErrShort, "got 60000 of the announced 100000 bytes")
	wantErr(t, src.ReadAt(t.Context(), make([]byte, 100), 70_000), origin.ErrShort, "file shrank")

	path = writeImage(t, data)
	src = open(t, path, origin.Config{})
	f, err := os.OpenFile(path, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.Write([]byte("more"))
	f.Close()
	_, err = readAll(t, src)
	wantErr(t, err, origin.ErrLong, "more than the announced 100000 bytes")
}
