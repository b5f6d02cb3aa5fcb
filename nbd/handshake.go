package nbd

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync/atomic"
)

// conn is the state of one client connection negotiated during the
// handshake.
type conn struct {
	srv *Server
	log *slog.Logger
	br  *bufio.Reader
	hw  *bufio.Writer // handshake replies; flushed after each option

	noZeroes   bool
	structured bool   // NBD_OPT_STRUCTURED_REPLY acknowledged
	metaAlloc  bool   // base:allocation selected ...
	metaExport string // ... for this export name
	optBuf     []byte

	// closing is set when the server shuts down: the write deadline is then
	// the shutdown grace, no longer extended per reply.
	closing atomic.Bool
}

// errAbort ends a handshake after NBD_OPT_ABORT.
var errAbort = errors.New("client aborted the handshake")

// transmissionFlags are the flags sent for every export.
func (c *conn) transmissionFlags() uint16 {
	f := uint16(tflagHasFlags | tflagReadOnly | tflagSendFlush | tflagSendCache | tflagCanMultiConn)
	if c.structured {
		f |= tflagSendDF
	}
	return f
}

// negotiate runs the fixed newstyle handshake up to the transmission phase.
// It returns the opened export and its name, or an error when the session
// must end. It reads only from c.br and writes only to c.hw.
func (c *conn) negotiate(ctx context.Context) (Export, string, error) {
	var b [20]byte
	binary.BigEndian.PutUint64(b[0:], magicNBD)
	binary.BigEndian.PutUint64(b[8:], magicOpt)
	binary.BigEndian.PutUint16(b[16:], flagFixedNewstyle|flagNoZeroes)
	c.hw.Write(b[:18])
	if err := c.hw.Flush(); err != nil {
		return nil, "", fmt.Errorf("send greeting: %w", err)
	}
	if _, err := io.ReadFull(c.br, b[:4]); err != nil {
		return nil, "", fmt.Errorf("read client flags: %w", err)
	}
	cflags := binary.BigEndian.Uint32(b[:4])
	if cflags&^(flagCFixedNewstyle|flagCNoZeroes) != 0 {
		return nil, "", fmt.Errorf("unknown client flags %#x", cflags)
	}
	c.noZeroes = cflags&flagCNoZeroes != 0

	for {
		if _, err := io.ReadFull(c.br, b[:16]); err != nil {
			return nil, "", fmt.Errorf("read option header: %w", err)
		}
		if m := binary.BigEndian.Uint64(b[0:8]); m != magicOpt {
			return nil, "", fmt.Errorf("bad option magic %#x", m)
		}
		opt := binary.BigEndian.Uint32(b[8:12])
		n := binary.BigEndian.Uint32(b[12:16])
		if n > maxOptionLen {
			return nil, "", fmt.Errorf("option %d: payload of %d bytes is too long", opt, n)
		}
		if cap(c.optBuf) < int(n) {
			c.optBuf = make([]byte, n)
		}
		data := c.optBuf[:n]
		if _, err := io.ReadFull(c.br, data); err != nil {
			return nil, "", fmt.Errorf("read option %d payload: %w", opt, err)
		}
		exp, name, done, err := c.option(ctx, opt, data)
		if err == nil {
			err = c.hw.Flush()
		}
		if err != nil {
			if exp != nil {
				exp.Close()
			}
			return nil, "", err
		}
		if done {
			return exp, name, nil
		}
	}
}

// option handles one option. done reports that transmission begins with exp.
func (c *conn) option(ctx context.Context, opt uint32, data []byte) (exp Export, name string, done bool, err error) {
	switch opt {
	case optExportName:
		if len(data) > maxStringLen {
			return nil, "", false, errors.New("NBD_OPT_EXPORT_NAME: name too long")
		}
		name = string(data)
		exp, err = c.srv.Exporter.Open(ctx, name)
		if err != nil {
			// This option cannot carry an error: hard disconnect.
			return nil, "", false, fmt.Errorf("open export %q: %w", name, err)
		}
		var b [10 + 124]byte
		binary.BigEndian.PutUint64(b[0:], uint64(exp.Size()))
		binary.BigEndian.PutUint16(b[8:], c.transmissionFlags())
		reply := b[:]
		if c.noZeroes {
			reply = b[:10]
		}
		c.hw.Write(reply)
		c.selectMeta(name)
		return exp, name, true, nil

	case optAbort:
		c.reply(opt, repAck, nil)
		c.hw.Flush()
		return nil, "", false, errAbort

	case optList:
		if len(data) != 0 {
			return c.replyErr(opt, repErrInvalid, "NBD_OPT_LIST takes no data")
		}
		list, err := c.srv.Exporter.List(ctx)
		if err != nil {
			c.log.Warn("nbd list exports", "err", err)
			return c.replyErr(opt, c.errRep(ctx, repErrPolicy), "cannot list exports: %v", err)
		}
		for _, e := range list {
			if len(e.Name) > maxStringLen {
				continue
			}
			desc := e.Description
			if len(desc) > maxStringLen {
				desc = desc[:maxStringLen]
			}
			p := make([]byte, 4, 4+len(e.Name)+len(desc))
			binary.BigEndian.PutUint32(p, uint32(len(e.Name)))
			p = append(append(p, e.Name...), desc...)
			c.reply(opt, repServer, p)
		}
		c.reply(opt, repAck, nil)
		return nil, "", false, nil

	case optInfo, optGo:
		return c.infoGo(ctx, opt, data)

	case optStructuredReply:
		if len(data) != 0 {
			return c.replyErr(opt, repErrInvalid, "NBD_OPT_STRUCTURED_REPLY takes no data")
		}
		c.structured = true
		c.reply(opt, repAck, nil)
		return nil, "", false, nil

	case optListMetaContext, optSetMetaContext:
		return c.metaContext(ctx, opt, data)
	}
	return c.replyErr(opt, repErrUnsup, "option %d is not supported", opt)
}

// errRep is the option error to send when an operation failed with err: a
// shutdown if the server is going away, else fallback.
func (c *conn) errRep(ctx context.Context, fallback uint32) uint32 {
	if ctx.Err() != nil {
		return repErrShutdown
	}
	return fallback
}

// reply writes one option reply (buffered).
func (c *conn) reply(opt, typ uint32, data []byte) {
	var h [20]byte
	binary.BigEndian.PutUint64(h[0:], magicOptReply)
	binary.BigEndian.PutUint32(h[8:], opt)
	binary.BigEndian.PutUint32(h[12:], typ)
	binary.BigEndian.PutUint32(h[16:], uint32(len(data)))
	c.hw.Write(h[:])
	c.hw.Write(data)
}

// replyErr writes an error reply with a message; negotiation continues.
func (c *conn) replyErr(opt, typ uint32, format string, args ...any) (Export, string, bool, error) {
	msg := fmt.Sprintf(format, args...)
	if len(msg) > maxStringLen {
		msg = msg[:maxStringLen]
	}
	c.reply(opt, typ, []byte(msg))
	return nil, "", false, nil
}

// openErr answers an option whose export could not be opened.
func (c *conn) openErr(ctx context.Context, opt uint32, name string, err error) (Export, string, bool, error) {
	if errors.Is(err, ErrUnknownExport) {
		return c.replyErr(opt, repErrUnknown, "export %q not found", name)
	}
	c.log.Warn("nbd open export", "export", name, "err", err)
	// There is no generic server error; the export is unavailable to the
	// client, and the message says why.
	return c.replyErr(opt, c.errRep(ctx, repErrUnknown), "export %q cannot be opened: %v", name, err)
}

// parseName reads a 32-bit length-prefixed string from data.
func parseName(data []byte) (name string, rest []byte, ok bool) {
	if len(data) < 4 {
		return "", nil, false
	}
	n := binary.BigEndian.Uint32(data)
	if uint64(n) > uint64(len(data)-4) {
		return "", nil, false
	}
	return string(data[4 : 4+n]), data[4+n:], true
}

func (c *conn) infoGo(ctx context.Context, opt uint32, data []byte) (Export, string, bool, error) {
	name, rest, ok := parseName(data)
	if !ok || len(rest) < 2 {
		return c.replyErr(opt, repErrInvalid, "malformed NBD_OPT_INFO/GO payload")
	}
	nreq := int(binary.BigEndian.Uint16(rest))
	rest = rest[2:]
	if len(rest) != 2*nreq {
		return c.replyErr(opt, repErrInvalid, "malformed NBD_OPT_INFO/GO information requests")
	}
	if len(name) > maxStringLen {
		return c.replyErr(opt, repErrTooBig, "export name too long")
	}
	var wantName, wantDesc bool
	for i := range nreq {
		switch binary.BigEndian.Uint16(rest[2*i:]) {
		case infoName:
			wantName = true
		case infoDescription:
			wantDesc = true
		}
	}
	exp, err := c.srv.Exporter.Open(ctx, name)
	if err != nil {
		return c.openErr(ctx, opt, name, err)
	}

	var p [12]byte
	binary.BigEndian.PutUint16(p[0:], infoExport)
	binary.BigEndian.PutUint64(p[2:], uint64(exp.Size()))
	binary.BigEndian.PutUint16(p[10:], c.transmissionFlags())
	c.reply(opt, repInfo, p[:])
	if wantName {
		c.reply(opt, repInfo, append(binary.BigEndian.AppendUint16(nil, infoName), name...))
	}
	if wantDesc {
		if d := c.description(ctx, exp, name); d != "" {
			c.reply(opt, repInfo, append(binary.BigEndian.AppendUint16(nil, infoDescription), d...))
		}
	}
	var bs [14]byte
	binary.BigEndian.PutUint16(bs[0:], infoBlockSize)
	binary.BigEndian.PutUint32(bs[2:], minBlockSize)
	binary.BigEndian.PutUint32(bs[6:], prefBlockSize)
	binary.BigEndian.PutUint32(bs[10:], MaxRequestLength)
	c.reply(opt, repInfo, bs[:])
	c.reply(opt, repAck, nil)

	if opt == optInfo {
		if err := exp.Close(); err != nil {
			c.log.Warn("nbd export close", "export", name, "err", err)
		}
		return nil, "", false, nil
	}
	c.selectMeta(name)
	return exp, name, true, nil
}

// description finds exp's description: from the export itself, else from
// the Exporter's list.
func (c *conn) description(ctx context.Context, exp Export, name string) string {
	var d string
	if ds, ok := exp.(Describer); ok {
		d = ds.Description()
	} else if list, err := c.srv.Exporter.List(ctx); err == nil {
		for _, e := range list {
			if e.Name == name {
				d = e.Description
				break
			}
		}
	}
	if len(d) > maxStringLen {
		d = d[:maxStringLen]
	}
	return d
}

// selectMeta keeps base:allocation only if it was selected for the export
// that transmission now uses.
func (c *conn) selectMeta(name string) {
	if c.metaExport != name {
		c.metaAlloc = false
	}
}

func (c *conn) metaContext(ctx context.Context, opt uint32, data []byte) (Export, string, bool, error) {
	if !c.structured {
		return c.replyErr(opt, repErrInvalid, "negotiate structured replies first")
	}
	name, rest, ok := parseName(data)
	if !ok || len(rest) < 4 {
		return c.replyErr(opt, repErrInvalid, "malformed meta context payload")
	}
	nq := binary.BigEndian.Uint32(rest)
	rest = rest[4:]
	var queries []string
	for range nq {
		var q string
		q, rest, ok = parseName(rest)
		if !ok {
			return c.replyErr(opt, repErrInvalid, "malformed meta context query")
		}
		if len(q) > maxStringLen {
			return c.replyErr(opt, repErrTooBig, "meta context query too long")
		}
		queries = append(queries, q)
	}
	if len(rest) != 0 {
		return c.replyErr(opt, repErrInvalid, "trailing bytes after meta context queries")
	}
	if len(name) > maxStringLen {
		return c.replyErr(opt, repErrTooBig, "export name too long")
	}
	exp, err := c.srv.Exporter.Open(ctx, name)
	if err != nil {
		return c.openErr(ctx, opt, name, err)
	}
	if err := exp.Close(); err != nil {
		c.log.Warn("nbd export close", "export", name, "err", err)
	}

	match := false
	if opt == optListMetaContext && len(queries) == 0 {
		match = true
	}
	for _, q := range queries {
		if q == metaBaseAllocation || (opt == optListMetaContext && q == "base:") {
			match = true
		}
	}
	if opt == optSetMetaContext {
		c.metaExport, c.metaAlloc = name, match
	}
	if match {
		var id uint32 // LIST replies carry context ID 0
		if opt == optSetMetaContext {
			id = metaBaseAllocationID
		}
		c.reply(opt, repMetaContext, append(binary.BigEndian.AppendUint32(nil, id), metaBaseAllocation...))
	}
	c.reply(opt, repAck, nil)
	return nil, "", false, nil
}
