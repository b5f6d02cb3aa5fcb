package node_test

import (
	"bytes"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hoardvm/hoard/node"
	"github.com/hoardvm/hoard/node/api"
)

// guestCache is where the guest kernel, initrd and base image are kept
// between runs ($HOARD_GUEST_CACHE, default /tmp/hoard-guest-cache), so CI
// builds them once.
func guestCache(t *testing.T) string {
	if d := os.Getenv("HOARD_GUEST_CACHE"); d != "" {
		return d
	}
	return filepath.Join(os.TempDir(), "hoard-guest-cache")
}

// guestKit builds (or reuses) the kernel, initrd and an ext4 base image whose
// /MANIFEST lists the files the guest hashes; it returns the cache dir, the
// base image and the expected guest sha256.
func guestKit(t *testing.T) (kdir, base, sum string) {
	t.Helper()
	for _, tool := range []string{"qemu-system-x86_64", "qemu-img", "mkfs.ext4", "cpio"} {
		needTool(t, tool)
	}
	scripts, err := filepath.Abs("../scripts/guest")
	if err != nil {
		t.Fatal(err)
	}
	cache := guestCache(t)
	kdir = filepath.Join(cache, "kernel")
	if out, err := exec.CommandContext(t.Context(), filepath.Join(scripts, "build-guest.sh"), kdir).CombinedOutput(); err != nil {
		t.Skipf("cannot build the test guest (kernel download needs the Debian mirror): %v\n%s", err, out)
	}
	// A small ext4 image: the files of one Python library tree, all hashed by the guest.
	src := "/usr/lib/python3.11"
	if _, err := os.Stat(src); err != nil {
		src, _ = filepath.Abs("..") // any tree will do
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

var guestOK = regexp.MustCompile(`HOARD-GUEST-OK ([0-9a-f]{64}) (\d+)`)

// boot boots the test guest on an overlay and returns the guest's sha256 and
// the wall time.
func boot(t *testing.T, kdir, overlay string) (string, time.Duration) {
	t.Helper()
	start := time.Now()
	cmd := exec.CommandContext(t.Context(), "qemu-system-x86_64", "-accel", "tcg", "-nographic", "-m", "512",
		"-kernel", filepath.Join(kdir, "vmlinuz"), "-initrd", filepath.Join(kdir, "initrd.gz"),
		"-append", "console=ttyS0 panic=-1 quiet", "-no-reboot", "-nic", "none",
		"-drive", "file="+overlay+",if=none,id=d0,format=qcow2", "-device", "nvme,drive=d0,serial=hoard")
	cmd.WaitDelay = 5 * time.Second
	out, err := cmd.CombinedOutput()
	wall := time.Since(start)
	m := guestOK.FindSubmatch(out)
	if m == nil {
		tail := out
		if len(tail) > 3000 {
			tail = tail[len(tail)-3000:]
		}
		t.Fatalf("guest did not print HOARD-GUEST-OK (qemu: %v); console tail:\n%s", err, bytes.ReplaceAll(tail, []byte("\r"), nil))
	}
	return string(m[1]), wall
}

// TestGuestBootsFromLazyImage boots a real guest (qemu TCG, Debian cloud
// kernel, busybox initramfs) from a qcow2 overlay backed by a hoard export of
// a --lazy image whose origin is an HTTP server: the first boot pulls what it
// reads from the origin, the second boot (new overlay) reads nothing from it.
func TestGuestBootsFromLazyImage(t *testing.T) {
	if testing.Short() {
		t.Skip("boots a VM; skipped with -short")
	}
	t.Parallel()
	kdir, base, want := guestKit(t)

	f, err := os.Open(base)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fi, _ := f.Stat()
	var originBytes atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.ServeContent(countingWriter{w, &originBytes}, r, "base.raw", fi.ModTime(), f)
	}))
	defer srv.Close()

	tn := startNode(t, node.Config{})
	res := addImage(t, tn, api.ImportRequest{Source: srv.URL + "/base.raw", Name: "guest", Lazy: true})
	imported := originBytes.Load()
	dir := t.TempDir()

	bootOnce := func(label string) (api.Counters, time.Duration) {
		t.Helper()
		ov := filepath.Join(dir, label+".qcow2")
		makeOverlay(t, "guest", res.Format, tn.NBDSocket(), ov)
		before := tn.counters(t)
		sum, wall := boot(t, kdir, ov)
		if sum != want {
			t.Fatalf("%s boot: guest sha256 %s, want %s", label, sum, want)
		}
		// qemu has exited: wait until its export is closed (profile saved).
		waitFor(t, "export closed", func() bool { return tn.counters(t).ExportsOpen == 0 })
		after := tn.counters(t)
		d := api.Counters{ReadBytes: map[string]int64{}, PrefetchChunks: map[string]int64{}}
		for k, v := range after.ReadBytes {
			d.ReadBytes[k] = v - before.ReadBytes[k]
		}
		for k, v := range after.PrefetchChunks {
			d.PrefetchChunks[k] = v - before.PrefetchChunks[k]
		}
		d.OriginBytes = after.OriginBytes - before.OriginBytes
		t.Logf("%s boot: %s wall; read %s local, %s from origin; origin bytes %s; prefetched %d readahead, %d profile",
			label, wall.Round(10*time.Millisecond), mib(d.ReadBytes["local"]), mib(d.ReadBytes["origin"]), mib(d.OriginBytes),
			d.PrefetchChunks["readahead"], d.PrefetchChunks["profile"])
		return d, wall
	}

	cold, _ := bootOnce("cold")
	if cold.OriginBytes == 0 { // readahead may serve most guest reads: count the fetches
		t.Errorf("cold boot read nothing from the origin: %+v", cold)
	}
	if got := originBytes.Load() - imported; got != cold.OriginBytes {
		t.Errorf("origin server sent %d bytes, the node counted %d", got, cold.OriginBytes)
	}
	p, err := tn.client.Profile(t.Context(), "guest")
	if err != nil || p.Boots != 1 || p.Chunks == 0 {
		t.Fatalf("profile after the cold boot: %+v, %v", p, err)
	}
	t.Logf("profile: %d chunks, %s of %s non-zero", p.Chunks, mib(p.Bytes), mib(res.NonZeroBytes))

	warm, _ := bootOnce("warm")
	if warm.ReadBytes["origin"] != 0 || warm.OriginBytes != 0 {
		t.Errorf("warm boot fetched from the origin: read %d bytes, fetched %d", warm.ReadBytes["origin"], warm.OriginBytes)
	}
	if warm.ReadBytes["local"] == 0 {
		t.Error("warm boot read nothing locally")
	}
}

func mib(n int64) string { return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20)) }

// makeOverlay creates a qcow2 overlay at path backed by image's NBD export on
// socket (hoard vm overlay writes a backing that also reconnects; see
// cmd/hoard/vm.go).
func makeOverlay(t *testing.T, image, format, socket, path string) {
	t.Helper()
	backing := (&url.URL{Scheme: "nbd+unix", Path: "/" + image, RawQuery: "socket=" + socket}).String()
	out, err := exec.CommandContext(t.Context(), "qemu-img", "create", "-q", "-f", "qcow2", "-F", format, "-b", backing, path).CombinedOutput()
	if err != nil {
		t.Fatalf("qemu-img create %s: %v\n%s", path, err, out)
	}
}
