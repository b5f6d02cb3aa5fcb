package node_test

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"github.com/hoardvm/hoard/chunkstore"
	"github.com/hoardvm/hoard/node"
	"github.com/hoardvm/hoard/node/api"
	"github.com/hoardvm/hoard/node/internal/testutil"
)

// guestImages writes a raw disk (runs of zeros, random and repeated bytes)
// and its compressed qcow2; it returns their paths and the qcow2's bytes.
func guestImages(t *testing.T, size int) (raw, qcow string, qcowBytes []byte) {
	t.Helper()
	needTool(t, "qemu-img")
	dir := t.TempDir()
	raw = filepath.Join(dir, "disk.raw")
	if err := os.WriteFile(raw, testutil.Image(31, size), 0o600); err != nil {
		t.Fatal(err)
	}
	qcow = filepath.Join(dir, "disk.qcow2")
	run(t, "qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", raw, qcow)
	b, err := os.ReadFile(qcow)
	if err != nil {
		t.Fatal(err)
	}
	return raw, qcow, b
}

// TestGuestViewExport: a qcow2 added with the default format is exported
// raw, with the raw disk's bytes and its zero runs as holes, and shares every
// chunk with the raw disk.
func TestGuestViewExport(t *testing.T) {
	t.Parallel()
	raw, qcow, _ := guestImages(t, 12<<20)
	tn := startNode(t, node.Config{})
	res := addImage(t, tn, api.ImportRequest{Source: qcow, Name: "guest"})
	if res.Format != chunkstore.FormatRaw || res.Container != chunkstore.ContainerQcow2 {
		t.Fatalf("format %q container %q; want raw, qcow2", res.Format, res.Container)
	}
	d, err := tn.client.Image(t.Context(), "guest", false)
	if err != nil {
		t.Fatal(err)
	}
	if d.Format != "raw" || d.Container != "qcow2" { // hoard vm overlay writes -F with the format
		t.Fatalf("image info format %q container %q, want raw, qcow2", d.Format, d.Container)
	}
	run(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", raw, tn.uri("guest"))
	rres := addImage(t, tn, api.ImportRequest{Source: raw, Name: "raw"})
	if rres.NewChunks != 0 {
		t.Errorf("the raw disk added %d chunks after its qcow2's guest view", rres.NewChunks)
	}
	needTool(t, "nbdinfo")
	var extents []struct {
		Offset, Length int64
		Type           int
	}
	out := run(t, "nbdinfo", "--map", "--json", tn.uri("guest"))
	if err := json.Unmarshal([]byte(out), &extents); err != nil {
		t.Fatalf("nbdinfo --map --json: %v\n%s", err, out)
	}
	var holes int64
	for _, e := range extents {
		if e.Type&1 != 0 {
			holes += e.Length
		}
	}
	if holes == 0 {
		t.Errorf("no holes reported: %s", out)
	}
}

// TestGuestViewLazy: a qcow2 added lazily over HTTP is read by guest ranges
// through the qcow2 reader; reading its export whole fetches at most 1.2x the
// qcow2 file's bytes from the origin (beyond the add's own read).
func TestGuestViewLazy(t *testing.T) {
	t.Parallel()
	raw, _, qb := guestImages(t, 24<<20)
	srv := newRangeServer(t, qb)
	tn := startNode(t, node.Config{})
	res := addImage(t, tn, api.ImportRequest{Source: srv.URL + "/disk.qcow2", Name: "lazy", Lazy: true})
	if res.Container != chunkstore.ContainerQcow2 {
		t.Fatalf("container %q, want qcow2", res.Container)
	}
	added := srv.bytes.Load()
	run(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", raw, tn.uri("lazy"))
	read := srv.bytes.Load() - added
	ratio := float64(read) / float64(len(qb))
	t.Logf("qcow2 file %d bytes; the add read %d (%.2fx), reading the export whole %d (%.2fx)",
		len(qb), added, float64(added)/float64(len(qb)), read, ratio)
	if ratio > 1.2 {
		t.Errorf("reading the export whole fetched %.2fx the qcow2's bytes, want <= 1.2x", ratio)
	}
	if c := tn.counters(t); c.ReadBytes["origin"] == 0 {
		t.Errorf("counters %+v: no origin reads", c)
	}
}

// TestGuestViewLazyCorpus is TestGuestViewLazy on a real image: set
// HOARD_QCOW2_CORPUS to a directory holding NAME.raw and NAME.qcow2 (made by
// scripts/corpus/debian-images.sh and qemu-img convert -c -O qcow2) and
// HOARD_QCOW2_NAME to NAME (default minbase).
func TestGuestViewLazyCorpus(t *testing.T) {
	dir := os.Getenv("HOARD_QCOW2_CORPUS")
	if dir == "" {
		t.Skip("HOARD_QCOW2_CORPUS not set")
	}
	name := os.Getenv("HOARD_QCOW2_NAME")
	if name == "" {
		name = "minbase"
	}
	needTool(t, "qemu-img")
	qb, err := os.ReadFile(filepath.Join(dir, name+".qcow2"))
	if err != nil {
		t.Fatal(err)
	}
	srv := newRangeServer(t, qb)
	tn := startNode(t, node.Config{})
	addImage(t, tn, api.ImportRequest{Source: srv.URL + "/" + name + ".qcow2", Name: name, Lazy: true})
	added := srv.bytes.Load()
	run(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", filepath.Join(dir, name+".raw"), tn.uri(name))
	read := srv.bytes.Load() - added
	ratio := float64(read) / float64(len(qb))
	t.Logf("%s.qcow2: %d bytes; the lazy add read %d (%.3fx), reading the export whole %d (%.3fx)",
		name, len(qb), added, float64(added)/float64(len(qb)), read, ratio)
	if ratio > 1.2 {
		t.Errorf("reading the export whole fetched %.2fx the qcow2's bytes, want <= 1.2x", ratio)
	}
}
