package node_test

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/hoardvm/hoard/node"
	"github.com/hoardvm/hoard/node/api"
	"github.com/hoardvm/hoard/node/hot"
)

// TestHotTierServesWarmReads: the first read of an image fills the hot tier,
// the second is served from it, and bytes changed in the hot file on disk are
// caught and served from the chunk store instead, correctly.
func TestHotTierServesWarmReads(t *testing.T) {
	t.Parallel()
	needTool(t, "nbdcopy")
	dir := t.TempDir()
	src := filepath.Join(dir, "src.raw")
	data := writeImage(t, src, 12<<20, 21)
	tn := startNode(t, node.Config{})
	res := addImage(t, tn, api.ImportRequest{Source: src, Name: "hot"})

	status := func() hot.Stats {
		s, err := tn.client.Status(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		return s.Hot
	}
	copyAndCheck := func(name string) {
		t.Helper()
		dst := filepath.Join(dir, name)
		run(t, "nbdcopy", "--connections=2", tn.uri("hot"), dst)
		got, err := os.ReadFile(dst)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, data) {
			t.Fatalf("%s: the export differs from the source", name)
		}
	}
	copyAndCheck("first.raw")
	h := status()
	if h.Bytes != res.NonZeroBytes || h.Images != 1 {
		t.Fatalf("after one read the hot tier holds %d bytes of %d images, want %d bytes of 1", h.Bytes, h.Images, res.NonZeroBytes)
	}
	copyAndCheck("second.raw")
	h2 := status()
	if h2.Hits == h.Hits {
		t.Fatal("the second read was not served from the hot tier")
	}

	files, _ := filepath.Glob(filepath.Join(tn.dir, "hot", "*.raw"))
	if len(files) != 1 {
		t.Fatalf("hot files %v, want one", files)
	}
	f, err := os.OpenFile(files[0], os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	for off := int64(0); off < int64(len(data)); off += 1 << 20 {
		if _, err := f.WriteAt([]byte{^data[off+100]}, off+100); err != nil {
			t.Fatal(err)
		}
	}
	f.Close()
	copyAndCheck("third.raw")
	if h3 := status(); h3.Corrupt == 0 {
		t.Fatalf("changed hot blocks went unnoticed: %+v", h3)
	}
	copyAndCheck("fourth.raw") // healed
}
