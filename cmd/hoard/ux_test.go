package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// TestReadOnlyCommandsCreateNoStore: without a daemon, a command that only
// reads (or removes) says there is no data dir and fails, instead of
// creating an empty store where it runs.
func TestReadOnlyCommandsCreateNoStore(t *testing.T) {
	t.Parallel()
	cmds := [][]string{
		{"image", "ls"}, {"image", "inspect", "x"}, {"image", "profile", "x"}, {"image", "rm", "x"},
		{"store", "stats"}, {"store", "verify"}, {"store", "gc"}, {"status"},
	}
	for _, args := range cmds {
		// In a directory without --data-dir: the default ./.hoard.
		cwd := t.TempDir()
		cmd := exec.Command(hoardBin, args...)
		cmd.Dir = cwd
		// No daemon on this port, and none named by HOARD_API.
		cmd.Env = append(os.Environ(), "HOARD_API=", "HOARD_API_LISTEN=127.0.0.1:1")
		var stdout, stderr bytes.Buffer
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		if err := cmd.Run(); err == nil {
			t.Errorf("hoard %s in an empty directory succeeded:\n%s", strings.Join(args, " "), stdout.String())
		}
		if _, err := os.Stat(filepath.Join(cwd, ".hoard")); err == nil {
			t.Errorf("hoard %s created %s", strings.Join(args, " "), filepath.Join(cwd, ".hoard"))
		}
		if args[0] != "status" && !strings.Contains(stderr.String(), "no hoard data dir at "+filepath.Join(cwd, ".hoard")) {
			t.Errorf("hoard %s: stderr does not say there is no data dir:\n%s", strings.Join(args, " "), stderr.String())
		}
		// An explicit data dir that exists but holds no store.
		data := t.TempDir()
		_, errOut, err := hoard(t, data, []string{"HOARD_API=", "HOARD_API_LISTEN=127.0.0.1:1"}, args...)
		if err == nil {
			t.Errorf("hoard --data-dir %s %s succeeded", data, strings.Join(args, " "))
		}
		if _, err := os.Stat(filepath.Join(data, "store")); err == nil {
			t.Errorf("hoard --data-dir %s %s created a store", data, strings.Join(args, " "))
		}
		if args[0] != "status" && !strings.Contains(errOut, "hoard daemon --data-dir "+data) {
			t.Errorf("hoard %s: stderr does not say how to start the daemon:\n%s", strings.Join(args, " "), errOut)
		}
	}
	// image add still creates the store.
	data := t.TempDir()
	img := filepath.Join(t.TempDir(), "disk.raw")
	os.WriteFile(img, imageBytes(3, 1<<20), 0o600)
	mustHoard(t, data, []string{"HOARD_API="}, "image", "add", img, "--name", "d")
	if out := mustHoard(t, data, []string{"HOARD_API="}, "image", "ls"); !strings.Contains(out, "d ") {
		t.Fatalf("image ls after add:\n%s", out)
	}
}

// TestPullWithoutClusterSaysHowToJoin: image pull on a daemon without a
// swarm key says the node is not in a cluster and how to join one, not
// that no peer knows the image.
func TestPullWithoutClusterSaysHowToJoin(t *testing.T) {
	t.Parallel()
	data := t.TempDir()
	env := []string{"HOARD_API="}
	startDaemon(t, data, env)
	_, stderr, err := hoard(t, data, env, "image", "pull", "debian-12")
	if err == nil {
		t.Fatal("image pull of an unknown image on a node without a cluster succeeded")
	}
	for _, want := range []string{"not in a cluster", "hoard cluster keygen", filepath.Join(data, "swarm.key"), "p2p.bootstrap"} {
		if !strings.Contains(stderr, want) {
			t.Errorf("image pull: stderr does not mention %q:\n%s", want, stderr)
		}
	}
}

// TestAddThroughDaemonShowsProgress: image add through a running daemon,
// with stderr not a terminal, prints plain progress lines (bytes of the
// total, percent, rate) ending at 100%, then the summary; store verify
// through the daemon shows its progress too.
func TestAddThroughDaemonShowsProgress(t *testing.T) {
	t.Parallel()
	data := t.TempDir()
	img := filepath.Join(t.TempDir(), "disk.raw")
	os.WriteFile(img, imageBytes(11, 6<<20), 0o600)
	env := []string{"HOARD_API="}
	startDaemon(t, data, env)
	stdout, stderr, err := hoard(t, data, env, "image", "add", img, "--name", "deb")
	if err != nil {
		t.Fatalf("image add through the daemon: %v\n%s%s", err, stdout, stderr)
	}
	if !strings.Contains(stderr, "import deb: 6.0 MiB of 6.0 MiB (100%), ") || !strings.Contains(stderr, "/s") {
		t.Fatalf("image add through the daemon printed no progress lines:\n%s", stderr)
	}
	if strings.Contains(stderr, "\r") || strings.Contains(stderr, "\x1b[") {
		t.Fatalf("progress for a non-terminal has terminal controls: %q", stderr)
	}
	if !strings.Contains(stdout, "image deb imported") {
		t.Fatalf("summary:\n%s", stdout)
	}
	_, stderr, err = hoard(t, data, env, "store", "verify")
	if err != nil || !regexp.MustCompile(`verify: \d+ chunks of \d+ chunks \(100%\)`).MatchString(stderr) {
		t.Fatalf("store verify through the daemon: %v, progress:\n%s", err, stderr)
	}
	if out, stderr, err := hoard(t, data, env, "store", "gc"); err != nil || !strings.Contains(out, "removed") {
		t.Fatalf("store gc through the daemon: %v\n%s%s", err, out, stderr)
	}
}

// TestOfflineAndDaemonAnswersMatch: the image and store commands answer the
// same whether they open the store or go through the daemon (one
// imageService, two implementations).
func TestOfflineAndDaemonAnswersMatch(t *testing.T) {
	t.Parallel()
	data := t.TempDir()
	img := filepath.Join(t.TempDir(), "disk.raw")
	os.WriteFile(img, imageBytes(12, 3<<20), 0o600)
	env := []string{"HOARD_API="}
	mustHoard(t, data, env, "image", "add", img, "--name", "deb")
	queries := [][]string{{"image", "ls", "--json"}, {"image", "inspect", "deb", "--json", "--entries"},
		{"image", "profile", "deb", "--json"}, {"store", "stats", "--json"}}
	var offline []string
	for _, q := range queries {
		offline = append(offline, mustHoard(t, data, env, q...))
	}
	startDaemon(t, data, env)
	for i, q := range queries {
		if got := mustHoard(t, data, env, q...); got != offline[i] {
			t.Errorf("hoard %s: through the daemon\n%s\noffline\n%s", strings.Join(q, " "), got, offline[i])
		}
	}
}
