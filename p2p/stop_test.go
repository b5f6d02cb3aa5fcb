//go:build unix

package p2p

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
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

// TestRealStoppedHolderFailover: one of two holders is SIGSTOPped (its
// connection stays up, nothing answers). Single-chunk reads fail over to the
// other holder: the first after the hedge delay, the rest at once, since the
// stalled peer is asked last for a while; not 1 s each, nor the old 10 s.
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
	if err := proc.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	all := NewBitmap(len(img.chunks))
	for i := range img.chunks {
		all.Set(i)
	}
	haves := map[peer.ID]Bitmap{ai.ID: all, healthy.ID(): all}
	// Make the stopped holder the one picked first.
	a.addLoad(healthy.ID(), 1)
	defer a.addLoad(healthy.ID(), -1)
	start := time.Now()
	for i := range img.chunks {
		rstart := time.Now()
		n := 0
		missing, err := a.FetchFrom(ctx, img.id, img.wants()[i:i+1], haves, 1, func(Chunk) error { n++; return nil })
		if err != nil || len(missing) > 0 || n != 1 {
			t.Fatalf("read %d: %d chunks, missing %v, %v", i, n, missing, err)
		}
		if d := time.Since(rstart); d > 5*time.Second {
			t.Fatalf("read %d took %v with a healthy second holder", i, d)
		}
	}
	total := time.Since(start)
	t.Logf("%d single-chunk reads with one of two holders stopped: %v", len(img.chunks), total)
	// The hedge delay (1 s) once, plus slack for a loaded machine; the old
	// code paid the hedge delay on every read (8 s).
	if total > 4*time.Second {
		t.Fatalf("%d reads took %v: the stopped holder was asked first again and again", len(img.chunks), total)
	}
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
	if err := proc.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
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
