package nbd

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// needTool skips the test when a client binary is missing. CI installs them
// (Debian packages qemu-utils and libnbd-bin).
func needTool(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		t.Skipf("%s not installed (apt-get install qemu-utils libnbd-bin): %v", name, err)
	}
	return p
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.CommandContext(t.Context(), needTool(t, name), args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// toolFixture is a server with two random exports, on each network.
func toolFixture(t *testing.T, network string) (*testServer, *memImage) {
	img := newMemImage("debian-12", 24<<20, 42)
	other := newMemImage("ubuntu-24.04", 3<<20, 43)
	return startServer(t, network, newMemExporter(img, other)), img
}

func forNetworks(t *testing.T, f func(t *testing.T, s *testServer, img *memImage)) {
	for _, network := range networks {
		t.Run(network, func(t *testing.T) {
			t.Parallel()
			s, img := toolFixture(t, network)
			f(t, s, img)
		})
	}
}

func TestQemuImg(t *testing.T) {
	t.Parallel()
	needTool(t, "qemu-img")
	forNetworks(t, func(t *testing.T, s *testServer, img *memImage) {
		src := filepath.Join(t.TempDir(), "src.raw")
		if err := os.WriteFile(src, img.data, 0o600); err != nil {
			t.Fatal(err)
		}
		run(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", src, s.uri(img.name))
		out := filepath.Join(t.TempDir(), "out.raw")
		run(t, "qemu-img", "convert", "-f", "raw", "-O", "raw", s.uri(img.name), out)
		got, err := os.ReadFile(out)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, img.data) {
			t.Fatal("qemu-img convert output differs from the export")
		}
		info := run(t, "qemu-img", "info", "--output=json", s.uri(img.name))
		if !strings.Contains(info, fmt.Sprintf(`"virtual-size": %d`, len(img.data))) {
			t.Errorf("qemu-img info: %s", info)
		}
	})
}

func TestNbdcopyMultiConn(t *testing.T) {
	t.Parallel()
	needTool(t, "nbdcopy")
	forNetworks(t, func(t *testing.T, s *testServer, img *memImage) {
		out := filepath.Join(t.TempDir(), "out.raw")
		run(t, "nbdcopy", "--connections=4", "--requests=16", s.uri(img.name), out)
		got, err := os.ReadFile(out)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, img.data) {
			t.Fatal("nbdcopy output differs from the export")
		}
	})
}

func TestNbdinfo(t *testing.T) {
	t.Parallel()
	needTool(t, "nbdinfo")
	forNetworks(t, func(t *testing.T, s *testServer, img *memImage) {
		list := run(t, "nbdinfo", "--list", s.uri(""))
		for _, name := range []string{"debian-12", "ubuntu-24.04"} {
			if !strings.Contains(list, name) {
				t.Errorf("nbdinfo --list lacks %s:\n%s", name, list)
			}
		}
		if !strings.Contains(list, "image debian-12") {
			t.Errorf("nbdinfo --list lacks the description:\n%s", list)
		}

		var info struct {
			Exports []struct {
				Name      string   `json:"export-name"`
				Size      int64    `json:"export-size"`
				ReadOnly  bool     `json:"is_read_only"`
				MultiConn bool     `json:"can_multi_conn"`
				CanFlush  bool     `json:"can_flush"`
				CanCache  bool     `json:"can_cache"`
				BlockMin  int64    `json:"block_size_minimum"`
				BlockPref int64    `json:"block_size_preferred"`
				BlockMax  int64    `json:"block_size_maximum"`
				Contexts  []string `json:"contexts"`
			} `json:"exports"`
		}
		out := run(t, "nbdinfo", "--json", s.uri(img.name))
		if err := json.Unmarshal([]byte(out), &info); err != nil || len(info.Exports) != 1 {
			t.Fatalf("nbdinfo --json: %v\n%s", err, out)
		}
		e := info.Exports[0]
		if e.Name != img.name || e.Size != int64(len(img.data)) || !e.ReadOnly || !e.MultiConn || !e.CanFlush ||
			!e.CanCache || e.BlockMin != 1 || e.BlockPref != 4096 || e.BlockMax != 32<<20 {
			t.Errorf("nbdinfo --json: %+v\n%s", e, out)
		}
		if !strings.Contains(out, metaBaseAllocation) {
			t.Errorf("nbdinfo --json lacks base:allocation:\n%s", out)
		}

		// --map: holes must match the fake's extents.
		var got [][2]int64
		sc := bufio.NewScanner(strings.NewReader(run(t, "nbdinfo", "--map", s.uri(img.name))))
		for sc.Scan() {
			f := strings.Fields(sc.Text())
			if len(f) < 3 {
				continue
			}
			off, _ := strconv.ParseInt(f[0], 10, 64)
			l, _ := strconv.ParseInt(f[1], 10, 64)
			typ, _ := strconv.Atoi(f[2])
			if typ == stateHole|stateZero {
				if n := len(got); n > 0 && got[n-1][0]+got[n-1][1] == off {
					got[n-1][1] += l
					continue
				}
				got = append(got, [2]int64{off, l})
			} else if typ != 0 {
				t.Errorf("--map line %q: type %d", sc.Text(), typ)
			}
		}
		want := img.holes()
		if fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("nbdinfo --map holes:\n got %v\nwant %v", got, want)
		}

		// Unknown export.
		cmd := exec.CommandContext(t.Context(), "nbdinfo", s.uri("no-such-image"))
		if out, err := cmd.CombinedOutput(); err == nil {
			t.Errorf("nbdinfo of an unknown export succeeded:\n%s", out)
		}
	})
}

func TestQemuUnknownExport(t *testing.T) {
	t.Parallel()
	needTool(t, "qemu-img")
	forNetworks(t, func(t *testing.T, s *testServer, img *memImage) {
		out, err := exec.CommandContext(t.Context(), "qemu-img", "info", s.uri("no-such-image")).CombinedOutput()
		if err == nil {
			t.Fatalf("qemu-img info of an unknown export succeeded:\n%s", out)
		}
		if !strings.Contains(string(out), "no-such-image") {
			t.Errorf("error does not name the export:\n%s", out)
		}
	})
}

func TestQemuIoRandomReads(t *testing.T) {
	t.Parallel()
	needTool(t, "qemu-io")
	forNetworks(t, func(t *testing.T, s *testServer, img *memImage) {
		r := rand.New(rand.NewPCG(7, 7))
		args := []string{"-r", "-f", "raw"}
		// Pattern runs and holes: qemu-io checks them itself.
		for i, p := range img.patterns {
			if i%2 == 0 {
				args = append(args, "-c", fmt.Sprintf("read -P %d %d %d", p.b, p.off, p.length))
			}
		}
		for i, h := range img.holes() {
			if i%2 == 0 {
				args = append(args, "-c", fmt.Sprintf("read -P 0 %d %d", h[0], h[1]))
			}
		}
		// Random small reads anywhere, dumped and compared.
		type rd struct{ off, n int64 }
		var reads []rd
		for range 20 {
			n := int64(16 * (1 + r.IntN(8)))
			off := int64(r.IntN(len(img.data)-int(n))) &^ 15
			reads = append(reads, rd{off, n})
			args = append(args, "-c", fmt.Sprintf("read -v %d %d", off, n))
		}
		args = append(args, s.uri(img.name))
		out := run(t, "qemu-io", args...)
		if strings.Contains(out, "Pattern verification failed") || strings.Contains(out, "error") {
			t.Fatalf("qemu-io:\n%s", out)
		}
		dump := parseHexdump(t, out)
		for _, rd := range reads {
			for i := rd.off; i < rd.off+rd.n; i++ {
				b, ok := dump[i]
				if !ok || b != img.data[i] {
					t.Fatalf("qemu-io read -v at %d: got %#x (present %v), want %#x", i, b, ok, img.data[i])
				}
			}
		}
	})
}

// parseHexdump reads qemu-io's "read -v" output: "%08x:  xx xx ... ascii".
func parseHexdump(t *testing.T, out string) map[int64]byte {
	m := map[int64]byte{}
	for line := range strings.Lines(out) {
		addr, rest, ok := strings.Cut(line, ":  ")
		if !ok {
			continue
		}
		base, err := strconv.ParseInt(strings.TrimSpace(addr), 16, 64)
		if err != nil {
			continue
		}
		for i, f := range strings.Fields(rest) {
			if i == 16 {
				break
			}
			v, err := strconv.ParseUint(f, 16, 8)
			if err != nil || len(f) != 2 {
				break
			}
			m[base+int64(i)] = byte(v)
		}
	}
	if len(m) == 0 {
		t.Fatalf("no hexdump in qemu-io output:\n%s", out)
	}
	return m
}
