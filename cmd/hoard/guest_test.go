package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestImageAddQcow2Formats: image add imports a qcow2 by its guest content
// by default and by its file bytes with --format raw; vm overlay backs a
// guest-view image with -F raw, and the overlay reads as the raw disk.
func TestImageAddQcow2Formats(t *testing.T) {
	t.Parallel()
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Skip("qemu-img not installed (apt-get install qemu-utils)")
	}
	data, dir := t.TempDir(), t.TempDir()
	raw := filepath.Join(dir, "disk.raw")
	os.WriteFile(raw, imageBytes(6, 4<<20), 0o600)
	q := filepath.Join(dir, "disk.qcow2")
	if out, err := exec.Command("qemu-img", "convert", "-c", "-O", "qcow2", raw, q).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img convert: %v\n%s", err, out)
	}
	// Offline, then through a daemon.
	if out := mustHoard(t, data, nil, "image", "add", q, "--name", "guest"); !strings.Contains(out, "raw (guest content of a qcow2)") {
		t.Fatalf("image add (auto):\n%s", out)
	}
	if out := mustHoard(t, data, nil, "image", "add", q, "--name", "file", "--format", "raw"); !strings.Contains(out, "format") || strings.Contains(out, "guest content") || !strings.Contains(out, "qcow2") {
		t.Fatalf("image add --format raw:\n%s", out)
	}
	if _, stderr, err := hoard(t, data, nil, "image", "add", q, "--name", "x", "--format", "vmdk"); err == nil || !strings.Contains(stderr, "auto") {
		t.Fatalf("image add --format vmdk: %v %s", err, stderr)
	}
	if out := mustHoard(t, data, nil, "image", "inspect", "guest"); !strings.Contains(out, "raw (guest content of a qcow2)") {
		t.Fatalf("image inspect:\n%s", out)
	}
	startDaemon(t, data, nil)
	if out := mustHoard(t, data, nil, "image", "inspect", "guest"); !strings.Contains(out, "raw (guest content of a qcow2)") {
		t.Fatalf("image inspect through the daemon:\n%s", out)
	}
	ov := filepath.Join(dir, "vm.qcow2")
	mustHoard(t, data, nil, "vm", "overlay", "guest", ov)
	info, err := exec.Command("qemu-img", "info", ov).CombinedOutput()
	if err != nil || !strings.Contains(string(info), "backing file format: raw") {
		t.Fatalf("qemu-img info %s: %v\n%s", ov, err, info)
	}
	if out, err := exec.Command("qemu-img", "compare", "-f", "qcow2", "-F", "raw", ov, raw).CombinedOutput(); err != nil {
		t.Fatalf("overlay differs from the raw disk: %v\n%s", err, out)
	}
	ov2 := filepath.Join(dir, "vm2.qcow2")
	mustHoard(t, data, nil, "vm", "overlay", "file", ov2)
	if out, err := exec.Command("qemu-img", "compare", "-f", "qcow2", "-F", "raw", ov2, raw).CombinedOutput(); err != nil {
		t.Fatalf("overlay of the qcow2 file differs from the raw disk: %v\n%s", err, out)
	}
}
