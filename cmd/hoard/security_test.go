package main

import (
	"bytes"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestUnprivilegedUserLockedOut (issue 7, item 15): user nobody, against a
// real daemon run by root with the default config, can neither read the
// API token nor import a root-only file (the /etc/shadow attack), list or
// delete images. Skips unless run as root with runuser.
func TestUnprivilegedUserLockedOut(t *testing.T) {
	t.Parallel()
	if os.Geteuid() != 0 {
		t.Skip("needs root (to run a daemon as root and a client as nobody)")
	}
	runuser, err := exec.LookPath("runuser")
	if err != nil {
		t.Skip("runuser not installed (util-linux)")
	}
	// A copy of the binary nobody may run, and a root-only "shadow" file.
	pub, err := os.MkdirTemp("", "hoard-nobody")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(pub) })
	os.Chmod(pub, 0o755)
	bin := filepath.Join(pub, "hoard")
	copyFile(t, hoardBin, bin, 0o755)
	shadow := filepath.Join(pub, "shadow")
	os.WriteFile(shadow, []byte("root:$6$secret-hash:19000:0:99999:7:::\n"), 0o600)
	if out, err := exec.Command(runuser, "-u", "nobody", "--", "true").CombinedOutput(); err != nil {
		t.Skipf("runuser -u nobody does not work here: %v %s", err, out)
	}

	data := filepath.Join(pub, "data") // traversable, as /var/lib/hoard often is
	os.Mkdir(data, 0o755)
	startDaemon(t, data, nil)
	addr, err := os.ReadFile(filepath.Join(data, "api.addr"))
	if err != nil {
		t.Fatal(err)
	}
	asNobody := func(args ...string) (string, error) {
		cmd := exec.Command(runuser, append([]string{"-u", "nobody", "--", bin, "--data-dir", data}, args...)...)
		cmd.Env = append(os.Environ(), "HOARD_API="+strings.TrimSpace(string(addr)))
		cmd.Dir = pub
		var b bytes.Buffer
		cmd.Stdout, cmd.Stderr = &b, &b
		err := cmd.Run()
		return b.String(), err
	}
	if out, err := exec.Command(runuser, "-u", "nobody", "--", "cat", filepath.Join(data, "api.token")).CombinedOutput(); err == nil {
		t.Fatalf("nobody can read the API token: %s", out)
	}
	for _, args := range [][]string{
		{"image", "add", shadow, "--lazy", "--name", "shadow"},
		{"image", "add", shadow, "--name", "shadow2"},
		{"image", "ls"},
		{"image", "rm", "anything"},
		{"store", "gc"},
	} {
		out, err := asNobody(args...)
		if err == nil || !strings.Contains(out, "api.token") {
			t.Errorf("nobody: hoard %s: %v\n%s\nwant refused, naming the token file", strings.Join(args, " "), err, out)
		}
	}
	// Root (who can read the token) sees that nothing was added.
	if out := mustHoard(t, data, nil, "image", "ls", "--json"); strings.Contains(out, "shadow") {
		t.Fatalf("nobody's import went through:\n%s", out)
	}
}

func copyFile(t *testing.T, from, to string, mode os.FileMode) {
	t.Helper()
	in, err := os.Open(from)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out, err := os.OpenFile(to, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, mode)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestDaemonRefusesLoopbackOrigins (issue 7, item 15): by default the
// daemon does not fetch from http origins on loopback (a local SSRF);
// origin.allow_loopback lets it.
func TestDaemonRefusesLoopbackOrigins(t *testing.T) {
	t.Parallel()
	img := imageBytes(9, 1<<20)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.ServeContent(w, r, "d.raw", time.Time{}, bytes.NewReader(img))
	}))
	t.Cleanup(srv.Close)
	data := t.TempDir()
	startDaemon(t, data, nil)
	_, stderr, err := hoard(t, data, nil, "image", "add", srv.URL+"/d.raw", "--lazy", "--name", "local")
	if err == nil || !strings.Contains(stderr, "loopback") || !strings.Contains(stderr, "origin.allow_loopback") {
		t.Fatalf("lazy add of a loopback origin: %v %s; want refused, naming origin.allow_loopback", err, stderr)
	}

	allowed := t.TempDir()
	startDaemon(t, allowed, nil, "--origin-allow-loopback")
	mustHoard(t, allowed, nil, "image", "add", srv.URL+"/d.raw", "--lazy", "--name", "local")
}

// TestCLISendsTokenOnlyToItsDaemon: the CLI sends the data dir's token to
// the daemon that wrote the data dir's api.addr, never to another address
// HOARD_API names.
func TestCLISendsTokenOnlyToItsDaemon(t *testing.T) {
	t.Parallel()
	got := make(chan string, 10)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/healthz" {
			got <- r.Header.Get("Authorization")
		}
		w.Write([]byte("[]"))
	}))
	t.Cleanup(srv.Close)
	addr := strings.TrimPrefix(srv.URL, "http://")
	data := t.TempDir()
	os.WriteFile(filepath.Join(data, "api.token"), []byte("local-secret\n"), 0o600)

	os.WriteFile(filepath.Join(data, "api.addr"), []byte("127.0.0.1:1\n"), 0o600)
	next := func() string {
		t.Helper()
		select {
		case h := <-got:
			return h
		case <-time.After(10 * time.Second):
			t.Fatal("the CLI sent no request")
			return ""
		}
	}
	hoard(t, data, []string{"HOARD_API=" + addr}, "image", "ls", "--json")
	if h := next(); h != "" {
		t.Errorf("the data dir's token went to HOARD_API=%s, another daemon: %q", addr, h)
	}
	os.WriteFile(filepath.Join(data, "api.addr"), []byte(addr+"\n"), 0o600)
	hoard(t, data, nil, "image", "ls", "--json")
	if h := next(); h != "Bearer local-secret" {
		t.Errorf("the daemon of the data dir got Authorization %q, want its token", h)
	}
}
