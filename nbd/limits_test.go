package nbd

import (
	"encoding/binary"
	"errors"
	"net"
	"os"
	"runtime"
	"testing"
	"time"
)

// TestGlobalBufferBudget (issue 7, item 13): clients that pipeline READs and
// never read the replies hold at most MaxBufferedBytes together (the heap
// stays flat), are dropped after WriteTimeout, and a well-behaved client is
// still served. Not parallel: it measures the heap.
func TestGlobalBufferBudget(t *testing.T) {
	const (
		budget  = 16 << 20
		bad     = 6
		perBad  = 64 // 1 MiB reads each: 64 MiB per client, 384 MiB in all
		readLen = 1 << 20
	)
	img := newMemImage("disk", 64<<20, 3)
	s := startServerWith(t, "unix", &Server{Exporter: newMemExporter(img), MaxInflight: 64,
		MaxBufferedBytes: budget, WriteTimeout: 2 * time.Second})
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	base := ms.HeapAlloc

	var bads []*client
	for range bad {
		c := dial(t, s)
		c.open("disk", false)
		for h := range perBad {
			c.request(cmdRead, 0, uint64(h), uint64(h)*readLen, readLen, nil)
		}
		bads = append(bads, c)
	}
	// Watch the heap while the bad clients pin what they can, and until the
	// server dropped them all (it stops holding anything).
	var peak uint64
	var peakBuffered int64
	sawFull := false
	deadline := time.Now().Add(30 * time.Second)
	for {
		runtime.ReadMemStats(&ms)
		peak = max(peak, ms.HeapAlloc)
		b := s.srv.Buffered()
		peakBuffered = max(peakBuffered, b)
		sawFull = sawFull || b >= budget/2
		if sawFull && b == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after 30s the server still holds %d buffered bytes (saw the budget fill: %v)", b, sawFull)
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Logf("%d clients pipelining %d MiB each: buffered peak %d MiB, heap growth peak %d MiB",
		bad, perBad*readLen>>20, peakBuffered>>20, (int64(peak)-int64(base))>>20)
	if peakBuffered > budget {
		t.Errorf("buffered peaked at %d bytes, budget %d", peakBuffered, budget)
	}
	if grew := int64(peak) - int64(base); grew > 4*budget {
		t.Errorf("heap grew by %d MiB with %d clients pipelining %d MiB each, want about the %d MiB budget",
			grew>>20, bad, perBad*readLen>>20, budget>>20)
	}
	// The bad clients were dropped (write timeout): their sockets end.
	for i, c := range bads {
		c.nc.SetReadDeadline(time.Now().Add(10 * time.Second))
		buf := make([]byte, 1<<20)
		for {
			if _, err := c.nc.Read(buf); err != nil {
				var ne net.Error
				if errors.As(err, &ne) && ne.Timeout() {
					t.Errorf("bad client %d: connection still open long after the write timeout", i)
				}
				break
			}
		}
	}
	// And a good client is served.
	good := dial(t, s)
	good.open("disk", false)
	good.nc.SetDeadline(time.Now().Add(10 * time.Second))
	if r := good.read(1, 5<<20, readLen); r.errno != 0 || string(r.data) != string(img.data[5<<20:5<<20+readLen]) {
		t.Fatalf("good client: errno %d, %d bytes", r.errno, len(r.data))
	}
}

// TestGoodClientServedWhileOthersPin: while a few clients pin all they may,
// a client that reads its replies gets them without waiting for the write
// timeout (each connection holds at most a quarter of the budget).
func TestGoodClientServedWhileOthersPin(t *testing.T) {
	t.Parallel()
	img := newMemImage("disk", 64<<20, 4)
	s := startServerWith(t, "unix", &Server{Exporter: newMemExporter(img), MaxInflight: 64,
		MaxBufferedBytes: 16 << 20, WriteTimeout: time.Minute})
	for range 3 {
		c := dial(t, s)
		c.open("disk", false)
		for h := range 32 {
			c.request(cmdRead, 0, uint64(h), uint64(h)<<20, 1<<20, nil)
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for s.srv.Buffered() < 8<<20 {
		if time.Now().After(deadline) {
			t.Fatalf("the pinning clients hold only %d bytes", s.srv.Buffered())
		}
		time.Sleep(10 * time.Millisecond)
	}
	good := dial(t, s)
	good.open("disk", true)
	good.nc.SetDeadline(time.Now().Add(5 * time.Second))
	for i := range 8 {
		if r := good.read(uint64(i), uint64(i)<<20, 1<<20); r.errno != 0 {
			t.Fatalf("good client read %d: errno %d", i, r.errno)
		}
	}
}

// TestMaxConns (issue 7, item 12): beyond MaxConns a connection waits in the
// backlog (no greeting, no fd, no goroutine) until another one ends.
func TestMaxConns(t *testing.T) {
	t.Parallel()
	s := startServerWith(t, "unix", &Server{Exporter: newMemExporter(newMemImage("disk", 1<<20, 5)), MaxConns: 2})
	a, b := dial(t, s), dial(t, s)
	_ = b
	nc, err := net.Dial("unix", s.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	var g [18]byte
	nc.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	if _, err := nc.Read(g[:]); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("third connection with MaxConns 2: %v, want no greeting yet", err)
	}
	a.nc.Close()
	nc.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := readFullConn(nc, g[:]); err != nil || binary.BigEndian.Uint64(g[:]) != magicNBD {
		t.Fatalf("third connection after one ended: %v % x", err, g)
	}
}

func readFullConn(nc net.Conn, b []byte) (int, error) {
	n := 0
	for n < len(b) {
		m, err := nc.Read(b[n:])
		n += m
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

// TestStalledClientsDroppedUnderPressure (issue 7, item 13): when clients
// that take no replies have filled MaxBufferedBytes, a client that needs
// memory is served within about StallEvict, not after WriteTimeout: the
// server drops the stalled connections holding the most.
func TestStalledClientsDroppedUnderPressure(t *testing.T) {
	t.Parallel()
	img := newMemImage("disk", 64<<20, 6)
	s := startServerWith(t, "unix", &Server{Exporter: newMemExporter(img), MaxInflight: 64,
		MaxBufferedBytes: 16 << 20, WriteTimeout: time.Minute, StallEvict: 300 * time.Millisecond})
	for range 6 {
		c := dial(t, s)
		c.open("disk", false)
		for h := range 32 {
			c.request(cmdRead, 0, uint64(h), uint64(h)<<20, 1<<20, nil)
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for s.srv.Buffered() < 15<<20 {
		if time.Now().After(deadline) {
			t.Fatalf("the stalled clients hold only %d bytes", s.srv.Buffered())
		}
		time.Sleep(10 * time.Millisecond)
	}
	good := dial(t, s)
	good.open("disk", true)
	start := time.Now()
	good.nc.SetDeadline(time.Now().Add(10 * time.Second))
	for i := range 8 {
		if r := good.read(uint64(i), uint64(i)<<20, 1<<20); r.errno != 0 {
			t.Fatalf("good client read %d: errno %d", i, r.errno)
		}
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("good client served after %v with the budget full of stalled clients", d)
	}
}
