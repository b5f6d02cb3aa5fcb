package node_test

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/hoardvm/hoard/node"
	"github.com/hoardvm/hoard/node/api"
	"github.com/hoardvm/hoard/node/hot"
)

// startStoppable starts a daemon in-process on cfg.DataDir with the NBD socket at
// cfg.NBDSocket; stop cancels it and waits for Run.
func startStoppable(t *testing.T, cfg node.Config) (tn *testNode, stop func()) {
	t.Helper()
	cfg.APIListen = "127.0.0.1:0"
	n, err := node.New(cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- n.Run(ctx) }()
	stopped := false
	stop = func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	}
	t.Cleanup(stop)
	select {
	case <-n.Ready():
	case err := <-done:
		t.Fatalf("Run: %v", err)
	case <-time.After(20 * time.Second):
		t.Fatal("node not ready after 20s")
	}
	return &testNode{Node: n, dir: cfg.DataDir, client: api.NewClient(n.APIAddr().String(), n.APIToken())}, stop
}

// TestHotTierSurvivesRestart: the hot tier filled by one daemon is the next
// daemon's on the same data dir (its first read is a hot hit, nothing is
// refilled), and a byte changed in a hot file while no daemon ran is caught
// by its CRC: the right bytes are served and the entry refetched.
func TestHotTierSurvivesRestart(t *testing.T) {
	t.Parallel()
	needTool(t, "nbdcopy")
	dir := t.TempDir()
	sockDir, err := os.MkdirTemp("", "hoard-sock")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	cfg := node.Config{DataDir: filepath.Join(dir, "data"), NBDSocket: filepath.Join(sockDir, "nbd.sock"), HotCache: 1 << 30}
	src := filepath.Join(dir, "src.raw")
	data := writeImage(t, src, 12<<20, 33)

	status := func(tn *testNode) hot.Stats {
		t.Helper()
		s, err := tn.client.Status(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		return s.Hot
	}
	copyAndCheck := func(tn *testNode, name string) {
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

	a, stopA := startStoppable(t, cfg)
	res := addImage(t, a, api.ImportRequest{Source: src, Name: "hot"})
	copyAndCheck(a, "a.raw")
	if h := status(a); h.Bytes != res.NonZeroBytes {
		t.Fatalf("first daemon: hot tier holds %d bytes, want %d", h.Bytes, res.NonZeroBytes)
	}
	stopA()

	b, stopB := startStoppable(t, cfg)
	if h := status(b); h.Bytes != res.NonZeroBytes || h.Images != 1 {
		t.Fatalf("after a restart the hot tier holds %d bytes of %d images, want %d bytes of 1", h.Bytes, h.Images, res.NonZeroBytes)
	}
	copyAndCheck(b, "b.raw")
	if h := status(b); h.Hits == 0 || h.Fills != 0 || h.Corrupt != 0 {
		t.Fatalf("the first read after a restart was not served from the kept hot tier: %+v", h)
	}
	stopB()

	files, _ := filepath.Glob(filepath.Join(cfg.DataDir, "hot", "*.raw"))
	if len(files) != 1 {
		t.Fatalf("hot files %v, want one", files)
	}
	f, err := os.OpenFile(files[0], os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	changed := 0
	for off := int64(0); off < int64(len(data)); off += 1 << 20 {
		if data[off+100] == 0 && data[off+101] == 0 {
			continue // a zero entry: not in the tier
		}
		if _, err := f.WriteAt([]byte{^data[off+100]}, off+100); err != nil {
			t.Fatal(err)
		}
		changed++
	}
	f.Close()

	c, _ := startStoppable(t, cfg)
	copyAndCheck(c, "c.raw")
	h := status(c)
	if h.Corrupt == 0 || h.Fills == 0 {
		t.Fatalf("bytes changed in a kept hot file went unnoticed (%d changed): %+v", changed, h)
	}
	copyAndCheck(c, "d.raw") // healed
}
