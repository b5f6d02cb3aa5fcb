package nbd

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// Reply header sizes. A read's data is read into a pooled buffer after
// replyRoom bytes of room, so that the reply header can be put in front of
// it and the whole reply written with one call.
const (
	simpleReplySize     = 16
	structuredReplySize = 20
	replyRoom           = 32
)

// transmission serves the requests of one connection.
type transmission struct {
	*conn
	nc     net.Conn
	exp    Export
	size   int64
	cancel context.CancelFunc // cancels every in-flight request

	wmu  sync.Mutex // serialises reply frames
	werr error      // first write error; later replies are dropped
	// stalledSince is when the reply being written last made progress
	// (unix ns), 0 when no write is under way.
	stalledSince atomic.Int64
	held         atomic.Int64 // bytes of the Server's budget held

	bmu   sync.Mutex
	bytes int           // read bytes in flight
	freed chan struct{} // signalled when bytes drop
}

// maxInflightBytes bounds the read buffers one connection holds at once, so
// that a client cannot pin MaxInflight * 32 MiB; so does a quarter of the
// Server's MaxBufferedBytes when that is less. A single request of any
// allowed length always proceeds as far as the connection is concerned.
const maxInflightBytes = 64 << 20

// reserve waits until a read buffer for n bytes fits in the connection's
// budget and then in the Server's; it returns the Server budget taken (to
// give to release), or ok false when ctx ended. Only the reader goroutine
// calls it.
func (t *transmission) reserve(ctx context.Context, n int) (global int64, ok bool) {
	n = bufSize(n)
	limit := int(min(maxInflightBytes, t.srv.maxBuffered()/4))
	for {
		t.bmu.Lock()
		if t.bytes == 0 || t.bytes+n <= limit {
			t.bytes += n
			t.bmu.Unlock()
			break
		}
		t.bmu.Unlock()
		select {
		case <-t.freed:
		case <-ctx.Done():
			return 0, false
		}
	}
	if global = t.srv.acquire(ctx, t, n); global == 0 {
		t.releaseLocal(n)
		return 0, false
	}
	t.held.Add(global)
	return global, true
}

// release gives back what reserve(n) took.
func (t *transmission) release(n int, global int64) {
	t.held.Add(-global)
	t.srv.releaseBudget(global)
	t.releaseLocal(bufSize(n))
}

func (t *transmission) releaseLocal(n int) {
	t.bmu.Lock()
	t.bytes -= n
	t.bmu.Unlock()
	select {
	case t.freed <- struct{}{}:
	default:
	}
}

// run reads requests until the client disconnects, then waits for the
// requests in flight.
func (t *transmission) run(ctx context.Context) {
	var wg sync.WaitGroup
	defer wg.Wait()
	sem := make(chan struct{}, t.srv.maxInflight())
	t.freed = make(chan struct{}, 1)
	var hdr [requestHeaderSize]byte
	for {
		if _, err := io.ReadFull(t.br, hdr[:]); err != nil {
			if ctx.Err() == nil && !errors.Is(err, io.EOF) {
				t.log.Debug("nbd read request", "err", err)
			}
			t.cancel() // client gone: cancel what it asked for
			return
		}
		req, err := parseRequest(hdr[:])
		if err != nil {
			t.log.Warn("nbd protocol error; disconnecting", "err", err)
			t.cancel()
			return
		}
		switch req.typ {
		case cmdDisc:
			// Soft disconnect: finish what is in flight (deferred Wait).
			return
		case cmdWrite:
			if _, err := io.CopyN(io.Discard, t.br, int64(req.length)); err != nil {
				t.cancel()
				return
			}
			t.replyError(req, errnoPerm, "export is read-only")
			continue
		case cmdTrim, cmdWriteZeroes:
			t.replyError(req, errnoPerm, "export is read-only")
			continue
		case cmdFlush:
			t.replyOK(req)
			continue
		case cmdRead, cmdBlockStatus, cmdCache:
			if req.length == 0 || req.length > MaxRequestLength && req.typ == cmdRead ||
				!inRange(req.offset, req.length, t.size) {
				t.replyError(req, errnoInval, "request out of range")
				continue
			}
			if req.typ == cmdBlockStatus && !t.metaAlloc {
				t.replyError(req, errnoInval, "no metadata context negotiated")
				continue
			}
		default:
			t.replyError(req, errnoInval, "unsupported command")
			continue
		}
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
			return
		}
		var n int
		var global int64
		if req.typ == cmdRead {
			n = int(req.length)
			var ok bool
			if global, ok = t.reserve(ctx, n); !ok {
				<-sem
				return
			}
		}
		wg.Go(func() {
			defer func() {
				if n > 0 {
					t.release(n, global)
				}
				<-sem
			}()
			t.serve(ctx, req)
		})
	}
}

func (t *transmission) serve(ctx context.Context, req request) {
	switch req.typ {
	case cmdRead:
		t.read(ctx, req)
	case cmdBlockStatus:
		t.blockStatus(ctx, req)
	case cmdCache:
		if c, ok := t.exp.(Cacher); ok {
			if err := c.Cache(ctx, int64(req.offset), int64(req.length)); err != nil && ctx.Err() == nil {
				t.log.Debug("nbd cache hint", "offset", req.offset, "length", req.length, "err", err)
			}
		}
		t.replyOK(req)
	}
}

func (t *transmission) read(ctx context.Context, req request) {
	n := int(req.length)
	bp := getBuf(n)
	defer putBuf(bp)
	buf := *bp
	if err := t.exp.ReadAt(ctx, buf[replyRoom:], int64(req.offset)); err != nil {
		t.backendError(ctx, req, "read", err)
		return
	}
	var frame []byte
	if t.structured {
		frame = buf[replyRoom-structuredReplySize-8:]
		putStructuredHeader(frame, replyFlagDone, replyTypeOffsetData, req.handle, 8+n)
		binary.BigEndian.PutUint64(frame[structuredReplySize:], req.offset)
	} else {
		frame = buf[replyRoom-simpleReplySize:]
		putSimpleHeader(frame, 0, req.handle)
	}
	t.write(frame)
}

func (t *transmission) blockStatus(ctx context.Context, req request) {
	length := int64(req.length)
	var exts []Extent
	if e, ok := t.exp.(Extenter); ok {
		var err error
		exts, err = e.Extents(ctx, int64(req.offset), length)
		if err != nil {
			t.backendError(ctx, req, "block status", err)
			return
		}
	} else {
		exts = []Extent{{Length: length}}
	}
	// Descriptors: clipped to the request, adjacent alike extents merged.
	p := make([]byte, structuredReplySize+4, structuredReplySize+4+8*min(len(exts), 64))
	binary.BigEndian.PutUint32(p[structuredReplySize:], metaBaseAllocationID)
	var covered int64
	var last int // offset in p of the last descriptor, 0 if none
	for _, e := range exts {
		if covered >= length {
			break
		}
		if e.Length <= 0 {
			continue
		}
		l := min(e.Length, length-covered)
		covered += l
		var flags uint32
		if e.Hole {
			flags = stateHole | stateZero
		}
		if last != 0 && binary.BigEndian.Uint32(p[last+4:]) == flags {
			binary.BigEndian.PutUint32(p[last:], binary.BigEndian.Uint32(p[last:])+uint32(l))
			continue
		}
		if last != 0 && req.flags&cmdFlagReqOne != 0 {
			break
		}
		last = len(p)
		p = binary.BigEndian.AppendUint32(p, uint32(l))
		p = binary.BigEndian.AppendUint32(p, flags)
	}
	if last == 0 {
		t.backendError(ctx, req, "block status", errors.New("backend returned no extents"))
		return
	}
	putStructuredHeader(p, replyFlagDone, replyTypeBlockStatus, req.handle, len(p)-structuredReplySize)
	t.write(p)
}

// backendError answers a request whose backend call failed: EIO, or
// ESHUTDOWN when the server is shutting down.
func (t *transmission) backendError(ctx context.Context, req request, what string, err error) {
	errno := uint32(errnoIO)
	if ctx.Err() != nil {
		errno = errnoShutdown
	} else {
		t.log.Warn("nbd "+what+" failed", "offset", req.offset, "length", req.length, "err", err)
	}
	t.replyError(req, errno, what+": "+err.Error())
}

func putSimpleHeader(b []byte, errno uint32, handle uint64) {
	binary.BigEndian.PutUint32(b[0:], magicSimpleReply)
	binary.BigEndian.PutUint32(b[4:], errno)
	binary.BigEndian.PutUint64(b[8:], handle)
}

func putStructuredHeader(b []byte, flags, typ uint16, handle uint64, length int) {
	binary.BigEndian.PutUint32(b[0:], magicStructReply)
	binary.BigEndian.PutUint16(b[4:], flags)
	binary.BigEndian.PutUint16(b[6:], typ)
	binary.BigEndian.PutUint64(b[8:], handle)
	binary.BigEndian.PutUint32(b[16:], uint32(length))
}

// replyOK sends a successful reply without payload.
func (t *transmission) replyOK(req request) {
	var b [simpleReplySize]byte
	putSimpleHeader(b[:], 0, req.handle)
	t.write(b[:])
}

// replyError sends an error reply: a structured error chunk carrying msg
// when structured replies were negotiated, else a simple reply.
func (t *transmission) replyError(req request, errno uint32, msg string) {
	if !t.structured {
		var b [simpleReplySize]byte
		putSimpleHeader(b[:], errno, req.handle)
		t.write(b[:])
		return
	}
	if len(msg) > 1024 {
		msg = msg[:1024]
	}
	b := make([]byte, structuredReplySize+6, structuredReplySize+6+len(msg))
	putStructuredHeader(b, replyFlagDone, replyTypeError, req.handle, 6+len(msg))
	binary.BigEndian.PutUint32(b[structuredReplySize:], errno)
	binary.BigEndian.PutUint16(b[structuredReplySize+4:], uint16(len(msg)))
	t.write(append(b, msg...))
}

// write sends one whole reply frame. After a write error the connection is
// closed, which ends the reader and cancels every in-flight request.
func (t *transmission) write(frame []byte) {
	t.wmu.Lock()
	defer t.wmu.Unlock()
	if t.werr != nil {
		return
	}
	// A client that takes no reply for WriteTimeout is dropped. Re-checking
	// closing after the set keeps the shutdown grace if it raced with us.
	if !t.closing.Load() {
		t.nc.SetWriteDeadline(time.Now().Add(t.srv.writeTimeout()))
		if t.closing.Load() {
			t.nc.SetWriteDeadline(time.Now().Add(shutdownGrace))
		}
	}
	// Written in pieces so that stalled() sees progress on a big reply.
	defer t.stalledSince.Store(0)
	for len(frame) > 0 {
		t.stalledSince.Store(time.Now().UnixNano())
		n := min(len(frame), writePiece)
		if _, err := t.nc.Write(frame[:n]); err != nil {
			t.werr = err
			t.cancel()
			t.nc.Close()
			return
		}
		frame = frame[n:]
	}
}

// writePiece is how much of a reply is written between progress marks.
const writePiece = 256 << 10

// stalled reports how long the connection's current write has made no
// progress (0 when none is under way).
func (t *transmission) stalled(now time.Time) time.Duration {
	if since := t.stalledSince.Load(); since != 0 {
		return now.Sub(time.Unix(0, since))
	}
	return 0
}
