package chunkstore

import (
	"encoding/binary"
	"os"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"testing"
)

// rss returns the process's resident set (VmRSS) and its peak (VmHWM) in bytes.
func rss(t *testing.T) (int64, int64) {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Skip("no /proc/self/status")
	}
	var cur, peak int64
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) < 2 {
			continue
		}
		n, _ := strconv.ParseInt(f[1], 10, 64)
		switch f[0] {
		case "VmRSS:":
			cur = n << 10
		case "VmHWM:":
			peak = n << 10
		}
	}
	return cur, peak
}

// TestRSSMillionChunks holds 10^6 chunks and checks the process stays under
// 100 MB resident: the index lives in pebble on disk, not in memory. It writes
// ~600 MB, so it runs only with HOARD_BENCH_RSS=1:
//
//	HOARD_BENCH_RSS=1 go test -run TestRSSMillionChunks -v ./chunkstore
func TestRSSMillionChunks(t *testing.T) {
	if os.Getenv("HOARD_BENCH_RSS") == "" {
		t.Skip("set HOARD_BENCH_RSS=1 to run (writes ~600 MB)")
	}
	n := 1_000_000
	if v, err := strconv.Atoi(os.Getenv("HOARD_BENCH_RSS_CHUNKS")); err == nil {
		n = v
	}
	debug.SetGCPercent(50)
	s := openT(t, t.TempDir(), WithQuota(0))
	ctx := t.Context()
	data := make([]byte, 512)
	b := s.NewBatch("")
	for i := 0; i < n; i++ {
		binary.LittleEndian.PutUint64(data, uint64(i))
		if _, err := b.Put(ctx, Sum(data), data); err != nil {
			t.Fatal(err)
		}
		if b.Len() == 10000 {
			if err := b.Commit(ctx); err != nil {
				t.Fatal(err)
			}
			b = s.NewBatch("")
		}
	}
	if err := b.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	// Random reads touch the whole index.
	for i := 0; i < 100000; i++ {
		binary.LittleEndian.PutUint64(data, uint64((i*7919)%n))
		if _, err := s.Get(ctx, Sum(data)); err != nil {
			t.Fatal(err)
		}
	}
	runtime.GC()
	cur, peak := rss(t)
	u := s.Usage()
	t.Logf("%d chunks (%d MB on disk): RSS %.1f MB, peak %.1f MB", u.Chunks, u.DiskBytes>>20, float64(cur)/1e6, float64(peak)/1e6)
	if u.Chunks != int64(n) {
		t.Fatalf("store holds %d chunks, want %d", u.Chunks, n)
	}
	if peak > 100e6 {
		t.Fatalf("peak RSS %.1f MB holding %d chunks; goal < 100 MB", float64(peak)/1e6, n)
	}
}
