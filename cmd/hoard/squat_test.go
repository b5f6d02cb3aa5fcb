package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestCLIKeepsTokenFromPortSquatter: user nobody holds the API port that a
// data dir's api.addr names (a crashed daemon left it, or the daemon is not
// up yet). The CLI, run by root on that data dir, refuses to send the
// root-equivalent token there, and says why; the squatter never sees it.
// (It used to arrive on the first request, /healthz.)
func TestCLIKeepsTokenFromPortSquatter(t *testing.T) {
	t.Parallel()
	if os.Geteuid() != 0 {
		t.Skip("needs root (to run a squatter as nobody)")
	}
	runuser, err := exec.LookPath("runuser")
	if err != nil {
		t.Skip("runuser not installed (util-linux)")
	}
	py, err := exec.LookPath("/usr/bin/python3") // not a per-user shim nobody cannot run
	if err != nil {
		t.Skip("python3 not installed")
	}
	if out, err := exec.Command(runuser, "-u", "nobody", "--", "true").CombinedOutput(); err != nil {
		t.Skipf("runuser -u nobody does not work here: %v %s", err, out)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()

	data := t.TempDir()
	const secret = "0123456789abcdef-the-root-equivalent-token"
	if err := os.WriteFile(filepath.Join(data, "api.token"), []byte(secret+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(data, "api.addr"), []byte(addr+"\n"), 0o640); err != nil {
		t.Fatal(err)
	}

	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	script := fmt.Sprintf(`
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        print("AUTH", self.headers.get("Authorization"), flush=True)
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok\n")
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", %d), H).serve_forever()
`, port)
	squat := exec.CommandContext(ctx, runuser, "-u", "nobody", "--", py, "-c", script)
	var seen syncBuffer
	squat.Stdout, squat.Stderr = &seen, &seen
	// runuser forks python: kill the whole group, and do not wait for the
	// output pipe longer than a moment.
	squat.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	squat.Cancel = func() error { return syscall.Kill(-squat.Process.Pid, syscall.SIGKILL) }
	squat.WaitDelay = 2 * time.Second
	if err := squat.Start(); err != nil {
		t.Fatal(err)
	}
	stop := func() { syscall.Kill(-squat.Process.Pid, syscall.SIGKILL); squat.Wait() }
	defer stop()
	eventually(t, 20*time.Second, func() bool {
		c, err := net.Dial("tcp", addr)
		if err == nil {
			c.Close()
		}
		return err == nil
	}, "the squatter never listened on %s: %s", addr, &seen)

	_, stderr, err := hoard(t, data, nil, "status")
	if err == nil || !strings.Contains(stderr, "refusing to send it the token") {
		t.Errorf("hoard status against a squatted API port: %v, want a refusal naming the reason\n%s", err, stderr)
	}
	hoard(t, data, nil, "image", "ls") // a command that falls back to the store must not leak it either
	stop()
	if strings.Contains(seen.String(), secret) {
		t.Fatalf("the squatter (user nobody) received the API token:\n%s", seen.String())
	}
}
