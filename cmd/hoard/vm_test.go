package main

import (
	"bytes"
	"context"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hoardvm/hoard/nbd"
)

// patternExports serves one export, "img", of size bytes of 0x5a, and reports
// the first read on first.
type patternExports struct {
	size  int64
	once  sync.Once
	first chan struct{}
}

type patternExport struct{ e *patternExports }

func (e *patternExports) Open(ctx context.Context, name string) (nbd.Export, error) {
	if name != "img" {
		return nil, nbd.ErrUnknownExport
	}
	return patternExport{e}, nil
}

func (e *patternExports) List(ctx context.Context) ([]nbd.ExportInfo, error) {
	return []nbd.ExportInfo{{Name: "img"}}, nil
}

func (x patternExport) Size() int64  { return x.e.size }
func (x patternExport) Close() error { return nil }
func (x patternExport) ReadAt(ctx context.Context, p []byte, off int64) error {
	copy(p, bytes.Repeat([]byte{0x5a}, len(p)))
	x.e.once.Do(func() { close(x.e.first) })
	return nil
}

// serveNBD serves exp on the unix socket sock until the returned stop is
// called; stop waits for the server to be gone.
func serveNBD(t *testing.T, exp nbd.Exporter, sock string) (stop func()) {
	t.Helper()
	_ = os.Remove(sock)
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- (&nbd.Server{Exporter: exp}).Serve(ctx, ln) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				if err != nil && !errors.Is(err, context.Canceled) && !errors.Is(err, net.ErrClosed) {
					t.Errorf("nbd serve: %v", err)
				}
			case <-time.After(10 * time.Second):
				t.Errorf("nbd server did not stop within 10s")
			}
		})
	}
	t.Cleanup(stop)
	return stop
}

// An overlay made by CreateOverlay keeps working across a restart of the NBD
// server: a read issued while the server is away waits for it (the backing
// carries reconnect-delay) instead of failing with EIO, as it did with the
// plain nbd+unix backing URI.
func TestOverlaySurvivesServerRestart(t *testing.T) {
	t.Parallel()
	needTool(t, "qemu-img")
	qio := needTool(t, "qemu-io")
	dir := t.TempDir()
	sock := filepath.Join(dir, "nbd.sock")
	exp := &patternExports{size: 4 << 20, first: make(chan struct{})}
	stop := serveNBD(t, exp, sock)

	ov := filepath.Join(dir, "vm.qcow2")
	if err := CreateOverlay(t.Context(), "img", "raw", sock, ov); err != nil {
		t.Fatal(err)
	}
	info := runTool(t, "qemu-img", "info", ov)
	if !strings.Contains(info, `"reconnect-delay"`) || !strings.Contains(info, "backing file format: raw") {
		t.Fatalf("qemu-img info does not show a reconnecting raw backing:\n%s", info)
	}

	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	// The second read comes 1.5 s after the first, while the server is away
	// (stopped at the first read, back 3 s later).
	cmd := exec.CommandContext(ctx, qio, "-r",
		"-c", "read -P 0x5a 0 64k",
		"-c", "sleep 1500",
		"-c", "read -P 0x5a 1M 64k",
		ov)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-exp.first:
	case <-ctx.Done():
		t.Fatalf("qemu-io never read from the server")
	}
	stop()
	time.Sleep(3 * time.Second) // the daemon is away: what is measured, not a wait for a condition
	serveNBD(t, exp, sock)
	err := cmd.Wait()
	o := out.String()
	if err != nil || strings.Contains(o, "failed") || strings.Count(o, "read 65536/65536") != 2 {
		t.Fatalf("qemu-io across a server restart: %v\n%s", err, o)
	}
}

// needTool returns the path of a tool the test needs, or skips the test.
func needTool(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		t.Skipf("%s not installed (scripts/install-test-deps.sh installs it): %v", name, err)
	}
	return p
}

// runTool runs a tool the test needs and returns its output.
func runTool(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.CommandContext(t.Context(), needTool(t, name), args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}
