package nbd

import (
	"bytes"
	"context"
	"math/rand/v2"
	"net"
	"runtime"
	"sync"
	"testing"
	"time"
)

// TestNoGoroutineLeak is not parallel: parallel tests wait until it is done,
// so the goroutine count is the server's alone.
func TestNoGoroutineLeak(t *testing.T) {
	before := runtime.NumGoroutine()
	img := newMemImage("disk", 1<<20, 13)
	started := make(chan struct{}, 8)
	img.block = func(ctx context.Context, off int64) error {
		if off == 0 {
			started <- struct{}{}
			<-ctx.Done()
			return ctx.Err()
		}
		return nil
	}
	ln, err := net.Listen("unix", t.TempDir()+"/s")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	srv := &Server{Exporter: newMemExporter(img)}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, ln) }()
	s := &testServer{network: "unix", addr: ln.Addr().String(), srv: srv}

	for i := range 6 {
		c := dial(t, s)
		c.open("disk", i%2 == 0)
		c.request(cmdRead, 0, 1, 0, 4096, nil) // blocks until cancelled
		c.request(cmdRead, 0, 2, 4096, 4096, nil)
		<-started
		switch i % 3 {
		case 0: // vanish mid-request
			c.nc.Close()
		case 1: // soft disconnect with a request in flight: waits for it
			c.request(cmdDisc, 0, 3, 0, 0, nil)
		case 2: // left connected for the shutdown
		}
	}
	half := dial(t, s) // mid-handshake
	_ = half
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Serve: %v", err)
	}
	if o, c := img.opened.Load(), img.closed.Load(); o != c {
		t.Errorf("%d exports opened, %d closed", o, c)
	}
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > before {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			t.Fatalf("%d goroutines after Serve returned, %d before:\n%s",
				runtime.NumGoroutine(), before, buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestManyConnectionsPipelined checks every byte of many concurrent,
// pipelined random reads over several connections.
func TestManyConnectionsPipelined(t *testing.T) {
	t.Parallel()
	img := newMemImage("disk", 16<<20, 14)
	s := startServer(t, "tcp", newMemExporter(img))
	var wg sync.WaitGroup
	for conn := range 8 {
		c := dial(t, s)
		c.open("disk", conn%2 == 0)
		// readReply's Fatalf in this goroutine ends it; wg.Go's deferred Done
		// still runs.
		wg.Go(func() {
			r := rand.New(rand.NewPCG(uint64(conn), 1))
			type rd struct{ off, n uint64 }
			reqs := map[uint64]rd{}
			for h := range uint64(200) {
				n := uint64(1 + r.IntN(256<<10))
				reqs[h] = rd{r.Uint64N(uint64(len(img.data)) - n), n}
			}
			sent := make(chan struct{})
			defer func() { <-sent }()
			go func() { // the replies are read below; requests pipeline freely
				defer close(sent)
				for h := range uint64(200) {
					hdr := encodeRequest(request{typ: cmdRead, handle: h, offset: reqs[h].off, length: uint32(reqs[h].n)})
					if _, err := c.nc.Write(hdr); err != nil {
						return
					}
				}
			}()
			for range 200 {
				rep := c.readReply(func(h uint64) int { return int(reqs[h].n) })
				want := reqs[rep.handle]
				if rep.errno != 0 || !bytes.Equal(rep.data, img.data[want.off:want.off+want.n]) {
					t.Errorf("conn %d handle %d: errno %d or data mismatch", conn, rep.handle, rep.errno)
					return
				}
			}
		})
	}
	wg.Wait()
}
