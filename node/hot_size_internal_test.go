package node

import (
	"context"
	"os/exec"
	"testing"
	"time"

	"github.com/hoardvm/hoard/node/hot"
)

// TestHotTierDefaultFitsFreeSpace (issue 7, item 3): on a data dir with
// 256 MiB of disk the default hot tier takes at most a quarter of the free
// space (it used to be 4 GiB whatever the disk, so that filling it could fill
// the disk the chunk store writes to); a configured size is used as given.
func TestHotTierDefaultFitsFreeSpace(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", dir).CombinedOutput(); err != nil {
		t.Skipf("cannot mount a small tmpfs (needs root): %v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", "-l", dir).Run() })
	for _, tc := range []struct {
		hot     int64 // Config.HotCache
		atLeast int64
		atMost  int64
	}{
		{hot: 0, atLeast: hot.MinSize, atMost: 64 << 20},
		{hot: 1 << 30, atLeast: 1 << 30, atMost: 1 << 30},
	} {
		n, err := New(Config{DataDir: dir, NBDSocket: "-", APIListen: "127.0.0.1:0", HotCache: tc.hot}, nil)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(t.Context())
		ran := make(chan error, 1)
		go func() { ran <- n.Run(ctx) }()
		select {
		case <-n.Ready():
		case err := <-ran:
			t.Fatalf("Run: %v", err)
		case <-time.After(10 * time.Second):
			t.Fatal("node not ready after 10 s")
		}
		var size int64
		if n.hot != nil {
			size = n.hot.Max()
		}
		cancel()
		if err := <-ran; err != nil {
			t.Fatalf("Run: %v", err)
		}
		if size < tc.atLeast || size > tc.atMost {
			t.Errorf("cache.hot %d on a 256 MiB disk: hot tier of %d bytes, want [%d, %d]", tc.hot, size, tc.atLeast, tc.atMost)
		}
	}
}
