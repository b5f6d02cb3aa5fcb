package nbd

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"encoding/hex"
	"flag"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

var update = flag.Bool("update", false, "rewrite golden files in testdata")

// clientScript builds client-side handshake bytes: client flags, then
// options.
type clientScript []byte

func newScript(flags uint32) clientScript {
	return binary.BigEndian.AppendUint32(nil, flags)
}

func (s clientScript) opt(opt uint32, data []byte) clientScript {
	s = binary.BigEndian.AppendUint64(s, magicOpt)
	s = binary.BigEndian.AppendUint32(s, opt)
	s = binary.BigEndian.AppendUint32(s, uint32(len(data)))
	return append(s, data...)
}

// transcripts are canned client inputs: golden files and fuzz seeds.
var transcripts = map[string]clientScript{
	"list-info-go": newScript(flagCFixedNewstyle|flagCNoZeroes).
		opt(optList, nil).
		opt(optStructuredReply, nil).
		opt(optListMetaContext, metaData("disk")).
		opt(optSetMetaContext, metaData("disk", metaBaseAllocation)).
		opt(optInfo, nameData("disk", 0, 2, 0, infoName, 0, infoDescription)).
		opt(optGo, nameData("disk", 0, 0)),
	"errors-then-export-name": newScript(flagCFixedNewstyle).
		opt(99, []byte("junk")).
		opt(optGo, nameData("missing", 0, 0)).
		opt(optInfo, []byte{0, 0}).
		opt(optSetMetaContext, metaData("disk", metaBaseAllocation)).
		opt(optExportName, []byte("disk")),
	"abort": newScript(flagCFixedNewstyle).opt(optAbort, nil),
}

// negotiateBytes runs the server's handshake over in-memory input and
// returns what the server wrote.
func negotiateBytes(t testing.TB, in []byte) ([]byte, error) {
	var out bytes.Buffer
	c := &conn{
		srv: &Server{Exporter: newMemExporter(newMemImage("disk", 64<<10, 1))},
		log: slog.New(slog.DiscardHandler),
		br:  bufio.NewReader(bytes.NewReader(in)),
		hw:  bufio.NewWriter(&out),
	}
	exp, _, err := c.negotiate(context.Background())
	if exp != nil {
		exp.Close()
	}
	return out.Bytes(), err
}

func TestHandshakeGolden(t *testing.T) {
	t.Parallel()
	for name, in := range transcripts {
		out, _ := negotiateBytes(t, in)
		got := []byte(hex.Dump(out))
		path := filepath.Join("testdata", "handshake-"+name+".golden")
		if *update {
			if err := os.WriteFile(path, got, 0o644); err != nil {
				t.Fatal(err)
			}
			continue
		}
		want, err := os.ReadFile(path)
		if err != nil {
			t.Fatalf("%v (run go test -run Golden -update)", err)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("%s: server output differs from %s:\n%s", name, path, got)
		}
	}
}

func FuzzHandshake(f *testing.F) {
	for _, in := range transcripts {
		f.Add([]byte(in))
	}
	f.Add([]byte{0, 0, 0, 1})
	f.Fuzz(func(t *testing.T, in []byte) {
		done := make(chan struct{})
		go func() {
			defer close(done)
			negotiateBytes(t, in)
		}()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("handshake hung on finite input")
		}
	})
}

// scriptConn is a net.Conn that reads a fixed input and discards output.
type scriptConn struct {
	r  io.Reader
	mu sync.Mutex
	n  int
}

func (c *scriptConn) Read(p []byte) (int, error) { return c.r.Read(p) }
func (c *scriptConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.n += len(p)
	return len(p), nil
}
func (c *scriptConn) Close() error                     { return nil }
func (c *scriptConn) LocalAddr() net.Addr              { return &net.UnixAddr{Name: "fuzz", Net: "unix"} }
func (c *scriptConn) RemoteAddr() net.Addr             { return &net.UnixAddr{Name: "fuzz", Net: "unix"} }
func (c *scriptConn) SetDeadline(time.Time) error      { return nil }
func (c *scriptConn) SetReadDeadline(time.Time) error  { return nil }
func (c *scriptConn) SetWriteDeadline(time.Time) error { return nil }

func encodeRequest(r request) []byte {
	b := make([]byte, requestHeaderSize)
	binary.BigEndian.PutUint32(b[0:], magicRequest)
	binary.BigEndian.PutUint16(b[4:], r.flags)
	binary.BigEndian.PutUint16(b[6:], r.typ)
	binary.BigEndian.PutUint64(b[8:], r.handle)
	binary.BigEndian.PutUint64(b[16:], r.offset)
	binary.BigEndian.PutUint32(b[24:], r.length)
	return b
}

// FuzzRequest decodes request headers and runs the transmission loop on
// arbitrary request streams.
func FuzzRequest(f *testing.F) {
	f.Add(encodeRequest(request{typ: cmdRead, handle: 1, length: 4096}), true)
	f.Add(append(encodeRequest(request{typ: cmdWrite, handle: 2, length: 4}), 1, 2, 3, 4), false)
	f.Add(encodeRequest(request{typ: cmdBlockStatus, flags: cmdFlagReqOne, offset: 100, length: 1 << 20}), true)
	f.Add(encodeRequest(request{typ: cmdRead, offset: ^uint64(0), length: ^uint32(0)}), false)
	f.Add(encodeRequest(request{typ: cmdDisc}), false)
	img := newMemImage("disk", 1<<20, 1)
	f.Fuzz(func(t *testing.T, in []byte, structured bool) {
		if r, err := parseRequest(in); err == nil {
			if !bytes.Equal(encodeRequest(r), in[:requestHeaderSize]) {
				t.Fatalf("request round trip: %x -> %+v", in[:requestHeaderSize], r)
			}
		} else if len(in) >= 4 && binary.BigEndian.Uint32(in) == magicRequest && len(in) >= requestHeaderSize {
			t.Fatalf("valid header rejected: %v", err)
		}

		sc := &scriptConn{r: bytes.NewReader(in)}
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		tr := &transmission{
			conn: &conn{
				srv:        &Server{MaxInflight: 4},
				log:        slog.New(slog.DiscardHandler),
				br:         bufio.NewReader(sc),
				structured: structured,
				metaAlloc:  structured,
			},
			nc:     sc,
			exp:    memExport{img},
			size:   int64(len(img.data)),
			cancel: cancel,
		}
		done := make(chan struct{})
		go func() {
			defer close(done)
			tr.run(ctx)
		}()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("transmission hung on finite input")
		}
	})
}
