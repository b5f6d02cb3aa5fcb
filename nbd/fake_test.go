package nbd

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// memImage is the content of one in-memory export: random data, runs of a
// single byte value, and holes (zeroes).
type memImage struct {
	name, desc string
	data       []byte
	extents    []Extent // cover data exactly
	patterns   []patternRun

	// Hooks for protocol tests.
	block   func(ctx context.Context, off int64) error // called before each read
	failOff int64                                      // reads covering this offset fail (if >= 0)
	opened  atomic.Int32
	closed  atomic.Int32
	cached  atomic.Int64
}

type patternRun struct {
	off, length int64
	b           byte
}

// newMemImage builds an image of size bytes, alternating random data,
// single-byte patterns and holes, all 4 KiB aligned.
func newMemImage(name string, size int64, seed uint64) *memImage {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	m := &memImage{name: name, desc: "image " + name, data: make([]byte, size), failOff: -1}
	var off int64
	kind := 0
	for off < size {
		l := min(int64(1+r.IntN(64))*4096, size-off)
		switch kind % 3 {
		case 0: // random data
			for i := off; i < off+l; i += 8 {
				binary.LittleEndian.PutUint64(m.data[i:], r.Uint64()|1) // never a whole zero word
			}
			m.extents = append(m.extents, Extent{Length: l})
		case 1: // pattern
			b := byte(1 + r.IntN(255))
			for i := off; i < off+l; i++ {
				m.data[i] = b
			}
			m.patterns = append(m.patterns, patternRun{off, l, b})
			m.extents = append(m.extents, Extent{Length: l})
		case 2: // hole
			m.extents = append(m.extents, Extent{Length: l, Hole: true})
		}
		off += l
		kind++
	}
	// Merge adjacent alike extents so that they compare with what the
	// server (and clients) report.
	var merged []Extent
	for _, e := range m.extents {
		if n := len(merged); n > 0 && merged[n-1].Hole == e.Hole {
			merged[n-1].Length += e.Length
			continue
		}
		merged = append(merged, e)
	}
	m.extents = merged
	return m
}

// holes returns the [off, off+len) hole ranges.
func (m *memImage) holes() [][2]int64 {
	var out [][2]int64
	var off int64
	for _, e := range m.extents {
		if e.Hole {
			out = append(out, [2]int64{off, e.Length})
		}
		off += e.Length
	}
	return out
}

type memExport struct{ img *memImage }

func (e memExport) Size() int64 { return int64(len(e.img.data)) }

func (e memExport) ReadAt(ctx context.Context, p []byte, off int64) error {
	if e.img.block != nil {
		if err := e.img.block(ctx, off); err != nil {
			return err
		}
	}
	if f := e.img.failOff; f >= 0 && off <= f && f < off+int64(len(p)) {
		return errors.New("injected read error")
	}
	if off < 0 || off+int64(len(p)) > int64(len(e.img.data)) {
		return fmt.Errorf("read out of range: %d+%d", off, len(p))
	}
	copy(p, e.img.data[off:])
	return nil
}

func (e memExport) Close() error {
	e.img.closed.Add(1)
	return nil
}

func (e memExport) Extents(ctx context.Context, off, length int64) ([]Extent, error) {
	var out []Extent
	var pos int64
	for _, x := range e.img.extents {
		end := pos + x.Length
		if end > off {
			start := max(pos, off)
			out = append(out, Extent{Length: end - start, Hole: x.Hole})
			if end >= off+length {
				break
			}
		}
		pos = end
	}
	return out, nil
}

func (e memExport) Cache(ctx context.Context, off, length int64) error {
	e.img.cached.Add(length)
	return nil
}

// memExporter serves a fixed set of images.
type memExporter struct {
	mu     sync.Mutex
	images map[string]*memImage
}

func newMemExporter(imgs ...*memImage) *memExporter {
	x := &memExporter{images: map[string]*memImage{}}
	for _, m := range imgs {
		x.images[m.name] = m
	}
	return x
}

func (x *memExporter) Open(ctx context.Context, name string) (Export, error) {
	x.mu.Lock()
	defer x.mu.Unlock()
	m, ok := x.images[name]
	if !ok {
		return nil, fmt.Errorf("open %q: %w", name, ErrUnknownExport)
	}
	m.opened.Add(1)
	return memExport{m}, nil
}

func (x *memExporter) List(ctx context.Context) ([]ExportInfo, error) {
	x.mu.Lock()
	defer x.mu.Unlock()
	var out []ExportInfo
	for _, m := range x.images {
		out = append(out, ExportInfo{Name: m.name, Description: m.desc})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

// testServer is a running Server on one listener.
type testServer struct {
	network, addr string // addr: socket path or host:port
	srv           *Server
}

// startServer serves x on a unix socket ("unix") or TCP loopback ("tcp")
// until the test ends, then checks that Serve returned nil.
func startServer(t testing.TB, network string, x Exporter) *testServer {
	t.Helper()
	return startServerWith(t, network, &Server{Exporter: x, MaxInflight: 16})
}

// startServerWith is startServer with a Server of the test's own.
func startServerWith(t testing.TB, network string, srv *Server) *testServer {
	t.Helper()
	var ln net.Listener
	var err error
	switch network {
	case "unix":
		dir, derr := os.MkdirTemp("", "nbd") // short path: sun_path is 108 bytes
		if derr != nil {
			t.Fatal(derr)
		}
		t.Cleanup(func() { os.RemoveAll(dir) })
		ln, err = net.Listen("unix", filepath.Join(dir, "nbd.sock"))
	case "tcp":
		ln, err = net.Listen("tcp", "127.0.0.1:0")
	}
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Serve returned %v, want nil", err)
			}
		case <-time.After(10 * time.Second):
			t.Errorf("Serve did not return after cancel")
		}
	})
	return &testServer{network: network, addr: ln.Addr().String(), srv: srv}
}

// uri is the NBD URI of export name.
func (s *testServer) uri(name string) string {
	if s.network == "unix" {
		return "nbd+unix:///" + name + "?socket=" + s.addr
	}
	return "nbd://" + s.addr + "/" + name
}

// client is a minimal NBD client for protocol tests.
type client struct {
	t          testing.TB
	nc         net.Conn
	br         *bufio.Reader
	size       int64
	structured bool
	flags      uint16
}

func dial(t testing.TB, s *testServer) *client {
	t.Helper()
	nc, err := net.Dial(s.network, s.addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	nc.SetDeadline(time.Now().Add(30 * time.Second))
	c := &client{t: t, nc: nc, br: bufio.NewReader(nc)}
	var g [18]byte
	c.readFull(g[:])
	if binary.BigEndian.Uint64(g[0:]) != magicNBD || binary.BigEndian.Uint64(g[8:]) != magicOpt {
		t.Fatalf("bad greeting % x", g)
	}
	if f := binary.BigEndian.Uint16(g[16:]); f != flagFixedNewstyle|flagNoZeroes {
		t.Fatalf("handshake flags %#x", f)
	}
	c.write(binary.BigEndian.AppendUint32(nil, flagCFixedNewstyle|flagCNoZeroes))
	return c
}

func (c *client) readFull(b []byte) {
	c.t.Helper()
	if _, err := io.ReadFull(c.br, b); err != nil {
		c.t.Fatalf("client read: %v", err)
	}
}

func (c *client) write(b []byte) {
	c.t.Helper()
	if _, err := c.nc.Write(b); err != nil {
		c.t.Fatalf("client write: %v", err)
	}
}

func (c *client) sendOpt(opt uint32, data []byte) {
	c.t.Helper()
	b := binary.BigEndian.AppendUint64(nil, magicOpt)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	c.write(append(b, data...))
}

type optReply struct {
	opt, typ uint32
	data     []byte
}

func (c *client) readOptReply() optReply {
	c.t.Helper()
	var h [20]byte
	c.readFull(h[:])
	if m := binary.BigEndian.Uint64(h[0:]); m != magicOptReply {
		c.t.Fatalf("option reply magic %#x", m)
	}
	r := optReply{opt: binary.BigEndian.Uint32(h[8:]), typ: binary.BigEndian.Uint32(h[12:])}
	r.data = make([]byte, binary.BigEndian.Uint32(h[16:]))
	c.readFull(r.data)
	return r
}

// repliesUntilFinal reads option replies up to ACK or an error.
func (c *client) repliesUntilFinal() []optReply {
	c.t.Helper()
	var out []optReply
	for {
		r := c.readOptReply()
		out = append(out, r)
		if r.typ == repAck || r.typ&(1<<31) != 0 {
			return out
		}
	}
}

func nameData(name string, tail ...byte) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	return append(append(b, name...), tail...)
}

// metaData is the payload of NBD_OPT_{LIST,SET}_META_CONTEXT.
func metaData(name string, queries ...string) []byte {
	b := nameData(name)
	b = binary.BigEndian.AppendUint32(b, uint32(len(queries)))
	for _, q := range queries {
		b = append(b, nameData(q)...)
	}
	return b
}

// open negotiates structured replies and base:allocation (if asked) and
// enters transmission with NBD_OPT_GO.
func (c *client) open(name string, structured bool) {
	c.t.Helper()
	if structured {
		c.sendOpt(optStructuredReply, nil)
		if r := c.readOptReply(); r.typ != repAck {
			c.t.Fatalf("structured reply: %#x", r.typ)
		}
		c.sendOpt(optSetMetaContext, metaData(name, metaBaseAllocation))
		rs := c.repliesUntilFinal()
		if len(rs) != 2 || rs[0].typ != repMetaContext || rs[1].typ != repAck {
			c.t.Fatalf("set meta context replies: %+v", rs)
		}
		c.structured = true
	}
	c.sendOpt(optGo, nameData(name, 0, 0))
	for _, r := range c.repliesUntilFinal() {
		switch {
		case r.typ == repInfo && binary.BigEndian.Uint16(r.data) == infoExport:
			c.size = int64(binary.BigEndian.Uint64(r.data[2:]))
			c.flags = binary.BigEndian.Uint16(r.data[10:])
		case r.typ&(1<<31) != 0:
			c.t.Fatalf("NBD_OPT_GO %q: error %#x %s", name, r.typ, r.data)
		}
	}
}

func (c *client) request(typ uint16, flags uint16, handle, off uint64, length uint32, payload []byte) {
	c.t.Helper()
	b := make([]byte, requestHeaderSize, requestHeaderSize+len(payload))
	binary.BigEndian.PutUint32(b[0:], magicRequest)
	binary.BigEndian.PutUint16(b[4:], flags)
	binary.BigEndian.PutUint16(b[6:], typ)
	binary.BigEndian.PutUint64(b[8:], handle)
	binary.BigEndian.PutUint64(b[16:], off)
	binary.BigEndian.PutUint32(b[24:], length)
	c.write(append(b, payload...))
}

// reply is one whole transmission reply (all chunks of a structured one).
type reply struct {
	handle  uint64
	errno   uint32
	data    []byte      // read data, placed at request-relative offsets
	extents [][2]uint32 // block status descriptors
}

// readReply reads one reply. For a simple read reply, readLen says how many
// data bytes follow. Structured chunks of different handles are not expected
// to interleave (the server never splits a reply).
func (c *client) readReply(readLen func(handle uint64) int) reply {
	c.t.Helper()
	var m [4]byte
	c.readFull(m[:])
	switch binary.BigEndian.Uint32(m[:]) {
	case magicSimpleReply:
		var h [12]byte
		c.readFull(h[:])
		r := reply{errno: binary.BigEndian.Uint32(h[0:]), handle: binary.BigEndian.Uint64(h[4:])}
		if r.errno == 0 && readLen != nil {
			r.data = make([]byte, readLen(r.handle))
			c.readFull(r.data)
		}
		return r
	case magicStructReply:
		var h [16]byte
		c.readFull(h[:])
		flags, typ := binary.BigEndian.Uint16(h[0:]), binary.BigEndian.Uint16(h[2:])
		r := reply{handle: binary.BigEndian.Uint64(h[4:])}
		p := make([]byte, binary.BigEndian.Uint32(h[12:]))
		c.readFull(p)
		if flags&replyFlagDone == 0 {
			c.t.Fatalf("chunk without DONE flag (type %d)", typ)
		}
		switch typ {
		case replyTypeOffsetData:
			r.data = p[8:]
		case replyTypeBlockStatus:
			if id := binary.BigEndian.Uint32(p); id != metaBaseAllocationID {
				c.t.Fatalf("block status context %d", id)
			}
			for i := 4; i+8 <= len(p); i += 8 {
				r.extents = append(r.extents, [2]uint32{binary.BigEndian.Uint32(p[i:]), binary.BigEndian.Uint32(p[i+4:])})
			}
		case replyTypeError:
			r.errno = binary.BigEndian.Uint32(p)
			if ml := int(binary.BigEndian.Uint16(p[4:])); 6+ml != len(p) {
				c.t.Fatalf("error chunk message length %d in %d-byte payload", ml, len(p))
			}
		case 0:
		default:
			c.t.Fatalf("unexpected chunk type %d", typ)
		}
		return r
	default:
		c.t.Fatalf("bad reply magic % x", m)
	}
	return reply{}
}

// read issues one read and returns its reply.
func (c *client) read(handle, off uint64, length uint32) reply {
	c.t.Helper()
	c.request(cmdRead, 0, handle, off, length, nil)
	r := c.readReply(func(uint64) int { return int(length) })
	if r.handle != handle {
		c.t.Fatalf("reply handle %d, want %d", r.handle, handle)
	}
	return r
}
