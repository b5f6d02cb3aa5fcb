package nbd

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/netutil"
	"golang.org/x/sync/semaphore"
)

// Export is one opened export, for one client connection.
type Export interface {
	// Size is the size of the export in bytes. It must not change while the
	// export is open.
	Size() int64
	// ReadAt fills p entirely from offset off, or returns an error. It is
	// called concurrently from several goroutines. The server checks that
	// [off, off+len(p)) lies within Size. p belongs to the server and must not
	// be retained after ReadAt returns. ctx is cancelled when the client
	// disconnects or the server shuts down.
	ReadAt(ctx context.Context, p []byte, off int64) error
	// Close is called once when the connection that opened the export ends,
	// after every ReadAt, Extents and Cache call has returned.
	Close() error
}

// Extenter is implemented by an Export that knows where its holes are. It
// answers NBD_CMD_BLOCK_STATUS for the base:allocation context.
type Extenter interface {
	// Extents describes [off, off+length): consecutive extents, the first
	// starting at off. They may cover less than length (but more than 0
	// bytes); whatever goes beyond length is ignored. Called concurrently.
	Extents(ctx context.Context, off, length int64) ([]Extent, error)
}

// Extent is one run of an export's bytes. A hole reads as zeroes and is
// reported as NBD_STATE_HOLE|NBD_STATE_ZERO.
type Extent struct {
	Length int64
	Hole   bool
}

// Cacher is implemented by an Export that can act on NBD_CMD_CACHE, a hint
// that the client will soon read [off, off+length). Called concurrently; the
// reply waits for it, and its error is logged, never sent to the client.
type Cacher interface {
	Cache(ctx context.Context, off, length int64) error
}

// Describer is implemented by an Export that has a human-readable
// description, sent as NBD_INFO_DESCRIPTION. Without it the description is
// looked up in [Exporter.List].
type Describer interface {
	Description() string
}

// Exporter resolves export names. It is implemented by the daemon and called
// concurrently from every connection.
type Exporter interface {
	// Open opens the export called name ("" is the default export name a
	// client may send). It returns an error wrapping ErrUnknownExport when
	// there is none. The server also opens (and closes at once) exports to
	// answer NBD_OPT_INFO and NBD_OPT_SET_META_CONTEXT.
	Open(ctx context.Context, name string) (Export, error)
	// List returns the exports for NBD_OPT_LIST.
	List(ctx context.Context) ([]ExportInfo, error)
}

// ExportInfo names and describes an export for NBD_OPT_LIST.
type ExportInfo struct {
	Name, Description string
}

// ErrUnknownExport is returned (wrapped) by [Exporter.Open] when no export has
// the requested name.
var ErrUnknownExport = errors.New("nbd: unknown export")

// Server serves NBD exports. Its fields must not change once Serve is called.
// One Server may Serve several listeners at once.
type Server struct {
	Exporter Exporter
	Log      *slog.Logger // nil => discard
	// MaxInflight bounds the requests served concurrently per connection;
	// further requests wait to be read. Default 32.
	MaxInflight int
	// HandshakeTimeout bounds the whole option negotiation. Default 30s.
	HandshakeTimeout time.Duration
	// MaxConns caps the connections served at once on each listener; more
	// wait in the listen backlog until one ends. Default DefaultMaxConns.
	MaxConns int
	// MaxBufferedBytes bounds the read buffers all connections of the
	// Server hold at once (read data waiting to be sent), so that clients
	// that pipeline READs and never read the replies cannot exhaust memory.
	// A request waits to be read until its buffer fits. Each connection
	// may hold at most a quarter of it (and at most 64 MiB), so a few such
	// clients cannot starve the others. Default DefaultMaxBufferedBytes.
	MaxBufferedBytes int64
	// WriteTimeout drops a client that does not take a reply for this long,
	// freeing what its connection holds. Default 60s.
	WriteTimeout time.Duration
	// StallEvict: while a request waits for MaxBufferedBytes, a connection
	// whose reply has made no progress for this long is dropped (the one
	// holding most first), so clients that stop reading cannot keep the
	// others waiting until WriteTimeout. Default 5s.
	StallEvict time.Duration

	budgetOnce sync.Once
	budget     *semaphore.Weighted
	buffered   atomic.Int64 // bytes of the budget in use

	mu     sync.Mutex
	active map[*transmission]struct{} // connections in transmission
}

// Defaults of the Server's limits.
const (
	DefaultMaxConns         = 1024
	DefaultMaxBufferedBytes = 256 << 20
	defaultWriteTimeout     = 60 * time.Second
	defaultStallEvict       = 5 * time.Second
	// budgetWait is how long a request waits for the budget before the
	// server looks for a stalled connection to drop.
	budgetWait = 200 * time.Millisecond
)

const (
	defaultMaxInflight      = 32
	defaultHandshakeTimeout = 30 * time.Second
	// shutdownGrace is how long in-flight replies may still be written once
	// the server shuts down.
	shutdownGrace = 2 * time.Second
	readBufSize   = 64 << 10
)

func (s *Server) logger() *slog.Logger {
	if s.Log == nil {
		return slog.New(slog.DiscardHandler)
	}
	return s.Log
}

func (s *Server) maxInflight() int {
	if s.MaxInflight > 0 {
		return s.MaxInflight
	}
	return defaultMaxInflight
}

func (s *Server) maxBuffered() int64 {
	if s.MaxBufferedBytes > 0 {
		return s.MaxBufferedBytes
	}
	return DefaultMaxBufferedBytes
}

func (s *Server) writeTimeout() time.Duration {
	if s.WriteTimeout > 0 {
		return s.WriteTimeout
	}
	return defaultWriteTimeout
}

// acquire takes n bytes of the Server's read buffer budget (all of it for a
// request larger than the budget) for t; it returns how much it took, 0 if
// ctx ended first. While it waits it drops stalled connections (StallEvict).
func (s *Server) acquire(ctx context.Context, t *transmission, n int) int64 {
	s.budgetOnce.Do(func() { s.budget = semaphore.NewWeighted(s.maxBuffered()) })
	w := min(int64(n), s.maxBuffered())
	for !s.budget.TryAcquire(w) {
		wctx, cancel := context.WithTimeout(ctx, budgetWait)
		err := s.budget.Acquire(wctx, w)
		cancel()
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			return 0
		}
		s.dropStalled(t)
	}
	s.buffered.Add(w)
	return w
}

// dropStalled closes the connection (not self) that holds most of the budget
// among those whose reply has made no progress for StallEvict.
func (s *Server) dropStalled(self *transmission) {
	evict := s.StallEvict
	if evict <= 0 {
		evict = defaultStallEvict
	}
	now := time.Now()
	var victim *transmission
	s.mu.Lock()
	for t := range s.active {
		if t != self && t.held.Load() > 0 && t.stalled(now) >= evict && (victim == nil || t.held.Load() > victim.held.Load()) {
			victim = t
		}
	}
	s.mu.Unlock()
	if victim == nil {
		return
	}
	victim.log.Warn("nbd client takes no replies while others wait for memory; disconnecting it",
		"stalled", victim.stalled(now).Round(time.Millisecond), "held_bytes", victim.held.Load())
	victim.cancel()
	victim.nc.Close()
}

func (s *Server) track(t *transmission, on bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.active == nil {
		s.active = make(map[*transmission]struct{})
	}
	if on {
		s.active[t] = struct{}{}
	} else {
		delete(s.active, t)
	}
}

func (s *Server) releaseBudget(w int64) {
	s.buffered.Add(-w)
	s.budget.Release(w)
}

// Buffered returns the bytes of read buffers the Server's connections hold
// now (at most MaxBufferedBytes).
func (s *Server) Buffered() int64 { return s.buffered.Load() }

func (s *Server) handshakeTimeout() time.Duration {
	if s.HandshakeTimeout > 0 {
		return s.HandshakeTimeout
	}
	return defaultHandshakeTimeout
}

// Serve accepts connections on ln and serves each on its own goroutine until
// ctx is cancelled; it then closes ln and every connection, waits for all its
// goroutines, and returns nil. It returns an error if ln fails for another
// reason (after closing the connections it accepted). Serve closes ln.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	if s.Exporter == nil {
		return errors.New("nbd: Server.Exporter is nil")
	}
	log := s.logger()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	maxConns := s.MaxConns
	if maxConns <= 0 {
		maxConns = DefaultMaxConns
	}
	ln = netutil.LimitListener(ln, maxConns)
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()

	var wg sync.WaitGroup
	defer wg.Wait()
	var backoff time.Duration
	for {
		nc, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if errors.Is(err, net.ErrClosed) {
				return fmt.Errorf("nbd: accept: %w", err)
			}
			// Out of file descriptors and the like: back off and retry,
			// as net/http does.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			log.Warn("nbd accept failed; retrying", "err", err, "backoff", backoff)
			select {
			case <-time.After(backoff):
			case <-ctx.Done():
				return nil
			}
			continue
		}
		backoff = 0
		wg.Go(func() { s.serveConn(ctx, nc) })
	}
}

// serveConn runs one client connection to its end.
func (s *Server) serveConn(ctx context.Context, nc net.Conn) {
	defer nc.Close()
	log := s.logger().With("component", "nbd", "remote_addr", nc.RemoteAddr().String())
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// On server shutdown, unblock the reader at once and give in-flight
	// replies a short grace period.
	c := &conn{
		srv: s,
		log: log,
		br:  bufio.NewReaderSize(nc, readBufSize),
	}
	stop := context.AfterFunc(ctx, func() {
		c.closing.Store(true)
		nc.SetReadDeadline(time.Unix(1, 0))
		nc.SetWriteDeadline(time.Now().Add(shutdownGrace))
	})
	defer stop()
	bw := bufio.NewWriter(nc)
	c.hw = bw

	// The deadline bounds the client's I/O, the context the Exporter's.
	nc.SetDeadline(time.Now().Add(s.handshakeTimeout()))
	hctx, hcancel := context.WithTimeout(ctx, s.handshakeTimeout())
	exp, name, err := c.negotiate(hctx)
	hcancel()
	if err != nil {
		if !errors.Is(err, errAbort) {
			log.Debug("nbd handshake ended", "err", err)
		}
		return
	}
	defer func() {
		if err := exp.Close(); err != nil {
			log.Warn("nbd export close", "export", name, "err", err)
		}
	}()
	nc.SetDeadline(time.Time{})
	if ctx.Err() != nil { // shut down while we cleared the deadline
		return
	}
	c.hw = nil
	log.Debug("nbd client connected", "export", name, "structured", c.structured)
	t := &transmission{
		conn:   c,
		nc:     nc,
		exp:    exp,
		size:   exp.Size(),
		cancel: cancel,
	}
	s.track(t, true)
	t.run(ctx)
	s.track(t, false)
	log.Debug("nbd client disconnected", "export", name)
}
