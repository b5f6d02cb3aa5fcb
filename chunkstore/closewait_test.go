package chunkstore

import (
	"errors"
	"math/rand/v2"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"
)

// gate blocks the goroutines that reach wait until open is called (or a
// bound passes, so that a failing test cannot hang); entered is closed when
// the first one arrives.
type gate struct {
	entered, release chan struct{}
	once             sync.Once
}

func newGate() *gate { return &gate{entered: make(chan struct{}), release: make(chan struct{})} }

func (g *gate) wait() {
	g.once.Do(func() { close(g.entered) })
	select {
	case <-g.release:
	case <-time.After(30 * time.Second):
	}
}

func (g *gate) open() { close(g.release) }

// waitEntered fails the test unless something reached the gate within d.
func (g *gate) waitEntered(t *testing.T, d time.Duration, what string) {
	t.Helper()
	select {
	case <-g.entered:
	case <-time.After(d):
		t.Fatalf("%s never started", what)
	}
}

// eventually polls cond until it holds or d passes.
func eventually(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v", what, d)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// goroutinesIn counts the goroutines whose stack holds frame.
func goroutinesIn(frame string) int {
	buf := make([]byte, 1<<20)
	return strings.Count(string(buf[:runtime.Stack(buf, true)]), frame)
}

// returnsWithin fails unless ch delivers within d; it returns what it got.
func returnsWithin(t *testing.T, ch <-chan error, d time.Duration, what string) error {
	t.Helper()
	select {
	case err := <-ch:
		return err
	case <-time.After(d):
		t.Fatalf("%s did not return within %v of Close", what, d)
		return nil
	}
}

// Calls waiting for room or for a compaction that another call is running
// (here held up in a slow fsync) give up with ErrClosed as soon as Close
// begins; Close waits only for the call that is running, and returns once
// it ends. Before, these calls did not register with Close and waited on
// plain mutexes: they outlived Close and then used the closed index.
func TestCloseDoesNotWaitForBlockedCalls(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	s, err := Open(t.TempDir(), WithQuota(1<<20))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	r := rand.New(rand.NewPCG(41, 42))
	ids := putRandom(t, s, r, 30, 20000) // 3 entries a pack
	rec, _, _ := s.getRecord(ids[3].digest)
	var mates []ID // the other entries of ids[3]'s pack
	for _, id := range ids {
		if r2, _, _ := s.getRecord(id.digest); r2.pack == rec.pack && id != ids[3] {
			mates = append(mates, id)
		}
	}
	if len(mates) != 2 {
		t.Fatalf("pack of a chunk holds %d others, want 2", len(mates))
	}
	g := newGate()
	s.packs.faults.sync = func(uint32) error { g.wait(); return nil }
	// The running call: a Delete whose compaction copies ids[3] and then
	// waits in the pack fsync.
	running := make(chan error, 1)
	go func() { running <- s.Delete(ctx, mates...) }()
	g.waitEntered(t, 10*time.Second, "the compaction of a delete")

	// Make every commit want room, so that it waits for the compaction.
	s.opts.high, s.opts.low = 0.3, 0.2
	waiting := make(chan error, 3)
	go func() { _, err := s.Compact(ctx); waiting <- err }()
	for range 2 {
		d := randChunk(r, 20000)
		go func() { waiting <- s.Put(ctx, Sum(d), d) }()
	}
	// The delete, the Compact and one Put in compactions; both Puts in makeRoom.
	eventually(t, 10*time.Second, "three calls waiting for room or compaction", func() bool {
		return goroutinesIn("chunkstore.(*Store).compact(") >= 3 && goroutinesIn("chunkstore.(*Store).makeRoom(") >= 2
	})

	closed := make(chan error, 1)
	go func() { closed <- s.Close() }()
	for range 3 {
		if err := returnsWithin(t, waiting, 5*time.Second, "a call waiting for room or compaction"); !errors.Is(err, ErrClosed) {
			t.Errorf("a call waiting when Close began: %v, want ErrClosed", err)
		}
	}
	select {
	case err := <-closed:
		t.Fatalf("Close returned (%v) while a compaction was still running", err)
	default:
	}
	g.open()
	if err := returnsWithin(t, running, 10*time.Second, "the running delete"); err != nil && !errors.Is(err, ErrClosed) {
		t.Errorf("the delete running when Close began: %v", err)
	}
	if err := returnsWithin(t, closed, 10*time.Second, "Close"); err != nil {
		t.Errorf("close: %v", err)
	}
}

// A commit waiting for another commit's claim on the same new chunk gives up
// with ErrClosed when Close begins (before, it waited for the other commit,
// and the other commit had not registered with Close either).
func TestCloseDoesNotWaitForClaimWait(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	s, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	x := randChunk(rand.New(rand.NewPCG(43, 44)), 20000)
	g := newGate()
	s.packs.faults.commit = func() error { g.wait(); return nil }
	claimWaiting := newGate()
	s.packs.faults.claimWait = func([32]byte) { claimWaiting.once.Do(func() { close(claimWaiting.entered) }) }
	first := make(chan error, 1)
	go func() { first <- s.Put(ctx, Sum(x), x) }()
	g.waitEntered(t, 10*time.Second, "the first commit")
	second := make(chan error, 1)
	go func() { second <- s.Put(ctx, Sum(x), x) }()
	claimWaiting.waitEntered(t, 10*time.Second, "the second commit's wait")

	closed := make(chan error, 1)
	go func() { closed <- s.Close() }()
	if err := returnsWithin(t, second, 5*time.Second, "the commit waiting for a claim"); !errors.Is(err, ErrClosed) {
		t.Errorf("the commit waiting when Close began: %v, want ErrClosed", err)
	}
	select {
	case err := <-closed:
		t.Fatalf("Close returned (%v) while a commit was still running", err)
	default:
	}
	g.open()
	if err := returnsWithin(t, first, 10*time.Second, "the running commit"); err != nil {
		t.Errorf("the commit running when Close began: %v", err)
	}
	if err := returnsWithin(t, closed, 10*time.Second, "Close"); err != nil {
		t.Errorf("close: %v", err)
	}
}
