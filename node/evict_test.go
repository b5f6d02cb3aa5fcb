package node_test

import (
	"bytes"
	"context"
	"strings"
	"testing"
	"time"

	"github.com/hoardvm/hoard/node"
	"github.com/hoardvm/hoard/node/api"
	"github.com/hoardvm/hoard/planner"
)

// TestEvictionPoliciesUnderQuota: with each store.eviction policy, a daemon
// with a small quota evicts to take in a lazy image larger than the quota,
// read in several attaches, while another image stays open: none of the open
// image's chunks is evicted (it reads back without the origin), the store
// stays within its quota, and every read returns the origin's bytes.
func TestEvictionPoliciesUnderQuota(t *testing.T) {
	t.Parallel()
	for _, policy := range planner.EvictionNames() {
		t.Run(policy, func(t *testing.T) {
			t.Parallel()
			ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
			defer cancel()
			const quota = 2 << 20
			live, scan := randBytes(1<<20, 31), randBytes(3<<20, 32)
			liveSrv, scanSrv := newRangeServer(t, live), newRangeServer(t, scan)
			tn := startNode(t, node.Config{Eviction: policy, StoreQuota: quota,
				MemCache: -1, HotCache: -1, Readahead: -1, NoProfilePrefetch: true})
			liveRes := addImage(t, tn, api.ImportRequest{Source: liveSrv.URL + "/live.raw", Name: "live", Lazy: true, Chunking: "fixed"})
			addImage(t, tn, api.ImportRequest{Source: scanSrv.URL + "/scan.raw", Name: "scan", Lazy: true, Chunking: "fixed"})

			readAll := func(name string, data []byte, from, to int) {
				t.Helper()
				x, err := tn.Open(ctx, name)
				if err != nil {
					t.Fatal(err)
				}
				defer x.Close()
				p := make([]byte, 128<<10)
				for off := from; off < to; off += len(p) {
					if err := x.ReadAt(ctx, p, int64(off)); err != nil {
						t.Fatalf("read %s at %d: %v", name, off, err)
					}
					if !bytes.Equal(p, data[off:off+len(p)]) {
						t.Fatalf("read %s at %d: wrong bytes", name, off)
					}
				}
			}
			x, err := tn.Open(ctx, "live")
			if err != nil {
				t.Fatal(err)
			}
			defer x.Close()
			p := make([]byte, len(live))
			if err := x.ReadAt(ctx, p, 0); err != nil || !bytes.Equal(p, live) {
				t.Fatalf("first read of the open image: %v (or wrong bytes)", err)
			}
			// The scan, in attaches of 512 KiB: three times what the
			// quota leaves beside the open image.
			for off := 0; off < len(scan); off += 512 << 10 {
				readAll("scan", scan, off, off+512<<10)
			}
			st := tn.Store()
			if u := st.Usage(); u.DiskBytes > quota || u.StoredBytes >= int64(len(scan)) {
				t.Errorf("usage %+v: over the %d-byte quota, or nothing of the scan evicted", u, quota)
			}
			m, err := st.GetManifest(ctx, liveRes.Manifest)
			if err != nil {
				t.Fatal(err)
			}
			for _, id := range m.ChunkIDs() {
				if ok, err := st.Has(ctx, id); err != nil || !ok {
					t.Fatalf("chunk %s of the open image evicted (err %v)", id, err)
				}
			}
			before := liveSrv.bytes.Load()
			if err := x.ReadAt(ctx, p, 0); err != nil || !bytes.Equal(p, live) {
				t.Fatalf("second read of the open image: %v (or wrong bytes)", err)
			}
			if got := liveSrv.bytes.Load() - before; got != 0 {
				t.Errorf("second read of the open image fetched %d origin bytes", got)
			}
		})
	}
}

// TestUnknownEvictionPolicy: New refuses an unknown store.eviction and names
// the valid ones.
func TestUnknownEvictionPolicy(t *testing.T) {
	t.Parallel()
	_, err := node.New(node.Config{DataDir: t.TempDir(), Eviction: "fifo"}, nil)
	if err == nil {
		t.Fatal("New accepted store.eviction=fifo")
	}
	for _, want := range append([]string{`"fifo"`, "store.eviction"}, planner.EvictionNames()...) {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %s", err, want)
		}
	}
}
