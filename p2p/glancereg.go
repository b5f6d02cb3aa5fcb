package p2p

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/hoardvm/hoard/chunkstore"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/protocol"
)

// GlanceBackend is the optional half of a Backend that registers Glance
// images for the cluster (the Glance mirror's registrar): New detects it
// with a type assertion on the WithBackend value and then answers
// ProtocolGlanceRegister; without it such requests are reset.
//
// The asking node has already had the download authorized by Glance with
// its caller's credentials; the registrar registers the image with its own
// (hoard's) Glance credentials.
type GlanceBackend interface {
	// RegisterGlance registers Glance image id (or waits for the
	// registration under way, or finds it registered) and returns the
	// manifest and the name it is registered under (id, or
	// GlanceFileViewPrefix+id). progress, which the
	// backend may call from any goroutine, reports the bytes read from
	// Glance so far and the image's size.
	RegisterGlance(ctx context.Context, from peer.ID, id string, progress func(done, total int64)) (manifest chunkstore.ID, name string, err error)
}

const (
	// ProtocolGlanceRegister is the stream protocol a node asks the
	// registrar of a Glance image to register it now with: the asker
	// writes one frame (glanceRegRequest, the image ID) and closes its
	// side; the registrar answers progress frames every few seconds while
	// it streams the image from Glance, then one final frame: the manifest
	// and name, or an error.
	ProtocolGlanceRegister protocol.ID = "/hoard/glance-register/1.0.0"
	// MaxGlanceIDLen bounds a Glance image ID (a UUID is 36 bytes).
	MaxGlanceIDLen = 64
	// MaxGlanceRegisterError bounds the error text of an answer, in bytes.
	MaxGlanceRegisterError = 1024

	glanceRegRequest  byte = 0x01
	glanceRegProgress byte = 0x02 // uvarint(done) uvarint(total)
	glanceRegDone     byte = 0x03 // manifest digest (32 bytes), name
	glanceRegError    byte = 0x04 // UTF-8 text

	// maxGlanceRegFrame bounds every frame of the protocol.
	maxGlanceRegFrame = 1 + sha256.Size + maxImageNameLen + MaxGlanceRegisterError
	// maxImageNameLen is chunkstore.ValidateName's bound.
	maxImageNameLen = 200
	// glanceRegTimeout bounds one registration served.
	glanceRegTimeout = 30 * time.Minute
	// glanceRegProgressEvery is how often the registrar reports progress.
	glanceRegProgressEvery = 2 * time.Second
	// maxGlanceRegServed bounds the registration requests served at once.
	maxGlanceRegServed = 32
	// maxGlanceRegPerPeer bounds those of one peer.
	maxGlanceRegPerPeer = 2

	// GlanceFileViewPrefix starts the name of a Glance image's file view
	// (node.FileViewPrefix). A registrar's answer for Glance image id must
	// name the image id or GlanceFileViewPrefix+id.
	GlanceFileViewPrefix = "glance-file:"
)

// glanceSlots bounds the registration requests served at once, in all and
// per peer (so that one peer cannot take every slot).
type glanceSlots struct {
	mu      sync.Mutex
	total   int
	perPeer map[peer.ID]int
}

// take takes a slot for a request of from; false when none is free.
func (g *glanceSlots) take(from peer.ID) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.total >= maxGlanceRegServed || g.perPeer[from] >= maxGlanceRegPerPeer {
		return false
	}
	g.total++
	g.perPeer[from]++
	return true
}

func (g *glanceSlots) release(from peer.ID) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.total--
	if g.perPeer[from]--; g.perPeer[from] <= 0 {
		delete(g.perPeer, from)
	}
}

// ErrGlanceRegisterOff is what AskGlanceRegister wraps when the peer does not
// serve ProtocolGlanceRegister (an older node, or no GlanceBackend).
var ErrGlanceRegisterOff = errors.New("the peer does not register Glance images for the cluster")

func (p *Peer) glanceBackend() GlanceBackend {
	gb, _ := p.o.backend.(GlanceBackend)
	return gb
}

// startGlanceRegister serves ProtocolGlanceRegister when the backend is a
// GlanceBackend.
func (p *Peer) startGlanceRegister() {
	if p.glanceBackend() == nil {
		return
	}
	p.glanceSlots = &glanceSlots{perPeer: map[peer.ID]int{}}
	p.host.SetStreamHandler(ProtocolGlanceRegister, p.handleGlanceRegister)
}

func (p *Peer) stopGlanceRegister() {
	if p.glanceSlots != nil {
		p.host.RemoveStreamHandler(ProtocolGlanceRegister)
	}
}

// checkGlanceID bounds a Glance image ID: 1 to MaxGlanceIDLen printable
// ASCII bytes, none of them a path separator.
func checkGlanceID(id string) error {
	if id == "" || len(id) > MaxGlanceIDLen {
		return fmt.Errorf("%w: glance image id of %d bytes (want 1 to %d)", errProtocol, len(id), MaxGlanceIDLen)
	}
	for i := 0; i < len(id); i++ {
		if c := id[i]; c <= ' ' || c >= 0x7f || c == '/' || c == '?' || c == '#' {
			return fmt.Errorf("%w: glance image id %q: not printable ASCII without / ? #", errProtocol, id)
		}
	}
	return nil
}

// readGlanceRegFrame reads one frame of at most maxGlanceRegFrame bytes.
func readGlanceRegFrame(r *bufio.Reader) ([]byte, error) {
	n, err := binary.ReadUvarint(r)
	if err != nil {
		return nil, err
	}
	if n == 0 || n > maxGlanceRegFrame {
		return nil, fmt.Errorf("%w: glance register frame of %d bytes (max %d)", errProtocol, n, maxGlanceRegFrame)
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(r, b); err != nil {
		return nil, err
	}
	return b, nil
}

// handleGlanceRegister serves one ProtocolGlanceRegister request.
func (p *Peer) handleGlanceRegister(s network.Stream) {
	remote := s.Conn().RemotePeer()
	if !p.serving(s) {
		return
	}
	defer p.unserve(s)
	gb := p.glanceBackend()
	if gb == nil || p.Bad(remote) {
		s.Reset()
		return
	}
	if !p.glanceSlots.take(remote) {
		p.log.Debug("glance register request refused: too many under way, in all or of this peer", "peer_id", remote.String())
		s.Reset()
		return
	}
	defer p.glanceSlots.release(remote)
	ctx, cancel := context.WithTimeout(p.ctx, glanceRegTimeout)
	defer cancel()
	defer context.AfterFunc(ctx, func() { s.Reset() })()
	s.SetReadDeadline(time.Now().Add(p.o.writeTimeout))
	frame, err := readGlanceRegFrame(bufio.NewReaderSize(s, 128))
	if err == nil && (frame[0] != glanceRegRequest) {
		err = fmt.Errorf("%w: not a glance register request", errProtocol)
	}
	var id string
	if err == nil {
		id = string(frame[1:])
		err = checkGlanceID(id)
	}
	if err != nil {
		p.log.Debug("closing glance register stream: bad request", "peer_id", remote.String(), "err", err)
		s.Reset()
		return
	}

	type result struct {
		manifest chunkstore.ID
		name     string
		err      error
	}
	var done, total atomic.Int64
	res := make(chan result, 1)
	go func() {
		m, name, err := gb.RegisterGlance(ctx, remote, id, func(d, t int64) { done.Store(d); total.Store(t) })
		res <- result{m, name, err}
	}()
	write := func(body []byte) error {
		s.SetWriteDeadline(time.Now().Add(p.o.writeTimeout))
		_, err := s.Write(appendFrame(nil, body))
		return err
	}
	tick := time.NewTicker(glanceRegProgressEvery)
	defer tick.Stop()
	for {
		select {
		case r := <-res:
			var body []byte
			if r.err == nil && (!r.manifest.Defined() || chunkstore.ValidateName(r.name) != nil || (r.name != id && r.name != GlanceFileViewPrefix+id)) {
				r.err = fmt.Errorf("the registrar registered an invalid manifest or name %q", r.name)
			}
			if r.err != nil {
				msg := r.err.Error()
				for len(msg) > MaxGlanceRegisterError || !utf8.ValidString(msg) {
					msg = strings.ToValidUTF8(msg[:min(len(msg), MaxGlanceRegisterError)], "?")
				}
				body = append([]byte{glanceRegError}, msg...)
			} else {
				d := r.manifest.Digest()
				body = append(append([]byte{glanceRegDone}, d[:]...), r.name...)
			}
			if err := write(body); err != nil {
				s.Reset()
				return
			}
			s.Close()
			return
		case <-tick.C:
			b := binary.AppendUvarint([]byte{glanceRegProgress}, uint64(max(0, done.Load())))
			b = binary.AppendUvarint(b, uint64(max(0, total.Load())))
			if err := write(b); err != nil {
				// The asker went away: it stops waiting, the registration
				// (the backend's own) goes on.
				cancel()
				<-res
				s.Reset()
				return
			}
		}
	}
}

// AskGlanceRegister asks peer to to register Glance image id now (see
// GlanceBackend) and waits for its answer: the manifest and name it
// registered. It gives up when to reports no progress for stall (sends
// nothing, or progress frames whose done does not grow), or when ctx ends. progress, if not nil, is called with each progress report.
// An error wraps ErrGlanceRegisterOff when to does not serve the protocol.
func (p *Peer) AskGlanceRegister(ctx context.Context, to peer.ID, id string, stall time.Duration, progress func(done, total int64)) (chunkstore.ID, string, error) {
	if err := checkGlanceID(id); err != nil {
		return chunkstore.ID{}, "", err
	}
	if p.Bad(to) {
		return chunkstore.ID{}, "", fmt.Errorf("ask %s to register glance image %s: the peer sent bad bytes recently", to, id)
	}
	octx, cancel := context.WithTimeout(ctx, min(stall, 10*time.Second))
	s, err := p.host.NewStream(octx, to, ProtocolGlanceRegister)
	cancel()
	if err != nil {
		if strings.Contains(err.Error(), "protocols not supported") || strings.Contains(err.Error(), "protocol not supported") {
			err = fmt.Errorf("%w: %w", ErrGlanceRegisterOff, err)
		}
		return chunkstore.ID{}, "", fmt.Errorf("ask %s to register glance image %s: %w", to, id, err)
	}
	defer s.Reset()
	defer context.AfterFunc(ctx, func() { s.Reset() })()
	s.SetWriteDeadline(time.Now().Add(p.o.writeTimeout))
	if _, err := s.Write(appendFrame(nil, append([]byte{glanceRegRequest}, id...))); err != nil {
		return chunkstore.ID{}, "", fmt.Errorf("ask %s to register glance image %s: %w", to, id, err)
	}
	s.CloseWrite()
	r := bufio.NewReaderSize(s, 512)
	// The last time done grew (or the request was sent), and its value.
	grew, lastDone := time.Now(), int64(-1)
	for {
		s.SetReadDeadline(grew.Add(stall))
		frame, err := readGlanceRegFrame(r)
		if err != nil {
			if ctx.Err() != nil {
				err = ctx.Err()
			}
			return chunkstore.ID{}, "", fmt.Errorf("ask %s to register glance image %s: no answer or progress within %v: %w", to, id, stall, err)
		}
		switch frame[0] {
		case glanceRegProgress:
			d := &entryDecoder{b: frame[1:]}
			done, err1 := d.uvarint("done", 1<<63-1)
			total, err2 := d.uvarint("total", 1<<63-1)
			if err := errors.Join(err1, err2); err != nil || len(d.b) != 0 {
				return chunkstore.ID{}, "", p.glanceRegBad(to, id, "a bad progress frame")
			}
			if int64(done) > lastDone {
				grew, lastDone = time.Now(), int64(done)
			} else if time.Since(grew) >= stall {
				return chunkstore.ID{}, "", fmt.Errorf("ask %s to register glance image %s: its registration read no more of the image from Glance for %v (stuck at %d of %d bytes)",
					to, id, stall, done, total)
			}
			if progress != nil {
				progress(int64(done), int64(total))
			}
		case glanceRegDone:
			if len(frame) < 1+sha256.Size {
				return chunkstore.ID{}, "", p.glanceRegBad(to, id, "a short answer")
			}
			m := chunkstore.IDFromDigest([sha256.Size]byte(frame[1 : 1+sha256.Size]))
			name := string(frame[1+sha256.Size:])
			if chunkstore.ValidateName(name) != nil {
				return chunkstore.ID{}, "", p.glanceRegBad(to, id, "an invalid image name")
			}
			if name != id && name != GlanceFileViewPrefix+id {
				return chunkstore.ID{}, "", p.glanceRegBad(to, id, fmt.Sprintf("the image name %q, neither the id nor its file view", name))
			}
			return m, name, nil
		case glanceRegError:
			msg := frame[1:]
			if len(msg) > MaxGlanceRegisterError || !utf8.Valid(msg) {
				return chunkstore.ID{}, "", p.glanceRegBad(to, id, "a bad error text")
			}
			return chunkstore.ID{}, "", fmt.Errorf("peer %s could not register glance image %s: %s", to, id, msg)
		default:
			return chunkstore.ID{}, "", p.glanceRegBad(to, id, fmt.Sprintf("an unknown frame type %#x", frame[0]))
		}
	}
}

// glanceRegBad marks to bad for a protocol violation and returns the error.
func (p *Peer) glanceRegBad(to peer.ID, id, what string) error {
	err := fmt.Errorf("ask %s to register glance image %s: %w: it sent %s", to, id, errProtocol, what)
	p.markBad(to, err)
	return err
}
