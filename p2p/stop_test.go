//go:build unix

package p2p

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"
)

// stoppedImage is the image the holder process serves.
func stoppedImage(t testing.TB) *testImage { return newTestImage(t, 8, 64<<10, 31) }

// TestHelperHolderProcess is not a test: TestRealStoppedHolderFailover runs
// the test binary again with HOARD_P2P_HOLDER_KEY set to make it a holder
// process it can SIGSTOP.
func TestHelperHolderProcess(t *testing.T) {
	key := os.Getenv("HOARD_P2P_HOLDER_KEY")
	if key == "" {
		t.Skip("a helper process for TestRealStoppedHolderFailover")
	}
	k, err := DecodeSwarmKey([]byte(key))
	if err != nil {
		t.Fatal(err)
	}
	p := realPeer(t, WithSwarmKey(k), WithBackend(&fakeBackend{img: stoppedImage(t)}))
	fmt.Println("ADDR", p.Addrs()[0])
	bufio.NewReader(os.Stdin).ReadString('\n') // until the parent goes
}

// holderProcess starts the test binary as a holder process (see
// TestHelperHolderProcess) on swarm key keyText and returns its address and
// the process, which the test's cleanup ends (SIGCONT first).
func holderProcess(t *testing.T, ctx context.Context, keyText []byte) (peer.AddrInfo, *os.Process) {
	t.Helper()
	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^TestHelperHolderProcess$")
	cmd.Env = append(os.Environ(), "HOARD_P2P_HOLDER_KEY="+string(keyText))
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGCONT)
		stdin.Close()
		cmd.Process.Kill()
		cmd.Wait()
	})
	sc := bufio.NewScanner(out)
	var addr string
	for addr == "" && sc.Scan() {
		addr, _ = strings.CutPrefix(sc.Text(), "ADDR ")
	}
	ai, err := peer.AddrInfoFromString(addr)
	if err != nil {
		t.Fatalf("holder process said %q: %v", addr, err)
	}
	return *ai, cmd.Process
}

// stopHolder SIGSTOPs the holder process and returns once every thread of it
// has stopped. kill(2) returns as soon as the signal is queued: one thread is
// woken to stop the others, and on a busy machine the rest run on meanwhile,
// long enough to answer a request sent just after (the holder then was not
// stopped for the read the test meant to stall). It skips the test where
// there is no /proc to tell.
func stopHolder(t *testing.T, proc *os.Process) {
	t.Helper()
	tasks := fmt.Sprintf("/proc/%d/task", proc.Pid)
	if _, err := os.Stat(tasks); err != nil {
		t.Skipf("cannot tell when the holder process has stopped: %v", err)
	}
	if err := proc.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	eventually(t, 20*time.Second, "every thread of the holder process to stop", func() bool { return allStopped(t, tasks) })
}

// allStopped reports whether every thread under tasks (/proc/PID/task) is in
// the stopped state (or gone).
func allStopped(t *testing.T, tasks string) bool {
	t.Helper()
	stats, err := filepath.Glob(filepath.Join(tasks, "*", "stat"))
	if err != nil || len(stats) == 0 {
		t.Fatalf("threads of the holder process: %v (%d found)", err, len(stats))
	}
	for _, f := range stats {
		b, err := os.ReadFile(f)
		if err != nil {
			continue // the thread exited
		}
		// "pid (comm) S ...": the state follows the last ')'.
		i := strings.LastIndexByte(string(b), ')')
		if i < 0 || i+2 >= len(b) {
			t.Fatalf("%s: %q", f, b)
		}
		switch b[i+2] {
		case 'T', 't', 'Z', 'X':
		default:
			return false
		}
	}
	return true
}

// TestRealStopHolderStopsEveryThread: stopHolder returns with the holder
// process stopped, not merely signalled (the holder answered a read right
// after the signal, on a busy machine, when the tests only sent SIGSTOP).
func TestRealStopHolderStopsEveryThread(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	_, proc := holderProcess(t, ctx, GenerateSwarmKey())
	tasks := fmt.Sprintf("/proc/%d/task", proc.Pid)
	for i := range 10 {
		stopHolder(t, proc)
		if !allStopped(t, tasks) {
			t.Fatalf("stop %d: stopHolder returned with a thread of the holder still running", i)
		}
		if err := proc.Signal(syscall.SIGCONT); err != nil {
			t.Fatal(err)
		}
		eventually(t, 20*time.Second, "the holder process to run again", func() bool { return !allStopped(t, tasks) })
	}
}

// TestRealStoppedHolderFailover: one of two holders is SIGSTOPped (its
// connection stays up, nothing answers). Single-chunk reads fail over to the
// other holder: the first after the hedge delay, the rest at once, since the
// stalled peer is asked last for a while; not 1 s each, nor the old 10 s.
// It checks whom each read asks first, not the wall-clock total: on a busy
// machine any read may be slow.
func TestRealStoppedHolderFailover(t *testing.T) {
	t.Parallel()
	img := stoppedImage(t)
	keyText := GenerateSwarmKey()
	key, _ := DecodeSwarmKey(keyText)
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	ai, proc := holderProcess(t, ctx, keyText)
	a := realPeer(t, WithSwarmKey(key))
	healthy := realPeer(t, WithSwarmKey(key), WithBackend(&fakeBackend{img: img}))
	for _, to := range []peer.AddrInfo{ai, info(healthy)} {
		if err := a.host.Connect(ctx, to); err != nil {
			t.Fatal(err)
		}
	}
	// A stream to the holder is open and warm when it stops.
	if _, err := a.Fetch(ctx, ai.ID, img.id, img.wants()[:1], false, func(Chunk) error { return nil }); err != nil {
		t.Fatal(err)
	}
	stopHolder(t, proc)
	all := NewBitmap(len(img.chunks))
	for i := range img.chunks {
		all.Set(i)
	}
	haves := map[peer.ID]Bitmap{ai.ID: all, healthy.ID(): all}
	// Make the stopped holder the one picked first.
	a.addLoad(healthy.ID(), 1)
	defer a.addLoad(healthy.ID(), -1)
	name := map[peer.ID]string{ai.ID: "stopped", healthy.ID(): "healthy"}
	type ask struct {
		peer  peer.ID
		hedge bool
	}
	describe := func(as []ask) string {
		var out []string
		for _, x := range as {
			if x.hedge {
				out = append(out, name[x.peer]+" (hedge)")
			} else {
				out = append(out, name[x.peer])
			}
		}
		return "[" + strings.Join(out, ", ") + "]"
	}
	var asks []ask // this read's, in order (FetchFrom calls launched on this goroutine)
	a.launched = func(id peer.ID, hedge bool) { asks = append(asks, ask{id, hedge}) }
	start := time.Now()
	for i := range img.chunks {
		asks = asks[:0]
		rstart := time.Now()
		n := 0
		missing, err := a.FetchFrom(ctx, img.id, img.wants()[i:i+1], haves, 1, func(c Chunk) error {
			n++
			if c.From != healthy.ID() {
				t.Errorf("read %d: chunk from %s, want the healthy holder", i, c.From)
			}
			return nil
		})
		d := time.Since(rstart)
		if err != nil || len(missing) > 0 || n != 1 {
			t.Fatalf("read %d: %d chunks, missing %v, %v", i, n, missing, err)
		}
		t.Logf("read %d: %v, asked %v", i, d, describe(asks))
		if len(asks) == 0 || asks[0].hedge {
			t.Fatalf("read %d asked %v", i, describe(asks))
		}
		// The first read asks the stopped holder (the healthy one has a
		// request out) and gets the chunk from the hedge: the stopped
		// holder is then asked last; every later read asks the healthy
		// holder first (a hedge to the stopped one is fine: the machine may
		// be too busy to deliver within the hedge delay).
		want := healthy.ID()
		if i == 0 {
			want = ai.ID
		}
		if asks[0].peer != want {
			t.Fatalf("read %d asked the %s holder first, want the %s one (asked %v): the stopped holder is not asked last", i, name[asks[0].peer], name[want], describe(asks))
		}
		if !a.Slow(ai.ID) {
			t.Fatalf("after read %d the stopped holder is not marked slow", i)
		}
		if a.Slow(healthy.ID()) {
			t.Fatalf("after read %d the healthy holder is marked slow", i)
		}
		if d > 5*time.Second {
			t.Fatalf("read %d took %v with a healthy second holder", i, d)
		}
	}
	t.Logf("%d single-chunk reads with one of two holders stopped: %v", len(img.chunks), time.Since(start))
}

// TestRealStoppedOnlyHolder: when the only holder is SIGSTOPped, the first
// read gives up after the stall timeout; later reads, once it is known to
// stall, after the hedge delay (the caller then goes to the designated
// fetcher or the origin), not the stall timeout each time.
func TestRealStoppedOnlyHolder(t *testing.T) {
	t.Parallel()
	img := stoppedImage(t)
	keyText := GenerateSwarmKey()
	key, _ := DecodeSwarmKey(keyText)
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	ai, proc := holderProcess(t, ctx, keyText)
	const hedge, stall = 300 * time.Millisecond, 4 * time.Second
	a := realPeer(t, WithSwarmKey(key), WithHedging(hedge, stall))
	if err := a.host.Connect(ctx, ai); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Fetch(ctx, ai.ID, img.id, img.wants()[:1], false, func(Chunk) error { return nil }); err != nil {
		t.Fatal(err)
	}
	stopHolder(t, proc)
	all := NewBitmap(len(img.chunks))
	for i := range img.chunks {
		all.Set(i)
	}
	haves := map[peer.ID]Bitmap{ai.ID: all}
	for i := range 4 {
		start := time.Now()
		missing, err := a.FetchFrom(ctx, img.id, img.wants()[i:i+1], haves, 1, func(Chunk) error { return nil })
		d := time.Since(start)
		if err != nil || len(missing) != 1 {
			t.Fatalf("read %d from a stopped holder: missing %v, %v", i, missing, err)
		}
		t.Logf("read %d: gave up after %v", i, d)
		if i > 0 && d > stall/2 {
			t.Fatalf("read %d waited %v for a holder known to stall (stall timeout %v)", i, d, stall)
		}
	}
	if !a.Slow(ai.ID) {
		t.Fatal("the stopped holder is not reported slow")
	}
}
