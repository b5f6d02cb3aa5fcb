package origin_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hoardvm/hoard/node/origin"
)

// guestRaw is a raw disk of size bytes: random 64 KiB blocks with runs of
// zeros between them, and some repeated blocks.
func guestRaw(seed uint64, size int) []byte {
	r := rand.New(rand.NewPCG(seed, 7))
	data := make([]byte, size)
	for off := 0; off < size; off += 64 << 10 {
		end := min(off+64<<10, size)
		switch r.IntN(4) {
		case 0: // zeros
		case 1: // text-like, compressible
			for i := off; i < end; i++ {
				data[i] = "hoard guest view "[i%17]
			}
		default:
			for i := off; i < end; i += 8 {
				v := r.Uint64()
				for j := 0; j < 8 && i+j < end; j++ {
					data[i+j] = byte(v >> (8 * j))
				}
			}
		}
	}
	return data
}

func needQemuImg(t testing.TB) {
	t.Helper()
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Skip("qemu-img not installed (scripts/install-test-deps.sh installs it)")
	}
}

// qemuImg runs qemu-img with args.
func qemuImg(t testing.TB, args ...string) {
	t.Helper()
	if out, err := exec.Command("qemu-img", args...).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// writeQcow2 writes raw to dir and converts it to a compressed qcow2 with
// extra qemu-img convert options; it returns the qcow2's path.
func writeQcow2(t testing.TB, dir string, raw []byte, opts ...string) string {
	t.Helper()
	rawPath := filepath.Join(dir, "guest.raw")
	if err := os.WriteFile(rawPath, raw, 0o644); err != nil {
		t.Fatal(err)
	}
	q := filepath.Join(dir, "guest.qcow2")
	qemuImg(t, append(append([]string{"convert", "-O", "qcow2"}, opts...), rawPath, q)...)
	return q
}

func TestGuestReadsGuestContent(t *testing.T) {
	t.Parallel()
	needQemuImg(t)
	raw := guestRaw(1, 5<<20+12345&^511)
	for _, tc := range []struct {
		name string
		opts []string
	}{
		{"compressed", []string{"-c"}},
		{"plain", nil},
		{"zstd", []string{"-c", "-o", "compression_type=zstd"}},
		{"4k clusters v2", []string{"-c", "-o", "cluster_size=4096,compat=0.10"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			ctx := t.Context()
			q := writeQcow2(t, t.TempDir(), raw, tc.opts...)
			src, err := origin.Open(ctx, q, origin.Config{})
			if err != nil {
				t.Fatal(err)
			}
			head := make([]byte, 512)
			if err := src.ReadAt(ctx, head, 0); err != nil {
				t.Fatal(err)
			}
			if c := origin.SniffContainer(head); c != origin.ContainerQcow2 {
				t.Fatalf("sniffed %q", c)
			}
			g, err := origin.OpenGuest(ctx, src, origin.ContainerQcow2)
			if err != nil {
				t.Fatal(err)
			}
			defer g.Close()
			if g.Size() != int64(len(raw)) {
				t.Fatalf("guest size %d, want %d", g.Size(), len(raw))
			}
			rc, _ := g.Stream(ctx)
			got, err := io.ReadAll(rc)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, raw) {
				t.Fatal("streamed guest content differs from the raw disk")
			}
			fi, _ := os.Stat(q)
			if ob := g.OriginBytes(); ob > fi.Size()*12/10+guestBlockForTest {
				t.Errorf("reading the guest whole read %d origin bytes for a %d-byte qcow2", ob, fi.Size())
			}
			r := rand.New(rand.NewPCG(2, 2))
			for range 200 {
				off := r.Int64N(int64(len(raw)))
				n := min(r.Int64N(300<<10)+1, int64(len(raw))-off)
				p := make([]byte, n)
				if err := g.ReadAt(ctx, p, off); err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(p, raw[off:off+n]) {
					t.Fatalf("ReadAt(%d, %d) differs", off, n)
				}
			}
			if err := g.ReadAt(ctx, make([]byte, 2), int64(len(raw))-1); err == nil {
				t.Fatal("a read past the guest size succeeded")
			}
		})
	}
}

const guestBlockForTest = 128 << 10

func TestGuestRefusals(t *testing.T) {
	t.Parallel()
	needQemuImg(t)
	ctx := t.Context()
	dir := t.TempDir()
	raw := guestRaw(3, 1<<20)
	base := writeQcow2(t, dir, raw, "-c")
	backed := filepath.Join(dir, "backed.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base, backed)
	luks := filepath.Join(dir, "luks.qcow2")
	qemuImg(t, "create", "-q", "--object", "secret,id=sec0,data=hoard", "-f", "qcow2",
		"-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10", luks, "1M")
	hdr, err := os.ReadFile(base)
	if err != nil {
		t.Fatal(err)
	}
	corrupt := func(name string, edit func(b []byte)) string {
		b := bytes.Clone(hdr)
		edit(b)
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	for _, tc := range []struct {
		name, path string
		want       []string
	}{
		{"backing file", backed, []string{backed, "backing file", base, "qemu-img convert"}},
		{"encrypted", luks, []string{luks, "encrypted", "luks", "--format raw"}},
		{"cluster bits", corrupt("bits.qcow2", func(b []byte) { b[23] = 40 }), []string{"corrupt qcow2 header", "cluster bits", "qemu-img check"}},
		{"L1 outside", corrupt("l1.qcow2", func(b []byte) { b[40] = 0x7f }), []string{"corrupt qcow2 header", "L1 table"}},
		{"version", corrupt("version.qcow2", func(b []byte) { b[7] = 9 }), []string{"qcow2 version 9", "qemu-img convert"}},
		{"corrupt bit", corrupt("bit.qcow2", func(b []byte) { b[79] |= 2 }), []string{"marked corrupt", "qemu-img check -r all"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			src, err := origin.Open(ctx, tc.path, origin.Config{})
			if err != nil {
				t.Fatal(err)
			}
			defer src.Close()
			_, err = origin.OpenGuest(ctx, src, origin.ContainerQcow2)
			if !errors.Is(err, origin.ErrContainer) || !errors.Is(err, origin.ErrInvalid) {
				t.Fatalf("OpenGuest: %v, want ErrContainer and ErrInvalid", err)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not say %q", err, w)
				}
			}
		})
	}
	src, err := origin.Open(ctx, base, origin.Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	if _, err := origin.OpenGuest(ctx, src, origin.ContainerVMDK); !errors.Is(err, origin.ErrContainer) || !strings.Contains(err.Error(), "--format raw") {
		t.Fatalf("vmdk: %v", err)
	}
}

func TestSniffContainer(t *testing.T) {
	t.Parallel()
	vdi := make([]byte, 512)
	copy(vdi[0x40:], []byte{0x7f, 0x10, 0xda, 0xbe})
	for _, tc := range []struct {
		head []byte
		want string
	}{
		{[]byte("QFI\xfb\x00\x00\x00\x03"), origin.ContainerQcow2},
		{[]byte("KDMV...."), origin.ContainerVMDK},
		{[]byte("# Disk DescriptorFile\n"), origin.ContainerVMDK},
		{[]byte("vhdxfile"), origin.ContainerVHDX},
		{[]byte("conectix"), origin.ContainerVPC},
		{vdi, origin.ContainerVDI},
		{make([]byte, 512), ""},
		{[]byte("QF"), ""},
	} {
		if got := origin.SniffContainer(tc.head); got != tc.want {
			t.Errorf("SniffContainer(%q) = %q, want %q", tc.head[:min(8, len(tc.head))], got, tc.want)
		}
	}
	for f, want := range map[string]string{"qcow2": "qcow2", "QCOW2": "qcow2", "raw": "", "iso": "", "vhd": "vpc", "vmdk": "vmdk"} {
		if got := origin.ContainerOf(f); got != want {
			t.Errorf("ContainerOf(%q) = %q, want %q", f, got, want)
		}
	}
}

// memSource is an in-memory origin.Source for the fuzz target.
type memSource struct{ b []byte }

func (m *memSource) Ref() origin.Ref { return origin.Ref{Kind: "file", Location: "/fuzz.qcow2"} }
func (m *memSource) Size() int64     { return int64(len(m.b)) }
func (m *memSource) ReadAt(_ context.Context, p []byte, off int64) error {
	if off < 0 || off+int64(len(p)) > int64(len(m.b)) {
		return errors.New("out of range")
	}
	copy(p, m.b[off:])
	return nil
}
func (m *memSource) Stream(context.Context) (io.ReadCloser, error) {
	return io.NopCloser(bytes.NewReader(m.b)), nil
}
func (m *memSource) Close() error { return nil }

// FuzzQcow2Header feeds header bytes (followed by a small valid image's
// tables and clusters) to OpenGuest: it must return an error or a guest view
// whose reads succeed or fail, and never panic or allocate without bound.
func FuzzQcow2Header(f *testing.F) {
	needQemuImg(f)
	raw := guestRaw(4, 256<<10)
	dir := f.TempDir()
	var images [][]byte
	for _, opts := range [][]string{{"-c"}, {"-o", "cluster_size=4096"}, {"-c", "-o", "compat=0.10,cluster_size=512"}} {
		b, err := os.ReadFile(writeQcow2(f, dir, raw, opts...))
		if err != nil {
			f.Fatal(err)
		}
		images = append(images, b)
		f.Add(uint8(len(images)-1), b[:min(len(b), 512)])
	}
	f.Add(uint8(0), []byte("QFI\xfb"))
	f.Fuzz(func(t *testing.T, which uint8, header []byte) {
		img := bytes.Clone(images[int(which)%len(images)])
		copy(img, header)
		if len(header) > len(img) {
			img = append(img, header[len(img):]...)
		}
		ctx := context.Background()
		g, err := origin.OpenGuest(ctx, &memSource{img}, origin.ContainerQcow2)
		if err != nil {
			if !errors.Is(err, origin.ErrContainer) && !strings.Contains(err.Error(), "qcow2 header") {
				t.Fatalf("error not marked ErrContainer: %v", err)
			}
			return
		}
		defer g.Close()
		p := make([]byte, 64<<10)
		for _, off := range []int64{0, g.Size() / 2, g.Size() - 1} {
			if off < 0 {
				continue
			}
			n := min(int64(len(p)), g.Size()-off)
			_ = g.ReadAt(ctx, p[:n], off)
		}
	})
}
