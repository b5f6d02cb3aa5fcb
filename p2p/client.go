package p2p

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/hoardvm/hoard/chunkstore"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"golang.org/x/sync/errgroup"
)

// ErrBadPeer is returned when a peer sent bytes that do not match their ID; the
// peer is marked bad (see Peer.Bad).
var ErrBadPeer = errors.New("peer sent bad data")

// pool is a peer's long-lived chunk streams. A pool is dropped from
// Peer.pools when its last stream ends, and once closed (the peer was marked
// bad, or the node is closing) it takes no new stream.
type pool struct {
	mu      sync.Mutex
	conns   []*conn
	opening int
	opened  chan struct{} // closed when an opening stream is done (getConn waits on it)
	closed  bool
}

// openDone records that a stream finished opening (or failed to); pl.mu is held.
func (pl *pool) openDone() {
	pl.opening--
	if pl.opened != nil {
		close(pl.opened)
		pl.opened = nil
	}
}

func (pl *pool) size() int {
	pl.mu.Lock()
	defer pl.mu.Unlock()
	return len(pl.conns)
}

// remove drops c and reports whether the pool is now empty and idle.
func (pl *pool) remove(c *conn) (empty bool) {
	pl.mu.Lock()
	defer pl.mu.Unlock()
	for i, x := range pl.conns {
		if x == c {
			pl.conns = append(pl.conns[:i], pl.conns[i+1:]...)
			break
		}
	}
	return len(pl.conns) == 0 && pl.opening == 0
}

func (pl *pool) closeAll() {
	pl.mu.Lock()
	conns := pl.conns
	pl.conns = nil
	pl.closed = true
	if pl.opened != nil {
		close(pl.opened) // getConn's waiters see closed
		pl.opened = nil
	}
	pl.mu.Unlock()
	for _, c := range conns {
		c.s.Reset()
	}
}

// conn is one long-lived stream with requests pipelined on it; a reader
// goroutine hands reply frames to the calls by request ID.
type conn struct {
	s       network.Stream
	wsem    chan struct{} // held while writing a frame; every write has a deadline (writeFrame)
	w       *bufio.Writer
	mu      sync.Mutex
	pending map[uint64]*call
	used    time.Time // last request sent
	err     error
	cancels []uint64 // CANCELs to send (by sendCancels)
	sending bool     // a sendCancels goroutine runs
}

type call struct {
	ch   chan *message // reply frames; closed after the last one or when the stream dies
	done chan struct{} // closed by the caller when it stops listening
	c    *conn
	p    *Peer
	id   uint64
}

// inflight returns the requests in flight on c; ok is false once c failed.
func (c *conn) inflight() (n int, ok bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.pending), c.err == nil
}

func (c *conn) fail(err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err == nil {
		c.err = err
	}
	for id, cl := range c.pending {
		close(cl.ch)
		delete(c.pending, id)
	}
}

// minSendRate is the slowest a peer may take our bytes before a write gives
// up: a write of n bytes may take the write timeout plus n at this rate (as
// boxo's bitswap network bounds its sends, with a data-center rate).
const minSendRate = 1 << 20

// writeTimeout is how long writing n bytes to a peer may take.
func (p *Peer) writeTimeout(n int) time.Duration {
	return p.o.writeTimeout + time.Duration(int64(n)*int64(time.Second)/minSendRate)
}

// writeFrame writes one frame and flushes it within the write timeout. A
// write that fails (or times out: the peer stopped reading) may have left
// part of a frame on the stream, so the stream is reset; its reader then
// fails the calls pending on it.
// The write also ends with ctx: a write still under way then is stuck on a
// peer that does not read (a frame is small), and the stream is reset.
func (p *Peer) writeFrame(ctx context.Context, c *conn, frame []byte) error {
	select {
	case c.wsem <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	}
	defer func() { <-c.wsem }()
	if err := ctx.Err(); err != nil {
		return err // both were ready: do not start a write only to reset it
	}
	stop := context.AfterFunc(ctx, func() { c.s.Reset() })
	defer stop()
	c.s.SetWriteDeadline(time.Now().Add(p.writeTimeout(len(frame))))
	_, err := c.w.Write(frame)
	if err == nil {
		err = c.w.Flush()
	}
	if err != nil {
		c.s.Reset()
		if ctx.Err() != nil {
			err = fmt.Errorf("%w (stream reset: write still blocked)", ctx.Err())
		}
	}
	return err
}

func (p *Peer) readLoop(remote peer.ID, pl *pool, c *conn) {
	defer p.wg.Done()
	r := bufio.NewReaderSize(c.s, 256<<10)
	err := func() error {
		for {
			frame, err := readFrame(r, nil)
			if err != nil {
				return err
			}
			m, err := decodeMessage(frame)
			if err != nil {
				return err
			}
			if m.Type&0x80 == 0 {
				return fmt.Errorf("%w: request type %#x from server", errProtocol, m.Type)
			}
			last := m.Type == msgEnd || m.Type == msgError || m.Type == msgBitmap || m.Type == msgID
			c.mu.Lock()
			cl := c.pending[m.ReqID]
			if last {
				delete(c.pending, m.ReqID)
			}
			c.mu.Unlock()
			if cl == nil {
				continue // cancelled
			}
			select {
			case cl.ch <- m:
			case <-cl.done:
			}
			if last {
				close(cl.ch)
			}
		}
	}()
	c.s.Reset()
	c.fail(fmt.Errorf("stream to %s: %w", remote, err))
	p.dropConn(remote, pl, c)
}

// dropConn forgets c, and its pool when that was the pool's last stream, so
// Peer.pools holds only peers with live streams.
func (p *Peer) dropConn(remote peer.ID, pl *pool, c *conn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.conns, c)
	if pl.remove(c) && p.pools[remote] == pl {
		delete(p.pools, remote)
	}
}

func (p *Peer) poolFor(remote peer.ID) (*pool, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return nil, errors.New("p2p node closed")
	}
	pl := p.pools[remote]
	if pl == nil {
		pl = &pool{}
		p.pools[remote] = pl
	}
	return pl, nil
}

// getConn returns the pooled stream to remote with the fewest requests in
// flight, opening another when all are busy and the pool is not full.
func (p *Peer) getConn(ctx context.Context, remote peer.ID) (*conn, error) {
	pl, err := p.poolFor(remote)
	if err != nil {
		return nil, err
	}
	pl.mu.Lock()
	var best *conn
	for {
		bestN, live := 0, 0
		best = nil
		for _, c := range pl.conns {
			n, ok := c.inflight()
			if !ok {
				continue // failed or idle-closed; its reader drops it
			}
			live++
			if best == nil || n < bestN {
				best, bestN = c, n
			}
		}
		full := live+pl.opening >= max(p.o.streamsPerPeer, 1)
		if best != nil && (bestN == 0 || full) {
			pl.mu.Unlock()
			return best, nil
		}
		if !full {
			break
		}
		// Every stream the pool may have is opening: wait for one.
		if pl.opened == nil {
			pl.opened = make(chan struct{})
		}
		opened := pl.opened
		pl.mu.Unlock()
		select {
		case <-opened:
		case <-ctx.Done():
			return nil, fmt.Errorf("open chunk stream to %s: %w", remote, ctx.Err())
		}
		pl.mu.Lock()
		if pl.closed {
			pl.mu.Unlock()
			return nil, fmt.Errorf("open chunk stream to %s: %w", remote, errStreamsClosed)
		}
	}
	pl.opening++
	pl.mu.Unlock()
	s, err := p.host.NewStream(network.WithAllowLimitedConn(ctx, "hoard"), remote, ProtocolChunks)
	if err != nil {
		p.mu.Lock()
		pl.mu.Lock()
		pl.openDone()
		empty := len(pl.conns) == 0 && pl.opening == 0
		pl.mu.Unlock()
		if empty && p.pools[remote] == pl {
			delete(p.pools, remote) // an unreachable peer leaves no pool behind
		}
		p.mu.Unlock()
		if best != nil {
			return best, nil
		}
		return nil, fmt.Errorf("open chunk stream to %s: %w", remote, err)
	}
	c := &conn{s: s, wsem: make(chan struct{}, 1), w: bufio.NewWriterSize(s, 16<<10), pending: map[uint64]*call{}, used: time.Now()}
	// Register c with the node (so Close resets it) and its pool under p.mu,
	// unless the node closed or the pool was closed (peer marked bad) while
	// the stream opened: a stream no pool holds would be reset by no one.
	p.mu.Lock()
	pl.mu.Lock()
	pl.openDone()
	ok := !p.closed && !pl.closed
	if ok {
		pl.conns = append(pl.conns, c)
		p.conns[c] = struct{}{}
		p.wg.Add(1)
	}
	pl.mu.Unlock()
	p.mu.Unlock()
	if !ok {
		s.Reset()
		return nil, fmt.Errorf("open chunk stream to %s: %w", remote, errStreamsClosed)
	}
	go p.readLoop(remote, pl, c)
	return c, nil
}

var errIdle = errors.New("stream closed: idle")

// errStreamsClosed: the node is closing, or the peer was just marked bad.
var errStreamsClosed = errors.New("p2p node closed or peer dropped")

// send registers a call and writes req on a pooled stream to remote.
func (p *Peer) send(ctx context.Context, remote peer.ID, req *message) (*call, error) {
	c, err := p.getConn(ctx, remote)
	if err != nil {
		return nil, err
	}
	req.ReqID = p.reqID.Add(1)
	cl := &call{ch: make(chan *message, 16), done: make(chan struct{}), c: c, p: p, id: req.ReqID}
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return nil, err
	}
	c.pending[req.ReqID] = cl
	c.used = time.Now()
	c.mu.Unlock()
	if err := p.writeFrame(ctx, c, appendMessage(nil, req)); err != nil {
		cl.finish(false)
		return nil, fmt.Errorf("send to %s: %w", remote, err)
	}
	return cl, nil
}

// closeIdle resets pooled streams that have had no request in flight since
// before idleSince, so streams to peers no longer asked do not stay open.
func (p *Peer) closeIdle(idleSince time.Time) int {
	p.mu.Lock()
	var idle []*conn
	for c := range p.conns {
		c.mu.Lock()
		if c.err == nil && len(c.pending) == 0 && c.used.Before(idleSince) {
			c.err = errIdle // no new request goes on it
			idle = append(idle, c)
		}
		c.mu.Unlock()
	}
	p.mu.Unlock()
	for _, c := range idle {
		c.s.Reset() // its reader drops it from its pool
	}
	return len(idle)
}

// finish stops listening; when the reply is incomplete it tells the server to
// stop working on it.
func (cl *call) finish(cancel bool) {
	close(cl.done)
	cl.c.mu.Lock()
	_, still := cl.c.pending[cl.id]
	delete(cl.c.pending, cl.id)
	cl.c.mu.Unlock()
	if still && cancel {
		cl.p.cancelLater(cl.c, cl.id)
	}
}

// cancelLater queues a CANCEL for request id on c. CANCELs are written by one
// goroutine per stream, so a caller that gives up never waits for a write to
// a peer that stopped reading (at most the write timeout; on mocknet, whose
// streams have no deadlines, until Close).
func (p *Peer) cancelLater(c *conn, id uint64) {
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return
	}
	c.cancels = append(c.cancels, id)
	start := !c.sending
	c.sending = true
	c.mu.Unlock()
	if !start {
		return
	}
	p.mu.Lock()
	closed := p.closed
	if !closed {
		p.wg.Add(1)
	}
	p.mu.Unlock()
	if !closed {
		go p.sendCancels(c)
	}
}

func (p *Peer) sendCancels(c *conn) {
	defer p.wg.Done()
	for {
		c.mu.Lock()
		ids := c.cancels
		c.cancels = nil
		if len(ids) == 0 || c.err != nil {
			c.sending = false
			c.mu.Unlock()
			return
		}
		c.mu.Unlock()
		var b []byte
		for _, id := range ids {
			b = appendMessage(b, &message{Type: msgCancel, ReqID: id})
		}
		if err := p.writeFrame(p.ctx, c, b); err != nil {
			c.mu.Lock()
			c.sending, c.cancels = false, nil
			c.mu.Unlock()
			return
		}
	}
}

// next returns the next reply frame, or an error when the stream died or ctx ended.
func (cl *call) next(ctx context.Context) (*message, error) {
	select {
	case m, ok := <-cl.ch:
		if !ok {
			cl.c.mu.Lock()
			err := cl.c.err
			cl.c.mu.Unlock()
			if err == nil {
				err = errors.New("stream closed")
			}
			return nil, err
		}
		if m.Type == msgError {
			return nil, replyError(m.Data)
		}
		return m, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func replyError(b []byte) error {
	if len(b) > 0 && b[0] == errCodeNotFound {
		return chunkstore.ErrNotFound
	}
	if len(b) > 0 {
		b = b[1:]
	}
	return fmt.Errorf("peer error: %s", b)
}

// Have asks remote which entries of manifest it holds. A peer that does not
// know the manifest returns an empty bitmap.
func (p *Peer) Have(ctx context.Context, remote peer.ID, manifest chunkstore.ID) (Bitmap, error) {
	defer p.observe("have", time.Now())
	cl, err := p.send(ctx, remote, &message{Type: msgHave, Manifest: manifest})
	if err != nil {
		return nil, err
	}
	m, err := cl.next(ctx)
	cl.finish(err != nil)
	if err != nil {
		return nil, fmt.Errorf("have %s from %s: %w", manifest, remote, err)
	}
	if m.Type != msgBitmap {
		return nil, fmt.Errorf("have %s from %s: %w: reply type %#x", manifest, remote, errProtocol, m.Type)
	}
	return Bitmap(bytes.Clone(m.Data)), nil
}

// Manifest fetches the encoded manifest id from remote and verifies it against
// id; a peer that sends other bytes is marked bad.
func (p *Peer) Manifest(ctx context.Context, remote peer.ID, id chunkstore.ID) ([]byte, error) {
	defer p.observe("manifest", time.Now())
	cl, err := p.send(ctx, remote, &message{Type: msgManifest, Manifest: id})
	if err != nil {
		return nil, err
	}
	var buf []byte
	for {
		m, err := cl.next(ctx)
		if err != nil {
			cl.finish(true)
			return nil, fmt.Errorf("manifest %s from %s: %w", id, remote, err)
		}
		if m.Type == msgEnd {
			break
		}
		if m.Type != msgData || len(buf)+len(m.Data) > maxManifestSize {
			cl.finish(true)
			p.markBad(remote, errProtocol)
			return nil, fmt.Errorf("manifest %s from %s: %w", id, remote, errProtocol)
		}
		buf = append(buf, m.Data...)
	}
	cl.finish(false)
	if sha256.Sum256(buf) != id.Digest() {
		p.markBad(remote, chunkstore.ErrMismatch)
		return nil, fmt.Errorf("manifest %s from %s: %w", id, remote, ErrBadPeer)
	}
	return buf, nil
}

// resolve asks remote which manifest name stands for.
func (p *Peer) resolve(ctx context.Context, remote peer.ID, name string) (chunkstore.ID, error) {
	defer p.observe("resolve", time.Now())
	cl, err := p.send(ctx, remote, &message{Type: msgResolve, Name: name})
	if err != nil {
		return chunkstore.ID{}, err
	}
	m, err := cl.next(ctx)
	cl.finish(err != nil)
	if err != nil {
		return chunkstore.ID{}, err
	}
	if m.Type != msgID {
		return chunkstore.ID{}, fmt.Errorf("%w: reply type %#x", errProtocol, m.Type)
	}
	return m.Manifest, nil
}

func (p *Peer) observe(typ string, start time.Time) {
	p.metrics.latency.WithLabelValues(typ).Observe(time.Since(start).Seconds())
}

// Want is a chunk to fetch: its entry index in the manifest and its ID, which
// the received bytes are verified against.
type Want struct {
	Index int
	ID    chunkstore.ID
}

// Chunk is a chunk received from a peer and verified.
type Chunk struct {
	Index  int
	ID     chunkstore.ID
	Stored chunkstore.Stored // as the peer sent it (its stored, compressed form)
	Data   []byte            // the uncompressed bytes, verified against ID
	From   peer.ID
}

// Fetch asks remote for wants (any number; sent as pipelined batches of up to
// MaxBatch over the peer's pooled streams) and calls fn, never concurrently,
// for each chunk as it arrives and verifies. With fetch, remote is asked as the
// designated fetcher and may go to its origin. It returns the indices remote
// answered NOTFOUND. A chunk that fails verification marks remote bad and ends
// the fetch with ErrBadPeer; an error from fn ends it with that error. On any
// error, chunks already passed to fn stay delivered.
func (p *Peer) Fetch(ctx context.Context, remote peer.ID, manifest chunkstore.ID, wants []Want, fetch bool, fn func(Chunk) error) (notFound []int, err error) {
	if len(wants) == 0 {
		return nil, nil
	}
	g, gctx := errgroup.WithContext(ctx)
	var mu sync.Mutex // serializes fn and notFound
	for len(wants) > 0 {
		batch := wants[:min(len(wants), MaxBatch)]
		wants = wants[len(batch):]
		g.Go(func() error {
			nf, err := p.fetchBatch(gctx, remote, manifest, batch, fetch, func(c Chunk) error {
				mu.Lock()
				defer mu.Unlock()
				return fn(c)
			})
			mu.Lock()
			notFound = append(notFound, nf...)
			mu.Unlock()
			return err
		})
	}
	err = g.Wait()
	return notFound, err
}

func (p *Peer) fetchBatch(ctx context.Context, remote peer.ID, manifest chunkstore.ID, wants []Want, fetch bool, fn func(Chunk) error) ([]int, error) {
	defer p.observe("get", time.Now())
	byIndex := make(map[int]chunkstore.ID, len(wants))
	req := &message{Type: msgGet, Manifest: manifest, Fetch: fetch, Indices: make([]int, 0, len(wants))}
	for _, w := range wants {
		if _, dup := byIndex[w.Index]; !dup {
			byIndex[w.Index] = w.ID
			req.Indices = append(req.Indices, w.Index)
		}
	}
	p.addLoad(remote, int64(len(byIndex)))
	left := len(byIndex)
	defer func() { p.addLoad(remote, -int64(left)) }()
	cl, err := p.send(ctx, remote, req)
	if err != nil {
		return nil, err
	}
	var notFound []int
	for {
		m, err := cl.next(ctx)
		if err != nil {
			cl.finish(true)
			return notFound, fmt.Errorf("fetch from %s: %w", remote, err)
		}
		if m.Type == msgEnd {
			cl.finish(false)
			for _, idx := range req.Indices {
				if _, ok := byIndex[idx]; ok {
					notFound = append(notFound, idx) // silently skipped (server cancelled)
				}
			}
			return notFound, nil
		}
		id, ok := byIndex[m.Index]
		if !ok || (m.Type != msgChunk && m.Type != msgNotFound) {
			cl.finish(true)
			p.markBad(remote, errProtocol)
			return notFound, fmt.Errorf("fetch from %s: %w: unexpected reply", remote, ErrBadPeer)
		}
		delete(byIndex, m.Index)
		left--
		p.addLoad(remote, -1)
		if m.Type == msgNotFound {
			notFound = append(notFound, m.Index)
			continue
		}
		raw, err := p.verify(id, m.Stored)
		if err != nil {
			cl.finish(true)
			p.markBad(remote, fmt.Errorf("chunk %s (entry %d): %w", id, m.Index, err))
			return notFound, fmt.Errorf("fetch entry %d from %s: %w", m.Index, remote, ErrBadPeer)
		}
		p.metrics.received.Add(float64(len(m.Stored.Payload)))
		if err := fn(Chunk{Index: m.Index, ID: id, Stored: m.Stored, Data: raw, From: remote}); err != nil {
			cl.finish(true)
			return notFound, err
		}
	}
}
