package main

import (
	"bytes"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
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
	logs *bytes.Buffer
}

func startSocketActivated(t *testing.T, data string, sock *os.File, notify string) *sdDaemon {
	t.Helper()
	args := []string{"-c", `LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=nbd exec "$@"`, "sh",
		hoardBin, "--data-dir", data, "daemon", "--api-listen", "127.0.0.1:0",
		// Not the socket systemd passes: the daemon must use fd 3, not listen here.
		"--nbd-socket", filepath.Join(data, "unused.sock")}
	d := &sdDaemon{cmd: exec.Command("sh", args...), done: make(chan error, 1), logs: &bytes.Buffer{}}
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
