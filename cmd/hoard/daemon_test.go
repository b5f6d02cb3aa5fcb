package main

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// startDaemon runs `hoard daemon` on data (API on a free port, NBD socket in a
// short temp dir) until the test ends; it returns the socket path.
func startDaemon(t *testing.T, data string, env []string, args ...string) string {
	t.Helper()
	sockDir, err := os.MkdirTemp("", "hoard-cli-sock")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	sock := filepath.Join(sockDir, "nbd.sock")
	cmd := exec.Command(hoardBin, append([]string{"--data-dir", data, "daemon", "--api-listen", "127.0.0.1:0", "--nbd-socket", sock}, args...)...)
	cmd.Env = append(os.Environ(), env...)
	var logs bytes.Buffer
	cmd.Stderr = &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Signal(os.Interrupt)
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("daemon exited with %v on SIGINT\n%s", err, logs.String())
			}
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			t.Errorf("daemon did not stop on SIGINT\n%s", logs.String())
		}
	})
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Stat(filepath.Join(data, "api.addr")); err == nil {
			return sock
		}
		select {
		case err := <-done:
			t.Fatalf("daemon exited: %v\n%s", err, logs.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("daemon not ready after 10s\n%s", logs.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestCLIThroughDaemon: while a daemon holds the store, the CLI goes through
// its API (add, ls, inspect, profile, rm), and vm overlay makes a disk whose
// bytes are the image's.
func TestCLIThroughDaemon(t *testing.T) {
	t.Parallel()
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Skip("qemu-img not installed (apt-get install qemu-utils)")
	}
	data := t.TempDir()
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.raw")
	os.WriteFile(img, imageBytes(5, 4<<20), 0o600)
	env := []string{"HOARD_API_TOKEN=s3cret"}
	sock := startDaemon(t, data, env)

	// A relative source path is resolved by the CLI, not the daemon.
	cmd := exec.Command(hoardBin, "--data-dir", data, "image", "add", "disk.raw", "--name", "deb", "--json")
	cmd.Dir, cmd.Env = dir, append(os.Environ(), env...)
	if out, err := cmd.CombinedOutput(); err != nil || !strings.Contains(string(out), `"manifest"`) {
		t.Fatalf("image add through the daemon: %v\n%s", err, out)
	}
	// Without the token the daemon refuses.
	if _, stderr, err := hoard(t, data, nil, "image", "ls"); err == nil || !strings.Contains(stderr, "token") {
		t.Fatalf("image ls without the API token: %v %s", err, stderr)
	}
	var rows []struct{ Name string }
	json.Unmarshal([]byte(mustHoard(t, data, env, "image", "ls", "--json")), &rows)
	if len(rows) != 1 || rows[0].Name != "deb" {
		t.Fatalf("image ls: %+v", rows)
	}
	if out := mustHoard(t, data, env, "image", "inspect", "deb"); !strings.Contains(out, "file:"+img) {
		t.Fatalf("inspect:\n%s", out)
	}

	ov := filepath.Join(dir, "vm.qcow2")
	out := mustHoard(t, data, env, "vm", "overlay", "deb", ov)
	if !strings.Contains(out, "qemu-system-x86_64") || !strings.Contains(out, ov) {
		t.Fatalf("vm overlay output:\n%s", out)
	}
	info, err := exec.Command("qemu-img", "info", ov).CombinedOutput()
	if err != nil || !strings.Contains(string(info), `"server.path":"`+sock+`"`) || !strings.Contains(string(info), "backing file format: raw") {
		t.Fatalf("qemu-img info %s: %v\n%s", ov, err, info)
	}
	if out, err := exec.Command("qemu-img", "compare", "-f", "qcow2", "-F", "raw", ov, img).CombinedOutput(); err != nil {
		t.Fatalf("overlay differs from the image: %v\n%s", err, out)
	}
	xml := mustHoard(t, data, env, "vm", "overlay", "deb", filepath.Join(dir, "vm2.qcow2"), "--libvirt")
	for _, want := range []string{"<disk type='file' device='disk'>", "protocol='nbd' name='deb'", "socket='" + sock + "'"} {
		if !strings.Contains(xml, want) {
			t.Fatalf("--libvirt output lacks %q:\n%s", want, xml)
		}
	}

	var st struct {
		Counters struct {
			ReadBytes map[string]int64 `json:"read_bytes"`
		} `json:"counters"`
		Images int `json:"images"`
	}
	json.Unmarshal([]byte(mustHoard(t, data, env, "status", "--json")), &st)
	if st.Images != 1 || st.Counters.ReadBytes["local"] == 0 {
		t.Fatalf("status after reading the overlay: %+v", st)
	}
	var p struct{ Boots, Chunks int }
	json.Unmarshal([]byte(mustHoard(t, data, env, "image", "profile", "deb", "--json")), &p)
	if p.Boots != 1 || p.Chunks == 0 {
		t.Fatalf("profile after one attach that read: %+v", p)
	}
	// The store commands work through the daemon too.
	var stats struct {
		Images int   `json:"images"`
		Chunks int64 `json:"chunks"`
	}
	json.Unmarshal([]byte(mustHoard(t, data, env, "store", "stats", "--json")), &stats)
	if stats.Images != 1 || stats.Chunks == 0 {
		t.Fatalf("store stats through the daemon: %+v", stats)
	}
	if out := mustHoard(t, data, env, "store", "verify"); !strings.Contains(out, "0 corrupt") {
		t.Fatalf("store verify through the daemon:\n%s", out)
	}
	if out := mustHoard(t, data, env, "image", "rm", "deb"); !strings.Contains(out, "removed deb") {
		t.Fatalf("image rm:\n%s", out)
	}
	if out := mustHoard(t, data, env, "store", "gc"); !strings.Contains(out, "removed") {
		t.Fatalf("store gc through the daemon:\n%s", out)
	}
}
