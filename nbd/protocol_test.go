package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"sync"
	"testing"
	"time"
)

var networks = []string{"unix", "tcp"}

func TestReadSimpleAndStructured(t *testing.T) {
	t.Parallel()
	img := newMemImage("disk", 4<<20, 1)
	for _, network := range networks {
		s := startServer(t, network, newMemExporter(img))
		for _, structured := range []bool{false, true} {
			c := dial(t, s)
			c.open("disk", structured)
			if c.size != int64(len(img.data)) {
				t.Fatalf("size %d, want %d", c.size, len(img.data))
			}
			want := uint16(tflagHasFlags | tflagReadOnly | tflagSendFlush | tflagSendCache | tflagCanMultiConn)
			if structured {
				want |= tflagSendDF
			}
			if c.flags != want {
				t.Errorf("transmission flags %#x, want %#x", c.flags, want)
			}
			for i, rg := range [][2]uint64{{0, 4096}, {12345, 1}, {1 << 20, 1 << 20}, {uint64(len(img.data)) - 7, 7}} {
				r := c.read(uint64(i), rg[0], uint32(rg[1]))
				if r.errno != 0 || !bytes.Equal(r.data, img.data[rg[0]:rg[0]+rg[1]]) {
					t.Fatalf("%s structured=%v read %v: errno %d, data mismatch", network, structured, rg, r.errno)
				}
			}
			c.request(cmdFlush, 0, 99, 0, 0, nil)
			if r := c.readReply(nil); r.errno != 0 || r.handle != 99 {
				t.Errorf("flush: %+v", r)
			}
			c.request(cmdCache, 0, 100, 0, 8192, nil)
			if r := c.readReply(nil); r.errno != 0 || r.handle != 100 {
				t.Errorf("cache: %+v", r)
			}
			c.request(cmdDisc, 0, 101, 0, 0, nil)
			if _, err := c.br.ReadByte(); err != io.EOF {
				t.Errorf("after NBD_CMD_DISC: %v, want EOF", err)
			}
		}
	}
	if img.cached.Load() == 0 {
		t.Error("NBD_CMD_CACHE did not reach the Cacher")
	}
}

func TestInvalidRequests(t *testing.T) {
	t.Parallel()
	img := newMemImage("disk", 1<<20, 2)
	s := startServer(t, "unix", newMemExporter(img))
	for _, structured := range []bool{false, true} {
		c := dial(t, s)
		c.open("disk", structured)
		size := uint64(len(img.data))
		tests := []struct {
			name      string
			typ       uint16
			off       uint64
			len       uint32
			wantErrno uint32
		}{
			{"read past end", cmdRead, size - 10, 4096, errnoInval},
			{"read offset past end", cmdRead, size + 4096, 1, errnoInval},
			{"read offset overflow", cmdRead, ^uint64(0) - 10, 4096, errnoInval},
			{"read zero length", cmdRead, 0, 0, errnoInval},
			{"read too long", cmdRead, 0, MaxRequestLength + 1, errnoInval},
			{"trim", cmdTrim, 0, 4096, errnoPerm},
			{"write zeroes", cmdWriteZeroes, 0, 4096, errnoPerm},
			{"unknown command", 42, 0, 4096, errnoInval},
			{"cache past end", cmdCache, size, 1, errnoInval},
		}
		for i, tt := range tests {
			c.request(tt.typ, 0, uint64(i), tt.off, tt.len, nil)
			r := c.readReply(nil)
			if r.handle != uint64(i) || r.errno != tt.wantErrno {
				t.Errorf("structured=%v %s: handle %d errno %d, want %d", structured, tt.name, r.handle, r.errno, tt.wantErrno)
			}
		}
		// Block status without a negotiated context.
		if !structured {
			c.request(cmdBlockStatus, 0, 7, 0, 4096, nil)
			if r := c.readReply(nil); r.errno != errnoInval {
				t.Errorf("block status without context: errno %d", r.errno)
			}
		}
		// The connection still works.
		if r := c.read(1000, 100, 100); r.errno != 0 || !bytes.Equal(r.data, img.data[100:200]) {
			t.Errorf("read after errors failed: %d", r.errno)
		}
	}
}

func TestWriteRefusedPayloadDiscarded(t *testing.T) {
	t.Parallel()
	img := newMemImage("disk", 1<<20, 3)
	for _, network := range networks {
		s := startServer(t, network, newMemExporter(img))
		c := dial(t, s)
		c.open("disk", false)
		// A payload that looks like a request header must not be parsed as one.
		payload := bytes.Repeat([]byte{0x25, 0x60, 0x95, 0x13}, 256<<10/4)
		c.request(cmdWrite, 0, 1, 0, uint32(len(payload)), payload)
		if r := c.readReply(nil); r.handle != 1 || r.errno != errnoPerm {
			t.Fatalf("write: handle %d errno %d, want EPERM", r.handle, r.errno)
		}
		if r := c.read(2, 4096, 4096); r.errno != 0 || !bytes.Equal(r.data, img.data[4096:8192]) {
			t.Fatalf("read after write failed: %d", r.errno)
		}
	}
}

func TestBlockStatus(t *testing.T) {
	t.Parallel()
	img := newMemImage("disk", 8<<20, 4)
	s := startServer(t, "tcp", newMemExporter(img))
	c := dial(t, s)
	c.open("disk", true)
	c.request(cmdBlockStatus, 0, 1, 0, uint32(len(img.data)), nil)
	r := c.readReply(nil)
	if r.errno != 0 {
		t.Fatalf("block status errno %d", r.errno)
	}
	if len(r.extents) != len(img.extents) {
		t.Fatalf("%d extents, want %d", len(r.extents), len(img.extents))
	}
	for i, e := range img.extents {
		want := [2]uint32{uint32(e.Length), 0}
		if e.Hole {
			want[1] = stateHole | stateZero
		}
		if r.extents[i] != want {
			t.Errorf("extent %d: %v, want %v", i, r.extents[i], want)
		}
	}
	// NBD_CMD_FLAG_REQ_ONE, from inside the first extent, clipped to the request.
	first := img.extents[0].Length
	c.request(cmdBlockStatus, cmdFlagReqOne, 2, 100, uint32(first), nil)
	r = c.readReply(nil)
	if len(r.extents) != 1 || r.extents[0][0] != uint32(first-100) {
		t.Errorf("REQ_ONE: %v, want one extent of %d", r.extents, first-100)
	}
	c.request(cmdBlockStatus, 0, 3, 0, 10, nil)
	if r = c.readReply(nil); len(r.extents) != 1 || r.extents[0][0] != 10 {
		t.Errorf("short request: %v", r.extents)
	}
}

func TestSlowReadDoesNotStallOthers(t *testing.T) {
	t.Parallel()
	img := newMemImage("disk", 1<<20, 5)
	release := make(chan struct{})
	img.block = func(ctx context.Context, off int64) error {
		if off == 0 {
			select {
			case <-release:
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		return nil
	}
	s := startServer(t, "unix", newMemExporter(img))
	for _, structured := range []bool{false, true} {
		c := dial(t, s)
		c.open("disk", structured)
		c.request(cmdRead, 0, 1, 0, 4096, nil)     // slow
		c.request(cmdRead, 0, 2, 8192, 65536, nil) // fast
		lens := map[uint64]int{1: 4096, 2: 65536}
		r := c.readReply(func(h uint64) int { return lens[h] })
		if r.handle != 2 || !bytes.Equal(r.data, img.data[8192:8192+65536]) {
			t.Fatalf("first reply is for handle %d, want the fast read (2)", r.handle)
		}
		release <- struct{}{}
		r = c.readReply(func(h uint64) int { return lens[h] })
		if r.handle != 1 || !bytes.Equal(r.data, img.data[:4096]) {
			t.Fatalf("second reply: handle %d", r.handle)
		}
	}
}

func TestBackendErrorFailsOnlyThatRequest(t *testing.T) {
	t.Parallel()
	img := newMemImage("disk", 1<<20, 6)
	img.failOff = 500000
	s := startServer(t, "tcp", newMemExporter(img))
	for _, structured := range []bool{false, true} {
		c := dial(t, s)
		c.open("disk", structured)
		if r := c.read(1, 499000, 4096); r.errno != errnoIO {
			t.Fatalf("structured=%v: errno %d, want EIO", structured, r.errno)
		}
		if r := c.read(2, 0, 4096); r.errno != 0 || !bytes.Equal(r.data, img.data[:4096]) {
			t.Fatalf("read after backend error: errno %d", r.errno)
		}
	}
}

func TestClientVanishesMidRequest(t *testing.T) {
	t.Parallel()
	img := newMemImage("disk", 1<<20, 7)
	started := make(chan struct{}, 1)
	cancelled := make(chan struct{}, 1)
	img.block = func(ctx context.Context, off int64) error {
		if off != 0 {
			return nil
		}
		started <- struct{}{}
		<-ctx.Done()
		cancelled <- struct{}{}
		return ctx.Err()
	}
	s := startServer(t, "unix", newMemExporter(img))
	c := dial(t, s)
	c.open("disk", true)
	c.request(cmdRead, 0, 1, 0, 4096, nil)
	<-started
	c.nc.Close()
	select {
	case <-cancelled:
	case <-time.After(10 * time.Second):
		t.Fatal("backend ctx not cancelled after the client vanished")
	}
	deadline := time.Now().Add(10 * time.Second)
	for img.closed.Load() != img.opened.Load() {
		if time.Now().After(deadline) {
			t.Fatal("export not closed after the client vanished")
		}
		time.Sleep(time.Millisecond)
	}
	// Others are still served.
	c2 := dial(t, s)
	c2.open("disk", false)
	if r := c2.read(1, 4096, 4096); r.errno != 0 || !bytes.Equal(r.data, img.data[4096:8192]) {
		t.Fatalf("second client read: errno %d", r.errno)
	}
}

func TestServeReturnsNilOnCancel(t *testing.T) {
	t.Parallel()
	img := newMemImage("disk", 1<<20, 8)
	blocked := make(chan struct{}, 1)
	img.block = func(ctx context.Context, off int64) error {
		if off == 0 {
			blocked <- struct{}{}
			<-ctx.Done()
			return ctx.Err()
		}
		return nil
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	srv := &Server{Exporter: newMemExporter(img)}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, ln) }()
	s := &testServer{network: "tcp", addr: ln.Addr().String(), srv: srv}

	busy := dial(t, s) // a request in flight
	busy.open("disk", true)
	busy.request(cmdRead, 0, 1, 0, 4096, nil)
	<-blocked
	idle := dial(t, s) // idle in transmission
	idle.open("disk", false)
	_ = dial(t, s) // stuck in the handshake
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Serve: %v, want nil", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not return after cancel")
	}
	if r := busy.readReply(nil); r.errno != errnoShutdown {
		t.Errorf("in-flight read at shutdown: errno %d, want ESHUTDOWN", r.errno)
	}
	if o, c := img.opened.Load(), img.closed.Load(); o != c {
		t.Errorf("%d exports opened, %d closed", o, c)
	}
	if _, err := net.Dial("tcp", s.addr); err == nil {
		t.Error("listener still accepting after Serve returned")
	}
}

func TestOptions(t *testing.T) {
	t.Parallel()
	a, b := newMemImage("alpha", 1<<20, 9), newMemImage("beta", 2<<20, 10)
	s := startServer(t, "unix", newMemExporter(a, b))
	c := dial(t, s)

	c.sendOpt(optList, nil)
	rs := c.repliesUntilFinal()
	var names []string
	for _, r := range rs[:len(rs)-1] {
		if r.typ != repServer {
			t.Fatalf("list reply %#x", r.typ)
		}
		n := binary.BigEndian.Uint32(r.data)
		names = append(names, string(r.data[4:4+n]))
		if d := string(r.data[4+n:]); d != "image "+names[len(names)-1] {
			t.Errorf("description %q", d)
		}
	}
	if len(names) != 2 || names[0] != "alpha" || names[1] != "beta" || rs[len(rs)-1].typ != repAck {
		t.Errorf("NBD_OPT_LIST: %v", names)
	}

	c.sendOpt(optList, []byte{1})
	if r := c.readOptReply(); r.typ != repErrInvalid {
		t.Errorf("LIST with data: %#x", r.typ)
	}
	c.sendOpt(77, []byte("whatever"))
	if r := c.readOptReply(); r.typ != repErrUnsup || r.opt != 77 {
		t.Errorf("unknown option: %+v", r)
	}
	c.sendOpt(optStartTLS, nil)
	if r := c.readOptReply(); r.typ != repErrUnsup {
		t.Errorf("STARTTLS: %#x", r.typ)
	}
	c.sendOpt(optInfo, nameData("nope", 0, 0))
	if r := c.readOptReply(); r.typ != repErrUnknown {
		t.Errorf("INFO unknown export: %#x", r.typ)
	}
	c.sendOpt(optInfo, nameData("beta")) // missing request count
	if r := c.readOptReply(); r.typ != repErrInvalid {
		t.Errorf("INFO malformed: %#x", r.typ)
	}
	c.sendOpt(optSetMetaContext, metaData("beta", metaBaseAllocation))
	if r := c.readOptReply(); r.typ != repErrInvalid {
		t.Errorf("SET_META_CONTEXT before structured replies: %#x", r.typ)
	}
	c.sendOpt(optStructuredReply, nil)
	c.readOptReply()
	c.sendOpt(optListMetaContext, metaData("beta"))
	rs = c.repliesUntilFinal()
	if len(rs) != 2 || rs[0].typ != repMetaContext || string(rs[0].data[4:]) != metaBaseAllocation {
		t.Errorf("LIST_META_CONTEXT: %+v", rs)
	}
	c.sendOpt(optSetMetaContext, metaData("beta", "qemu:dirty-bitmap:x"))
	if rs = c.repliesUntilFinal(); len(rs) != 1 || rs[0].typ != repAck {
		t.Errorf("SET_META_CONTEXT with no match: %+v", rs)
	}
	c.sendOpt(optSetMetaContext, metaData("nope", metaBaseAllocation))
	if r := c.readOptReply(); r.typ != repErrUnknown {
		t.Errorf("SET_META_CONTEXT unknown export: %#x", r.typ)
	}

	req := []byte{0, 3, 0, infoName, 0, infoDescription, 0, infoBlockSize}
	c.sendOpt(optInfo, nameData("beta", req...))
	got := map[uint16][]byte{}
	for _, r := range c.repliesUntilFinal() {
		if r.typ == repInfo {
			got[binary.BigEndian.Uint16(r.data)] = r.data[2:]
		}
	}
	if e := got[infoExport]; len(e) != 10 || binary.BigEndian.Uint64(e) != 2<<20 {
		t.Errorf("NBD_INFO_EXPORT %x", e)
	}
	if string(got[infoName]) != "beta" || string(got[infoDescription]) != "image beta" {
		t.Errorf("name %q description %q", got[infoName], got[infoDescription])
	}
	bs := got[infoBlockSize]
	if len(bs) != 12 || binary.BigEndian.Uint32(bs) != 1 || binary.BigEndian.Uint32(bs[4:]) != 4096 ||
		binary.BigEndian.Uint32(bs[8:]) != 32<<20 {
		t.Errorf("NBD_INFO_BLOCK_SIZE %x", bs)
	}
	if a.opened.Load() != a.closed.Load() || b.opened.Load() != b.closed.Load() {
		t.Errorf("INFO leaked an open export")
	}

	// Enter transmission with NBD_OPT_EXPORT_NAME (no zeroes negotiated).
	c.sendOpt(optExportName, []byte("alpha"))
	var h [10]byte
	c.readFull(h[:])
	if binary.BigEndian.Uint64(h[:]) != 1<<20 {
		t.Fatalf("EXPORT_NAME size %d", binary.BigEndian.Uint64(h[:]))
	}
	c.structured = true
	// base:allocation was not selected for alpha.
	c.request(cmdBlockStatus, 0, 5, 0, 4096, nil)
	if r := c.readReply(nil); r.errno != errnoInval {
		t.Errorf("block status without context: errno %d", r.errno)
	}
	if r := c.read(6, 0, 100); r.errno != 0 || !bytes.Equal(r.data, a.data[:100]) {
		t.Errorf("read after EXPORT_NAME: %d", r.errno)
	}
}

func TestHandshakeHardDisconnects(t *testing.T) {
	t.Parallel()
	s := startServer(t, "tcp", newMemExporter(newMemImage("disk", 1<<20, 11)))
	tests := []struct {
		name string
		send func(c *client)
	}{
		{"unknown export name", func(c *client) { c.sendOpt(optExportName, []byte("nope")) }},
		{"option too long", func(c *client) {
			b := binary.BigEndian.AppendUint64(nil, magicOpt)
			b = binary.BigEndian.AppendUint32(b, optList)
			c.write(binary.BigEndian.AppendUint32(b, 1<<30))
		}},
		{"bad option magic", func(c *client) { c.write(make([]byte, 16)) }},
		{"abort", func(c *client) {
			c.sendOpt(optAbort, nil)
			if r := c.readOptReply(); r.typ != repAck {
				t.Errorf("abort reply %#x", r.typ)
			}
		}},
	}
	for _, tt := range tests {
		c := dial(t, s)
		tt.send(c)
		c.nc.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.br.ReadByte(); !errors.Is(err, io.EOF) {
			t.Errorf("%s: %v, want EOF", tt.name, err)
		}
	}
	// Unknown client flags.
	nc, err := net.Dial("tcp", s.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	io.ReadFull(nc, make([]byte, 18))
	nc.Write([]byte{0, 0, 0, 0x80})
	nc.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := nc.Read(make([]byte, 1)); !errors.Is(err, io.EOF) {
		t.Errorf("unknown client flags: %v, want EOF", err)
	}
}

func TestInflightBytesBounded(t *testing.T) {
	t.Parallel()
	img := newMemImage("disk", 64<<20, 12)
	var mu sync.Mutex
	var cur, peak int
	release := make(chan struct{})
	img.block = func(ctx context.Context, off int64) error {
		mu.Lock()
		cur++
		peak = max(peak, cur)
		mu.Unlock()
		defer func() {
			mu.Lock()
			cur--
			mu.Unlock()
		}()
		select {
		case <-release:
		case <-time.After(500 * time.Millisecond):
		}
		return nil
	}
	s := startServer(t, "unix", newMemExporter(img))
	c := dial(t, s)
	c.open("disk", true)
	for i := range 4 {
		c.request(cmdRead, 0, uint64(i), uint64(i)*(8<<20), 24<<20, nil)
	}
	for range 4 {
		if r := c.readReply(nil); r.errno != 0 {
			t.Fatalf("read errno %d", r.errno)
		}
	}
	close(release)
	if peak != 2 {
		t.Errorf("%d reads of 24 MiB in flight at once, want 2 (64 MiB budget)", peak)
	}
}
