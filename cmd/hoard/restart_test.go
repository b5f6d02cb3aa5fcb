package main

import (
	"bytes"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// sdDaemon is one `hoard daemon` started as systemd starts a socket-activated
// service: the NBD listener as fd 3, LISTEN_PID/LISTEN_FDS/LISTEN_FDNAMES set
// (by a shell, since LISTEN_PID must be the daemon's own pid) and
// NOTIFY_SOCKET pointing at notify.
type sdDaemon struct {
	cmd  *exec.Cmd
	done chan error
	logs *syncBuffer
}

func startSocketActivated(t *testing.T, data string, sock *os.File, notify string) *sdDaemon {
	t.Helper()
	args := []string{"-c", `LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=nbd exec "$@"`, "sh",
		hoardBin, "--data-dir", data, "daemon", "--api-listen", "127.0.0.1:0",
		// Not the socket systemd passes: the daemon must use fd 3, not listen here.
		"--nbd-socket", filepath.Join(data, "unused.sock")}
	d := &sdDaemon{cmd: exec.Command("sh", args...), done: make(chan error, 1), logs: &syncBuffer{}}
	d.cmd.Env = append(os.Environ(), "NOTIFY_SOCKET="+notify)
	d.cmd.ExtraFiles = []*os.File{sock}
	d.cmd.Stderr = d.logs
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { d.done <- d.cmd.Wait() }()
	t.Cleanup(func() {
		d.cmd.Process.Kill()
		<-d.done
	})
	return d
}

// expectNotify waits for a datagram on the notify socket containing want.
func expectNotify(t *testing.T, c *net.UnixConn, want string, d *sdDaemon) {
	t.Helper()
	buf := make([]byte, 4096)
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		n, err := c.Read(buf)
		if err == nil && strings.Contains(string(buf[:n]), want) {
			return
		}
		select {
		case err := <-d.done:
			d.done <- err
			if want != "STOPPING=1" {
				t.Fatalf("daemon exited (%v) before it sent %s\n%s", err, want, d.logs)
			}
		default:
		}
	}
	t.Fatalf("no %s from the daemon in 20s\n%s", want, d.logs)
}

// TestSocketActivation: given the NBD socket by systemd (fd 3), the daemon
// serves on it without touching the socket file, tells systemd READY=1 and
// STOPPING=1, and a client that connects while the daemon is stopped is
// served once it is started again, on the same socket.
func TestSocketActivation(t *testing.T) {
	t.Parallel()
	for _, tool := range []string{"nbdcopy", "sh"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed (apt-get install libnbd-bin)", tool)
		}
	}
	dir := t.TempDir()
	data := filepath.Join(dir, "data")
	img := filepath.Join(dir, "disk.raw")
	want := imageBytes(31, 4<<20)
	if err := os.WriteFile(img, want, 0o644); err != nil {
		t.Fatal(err)
	}
	mustHoard(t, data, nil, "image", "add", img, "--name", "deb")

	sockDir, err := os.MkdirTemp("", "hoard-sd")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	sockPath := filepath.Join(sockDir, "nbd.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: sockPath, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if err := os.Chmod(sockPath, 0o604); err != nil { // systemd's SocketMode; the daemon must keep it
		t.Fatal(err)
	}
	sockFile, err := ln.File()
	if err != nil {
		t.Fatal(err)
	}
	defer sockFile.Close()
	notifyPath := filepath.Join(sockDir, "notify")
	notify, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: notifyPath, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer notify.Close()

	uri := "nbd+unix:///deb?socket=" + sockPath
	copyAndCheck := func(name string, copyCmd *exec.Cmd, d *sdDaemon) {
		t.Helper()
		out, err := copyCmd.CombinedOutput()
		if err != nil {
			t.Fatalf("%s: nbdcopy: %v\n%s\ndaemon:\n%s", name, err, out, d.logs)
		}
		got, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("%s: the export's bytes differ from the image", name)
		}
	}

	d1 := startSocketActivated(t, data, sockFile, notifyPath)
	expectNotify(t, notify, "READY=1", d1)
	copyAndCheck("first.raw", exec.Command("nbdcopy", uri, filepath.Join(dir, "first.raw")), d1)
	if _, err := os.Stat(filepath.Join(data, "unused.sock")); err == nil {
		t.Fatal("the daemon listened on --nbd-socket although systemd passed it a socket")
	}

	d1.cmd.Process.Signal(syscall.SIGTERM)
	expectNotify(t, notify, "STOPPING=1", d1)
	select {
	case err := <-d1.done:
		d1.done <- err
		if err != nil {
			t.Fatalf("daemon exited with %v on SIGTERM\n%s", err, d1.logs)
		}
	case <-time.After(20 * time.Second):
		t.Fatalf("daemon did not stop on SIGTERM\n%s", d1.logs)
	}
	fi, err := os.Stat(sockPath)
	if err != nil {
		t.Fatalf("the daemon removed systemd's socket: %v", err)
	}
	if fi.Mode().Perm() != 0o604 {
		t.Fatalf("socket mode %v after the daemon ran, want systemd's 0604 kept", fi.Mode().Perm())
	}

	// A client connecting while no daemon runs waits in the backlog...
	late := exec.Command("nbdcopy", uri, filepath.Join(dir, "second.raw"))
	var lateOut bytes.Buffer
	late.Stdout, late.Stderr = &lateOut, &lateOut
	if err := late.Start(); err != nil {
		t.Fatal(err)
	}
	lateDone := make(chan error, 1)
	go func() { lateDone <- late.Wait() }()
	select {
	case err := <-lateDone:
		t.Fatalf("nbdcopy ended (%v) with no daemon running\n%s", err, lateOut.String())
	case <-time.After(300 * time.Millisecond):
	}
	// ...and is served by the next daemon.
	d2 := startSocketActivated(t, data, sockFile, notifyPath)
	expectNotify(t, notify, "READY=1", d2)
	select {
	case err := <-lateDone:
		if err != nil {
			t.Fatalf("nbdcopy started while the daemon was stopped: %v\n%s\ndaemon:\n%s", err, lateOut.String(), d2.logs)
		}
	case <-time.After(30 * time.Second):
		late.Process.Kill()
		t.Fatalf("nbdcopy started while the daemon was stopped did not finish\n%s", d2.logs)
	}
	got, err := os.ReadFile(filepath.Join(dir, "second.raw"))
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("the client served after the restart read wrong bytes (err %v)", err)
	}
}

// guestKit builds (or reuses) the test guest and its base image in the cache
// node's boot test uses ($HOARD_GUEST_CACHE, default /tmp/hoard-guest-cache).
func guestKit(t *testing.T) (kdir, base, sum string) {
	t.Helper()
	for _, tool := range []string{"qemu-system-x86_64", "qemu-img", "mkfs.ext4", "cpio"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed (scripts/install-test-deps.sh)", tool)
		}
	}
	scripts, err := filepath.Abs("../../scripts/guest")
	if err != nil {
		t.Fatal(err)
	}
	cache := os.Getenv("HOARD_GUEST_CACHE")
	if cache == "" {
		cache = filepath.Join(os.TempDir(), "hoard-guest-cache")
	}
	kdir = filepath.Join(cache, "kernel")
	if out, err := exec.CommandContext(t.Context(), filepath.Join(scripts, "build-guest.sh"), kdir).CombinedOutput(); err != nil {
		t.Skipf("cannot build the test guest (kernel download needs the Debian mirror): %v\n%s", err, out)
	}
	src := "/usr/lib/python3.11"
	if _, err := os.Stat(src); err != nil {
		src, _ = filepath.Abs("../..")
	}
	base = filepath.Join(cache, "base-256M.raw")
	if _, err := os.Stat(base + ".sha256"); err != nil {
		cmd := exec.CommandContext(t.Context(), filepath.Join(scripts, "make-base-image.sh"), base, "256M", src)
		cmd.Env = append(os.Environ(), "MANIFEST_FILES=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("make-base-image.sh: %v\n%s", err, out)
		}
	}
	b, err := os.ReadFile(base + ".sha256")
	if err != nil {
		t.Fatal(err)
	}
	sum, _, _ = strings.Cut(strings.TrimSpace(string(b)), " ")
	return kdir, base, sum
}

// procDaemon is one `hoard daemon` process.
type procDaemon struct {
	cmd  *exec.Cmd
	done chan error
	logs *syncBuffer
}

func startProcDaemon(t *testing.T, data, sock string, args ...string) *procDaemon {
	t.Helper()
	d := &procDaemon{done: make(chan error, 1), logs: &syncBuffer{}}
	d.cmd = exec.Command(hoardBin, append([]string{"--data-dir", data, "daemon", "--api-listen", "127.0.0.1:0", "--nbd-socket", sock}, args...)...)
	d.cmd.Stderr = d.logs
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { d.done <- d.cmd.Wait() }()
	t.Cleanup(func() {
		d.cmd.Process.Kill()
		<-d.done
		d.done <- nil
	})
	deadline := time.Now().Add(20 * time.Second)
	for {
		// Serving NBD (the socket listens before the store is open, so a
		// dial alone is not enough) and ready: the CLI then finds this
		// daemon's API (not a stale api.addr left by a killed one).
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			if procDaemonReady(data) {
				return d
			}
		}
		select {
		case err := <-d.done:
			d.done <- err
			t.Fatalf("daemon exited: %v\n%s", err, d.logs)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("daemon not serving NBD after 20s\n%s", d.logs)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// procDaemonReady reports whether the daemon on data answers /readyz with 200
// at the address in its api.addr.
func procDaemonReady(data string) bool {
	b, err := os.ReadFile(filepath.Join(data, "api.addr"))
	if err != nil {
		return false
	}
	c := http.Client{Timeout: 2 * time.Second}
	resp, err := c.Get("http://" + strings.TrimSpace(string(b)) + "/readyz")
	if err != nil {
		return false
	}
	resp.Body.Close()
	return resp.StatusCode == http.StatusOK
}

// guestIOError matches what a Linux guest logs when a disk read fails.
var guestIOError = regexp.MustCompile(`(?i)I/O error|critical medium error|blk_update_request|Buffer I/O|EXT4-fs error|HOARD-GUEST-FAIL`)

// TestGuestBootAcrossRestart boots a real guest (qemu TCG) from an overlay
// made by hoard vm overlay, its image added --lazy behind a slow HTTP origin,
// and stops the daemon while the guest reads its files: with SIGTERM, and
// with SIGKILL (a crash), then starts it again on the same data dir. The
// boot finishes with the right checksum and no I/O error in the guest's
// kernel log: QEMU reconnects (the overlay's reconnect-delay) and the new
// daemon serves on.
func TestGuestBootAcrossRestart(t *testing.T) {
	if testing.Short() {
		t.Skip("boots VMs; skipped with -short")
	}
	kdir, base, want := guestKit(t)
	f, err := os.Open(base)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fi, _ := f.Stat()
	var reqs atomic.Int64
	var slow atomic.Bool
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if slow.Load() {
			reqs.Add(1)
			time.Sleep(15 * time.Millisecond)
		}
		// A reader of its own per request: ServeContent seeks.
		http.ServeContent(w, r, "base.raw", fi.ModTime(), io.NewSectionReader(f, 0, fi.Size()))
	}))
	defer srv.Close()

	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGKILL} {
		t.Run(sig.String(), func(t *testing.T) {
			dir := t.TempDir()
			data := filepath.Join(dir, "data")
			sockDir, err := os.MkdirTemp("", "hoard-boot")
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { os.RemoveAll(sockDir) })
			sock := filepath.Join(sockDir, "nbd.sock")
			args := []string{"--origin-allow-loopback"}
			d := startProcDaemon(t, data, sock, args...)
			slow.Store(false)
			mustHoard(t, data, nil, "image", "add", srv.URL+"/base.raw", "--lazy", "--name", "guest")
			ov := filepath.Join(dir, "vm.qcow2")
			mustHoard(t, data, nil, "vm", "overlay", "guest", ov)

			reqs.Store(0)
			slow.Store(true)
			qemu := exec.CommandContext(t.Context(), "qemu-system-x86_64", "-accel", "tcg", "-nographic", "-m", "512",
				"-kernel", filepath.Join(kdir, "vmlinuz"), "-initrd", filepath.Join(kdir, "initrd.gz"),
				"-append", "console=ttyS0 panic=-1 quiet", "-no-reboot", "-nic", "none",
				"-drive", "file="+ov+",if=none,id=d0,format=qcow2", "-device", "nvme,drive=d0,serial=hoard")
			var console syncBuffer
			qemu.Stdout, qemu.Stderr = &console, &console
			qemu.WaitDelay = 5 * time.Second
			if err := qemu.Start(); err != nil {
				t.Fatal(err)
			}
			qdone := make(chan error, 1)
			go func() { qdone <- qemu.Wait() }()
			t.Cleanup(func() { qemu.Process.Kill(); <-qdone; qdone <- nil })

			// Mid-boot: the guest is reading its files and the origin has
			// served some of them.
			deadline := time.Now().Add(3 * time.Minute)
			for !strings.Contains(console.String(), "HOARD-GUEST-START") || reqs.Load() < 10 {
				select {
				case err := <-qdone:
					t.Fatalf("guest ended (%v) before the restart\n%s", err, console.String())
				default:
				}
				if time.Now().After(deadline) {
					t.Fatalf("guest not reading after 3 min\n%s", console.String())
				}
				time.Sleep(10 * time.Millisecond)
			}
			before := reqs.Load()
			d.cmd.Process.Signal(sig)
			select {
			case err := <-d.done:
				d.done <- err
			case <-time.After(30 * time.Second):
				t.Fatalf("daemon did not stop on %v\n%s", sig, d.logs)
			}
			if strings.Contains(console.String(), "HOARD-GUEST-OK") {
				t.Fatal("the guest finished before the daemon stopped: the restart was not mid-boot (origin too fast?)")
			}
			restarted := time.Now()
			d2 := startProcDaemon(t, data, sock, args...)
			t.Logf("%v: daemon serving again %v after it stopped; origin requests before the stop %d", sig, time.Since(restarted).Round(time.Millisecond), before)

			select {
			case <-qdone:
				qdone <- nil
			case <-time.After(4 * time.Minute):
				t.Fatalf("guest did not finish 4 min after the restart\n%s", console.String())
			}
			out := console.String()
			if m := guestIOError.FindString(out); m != "" {
				t.Fatalf("guest logged %q across the %v restart\n%s\ndaemon before the restart:\n%s\ndaemon after:\n%s", m, sig, out, d.logs, d2.logs)
			}
			m := guestOK.FindStringSubmatch(out)
			if m == nil || m[1] != want {
				t.Fatalf("guest checksum %v, want %s\n%s", m, want, out)
			}
			if reqs.Load() == before {
				t.Error("the restarted daemon fetched nothing from the origin: the restart was not mid-boot")
			}
		})
	}
}

var guestOK = regexp.MustCompile(`HOARD-GUEST-OK ([0-9a-f]{64}) (\d+)`)
