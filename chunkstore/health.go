package chunkstore

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/vfs"
	"golang.org/x/sys/unix"
	"golang.org/x/time/rate"
)

// The store's health: what keeps a full disk, a failed index or a deleted
// directory from killing the process or silently losing writes.
//
// pebble treats a failed WAL write as fatal: it calls Logger.Fatalf (which
// by default exits the process), or panics while rotating its log, and it
// retries a failed flush in a tight loop (at open too, which then never
// returns). So the index must never run out of space: the store keeps a
// reserve file (the ballast, see doc.go) on the same filesystem, and when the
// index hits ENOSPC the ballast is deleted so the index can finish what it
// was doing, and the store refuses new chunks, manifests and pins with
// ErrDiskFull until space is freed. Fatalf only marks the store failed.

// ballastName is the reserve file in the store's directory.
const ballastName = "reserve"

// ballastSize is the reserve for a filesystem of total bytes: 1/16 of it,
// between 2 MiB and 64 MiB (a few memtables' worth: a flush, a WAL and a
// manifest rotation). New data is refused once free space falls below the
// same amount again, so the index normally never needs the reserve.
func ballastSize(total int64) int64 { return min(64<<20, max(2<<20, total/16)) }

type health struct {
	dir  string
	log  *slog.Logger
	lim  *rate.Limiter
	dirs []dirID // directories that must stay where Open found them

	mu         sync.Mutex
	failed     error // permanent: writes fail with it until the store is reopened
	full       bool  // disk full: growth refused until space returns
	stalled    bool  // pebble stalls writes (its flushes cannot finish)
	ballast    int64 // size of the reserve file while it exists, 0 when released
	want       int64 // the reserve's target size, and the free space kept
	lastCheck  time.Time
	lastAvail  int64
	backoff    time.Duration
	suppressed int
	opening    chan struct{} // closed when Open hits ENOSPC with no reserve left
	openingHit bool
}

type dirID struct {
	path     string
	dev, ino uint64
}

func newHealth(dir string, log *slog.Logger) *health {
	return &health{dir: dir, log: log, lim: rate.NewLimiter(rate.Every(10*time.Second), 5),
		opening: make(chan struct{})}
}

// logError logs an error at most about once every 10 s (after a burst of 5),
// saying how many were suppressed: pebble retries failed background work
// in a loop, and a full disk once wrote ~1 MB/s of log.
func (h *health) logError(msg string, args ...any) {
	h.mu.Lock()
	if !h.lim.Allow() {
		h.suppressed++
		h.mu.Unlock()
		return
	}
	if h.suppressed > 0 {
		args = append(args, "suppressed_since_last", h.suppressed)
		h.suppressed = 0
	}
	h.mu.Unlock()
	h.log.Error(msg, append(args, "component", "pebble")...)
}

// fail puts the store in a failed state: every write fails with err (the
// first one recorded) until the store is reopened. Reads go on.
func (h *health) fail(err error) {
	h.mu.Lock()
	first := h.failed == nil
	if first {
		h.failed = err
	}
	h.mu.Unlock()
	if first {
		h.log.Error("chunk store failed; writes are refused until restart", "err", err)
	}
}

func (h *health) fullError() error {
	return fmt.Errorf("%w: the disk holding the data dir is full; free space under %s or lower store.quota", ErrDiskFull, h.dir)
}

// ensureBallast creates the reserve file if it is missing or short. On a
// disk too full to hold it, the store starts in the disk-full state.
func (h *health) ensureBallast() {
	var st unix.Statfs_t
	if err := unix.Statfs(h.dir, &st); err != nil {
		return
	}
	h.want = ballastSize(int64(st.Blocks) * st.Frsize)
	p := filepath.Join(h.dir, ballastName)
	if err := makeBallast(p, h.want); err != nil {
		if errors.Is(err, unix.ENOSPC) {
			h.full = true
		} else {
			h.log.Warn("cannot create the disk reserve file; a full disk may stop the index", "path", p, "err", err)
		}
		return
	}
	h.ballast = h.want
}

func makeBallast(p string, size int64) error {
	f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return err
	}
	if fi, err := f.Stat(); err == nil && fi.Size() >= size {
		return f.Close()
	}
	err = unix.Fallocate(int(f.Fd()), 0, 0, size)
	if errors.Is(err, unix.EOPNOTSUPP) {
		zero := make([]byte, 1<<20)
		err = nil
		for off := int64(0); off < size && err == nil; off += int64(len(zero)) {
			_, err = f.WriteAt(zero[:min(int64(len(zero)), size-off)], off)
		}
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(p)
	}
	return err
}

// onDiskFull runs when the index hits ENOSPC (vfs.OnDiskFull blocks the
// index's writes meanwhile and retries the failed one once afterwards).
func (h *health) onDiskFull() {
	h.mu.Lock()
	h.full = true
	had := h.ballast > 0
	h.ballast = 0
	if !had && !h.openingHit {
		h.openingHit = true
		close(h.opening)
	}
	h.backoff = min(2*time.Second, max(50*time.Millisecond, 2*h.backoff))
	wait := h.backoff
	h.mu.Unlock()
	if had {
		os.Remove(filepath.Join(h.dir, ballastName))
		h.log.Warn("disk full: released the disk reserve so the index can finish its writes; new chunks are refused until space is freed",
			"dir", h.dir)
		return
	}
	// Nothing left to release. pebble retries a failed flush at once, for
	// ever: waiting here (its writes are blocked meanwhile) turns that spin
	// into a few retries a second.
	h.logError("disk full and the disk reserve is used up; free space under the data dir", "dir", h.dir)
	time.Sleep(wait)
}

// writable returns the error a write must fail with, if any: a permanent
// failure, a lost directory, or a full disk (for a write that adds data:
// grow; for others only while pebble stalls writes, which would hang them).
// It rechecks the directories at most every 100 ms, and free space on every
// call (one statfs, well under a microsecond: anything else, the disk can be
// filled by another process in between).
func (h *health) writable(grow bool) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.failed != nil {
		return h.failed
	}
	now := time.Now()
	if now.Sub(h.lastCheck) >= 100*time.Millisecond {
		h.lastCheck = now
		for _, d := range h.dirs {
			if err := d.check(); err != nil {
				h.failed = err
				h.log.Error("chunk store failed; writes are refused until restart", "err", err)
				return err
			}
		}
	}
	if grow || h.full {
		h.checkSpaceLocked()
	}
	if h.full && (grow || h.stalled) {
		return h.fullError()
	}
	return nil
}

// room is writable(true) for a write of n bytes that must also leave the
// reserve's worth of space free (compaction's copies: they are written
// before the space they free is given back).
func (h *health) room(n int64) error {
	if err := h.writable(true); err != nil {
		return err
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.want > 0 && h.lastAvail-n < h.want {
		return fmt.Errorf("%w (%d bytes to write, %d free)", h.fullError(), n, h.lastAvail)
	}
	return nil
}

// checkSpaceLocked enters the disk-full state when free space falls below
// the reserve's size, and leaves it (recreating the reserve if it was used)
// once there is twice that.
func (h *health) checkSpaceLocked() {
	if h.want == 0 {
		return
	}
	var st unix.Statfs_t
	if err := unix.Statfs(h.dir, &st); err != nil {
		return
	}
	avail := int64(st.Bavail) * st.Frsize
	h.lastAvail = avail
	switch {
	case !h.full && avail < h.want:
		h.full = true
		h.log.Warn("disk nearly full: the chunk store refuses new data until space is freed", "dir", h.dir, "free_bytes", avail)
	case h.full && avail >= 2*h.want+h.want-h.ballast:
		if h.ballast == 0 {
			if err := makeBallast(filepath.Join(h.dir, ballastName), h.want); err != nil {
				return
			}
			h.ballast = h.want
		}
		h.full, h.backoff = false, 0
		h.log.Info("disk space recovered; the chunk store accepts writes again", "dir", h.dir)
	}
}

func statDir(p string) (dirID, error) {
	fi, err := os.Stat(p)
	if err != nil {
		return dirID{}, err
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return dirID{path: p}, nil
	}
	return dirID{path: p, dev: uint64(st.Dev), ino: uint64(st.Ino)}, nil
}

// check fails when the directory is gone or replaced: the store's open files
// are then unlinked, and whatever it writes is lost at restart.
func (d dirID) check() error {
	now, err := statDir(d.path)
	if err == nil && now == d {
		return nil
	}
	return fmt.Errorf("%w: %s was deleted or replaced while the store was open, so new writes would be lost; restart the daemon (what was written since is gone; see hoard store verify)",
		ErrFailed, d.path)
}

// quietLogger is pebble's logger: info is dropped, errors are rate-limited,
// and Fatalf fails the store instead of exiting the process.
type quietLogger struct{ h *health }

func (l quietLogger) Infof(string, ...any) {}
func (l quietLogger) Errorf(format string, args ...any) {
	l.h.logError(fmt.Sprintf(format, args...))
}
func (l quietLogger) Fatalf(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	if strings.Contains(msg, "no space left") {
		l.h.fail(fmt.Errorf("%w: free space under %s or lower store.quota, then restart the daemon (index: %s)", ErrDiskFull, l.h.dir, msg))
		return
	}
	l.h.fail(fmt.Errorf("%w: index: %s; restart the daemon", ErrFailed, msg))
}

// pebbleHooks wires the index's file system and events to h.
func (h *health) pebbleHooks(o *pebble.Options) {
	o.FS = vfs.OnDiskFull(vfs.Default, h.onDiskFull)
	o.Logger = quietLogger{h}
	o.EventListener = &pebble.EventListener{
		BackgroundError: func(err error) { h.logError("index background error", "err", err) },
		WriteStallBegin: func(pebble.WriteStallBeginInfo) {
			h.mu.Lock()
			h.stalled = true
			h.mu.Unlock()
		},
		WriteStallEnd: func() {
			h.mu.Lock()
			h.stalled = false
			h.mu.Unlock()
		},
		DiskSlow: func(info pebble.DiskSlowInfo) {
			h.logError("index disk slow", "path", info.Path, "duration", info.Duration)
		},
	}
}
