package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hoardvm/hoard/node/origin/glancetest"
)

var hoardBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "hoard-cli-test")
	if err != nil {
		panic(err)
	}
	hoardBin = filepath.Join(dir, "hoard")
	if out, err := exec.Command("go", "build", "-o", hoardBin, ".").CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "build hoard: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	glancetest.StopShared()
	os.RemoveAll(dir)
	os.Exit(code)
}

// hoard runs the binary with a data dir and extra env; it returns stdout,
// stderr and the error.
func hoard(t *testing.T, dataDir string, env []string, args ...string) (string, string, error) {
	t.Helper()
	cmd := exec.Command(hoardBin, append([]string{"--data-dir", dataDir}, args...)...)
	cmd.Env = append(os.Environ(), env...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	return out.String(), errb.String(), err
}

func mustHoard(t *testing.T, dataDir string, env []string, args ...string) string {
	t.Helper()
	out, stderr, err := hoard(t, dataDir, env, args...)
	if err != nil {
		t.Fatalf("hoard %s: %v\n%s%s", strings.Join(args, " "), err, out, stderr)
	}
	return out
}

func imageBytes(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, 7))
	b := make([]byte, n)
	for off := 0; off < n; off += 65536 {
		if r.IntN(3) == 0 {
			continue // zero region
		}
		for i := off; i < min(n, off+65536); i++ {
			b[i] = byte(r.IntN(8)) + 'a'
		}
	}
	return b
}

func TestCLIImageLifecycle(t *testing.T) {
	t.Parallel()
	data := t.TempDir()
	img := filepath.Join(t.TempDir(), "disk.raw")
	os.WriteFile(img, imageBytes(1, 6<<20), 0o600)

	out := mustHoard(t, data, nil, "image", "add", img, "--name", "deb12", "--json")
	var res struct {
		Manifest     string `json:"manifest"`
		Size         int64  `json:"size"`
		NonZeroBytes int64  `json:"non_zero_bytes"`
		NewChunks    int    `json:"new_chunks"`
	}
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatalf("image add --json: %v\n%s", err, out)
	}
	if res.Size != 6<<20 || res.NewChunks == 0 || !strings.HasPrefix(res.Manifest, "bafkrei") {
		t.Fatalf("import result %+v", res)
	}
	// Same name again: refused, nothing changes.
	if _, stderr, err := hoard(t, data, nil, "image", "add", img, "--name", "deb12"); err == nil || !strings.Contains(stderr, "already exists") {
		t.Fatalf("duplicate name accepted: %v %s", err, stderr)
	}
	// The same bytes under a second name share every chunk.
	out = mustHoard(t, data, nil, "image", "add", img, "--name", "copy", "--chunking", "cdc", "--json")
	if !strings.Contains(out, `"new_chunks": 0`) {
		t.Fatalf("second import of the same bytes stored new chunks:\n%s", out)
	}
	var rows []struct {
		Name    string `json:"name"`
		Present int    `json:"present_chunks"`
		Chunks  int    `json:"unique_chunks"`
	}
	json.Unmarshal([]byte(mustHoard(t, data, nil, "image", "ls", "--json")), &rows)
	if len(rows) != 2 || rows[0].Name != "copy" || rows[1].Present != rows[1].Chunks {
		t.Fatalf("image ls: %+v", rows)
	}
	out = mustHoard(t, data, nil, "image", "inspect", "deb12")
	for _, want := range []string{"manifest", res.Manifest, "cdc min 16384 avg 65536 max 262144", "file:" + img} {
		if !strings.Contains(out, want) {
			t.Fatalf("inspect output lacks %q:\n%s", want, out)
		}
	}
	var stats struct {
		Images     int     `json:"images"`
		DedupRatio float64 `json:"dedup_ratio"`
	}
	json.Unmarshal([]byte(mustHoard(t, data, nil, "store", "stats", "--json")), &stats)
	if stats.Images != 1 || stats.DedupRatio < 0.99 { // both names share one manifest
		t.Fatalf("stats %+v", stats)
	}
	mustHoard(t, data, nil, "store", "verify")
	// Removing one name keeps the chunks the other still uses.
	out = mustHoard(t, data, nil, "image", "rm", "copy")
	if !strings.Contains(out, "freed 0 chunks") {
		t.Fatalf("rm of a shared image freed chunks: %s", out)
	}
	out = mustHoard(t, data, nil, "image", "rm", "deb12")
	if strings.Contains(out, "freed 0 chunks") {
		t.Fatalf("rm of the last image freed nothing: %s", out)
	}
	var u struct {
		Chunks int `json:"chunks"`
	}
	json.Unmarshal([]byte(mustHoard(t, data, nil, "store", "stats", "--json")), &u)
	if u.Chunks != 0 {
		t.Fatalf("%d chunks left after removing every image", u.Chunks)
	}
}

func TestCLIErrors(t *testing.T) {
	t.Parallel()
	data := t.TempDir()
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"image", "add", "/nonexistent/disk.raw"}, "check the path"},
		{[]string{"image", "inspect", "nope"}, "hoard image ls"},
		{[]string{"image", "add", "/etc/hostname", "--chunking", "weird"}, "use cdc or fixed"},
		{[]string{"image", "add", "/etc/hostname", "--name", "bad/name"}, "invalid image name"},
		{[]string{"--store-quota", "lots", "store", "stats"}, "store.quota (from flag --store-quota): invalid value \"lots\""},
		{[]string{"image", "add", "glance://abc"}, "origin.glance.url"},
	} {
		_, stderr, err := hoard(t, data, []string{"HOARD_ORIGIN_GLANCE_URL="}, tc.args...)
		if err == nil || !strings.Contains(stderr, tc.want) {
			t.Errorf("hoard %s: err %v, stderr %q; want a failure mentioning %q", strings.Join(tc.args, " "), err, stderr, tc.want)
		}
	}
}

// TestCLIGlanceImport imports from a real Glance (Debian's glance-api).
func TestCLIGlanceImport(t *testing.T) {
	t.Parallel()
	g := glancetest.Shared(t)
	img := imageBytes(2, 3<<20)
	id := g.Upload(t, "cirros-test", "raw", img)
	var hdrs []string
	for k, v := range g.Headers() {
		hdrs = append(hdrs, k+"="+v)
	}
	env := []string{"HOARD_ORIGIN_GLANCE_URL=" + g.URL(), "HOARD_ORIGIN_GLANCE_HEADERS=" + strings.Join(hdrs, ",")}
	data := t.TempDir()
	out := mustHoard(t, data, env, "image", "add", "glance://"+id, "--json")
	if !strings.Contains(out, `"name": "`+id+`"`) || !strings.Contains(out, `"checksum": "sha512:`) {
		t.Fatalf("glance import summary lacks the Glance ID name or sha512 checksum:\n%s", out)
	}
	// Byte-identical: import the same bytes from a file; the manifests agree
	// apart from the source, so every chunk is already there.
	f := filepath.Join(t.TempDir(), "same.raw")
	os.WriteFile(f, img, 0o600)
	out = mustHoard(t, data, env, "image", "add", f, "--json")
	if !strings.Contains(out, `"new_chunks": 0`) {
		t.Fatalf("file with the Glance image's bytes stored new chunks: the Glance import differs\n%s", out)
	}
	if _, stderr, err := hoard(t, data, env, "image", "add", "glance://00000000-0000-0000-0000-000000000000"); err == nil || !strings.Contains(stderr, "not") {
		t.Fatalf("unknown Glance image: %v %s", err, stderr)
	}
}
