package chunkstore

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// logBuffer is a log sink that tests can search; safe for concurrent use.
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func (l *logBuffer) logger() *slog.Logger {
	return slog.New(slog.NewTextHandler(l, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

// putRandom stores n chunks of size bytes of incompressible data in one batch.
func putRandom(t testing.TB, s *Store, r *rand.Rand, n, size int) []ID {
	t.Helper()
	b := s.NewBatch("")
	var ids []ID
	for range n {
		d := make([]byte, size)
		fillRandom(r, d)
		id, _, err := b.Add(t.Context(), d)
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, id)
	}
	if err := b.Commit(t.Context()); err != nil {
		t.Fatal(err)
	}
	return ids
}

// A read that looked a chunk up just before compaction moved it and removed
// its pack must find it at its new place, not drop it. The hook runs a whole
// compaction between the read's index lookup and its pack read.
func TestReadRacingCompactionKeepsChunk(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	var logs logBuffer
	s := openT(t, t.TempDir(), WithLogger(logs.logger()))
	ids := putRandom(t, s, rand.New(rand.NewPCG(1, 2)), 10, 32<<10)
	keep := ids[0]
	// One dead entry: Delete's own compaction (below half live) leaves the
	// pack alone, compact(1) rewrites it.
	if err := s.Delete(ctx, ids[9]); err != nil {
		t.Fatal(err)
	}
	before, _, _ := s.getRecord(keep.digest)
	var once sync.Once
	s.packs.faults.afterLookup = func(d [32]byte) {
		if d == keep.digest {
			once.Do(func() {
				if _, err := s.compact(context.Background(), 1); err != nil {
					t.Errorf("compact: %v", err)
				}
			})
		}
	}
	got, err := s.Get(ctx, keep)
	if err != nil {
		t.Fatalf("get of a chunk compaction moved: %v", err)
	}
	if !keep.Verify(got) {
		t.Fatal("get returned wrong bytes")
	}
	after, ok, _ := s.getRecord(keep.digest)
	if !ok {
		t.Fatal("the chunk was dropped")
	}
	if after.pack == before.pack {
		t.Fatal("the hook did not move the chunk: the test tests nothing")
	}
	if strings.Contains(logs.String(), "corrupt") {
		t.Fatalf("a good chunk was reported corrupt:\n%s", logs.String())
	}
}

// A read that fails (EIO, ENOMEM, a short read) says nothing about the
// chunk's bytes: neither Get nor compaction may drop the chunk for it.
func TestTransientReadErrorKeepsChunk(t *testing.T) {
	t.Parallel()
	for _, fault := range []error{syscall.EIO, syscall.ENOMEM, io.ErrUnexpectedEOF, io.EOF} {
		t.Run(fault.Error(), func(t *testing.T) {
			t.Parallel()
			ctx := t.Context()
			var logs logBuffer
			s := openT(t, t.TempDir(), WithLogger(logs.logger()))
			ids := putRandom(t, s, rand.New(rand.NewPCG(3, 4)), 4, 16<<10)
			victim := ids[0]
			at, _, _ := s.getRecord(victim.digest)
			var on atomic.Bool
			s.packs.faults.readAt = func(pack uint32, off int64, buf []byte) error {
				if on.Load() && pack == at.pack && off == at.off {
					return fault
				}
				return nil
			}
			on.Store(true)
			_, err := s.Get(ctx, victim)
			if err == nil || errors.Is(err, ErrCorrupt) || !errors.Is(err, fault) {
				t.Fatalf("get with a failing read: %v, want the read error, not ErrCorrupt", err)
			}
			if _, err := s.GetStored(ctx, victim); err == nil {
				t.Fatal("get stored with a failing read succeeded")
			}
			// Compaction reads the entry too: a dead entry makes it rewrite the pack.
			if err := s.Delete(ctx, ids[3]); err != nil {
				t.Fatal(err)
			}
			if _, err := s.compact(ctx, 1); err == nil {
				t.Error("compaction that could not read an entry reported success")
			}
			// Verify counts the chunk it cannot read, keeps it and checks
			// the others (before, it stopped at the first read error).
			if res, err := s.Verify(ctx, nil); err != nil || len(res.Unreadable) != 1 || res.Unreadable[0] != victim ||
				len(res.Corrupt) != 0 || res.Chunks != 3 || res.Bytes != 2*16<<10 {
				t.Errorf("verify with one unreadable entry: %+v, %v; want it counted as unreadable and the other two checked", res, err)
			}
			on.Store(false)
			for _, id := range ids[:3] {
				got, err := s.Get(ctx, id)
				if err != nil || !id.Verify(got) {
					t.Fatalf("chunk lost after a transient read error: %v", err)
				}
			}
			if strings.Contains(logs.String(), "dropping") {
				t.Fatalf("a chunk was dropped for a read error:\n%s", logs.String())
			}
			// Once the fault is gone compaction finishes and frees the pack.
			if _, err := s.compact(ctx, 1); err != nil {
				t.Fatal(err)
			}
			assertAccounting(t, s)
		})
	}
}

// Readers hammer Get of pinned chunks while writers churn, eviction runs under
// a small quota, chunks are deleted and several goroutines compact at once:
// no pinned chunk may be lost or reported corrupt, and the accounting must
// match the index afterwards. (Before compactions had one owner and reads
// retried a moved chunk, this lost kept chunks within a second or two.)
func TestChurnNeverLosesKeptChunks(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(t.Context(), 4*time.Second)
	defer cancel()
	var logs logBuffer
	s := openT(t, t.TempDir(), WithQuota(4<<20), WithLogger(logs.logger()), WithSync(false))
	r := rand.New(rand.NewPCG(5, 6))
	kb := s.NewBatch("keep")
	var kept []ID
	for range 40 {
		d := make([]byte, 8<<10)
		fillRandom(r, d)
		id, _, err := kb.Add(ctx, d)
		if err != nil {
			t.Fatal(err)
		}
		kept = append(kept, id)
	}
	if err := kb.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	keptSet := map[[32]byte]bool{}
	for _, id := range kept {
		keptSet[id.digest] = true
	}
	// Widen the window between a read's lookup and its pack read.
	s.packs.faults.afterLookup = func(d [32]byte) {
		if keptSet[d] {
			runtime.Gosched()
		}
	}

	var (
		wg       sync.WaitGroup
		failures atomic.Int64
		reads    atomic.Int64
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
			r := rand.New(rand.NewPCG(seed, 1))
			for ctx.Err() == nil {
				f(r)
			}
		}()
	}
	for range 2 { // writers
		run(func(r *rand.Rand) {
			b := s.NewBatch("")
			var ids []ID
			for range 8 {
				d := make([]byte, 4<<10+r.IntN(12<<10))
				fillRandom(r, d)
				id, _, err := b.Add(ctx, d)
				if err != nil {
					b.Abort()
					if ctx.Err() == nil {
						fail("put: %v", err)
					}
					return
				}
				ids = append(ids, id)
			}
			if err := b.Commit(ctx); err != nil {
				if ctx.Err() == nil {
					fail("commit: %v", err)
				}
				return
			}
			recentMu.Lock()
			recent = append(recent, ids...)
			if len(recent) > 256 {
				recent = recent[len(recent)-256:]
			}
			recentMu.Unlock()
		})
	}
	run(func(r *rand.Rand) { // deletes and evictions: dead bytes for compaction
		recentMu.Lock()
		var victims []ID
		for range min(4, len(recent)) {
			victims = append(victims, recent[r.IntN(len(recent))])
		}
		recentMu.Unlock()
		var err error
		if r.IntN(2) == 0 {
			err = s.Delete(context.WithoutCancel(ctx), victims...)
		} else {
			_, err = s.Evict(context.WithoutCancel(ctx), 32<<10)
		}
		if err != nil {
			fail("delete/evict: %v", err)
		}
	})
	for _, frac := range []float64{compactThreshold, 1} { // two compactors at once
		run(func(*rand.Rand) {
			if _, err := s.compact(context.WithoutCancel(ctx), frac); err != nil {
				fail("compact: %v", err)
			}
		})
	}
	for range 2 { // readers of kept chunks
		run(func(r *rand.Rand) {
			id := kept[r.IntN(len(kept))]
			got, err := s.Get(context.WithoutCancel(ctx), id)
			if err != nil || !id.Verify(got) {
				fail("get of a kept chunk: %v", err)
			}
			reads.Add(1)
		})
	}
	wg.Wait()
	for _, id := range kept {
		if ok, err := s.Has(t.Context(), id); err != nil || !ok {
			fail("kept chunk %s lost: %v", id, err)
		}
	}
	if strings.Contains(logs.String(), "corrupt") {
		t.Errorf("good chunks reported corrupt:\n%.2000s", logs.String())
	}
	if reads.Load() < 100 || !strings.Contains(logs.String(), "evicted chunks") {
		t.Errorf("%d reads ran, eviction ran: %v: the test tests nothing", reads.Load(), strings.Contains(logs.String(), "evicted chunks"))
	}
	t.Logf("%d reads of kept chunks, usage %+v", reads.Load(), s.Usage())
	assertAccounting(t, s)
}

// assertAccounting checks that the in-memory usage and per-pack live bytes
// are what the index says (the store must be quiescent).
func assertAccounting(t *testing.T, s *Store) {
	t.Helper()
	u, live, err := s.countIndex()
	if err != nil {
		t.Fatal(err)
	}
	got := s.Usage()
	got.DiskBytes = 0
	if got != u {
		t.Errorf("usage in memory %+v, in the index %+v", got, u)
	}
	s.packs.mu.RLock()
	defer s.packs.mu.RUnlock()
	for id, p := range s.packs.packs {
		p.mu.Lock()
		if p.live != live[id] {
			t.Errorf("pack %s: %d live bytes in memory, %d in the index", packName(id), p.live, live[id])
		}
		p.mu.Unlock()
	}
	for id := range live {
		if s.packs.packs[id] == nil {
			t.Errorf("index points into pack %s, which is gone", packName(id))
		}
	}
}

// A record that points into a pack that is not open is dropped only when the
// pack's file is gone too; while the file is there the chunk is kept.
func TestRecordIntoMissingPack(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	s := openT(t, t.TempDir())
	id := putRandom(t, s, rand.New(rand.NewPCG(7, 8)), 1, 16<<10)[0]
	r, _, _ := s.getRecord(id.digest)
	s.packs.mu.Lock()
	p := s.packs.packs[r.pack]
	delete(s.packs.packs, r.pack) // as if the set lost it
	s.packs.cur = nil
	s.packs.mu.Unlock()
	if _, err := s.Get(ctx, id); err == nil || errors.Is(err, ErrCorrupt) {
		t.Fatalf("get with the pack file still on disk: %v, want an error that keeps the chunk", err)
	}
	if ok, _ := s.Has(ctx, id); !ok {
		t.Fatal("dropped a chunk whose pack file is still there")
	}
	p.f.Close()
	if err := os.Remove(p.f.Name()); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Get(ctx, id); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("get of a chunk whose pack is gone: %v, want ErrCorrupt", err)
	}
	if ok, _ := s.Has(ctx, id); ok {
		t.Fatal("a chunk whose pack is gone stays in the index")
	}
}
