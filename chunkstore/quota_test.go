package chunkstore

import (
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// packFileBytes is the size of the pack files on disk.
func packFileBytes(t *testing.T, s *Store) int64 {
	t.Helper()
	ents, err := os.ReadDir(filepath.Join(s.dir, "packs"))
	if err != nil {
		t.Fatal(err)
	}
	var n int64
	for _, e := range ents {
		fi, err := e.Info()
		if err != nil {
			t.Fatal(err)
		}
		n += fi.Size()
	}
	return n
}

// Under churn (writers, deletes, evictions, compactions, and commits that fail
// on an injected fault) the packs stay within the quota plus one pack, and
// the accounting is exact: it equals what the index says, and what a reopen
// recounts. (The quota used to leak: packs grew to 25x the quota.)
func TestChurnStaysWithinQuota(t *testing.T) {
	t.Parallel()
	const quota = 3 << 20
	dir := t.TempDir()
	s, err := Open(dir, WithQuota(quota), WithSync(false))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { s.Close() }()
	// Entries here are smaller than a pack, so the slack is one pack.
	limit := quota + s.packs.target
	if s.packs.target > s.diskSlack() {
		t.Fatal("slack smaller than a pack")
	}
	var commits, injected atomic.Int64
	s.packs.faults.commit = func() error {
		if commits.Add(1)%4 == 0 {
			injected.Add(1)
			return syscall.EIO
		}
		return nil
	}
	ctx, cancel := context.WithTimeout(t.Context(), 4*time.Second)
	defer cancel()
	r := rand.New(rand.NewPCG(9, 10))
	kb := s.NewBatch("keep")
	for range 16 { // 512 KiB pinned
		d := make([]byte, 32<<10)
		fillRandom(r, d)
		if _, _, err := kb.Add(ctx, d); err != nil {
			t.Fatal(err)
		}
	}
	for kb.Commit(ctx) != nil { // the fault may hit it: retry
		for range 16 {
			d := make([]byte, 32<<10)
			fillRandom(r, d)
			kb.Add(ctx, d)
		}
	}

	var (
		wg       sync.WaitGroup
		failures atomic.Int64
		maxDisk  atomic.Int64
		recentMu sync.Mutex
		recent   []ID
	)
	fail := func(format string, args ...any) {
		if failures.Add(1) <= 5 {
			t.Errorf(format, args...)
		}
	}
	run := func(f func(r *rand.Rand)) {
		wg.Add(1)
		seed := r.Uint64()
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(seed, 2))
			for ctx.Err() == nil {
				f(r)
			}
		}()
	}
	bg := context.WithoutCancel(ctx)
	for range 2 { // writers; every fourth commit fails
		run(func(r *rand.Rand) {
			b := s.NewBatch("")
			var ids []ID
			for range 16 {
				d := make([]byte, 8<<10+r.IntN(56<<10))
				fillRandom(r, d)
				id, _, err := b.Add(bg, d)
				if err != nil {
					b.Abort()
					fail("put: %v", err)
					return
				}
				ids = append(ids, id)
			}
			if err := b.Commit(bg); err != nil {
				if !errors.Is(err, syscall.EIO) {
					fail("commit: %v", err)
				}
				return
			}
			recentMu.Lock()
			recent = append(recent, ids...)
			if len(recent) > 512 {
				recent = recent[len(recent)-512:]
			}
			recentMu.Unlock()
		})
	}
	run(func(r *rand.Rand) { // deletes, evictions, compactions
		recentMu.Lock()
		var victims []ID
		for range min(2, len(recent)) {
			victims = append(victims, recent[r.IntN(len(recent))])
		}
		recentMu.Unlock()
		var err error
		switch r.IntN(3) {
		case 0:
			err = s.Delete(bg, victims...)
		case 1:
			_, err = s.Evict(bg, 256<<10)
		default:
			_, err = s.Compact(bg)
		}
		if err != nil {
			fail("delete/evict/compact: %v", err)
		}
	})
	run(func(*rand.Rand) { // watch the disk
		n := s.Usage().DiskBytes
		for {
			m := maxDisk.Load()
			if n <= m || maxDisk.CompareAndSwap(m, n) {
				break
			}
		}
		if n > limit {
			fail("packs hold %d bytes: more than the quota %d plus one pack %d", n, quota, s.packs.target)
		}
	})
	wg.Wait()
	if injected.Load() == 0 {
		t.Fatal("no commit failed: the test tests nothing")
	}
	// Reclaim what the failed commits left, then everything is exact.
	if _, err := s.compact(t.Context(), 1); err != nil {
		t.Fatal(err)
	}
	assertAccounting(t, s)
	before := s.Usage()
	if n := packFileBytes(t, s); n != before.DiskBytes {
		t.Errorf("pack files hold %d bytes, DiskBytes says %d", n, before.DiskBytes)
	}
	if before.DiskBytes > limit {
		t.Errorf("packs hold %d bytes after compaction: more than the quota %d plus one pack", before.DiskBytes, quota)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s, err = Open(dir, WithQuota(quota))
	if err != nil {
		t.Fatal(err)
	}
	if after := s.Usage(); after != before {
		t.Errorf("usage %+v before closing, %+v recounted after reopening", before, after)
	}
	assertAccounting(t, s)
	t.Logf("%d commits, %d failed by injection; disk peaked at %d bytes (quota %d, pack %d); at the end %+v",
		commits.Load(), injected.Load(), maxDisk.Load(), quota, s.packs.target, before)
}

// A pack that compaction cannot read whole is kept, and making room goes on
// without it: writes under the quota do not fail because of it.
func TestUnreadablePackDoesNotBlockWrites(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	s := openT(t, t.TempDir(), WithQuota(1<<20), WithWatermarks(0.9, 0.5))
	r := rand.New(rand.NewPCG(41, 42))
	ids := putRandom(t, s, r, 4, 16<<10)
	bad := ids[0]
	if err := s.Pin(ctx, "image:x", []ID{bad}); err != nil {
		t.Fatal(err)
	}
	at, _, _ := s.getRecord(bad.digest)
	var hits atomic.Int64
	s.packs.faults.readAt = func(pack uint32, off int64, buf []byte) error {
		if pack == at.pack && off == at.off {
			hits.Add(1)
			return syscall.EIO
		}
		return nil
	}
	s.Delete(ctx, ids[1:]...) // its compaction cannot read bad: an error, the pack stays
	for i := range 64 {       // 2 MiB through a 1 MiB quota
		d := make([]byte, 32<<10)
		fillRandom(r, d)
		if err := s.Put(ctx, Sum(d), d); err != nil {
			t.Fatalf("put %d with one unreadable pack: %v", i, err)
		}
	}
	if hits.Load() < 2 {
		t.Fatalf("compaction read the bad entry %d times: the test tests nothing", hits.Load())
	}
	if ok, _ := s.Has(ctx, bad); !ok {
		t.Fatal("the unreadable chunk was dropped")
	}
	if u := s.Usage(); u.DiskBytes > s.Quota()+s.packs.target {
		t.Fatalf("usage %+v past the quota", u)
	}
}
