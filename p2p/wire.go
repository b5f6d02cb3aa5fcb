package p2p

import (
	"bufio"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"github.com/hoardvm/hoard/chunkstore"
)

// Message types; see doc.go. Requests have the high bit clear, responses set.
const (
	msgHave     byte = 0x01
	msgGet      byte = 0x02
	msgManifest byte = 0x03
	msgResolve  byte = 0x04
	msgCancel   byte = 0x05

	msgBitmap   byte = 0x81
	msgChunk    byte = 0x82
	msgNotFound byte = 0x83
	msgData     byte = 0x84
	msgEnd      byte = 0x85
	msgError    byte = 0x86
	msgID       byte = 0x87
)

const (
	// MaxMessageSize bounds every frame on the wire: a chunk payload of up to
	// chunkstore.MaxChunkSize plus its header. Anything larger is a protocol error.
	MaxMessageSize = chunkstore.MaxChunkSize + 4096
	// MaxBatch is the most chunks one GET may ask for.
	MaxBatch = 256
	// maxManifestSize bounds a manifest fetched from a peer (sent in msgData parts).
	maxManifestSize = 512 << 20
	// manifestPart is the size of the msgData frames a manifest is sent in.
	manifestPart = 1 << 20
	maxNameLen   = 4096
	maxErrorLen  = 1024
)

var errProtocol = errors.New("chunk protocol error")

// message is one decoded frame. Which fields are set depends on Type.
type message struct {
	Type     byte
	ReqID    uint64
	Manifest chunkstore.ID // have, get, manifest; msgID's answer
	Fetch    bool          // get
	Indices  []int         // get
	Name     string        // resolve
	Index    int           // chunk, notfound
	Stored   chunkstore.Stored
	Data     []byte // bitmap, data, error text
}

// appendMessage appends m's frame (uvarint length, then the body) to b.
func appendMessage(b []byte, m *message) []byte {
	body := make([]byte, 0, 48+len(m.Data)+len(m.Stored.Payload)+len(m.Indices)*3)
	body = append(body, m.Type)
	body = binary.AppendUvarint(body, m.ReqID)
	switch m.Type {
	case msgHave, msgManifest, msgID:
		d := m.Manifest.Digest()
		body = append(body, d[:]...)
	case msgGet:
		d := m.Manifest.Digest()
		body = append(body, d[:]...)
		var flags byte
		if m.Fetch {
			flags |= 1
		}
		body = append(body, flags)
		body = binary.AppendUvarint(body, uint64(len(m.Indices)))
		for _, i := range m.Indices {
			body = binary.AppendUvarint(body, uint64(i))
		}
	case msgResolve:
		body = append(body, m.Name...)
	case msgChunk:
		body = binary.AppendUvarint(body, uint64(m.Index))
		body = append(body, m.Stored.Codec)
		body = binary.AppendUvarint(body, uint64(m.Stored.RawLen))
		body = append(body, m.Stored.Payload...)
	case msgNotFound:
		body = binary.AppendUvarint(body, uint64(m.Index))
	case msgBitmap, msgData, msgError:
		body = append(body, m.Data...)
	case msgCancel, msgEnd:
	}
	b = binary.AppendUvarint(b, uint64(len(body)))
	return append(b, body...)
}

// readFrame reads one frame body into buf (grown as needed) and returns it.
func readFrame(r *bufio.Reader, buf []byte) ([]byte, error) {
	n, err := binary.ReadUvarint(r)
	if err != nil {
		if errors.Is(err, io.EOF) {
			return nil, io.EOF
		}
		return nil, err
	}
	if n == 0 || n > MaxMessageSize {
		return nil, fmt.Errorf("%w: frame of %d bytes (max %d)", errProtocol, n, MaxMessageSize)
	}
	if uint64(cap(buf)) < n {
		buf = make([]byte, n)
	}
	buf = buf[:n]
	if _, err := io.ReadFull(r, buf); err != nil {
		return nil, fmt.Errorf("read frame: %w", io.ErrUnexpectedEOF)
	}
	return buf, nil
}

// decodeMessage parses a frame body strictly. Byte slices in the result alias
// b; callers copy what they keep beyond the next read.
func decodeMessage(b []byte) (*message, error) {
	if len(b) == 0 {
		return nil, fmt.Errorf("%w: empty frame", errProtocol)
	}
	m := &message{Type: b[0]}
	b = b[1:]
	id, n := binary.Uvarint(b)
	if n <= 0 {
		return nil, fmt.Errorf("%w: bad request id", errProtocol)
	}
	m.ReqID = id
	b = b[n:]
	digest := func() error {
		if len(b) < sha256.Size {
			return fmt.Errorf("%w: short manifest id", errProtocol)
		}
		m.Manifest = chunkstore.IDFromDigest([sha256.Size]byte(b[:sha256.Size]))
		b = b[sha256.Size:]
		return nil
	}
	uvarint := func(what string, limit uint64) (uint64, error) {
		v, n := binary.Uvarint(b)
		if n <= 0 || v > limit {
			return 0, fmt.Errorf("%w: bad %s", errProtocol, what)
		}
		b = b[n:]
		return v, nil
	}
	switch m.Type {
	case msgHave, msgManifest, msgID:
		if err := digest(); err != nil {
			return nil, err
		}
	case msgGet:
		if err := digest(); err != nil {
			return nil, err
		}
		if len(b) < 1 || b[0]&^1 != 0 {
			return nil, fmt.Errorf("%w: bad get flags", errProtocol)
		}
		m.Fetch = b[0]&1 != 0
		b = b[1:]
		count, err := uvarint("batch size", MaxBatch)
		if err != nil {
			return nil, err
		}
		m.Indices = make([]int, count)
		for i := range m.Indices {
			v, err := uvarint("entry index", 1<<40)
			if err != nil {
				return nil, err
			}
			m.Indices[i] = int(v)
		}
	case msgResolve:
		if len(b) == 0 || len(b) > maxNameLen {
			return nil, fmt.Errorf("%w: bad name length %d", errProtocol, len(b))
		}
		m.Name = string(b)
		b = nil
	case msgChunk:
		idx, err := uvarint("entry index", 1<<40)
		if err != nil {
			return nil, err
		}
		m.Index = int(idx)
		if len(b) < 1 {
			return nil, fmt.Errorf("%w: missing codec", errProtocol)
		}
		m.Stored.Codec = b[0]
		b = b[1:]
		raw, err := uvarint("raw length", chunkstore.MaxChunkSize)
		if err != nil {
			return nil, err
		}
		m.Stored.RawLen = int(raw)
		m.Stored.Payload = b
		b = nil
	case msgNotFound:
		idx, err := uvarint("entry index", 1<<40)
		if err != nil {
			return nil, err
		}
		m.Index = int(idx)
	case msgBitmap, msgData:
		m.Data = b
		b = nil
	case msgError:
		if len(b) > maxErrorLen {
			return nil, fmt.Errorf("%w: error text too long", errProtocol)
		}
		m.Data = b
		b = nil
	case msgCancel, msgEnd:
	default:
		return nil, fmt.Errorf("%w: unknown message type %#x", errProtocol, m.Type)
	}
	if len(b) != 0 {
		return nil, fmt.Errorf("%w: %d trailing bytes in message type %#x", errProtocol, len(b), m.Type)
	}
	return m, nil
}
