package p2p

import (
	"bytes"
	"crypto/sha256"
	"math/bits"
	"time"

	"github.com/hoardvm/hoard/chunkstore"
	"github.com/libp2p/go-libp2p/core/peer"
)

// Bitmap is a have-bitmap over a manifest's entry indices: bit i (byte i/8,
// bit i%8, least significant first) is set when entry i is held.
type Bitmap []byte

// NewBitmap returns an empty bitmap for n entries.
func NewBitmap(n int) Bitmap { return make(Bitmap, (n+7)/8) }

// Has reports whether bit i is set; indices past the end are unset.
func (b Bitmap) Has(i int) bool {
	return i >= 0 && i/8 < len(b) && b[i/8]&(1<<(i%8)) != 0
}

// Set sets bit i; the bitmap must be long enough.
func (b Bitmap) Set(i int) { b[i/8] |= 1 << (i % 8) }

// Count returns the number of bits set.
func (b Bitmap) Count() int {
	n := 0
	for _, x := range b {
		n += bits.OnesCount8(x)
	}
	return n
}

// Designated returns the peer that should fetch chunk from the origin on behalf
// of the cluster: the one with the highest rendezvous hash sha256(chunk digest ||
// peer ID) among peers (the caller includes itself). Every node that sees the
// same set of peers picks the same one, whatever the order; when a peer leaves,
// only the chunks it was designated for move. Returns "" for no peers.
func Designated(chunk chunkstore.ID, peers []peer.ID) peer.ID {
	var best peer.ID
	var bestScore [sha256.Size]byte
	d := chunk.Digest()
	h := sha256.New()
	var sum [sha256.Size]byte
	for _, p := range peers {
		h.Reset()
		h.Write(d[:])
		h.Write([]byte(p))
		h.Sum(sum[:0])
		// ties (the same peer twice) keep the first; a smaller ID wins a true tie.
		if best == "" || bytes.Compare(sum[:], bestScore[:]) > 0 ||
			(sum == bestScore && p < best) {
			best, bestScore = p, sum
		}
	}
	return best
}

// Pick chooses the peer to ask for entry index among those whose have-bitmap
// has it: never a peer marked bad; peers that stalled a fetch in the last 30 s
// only when no other has it; then the fewest requests in flight, then
// connected peers, then the lowest measured latency. ok is false when no
// usable peer has the entry.
func (p *Peer) Pick(haves map[peer.ID]Bitmap, index int) (peer.ID, bool) {
	return p.pick(haves, index, nil)
}

func (p *Peer) pick(haves map[peer.ID]Bitmap, index int, exclude map[peer.ID]bool) (peer.ID, bool) {
	var best peer.ID
	var bestLoad int64
	var bestConn, bestSlow bool
	var bestLat time.Duration
	for id, bm := range haves {
		if !bm.Has(index) || exclude[id] || id == p.host.ID() || p.Bad(id) {
			continue
		}
		slow := p.isSlow(id)
		load := p.outstanding(id)
		conn := p.connected(id)
		lat := p.host.Peerstore().LatencyEWMA(id)
		same := slow == bestSlow
		better := best == "" || (!slow && bestSlow) ||
			(same && load < bestLoad) ||
			(same && load == bestLoad && conn && !bestConn) ||
			(same && load == bestLoad && conn == bestConn && (lat < bestLat || (lat == bestLat && id < best)))
		if better {
			best, bestLoad, bestConn, bestSlow, bestLat = id, load, conn, slow, lat
		}
	}
	return best, best != ""
}
