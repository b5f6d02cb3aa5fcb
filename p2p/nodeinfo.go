package p2p

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"time"
	"unicode/utf8"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/protocol"
)

// NodeInfo is what a node says of itself to the cluster, for placement: its
// name (what the scheduler calls the host) and its load. Each node announces
// its own on TopicNodes every node-info interval and when its name or open
// exports change, and answers ProtocolNodeInfo with it; receivers keep the
// latest per node and forget it after a few intervals without news.
type NodeInfo struct {
	// Node is the announcing peer; over pubsub it is checked against the
	// message's signer.
	Node peer.ID
	// Name is the node's name (node.name): 1 to MaxNodeNameLen bytes of UTF-8.
	Name string
	// OpenExports is the number of NBD exports open on the node.
	OpenExports int
	// FreeQuota is the bytes the node's store can still take; -1: no quota.
	FreeQuota int64
	// Interval is how often the node announces itself: a receiver that hears
	// nothing for a few intervals drops the node.
	Interval time.Duration
	// Version orders a node's announcements (NextVersion); greater wins.
	Version uint64
}

// NodeBackend is the optional half of a Backend that takes part in
// placement: New detects it with a type assertion on the WithBackend value.
// Without it a node neither announces itself nor learns other nodes (its
// NodeInfo stays off even when the catalog is on).
type NodeBackend interface {
	// NodeInfo returns this node's current info; p2p fills in Node,
	// Interval and Version. Called from one goroutine about once a second
	// and for each ProtocolNodeInfo request: it must be cheap and never block.
	NodeInfo() NodeInfo
	// LearnNode is called with each info received from another node (by
	// pubsub or ProtocolNodeInfo), from the catalog's learn goroutine (see
	// CatalogBackend): it should return quickly. Infos may be old or
	// repeated: keep the greatest Version.
	LearnNode(from peer.ID, info NodeInfo)
}

const (
	// TopicNodes carries NodeInfo announcements.
	TopicNodes = "/hoard/nodes/1"
	// ProtocolNodeInfo is the stream protocol a node asks a peer's NodeInfo
	// with, when it connects to it: the server writes one frame (the
	// encoded info) and closes. Separate from the catalog sync so that
	// nodes without it still sync.
	ProtocolNodeInfo protocol.ID = "/hoard/node-info/1.0.0"
	// MaxNodeNameLen bounds NodeInfo.Name, in bytes.
	MaxNodeNameLen = 255
	// DefaultNodeInfoInterval is how often a node announces itself.
	DefaultNodeInfoInterval = 10 * time.Second
	// entryNode is the first byte of an encoded NodeInfo.
	entryNode byte = 0x03
	// nodeInfoPoll is how often the announcer looks for a change.
	nodeInfoPoll = time.Second
	// maxNodeInfoSize bounds an encoded NodeInfo.
	maxNodeInfoSize = 1 + 2*binary.MaxVarintLen64 + maxPeerIDLen + MaxNodeNameLen + 4*binary.MaxVarintLen64
)

// ErrNodeInfoOff is returned by PublishNodeInfo when the backend does not
// implement NodeBackend or the catalog gossip is off.
var ErrNodeInfoOff = errors.New("node info off: the backend does not implement p2p.NodeBackend and p2p.CatalogBackend")

func (p *Peer) nodeBackend() NodeBackend {
	nb, _ := p.o.backend.(NodeBackend)
	return nb
}

// AppendNodeInfo appends e's encoding to b, or returns an error, without
// appending, when e is out of bounds:
//
//	0x03 uvarint(version) uvarint(len) node peer ID uvarint(len) name
//	     uvarint(open exports) uvarint(free quota + 1) uvarint(interval ms)
func AppendNodeInfo(b []byte, e NodeInfo) ([]byte, error) {
	if err := checkPeerID(e.Node, "node"); err != nil {
		return b, err
	}
	if e.Name == "" || len(e.Name) > MaxNodeNameLen || !utf8.ValidString(e.Name) {
		return b, badEntry("node name %q: want 1 to %d bytes of UTF-8", trimName(e.Name), MaxNodeNameLen)
	}
	if e.OpenExports < 0 || e.FreeQuota < -1 || e.Interval < 0 {
		return b, badEntry("negative load or interval")
	}
	b = append(b, entryNode)
	b = binary.AppendUvarint(b, e.Version)
	b = binary.AppendUvarint(b, uint64(len(e.Node)))
	b = append(b, e.Node...)
	b = binary.AppendUvarint(b, uint64(len(e.Name)))
	b = append(b, e.Name...)
	b = binary.AppendUvarint(b, uint64(e.OpenExports))
	b = binary.AppendUvarint(b, uint64(e.FreeQuota+1))
	b = binary.AppendUvarint(b, uint64(e.Interval/time.Millisecond))
	return b, nil
}

// DecodeNodeInfo parses an encoded NodeInfo strictly, as DecodeCatalogEntry.
func DecodeNodeInfo(b []byte) (NodeInfo, error) {
	var e NodeInfo
	if len(b) > maxNodeInfoSize {
		return e, badEntry("node info of %d bytes (max %d)", len(b), maxNodeInfoSize)
	}
	if len(b) == 0 || b[0] != entryNode {
		return e, badEntry("not a node info")
	}
	d := &entryDecoder{b: b[1:]}
	var err error
	if e.Version, err = d.uvarint("version", 1<<64-1); err != nil {
		return e, err
	}
	if e.Node, err = d.peerID("node"); err != nil {
		return e, err
	}
	l, err := d.uvarint("name length", MaxNodeNameLen)
	if err != nil {
		return e, err
	}
	name, err := d.bytes(int(l), "name")
	if err != nil {
		return e, err
	}
	e.Name = string(name)
	open, err := d.uvarint("open exports", 1<<31-1)
	if err != nil {
		return e, err
	}
	e.OpenExports = int(open)
	free, err := d.uvarint("free quota", 1<<63-1)
	if err != nil {
		return e, err
	}
	e.FreeQuota = int64(free) - 1
	ms, err := d.uvarint("interval", uint64(24*time.Hour/time.Millisecond))
	if err != nil {
		return e, err
	}
	e.Interval = time.Duration(ms) * time.Millisecond
	if len(d.b) != 0 {
		return NodeInfo{}, badEntry("%d trailing bytes", len(d.b))
	}
	again, err := AppendNodeInfo(nil, e)
	if err != nil {
		return NodeInfo{}, err
	}
	if !bytes.Equal(again, b) {
		return NodeInfo{}, badEntry("not in canonical form")
	}
	return e, nil
}

// ownNodeInfo is the backend's NodeInfo with Node, Interval and Version
// filled in.
func (p *Peer) ownNodeInfo(nb NodeBackend, version uint64) NodeInfo {
	e := nb.NodeInfo()
	e.Node, e.Interval, e.Version = p.host.ID(), p.o.nodeInfoInterval, version
	return e
}

// PublishNodeInfo announces this node's info now (the announcer also does
// every interval and on change).
func (p *Peer) PublishNodeInfo(ctx context.Context) error {
	nb := p.nodeBackend()
	g, err := p.catalogGossip()
	if nb == nil || err != nil || g.nodes == nil {
		return ErrNodeInfoOff
	}
	p.mu.Lock()
	p.nodeVersion = NextVersion(p.nodeVersion, time.Now())
	v := p.nodeVersion
	p.mu.Unlock()
	b, err := AppendNodeInfo(nil, p.ownNodeInfo(nb, v))
	if err != nil {
		return fmt.Errorf("publish node info: %w (set node.name)", err)
	}
	if err := g.nodes.Publish(ctx, b); err != nil {
		return fmt.Errorf("publish node info: %w", err)
	}
	return nil
}

// announceNodes publishes this node's info every interval and within
// nodeInfoPoll of a change of its name or open exports, until ctx is done.
func (p *Peer) announceNodes(ctx context.Context) {
	nb := p.nodeBackend()
	if nb == nil || p.cat.gossip == nil || p.cat.gossip.nodes == nil {
		return
	}
	poll := time.NewTicker(min(nodeInfoPoll, p.o.nodeInfoInterval))
	defer poll.Stop()
	var last NodeInfo
	var at time.Time
	for {
		cur := nb.NodeInfo()
		if at.IsZero() || time.Since(at) >= p.o.nodeInfoInterval || cur.Name != last.Name || cur.OpenExports != last.OpenExports {
			if err := p.PublishNodeInfo(ctx); err != nil && ctx.Err() == nil {
				p.log.Debug("node info not announced", "err", err)
			}
			last, at = cur, time.Now()
		}
		select {
		case <-ctx.Done():
			return
		case <-poll.C:
		}
	}
}

// handleNodeInfo answers ProtocolNodeInfo with this node's info.
func (p *Peer) handleNodeInfo(s network.Stream) {
	defer s.Close()
	nb := p.nodeBackend()
	if nb == nil || p.Bad(s.Conn().RemotePeer()) {
		s.Reset()
		return
	}
	p.mu.Lock()
	v := p.nodeVersion
	p.mu.Unlock()
	b, err := AppendNodeInfo(nil, p.ownNodeInfo(nb, v))
	if err != nil {
		s.Reset()
		return
	}
	s.SetWriteDeadline(time.Now().Add(p.o.writeTimeout))
	if _, err := s.Write(appendFrame(nil, b)); err != nil {
		s.Reset()
	}
}

// askNodeInfo asks id for its NodeInfo and queues it for the backend.
func (p *Peer) askNodeInfo(ctx context.Context, id peer.ID, queue chan<- learnItem) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	s, err := p.host.NewStream(ctx, id, ProtocolNodeInfo)
	if err != nil {
		return fmt.Errorf("node info of %s: %w", id, err)
	}
	defer s.Reset()
	defer context.AfterFunc(ctx, func() { s.Reset() })()
	s.CloseWrite()
	s.SetReadDeadline(time.Now().Add(p.o.writeTimeout))
	frame, err := readFrame(bufio.NewReaderSize(s, 512), nil)
	if err != nil {
		return fmt.Errorf("node info of %s: %w", id, err)
	}
	e, err := DecodeNodeInfo(frame)
	if err != nil {
		return fmt.Errorf("node info of %s: %w", id, err)
	}
	if e.Node != id {
		return fmt.Errorf("node info of %s: %w: it names node %s", id, errProtocol, e.Node)
	}
	select {
	case queue <- learnItem{from: id, node: &e}:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
