package chunkstore

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// mountTmpfs mounts a tmpfs of the given size (like "32m") on a new
// directory, or skips the test when that is not possible (not root).
func mountTmpfs(t *testing.T, size string) string {
	t.Helper()
	mnt := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size="+size, "tmpfs", mnt).CombinedOutput(); err != nil {
		t.Skipf("needs a small tmpfs (run as root): mount: %v %s", err, out)
	}
	// Lazy: an abandoned index open may still hold files there.
	t.Cleanup(func() { exec.Command("umount", "-l", mnt).Run() })
	return mnt
}

// fillDisk writes a file until the disk is full.
func fillDisk(t *testing.T, p string) {
	t.Helper()
	f, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 64<<10)
	for {
		if _, err := f.Write(buf); err != nil {
			if !strings.Contains(err.Error(), "no space") {
				t.Fatal(err)
			}
			break
		}
	}
	buf = buf[:512]
	for {
		if _, err := f.Write(buf); err != nil {
			return
		}
	}
}

// countHandler counts log records at Error level and above.
type countHandler struct {
	mu     sync.Mutex
	errors int
	msgs   []string
}

func (h *countHandler) Enabled(context.Context, slog.Level) bool { return true }
func (h *countHandler) Handle(_ context.Context, r slog.Record) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if r.Level >= slog.LevelError {
		h.errors++
		if len(h.msgs) < 20 {
			h.msgs = append(h.msgs, r.Message)
		}
	}
	return nil
}
func (h *countHandler) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h *countHandler) WithGroup(string) slog.Handler      { return h }

func (h *countHandler) count() (int, []string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.errors, append([]string(nil), h.msgs...)
}

// within runs f and fails the test when it does not return within d.
func within(t *testing.T, d time.Duration, what string, f func()) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		f()
	}()
	select {
	case <-done:
	case <-time.After(d):
		t.Fatalf("%s did not return within %v", what, d)
	}
}

func manyIDs(n int) []ID {
	ids := make([]ID, n)
	for i := range ids {
		ids[i] = Sum([]byte{byte(i), byte(i >> 8), byte(i >> 16), 'x'})
	}
	return ids
}

// TestDiskFull fills the filesystem under a store. Before, the index's first
// failed write killed the process (pebble's Fatalf -> os.Exit, or a panic
// rotating its WAL) and Open on the full disk spun for ever. Now writes fail
// with ErrDiskFull, reads go on, Close returns, Open returns within a bound
// (and honours its context), the log stays quiet, and freeing space lets
// writes in again.
func TestDiskFull(t *testing.T) {
	mnt := mountTmpfs(t, "32m")
	dir := filepath.Join(mnt, "store")
	logs := &countHandler{}
	log := slog.New(logs)
	ctx := t.Context()
	s, err := Open(dir, WithLogger(log))
	if err != nil {
		t.Fatal(err)
	}
	r := rand.New(rand.NewPCG(1, 2))
	stored := map[ID][]byte{}
	for range 20 {
		d := randChunk(r, 20000)
		if err := s.Put(ctx, Sum(d), d); err != nil {
			t.Fatal(err)
		}
		stored[Sum(d)] = d
	}
	filler := filepath.Join(mnt, "filler")
	fillDisk(t, filler)

	d := randChunk(r, 20000)
	if err := s.Put(ctx, Sum(d), d); err == nil || !strings.Contains(err.Error(), "free space") {
		t.Fatalf("put on a full disk: %v, want an error that says to free space", err)
	}
	// A large index write: its WAL write hits ENOSPC (before: the process died).
	within(t, time.Minute, "pin on a full disk", func() {
		if err := s.Pin(ctx, "big", manyIDs(100000)); err != nil && !errors.Is(err, ErrDiskFull) {
			t.Errorf("big pin: %v, want success (from the reserve) or ErrDiskFull", err)
		}
	})
	if err := s.Pin(ctx, "small", manyIDs(1)); !errors.Is(err, ErrDiskFull) || !strings.Contains(err.Error(), "free space under "+dir) {
		t.Fatalf("pin once the disk is full: %v, want ErrDiskFull saying where to free space", err)
	}
	if err := s.Put(ctx, Sum(d), d); !errors.Is(err, ErrDiskFull) {
		t.Fatalf("put once the disk is full: %v, want ErrDiskFull", err)
	}
	if _, err := s.PutManifest(ctx, &Manifest{Chunking: DefaultCDC, Format: FormatRaw}); !errors.Is(err, ErrDiskFull) {
		t.Fatalf("put manifest once the disk is full: %v, want ErrDiskFull", err)
	}
	for id, want := range stored {
		got, err := s.Get(ctx, id)
		if err != nil || string(got) != string(want) {
			t.Fatalf("read a stored chunk on a full disk: %v", err)
		}
	}
	if err := s.Unpin(ctx, "big"); err != nil {
		t.Fatalf("unpin (frees space) on a full disk: %v", err)
	}
	within(t, time.Minute, "close on a full disk", func() { s.Close() })

	// Reopen on the full disk: within a bound, an error or a store that reads.
	within(t, time.Minute, "open on a full disk", func() {
		octx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		s, err := OpenContext(octx, dir, WithLogger(log))
		if err != nil {
			if !errors.Is(err, ErrDiskFull) {
				t.Errorf("open on a full disk: %v, want ErrDiskFull", err)
			}
			return
		}
		defer s.Close()
		for id := range stored {
			if _, err := s.Get(ctx, id); err != nil {
				t.Errorf("read after reopening on a full disk: %v", err)
			}
		}
		fillDisk(t, filler) // what the index gave back at close
		if err := s.Pin(ctx, "small", manyIDs(1)); !errors.Is(err, ErrDiskFull) {
			t.Errorf("pin after reopening on a full disk: %v, want ErrDiskFull", err)
		}
	})
	// Cancelling the context ends Open at once.
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := OpenContext(cctx, dir, WithLogger(log)); !errors.Is(err, context.Canceled) {
		t.Fatalf("open with a cancelled context: %v, want context.Canceled", err)
	}

	// Freeing space lets writes in again.
	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	within(t, time.Minute, "open after freeing space", func() {
		s, err := Open(dir, WithLogger(log))
		if err != nil {
			t.Errorf("open after freeing space: %v", err)
			return
		}
		defer s.Close()
		if err := s.Put(ctx, Sum(d), d); err != nil {
			t.Errorf("put after freeing space: %v", err)
		}
	})
	if n, msgs := logs.count(); n > 40 {
		t.Fatalf("%d error records logged (want a rate-limited few), first: %q", n, msgs)
	}
}

// TestOpenOnFullDisk: pebble's open replays the WAL and must flush it, on a
// full disk. With the reserve there it uses the reserve and opens (reads
// work, new data is refused); without, OpenContext returns ErrDiskFull
// within a bound instead of spinning for ever (before: Open never returned,
// at 100% CPU and ~1 MB/s of log).
func TestOpenOnFullDisk(t *testing.T) {
	for _, reserve := range []bool{true, false} {
		t.Run(fmt.Sprintf("reserve=%v", reserve), func(t *testing.T) {
			mnt := mountTmpfs(t, "32m")
			dir := filepath.Join(mnt, "store")
			ctx := t.Context()
			s, err := Open(dir)
			if err != nil {
				t.Fatal(err)
			}
			d := randChunk(rand.New(rand.NewPCG(3, 4)), 30000)
			if err := s.Put(ctx, Sum(d), d); err != nil {
				t.Fatal(err)
			}
			if err := s.Pin(ctx, "p", manyIDs(20000)); err != nil { // ~1.6 MB in the WAL, not flushed
				t.Fatal(err)
			}
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			if !reserve {
				if err := os.Remove(filepath.Join(dir, ballastName)); err != nil {
					t.Fatal(err)
				}
			}
			fillDisk(t, filepath.Join(mnt, "filler"))
			logs := &countHandler{}
			start := time.Now()
			within(t, time.Minute, "open on a full disk", func() {
				octx, cancel := context.WithTimeout(ctx, 45*time.Second)
				defer cancel()
				s, err := OpenContext(octx, dir, WithLogger(slog.New(logs)))
				if !reserve {
					if !errors.Is(err, ErrDiskFull) {
						t.Errorf("open without a reserve: %v, want ErrDiskFull", err)
					}
					if err == nil {
						s.Close()
					}
					return
				}
				if err != nil {
					t.Errorf("open with the reserve: %v", err)
					return
				}
				defer s.Close()
				_, err = os.Stat(filepath.Join(dir, ballastName))
				t.Logf("reserve used by the open: %v", err != nil)
				if got, err := s.Get(ctx, Sum(d)); err != nil || string(got) != string(d) {
					t.Errorf("read on a full disk: %v", err)
				}
				fillDisk(t, filepath.Join(mnt, "filler")) // what the index gave back
				if err := s.Pin(ctx, "q", manyIDs(1)); !errors.Is(err, ErrDiskFull) {
					t.Errorf("pin on a full disk: %v, want ErrDiskFull", err)
				}
			})
			t.Logf("open returned after %v", time.Since(start))
			if n, msgs := logs.count(); n > 20 {
				t.Fatalf("%d error records logged, first: %q", n, msgs)
			}
		})
	}
}

// freeBytes is the space free for unprivileged use under p.
func freeBytes(t *testing.T, p string) int64 {
	t.Helper()
	var st unix.Statfs_t
	if err := unix.Statfs(p, &st); err != nil {
		t.Fatal(err)
	}
	return int64(st.Bavail) * st.Frsize
}

// freeUp shrinks the filler file by n bytes.
func freeUp(t *testing.T, filler string, n int64) {
	t.Helper()
	fi, err := os.Stat(filler)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(filler, max(0, fi.Size()-n)); err != nil {
		t.Fatal(err)
	}
}

// TestCompactionKeepsDiskReserve: compaction writes the live entries of a
// pack before it frees the pack, so on a nearly full disk it must not take
// the space the reserve keeps free for the index: it stops with ErrDiskFull,
// reads go on, and once there is room it compacts. Before, it wrote its
// copies into the last free bytes.
func TestCompactionKeepsDiskReserve(t *testing.T) {
	mnt := mountTmpfs(t, "32m")
	dir := filepath.Join(mnt, "store")
	ctx := t.Context()
	s := openT(t, dir)
	ids := putRandom(t, s, rand.New(rand.NewPCG(5, 5)), 40, 64<<10) // one pack
	s.evictLock.Lock()
	_, err := s.deleteLocked(ctx, ids[12:], false) // no compaction yet
	s.evictLock.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	keep := ids[:12]
	live := s.Usage().StoredBytes
	filler := filepath.Join(mnt, "filler")
	fillDisk(t, filler)
	// More than the reserve's worth free, but not for the copies too.
	freeUp(t, filler, s.h.want+live/2)
	before := freeBytes(t, mnt)
	if _, err := s.Compact(ctx); !errors.Is(err, ErrDiskFull) {
		t.Fatalf("compaction on a nearly full disk: %v, want ErrDiskFull", err)
	}
	if now := freeBytes(t, mnt); now < before-(64<<10) {
		t.Fatalf("the refused compaction took %d bytes of the last %d free", before-now, before)
	}
	for _, id := range keep {
		if got, err := s.Get(ctx, id); err != nil || !id.Verify(got) {
			t.Fatalf("read while compaction is refused: %v", err)
		}
	}
	// A delete stands although its compaction is postponed.
	if err := s.Delete(ctx, keep[11]); err != nil {
		t.Fatalf("delete on a nearly full disk: %v", err)
	}
	keep = keep[:11]
	freeUp(t, filler, 2*live)
	n, err := s.Compact(ctx)
	if err != nil || n == 0 {
		t.Fatalf("compaction once there is room: %d bytes reclaimed, %v", n, err)
	}
	for _, id := range keep {
		if got, err := s.Get(ctx, id); err != nil || !id.Verify(got) {
			t.Fatalf("read after compaction: %v", err)
		}
	}
}
