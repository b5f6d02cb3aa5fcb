package p2p

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/hoardvm/hoard/chunkstore"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
)

// Error codes, the first byte of a msgError body.
const (
	errCodeNotFound byte = 1
	errCodeInternal byte = 2
)

// maxServerInflight bounds the requests one stream has in progress; the next
// request is not read until one finishes (backpressure on the requester).
const maxServerInflight = 16

// frameWriter serializes frames of concurrent responses onto one stream.
// Every write has a deadline (Peer.writeTimeout of its size), so a requester
// that stops reading fails the stream instead of holding its requests, and
// the node's Close, forever.
type frameWriter struct {
	mu      sync.Mutex
	s       interface{ SetWriteDeadline(time.Time) error } // nil: no deadline (tests)
	w       *bufio.Writer
	timeout func(n int) time.Duration
	err     error
}

func (fw *frameWriter) write(m *message, flush bool) error {
	fw.mu.Lock()
	defer fw.mu.Unlock()
	if fw.err != nil {
		return fw.err
	}
	// This call may write out what is buffered as well as its own frame.
	if fw.s != nil {
		n := fw.w.Buffered() + len(m.Data) + len(m.Stored.Payload) + 64
		fw.s.SetWriteDeadline(time.Now().Add(fw.timeout(n)))
	}
	var hdr [64]byte
	if m.Type == msgChunk {
		// Header then payload straight from the backend's buffer, no copy.
		body := hdr[:0]
		body = append(body, m.Type)
		body = binary.AppendUvarint(body, m.ReqID)
		body = binary.AppendUvarint(body, uint64(m.Index))
		body = append(body, m.Stored.Codec)
		body = binary.AppendUvarint(body, uint64(m.Stored.RawLen))
		var lenBuf [binary.MaxVarintLen64]byte
		n := binary.PutUvarint(lenBuf[:], uint64(len(body)+len(m.Stored.Payload)))
		fw.w.Write(lenBuf[:n])
		fw.w.Write(body)
		_, fw.err = fw.w.Write(m.Stored.Payload)
	} else {
		_, fw.err = fw.w.Write(appendMessage(hdr[:0], m))
	}
	if fw.err == nil && flush {
		fw.err = fw.w.Flush()
	}
	return fw.err
}

// requesterKey carries, in the context of a Backend call, the peer whose
// request it serves.
type requesterKey struct{}

// Requester returns the peer whose request a Backend call serves (ok false
// outside one).
func Requester(ctx context.Context) (id peer.ID, ok bool) {
	id, ok = ctx.Value(requesterKey{}).(peer.ID)
	return id, ok
}

func (p *Peer) handleStream(s network.Stream) {
	remote := s.Conn().RemotePeer()
	if !p.serving(s) {
		return
	}
	if p.Bad(remote) {
		s.Reset()
		p.unserve(s)
		return
	}
	defer p.unserve(s)
	ctx, cancel := context.WithCancel(context.WithValue(p.ctx, requesterKey{}, remote))
	defer cancel()
	r := bufio.NewReaderSize(s, 32<<10)
	fw := &frameWriter{s: s, w: bufio.NewWriterSize(s, 256<<10), timeout: p.writeTimeout}
	sem := make(chan struct{}, maxServerInflight)
	var wg sync.WaitGroup
	var mu sync.Mutex
	cancels := map[uint64]context.CancelFunc{}
	defer func() {
		// A node that is closing ends what it serves with a reset: a clean
		// close would tell the reader an answer cut short was whole.
		aborted := p.ctx.Err() != nil
		cancel()
		wg.Wait()
		if aborted || p.ctx.Err() != nil {
			s.Reset()
		} else {
			s.Close()
		}
	}()
	for {
		frame, err := readFrame(r, nil)
		if err != nil {
			return
		}
		m, err := decodeMessage(frame)
		if err != nil || m.Type&0x80 != 0 {
			p.log.Debug("closing chunk stream: bad request", "peer_id", remote.String(), "err", err)
			s.Reset()
			return
		}
		if m.Type == msgCancel {
			mu.Lock()
			if c := cancels[m.ReqID]; c != nil {
				c()
			}
			mu.Unlock()
			continue
		}
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
			return
		}
		rctx, rcancel := context.WithCancel(ctx)
		mu.Lock()
		cancels[m.ReqID] = rcancel
		mu.Unlock()
		wg.Add(1)
		go func() {
			defer func() {
				mu.Lock()
				delete(cancels, m.ReqID)
				mu.Unlock()
				rcancel()
				<-sem
				wg.Done()
			}()
			if err := p.serve(rctx, fw, m); err != nil {
				s.Reset()
			}
		}()
	}
}

// serving records s as served, so that Close resets it and waits for its
// handler (which calls unserve when done); on a closed peer it resets s and
// returns false.
func (p *Peer) serving(s network.Stream) bool {
	p.mu.Lock()
	closed := p.closed
	if !closed {
		p.served[s] = struct{}{}
		p.wg.Add(1)
	}
	p.mu.Unlock()
	if closed {
		s.Reset()
	}
	return !closed
}

// unserve forgets a stream handleStream is done with.
func (p *Peer) unserve(s network.Stream) {
	p.mu.Lock()
	delete(p.served, s)
	p.mu.Unlock()
	p.wg.Done()
}

// serve answers one request; an error means the stream is broken.
func (p *Peer) serve(ctx context.Context, fw *frameWriter, req *message) error {
	fail := func(err error) error {
		code := errCodeInternal
		text := err.Error()
		if errors.Is(err, chunkstore.ErrNotFound) {
			code, text = errCodeNotFound, "not found"
		}
		if len(text) > maxErrorLen-1 {
			text = text[:maxErrorLen-1]
		}
		return fw.write(&message{Type: msgError, ReqID: req.ReqID, Data: append([]byte{code}, text...)}, true)
	}
	b := p.o.backend
	switch req.Type {
	case msgResolve:
		p.mu.Lock()
		id, ok := p.names[req.Name]
		p.mu.Unlock()
		if !ok {
			return fail(chunkstore.ErrNotFound)
		}
		return fw.write(&message{Type: msgID, ReqID: req.ReqID, Manifest: id}, true)
	case msgHave:
		if b == nil {
			return fw.write(&message{Type: msgBitmap, ReqID: req.ReqID}, true)
		}
		bm, err := b.Have(ctx, req.Manifest)
		if errors.Is(err, chunkstore.ErrNotFound) {
			bm, err = nil, nil
		}
		if err != nil {
			return fail(err)
		}
		if len(bm) > MaxMessageSize-64 {
			return fail(fmt.Errorf("have bitmap of %d bytes is too large", len(bm)))
		}
		return fw.write(&message{Type: msgBitmap, ReqID: req.ReqID, Data: bm}, true)
	case msgManifest:
		if b == nil {
			return fail(chunkstore.ErrNotFound)
		}
		data, err := b.Manifest(ctx, req.Manifest)
		if err != nil {
			return fail(err)
		}
		for len(data) > 0 {
			n := min(len(data), manifestPart)
			if err := fw.write(&message{Type: msgData, ReqID: req.ReqID, Data: data[:n]}, false); err != nil {
				return err
			}
			data = data[n:]
		}
		return fw.write(&message{Type: msgEnd, ReqID: req.ReqID}, true)
	case msgGet:
		for _, idx := range req.Indices {
			if ctx.Err() != nil {
				break
			}
			var st chunkstore.Stored
			err := chunkstore.ErrNotFound
			if b != nil {
				st, err = b.Chunk(ctx, req.Manifest, idx, req.Fetch)
			}
			if err == nil && (len(st.Payload) > MaxMessageSize-64 || st.RawLen > chunkstore.MaxChunkSize) {
				err = fmt.Errorf("chunk %d too large", idx)
			}
			if err != nil {
				if !errors.Is(err, chunkstore.ErrNotFound) && ctx.Err() == nil {
					p.log.Warn("cannot serve chunk", "manifest", req.Manifest.String(), "index", idx, "err", err)
				}
				if err := fw.write(&message{Type: msgNotFound, ReqID: req.ReqID, Index: idx}, false); err != nil {
					return err
				}
				continue
			}
			if err := p.waitUpload(ctx, len(st.Payload)); err != nil {
				break
			}
			if err := fw.write(&message{Type: msgChunk, ReqID: req.ReqID, Index: idx, Stored: st}, true); err != nil {
				return err
			}
			p.metrics.served.Add(float64(len(st.Payload)))
		}
		return fw.write(&message{Type: msgEnd, ReqID: req.ReqID}, true)
	}
	return fail(fmt.Errorf("unexpected request type %#x", req.Type))
}

// waitUpload takes n bytes from the upload token bucket, in pieces no larger
// than its burst.
func (p *Peer) waitUpload(ctx context.Context, n int) error {
	if p.limiter == nil {
		return nil
	}
	for n > 0 {
		k := min(n, p.limiter.Burst())
		if err := p.limiter.WaitN(ctx, k); err != nil {
			return err
		}
		n -= k
	}
	return nil
}
