package nbd

import (
	"encoding/binary"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// BenchmarkRead measures reads through a Go client over a unix socket with
// 16 requests in flight, structured replies on.
func BenchmarkRead(b *testing.B) {
	img := newMemImage("disk", 256<<20, 1)
	s := startServer(b, "unix", newMemExporter(img))
	for _, bc := range []struct {
		name   string
		size   int
		random bool
	}{
		{"4KiB-random", 4096, true},
		{"1MiB-sequential", 1 << 20, false},
	} {
		b.Run(bc.name, func(b *testing.B) {
			c := dial(b, s)
			c.open("disk", true)
			c.nc.SetDeadline(time.Time{})
			b.SetBytes(int64(bc.size))
			b.ReportAllocs()
			const depth = 16
			slots := make(chan struct{}, depth)
			sendErr := make(chan error, 1)
			n := b.N
			go func() {
				r := rand.New(rand.NewPCG(1, 2))
				blocks := uint64(len(img.data) / bc.size)
				hdr := make([]byte, requestHeaderSize)
				for i := range n {
					slots <- struct{}{}
					off := uint64(i) % blocks
					if bc.random {
						off = r.Uint64N(blocks)
					}
					binary.BigEndian.PutUint32(hdr[0:], magicRequest)
					binary.BigEndian.PutUint16(hdr[4:], 0)
					binary.BigEndian.PutUint16(hdr[6:], cmdRead)
					binary.BigEndian.PutUint64(hdr[8:], uint64(i))
					binary.BigEndian.PutUint64(hdr[16:], off*uint64(bc.size))
					binary.BigEndian.PutUint32(hdr[24:], uint32(bc.size))
					if _, err := c.nc.Write(hdr); err != nil {
						sendErr <- err
						return
					}
				}
				sendErr <- nil
			}()
			buf := make([]byte, 8+bc.size)
			var h [structuredReplySize]byte
			b.ResetTimer()
			for range n {
				if _, err := io.ReadFull(c.br, h[:]); err != nil {
					b.Fatal(err)
				}
				if binary.BigEndian.Uint16(h[6:]) != replyTypeOffsetData {
					b.Fatalf("reply type %d", binary.BigEndian.Uint16(h[6:]))
				}
				l := binary.BigEndian.Uint32(h[16:])
				if _, err := io.ReadFull(c.br, buf[:l]); err != nil {
					b.Fatal(err)
				}
				<-slots
			}
			if err := <-sendErr; err != nil {
				b.Fatal(err)
			}
		})
	}
}

// TestCompareQemuNbd copies a 1 GiB export with nbdcopy from hoard's server
// (in memory) and from qemu-nbd -r (a sparse raw file of the same content,
// in the page cache) and logs the throughput of each. It runs only when
// HOARD_NBD_BENCH=1.
func TestCompareQemuNbd(t *testing.T) {
	if os.Getenv("HOARD_NBD_BENCH") != "1" {
		t.Skip("set HOARD_NBD_BENCH=1 to compare with qemu-nbd")
	}
	needTool(t, "nbdcopy")
	needTool(t, "qemu-nbd")
	img := newMemImage("disk", 1<<30, 99)
	dir := t.TempDir()
	raw := filepath.Join(dir, "disk.raw")
	f, err := os.Create(raw)
	if err != nil {
		t.Fatal(err)
	}
	var off int64
	for _, e := range img.extents {
		if !e.Hole {
			if _, err := f.WriteAt(img.data[off:off+e.Length], off); err != nil {
				t.Fatal(err)
			}
		}
		off += e.Length
	}
	f.Truncate(off)
	f.Close()
	exec.Command("cat", raw).Run() // warm the page cache

	s := startServer(t, "unix", newMemExporter(img))
	qsock := filepath.Join(dir, "q.sock")
	q := exec.Command("qemu-nbd", "-r", "-t", "-f", "raw", "-k", qsock, "-e", "8", raw)
	if err := q.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { q.Process.Kill(); q.Wait() }()
	for range 100 {
		if c, err := net.Dial("unix", qsock); err == nil {
			c.Close()
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	copyRate := func(uri string, args ...string) float64 {
		best := 0.0
		for range 3 {
			start := time.Now()
			run(t, "nbdcopy", append(args, uri, "null:")...)
			best = max(best, float64(len(img.data))/(1<<20)/time.Since(start).Seconds())
		}
		return best
	}
	var report strings.Builder
	for _, args := range [][]string{{"--connections=1"}, {"--connections=4"}, {"--connections=4", "--no-extents"},
		{"--connections=4", "--no-extents", "--request-size=4096", "--requests=64"}} {
		h := copyRate(s.uri("disk"), args...)
		qr := copyRate("nbd+unix:///?socket="+qsock, args...)
		fmt.Fprintf(&report, "nbdcopy %s of 1 GiB: hoard %.0f MiB/s, qemu-nbd -r %.0f MiB/s\n", strings.Join(args, " "), h, qr)
	}
	t.Log("\n" + report.String())
}
