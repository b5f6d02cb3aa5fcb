package p2p

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"sync"
	"time"

	pubsub "github.com/libp2p/go-libp2p-pubsub"
	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/protocol"
)

// Catalog topics and the anti-entropy protocol (see doc.go).
const (
	TopicCatalog  = "/hoard/catalog/1"
	TopicProfiles = "/hoard/profiles/1"
	// ProtocolCatalogSync is the stream protocol a node asks a peer's whole
	// catalog and profiles with.
	ProtocolCatalogSync protocol.ID = "/hoard/catalog-sync/1.0.0"
)

// Sync frame types (the first byte of a frame that is not an entry).
const (
	syncRequest byte = 0x10
	syncEnd     byte = 0x11
)

const (
	// maxSyncBytes and maxSyncEntries bound one sync reply; a server with
	// more sends what fits and flags the END frame as truncated.
	maxSyncBytes   = 64 << 20
	maxSyncEntries = 1 << 20
	// syncTimeout bounds one whole sync, either side.
	syncTimeout = 5 * time.Minute
	// syncConcurrency bounds the syncs a node runs at once, as a client;
	// maxServedSyncs as a server (a request over it is reset).
	syncConcurrency = 4
	maxServedSyncs  = 16
	// syncFanout is how many random connected peers the periodic sync asks.
	syncFanout = 3
	// syncDebounce gathers connection events before syncing with the new peers.
	syncDebounce = 500 * time.Millisecond
	// learnQueueSize bounds the entries waiting for the backend's Learn*.
	learnQueueSize = 4096
	// maxPubsubMessage is the pubsub limit on a whole RPC; entries themselves
	// are held to MaxCatalogEntrySize by the topic validators, so a larger
	// message is seen (and counted as rejected) rather than dropped unseen.
	maxPubsubMessage = 2*MaxCatalogEntrySize + 64<<10
)

// ErrCatalogOff is returned by PublishCatalog and PublishProfile when the
// node's backend does not implement CatalogBackend.
var ErrCatalogOff = errors.New("catalog off: the backend does not implement p2p.CatalogBackend")

// learnItem is one entry waiting for the backend.
type learnItem struct {
	from    peer.ID
	cat     *CatalogEntry
	profile *ProfileEntry
	node    *NodeInfo
}

// catalogState is the catalog's part of a Peer. gossip is set by New and
// read-only after; the maps are guarded by Peer.mu.
type catalogState struct {
	gossip   *gossip
	lastSync map[peer.ID]time.Time // when each peer was last asked (rate limit)
	syncing  map[peer.ID]bool
	serving  int // syncs being served
	verified verifiedSet
}

// verifiedSet remembers the encodings (by hash) of entries whose signature
// checked, so that a sync, which sends a peer's whole catalog every minute,
// costs a signature check only for what is new. It holds two generations of
// at most verifiedGen hashes each: bounded, and what is still synced stays.
type verifiedSet struct {
	mu        sync.Mutex
	cur, prev map[[sha256.Size]byte]struct{}
}

// verifiedGen bounds one generation of verifiedSet (two: 8 MiB at most).
const verifiedGen = 1 << 17

func (v *verifiedSet) has(h [sha256.Size]byte) bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	if _, ok := v.cur[h]; ok {
		return true
	}
	_, ok := v.prev[h]
	return ok
}

func (v *verifiedSet) add(h [sha256.Size]byte) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if len(v.cur) >= verifiedGen || v.cur == nil {
		v.prev, v.cur = v.cur, make(map[[sha256.Size]byte]struct{})
	}
	v.cur[h] = struct{}{}
}

// verifyEncoded checks the signature of a decoded entry (e a *CatalogEntry
// or *ProfileEntry) whose encoding is b, unless b checked before.
func (p *Peer) verifyEncoded(b []byte, e any) error {
	h := sha256.Sum256(b)
	if p.cat.verified.has(h) {
		return nil
	}
	var err error
	switch e := e.(type) {
	case *CatalogEntry:
		err = VerifyCatalogEntry(*e)
	case *ProfileEntry:
		err = VerifyProfileEntry(*e)
	default:
		err = fmt.Errorf("verify %T: not a catalog entry", e)
	}
	if err == nil {
		p.cat.verified.add(h)
	}
	return err
}

// gossip is the node's GossipSub and its two topics.
type gossip struct {
	ps                *pubsub.PubSub
	catalog, profiles *pubsub.Topic
	nodes             *pubsub.Topic // nil without a NodeBackend
	subs              []*pubsub.Subscription
	protocols         []protocol.ID // what pubsub registered on the host
}

func (p *Peer) catalogBackend() CatalogBackend {
	cb, _ := p.o.backend.(CatalogBackend)
	return cb
}

// startGossip starts GossipSub on the host and subscribes to the catalog
// topics, when the backend is a CatalogBackend; New calls it before the node
// connects anywhere. Started later, on a host already connected, gossipsub
// can miss a peer for good: a stream it opens to a peer that does not yet
// speak gossipsub fails, and the peer's later identify push may arrive while
// that attempt is still under way. pubsub ends with p.ctx (Close).
func (p *Peer) startGossip() error {
	if p.catalogBackend() == nil {
		return nil
	}
	before := map[protocol.ID]bool{}
	for _, id := range p.host.Mux().Protocols() {
		before[id] = true
	}
	ps, err := pubsub.NewGossipSub(p.ctx, p.host,
		pubsub.WithMessageSignaturePolicy(pubsub.StrictSign),
		pubsub.WithMaxMessageSize(maxPubsubMessage),
		// An announcement goes to every connected peer on the topic, not only
		// to the mesh: the mesh forms at heartbeats (the first 100 ms after a
		// peer joins), and a message published before would reach nobody.
		pubsub.WithFloodPublish(true),
		// Room for a burst of announcements (a node publishing its whole
		// catalog after an import); what overflows comes back by sync.
		pubsub.WithPeerOutboundQueueSize(256),
		pubsub.WithLogger(p.log.With("component", "pubsub")),
	)
	g := &gossip{ps: ps}
	// pubsub registers its protocols on the host and never removes them; the
	// host may outlive the Peer (WithHost), so stopGossip removes them.
	for _, id := range p.host.Mux().Protocols() {
		if !before[id] {
			g.protocols = append(g.protocols, id)
		}
	}
	p.cat.gossip = g
	if err != nil {
		return fmt.Errorf("start catalog gossip: %w", err)
	}
	topics := []struct {
		name string
		dst  **pubsub.Topic
	}{{TopicCatalog, &g.catalog}, {TopicProfiles, &g.profiles}}
	if p.nodeBackend() != nil {
		topics = append(topics, struct {
			name string
			dst  **pubsub.Topic
		}{TopicNodes, &g.nodes})
	}
	for _, t := range topics {
		if err := ps.RegisterTopicValidator(t.name, p.validateEntry, pubsub.WithValidatorTimeout(5*time.Second)); err != nil {
			return fmt.Errorf("catalog topic %s: %w", t.name, err)
		}
		topic, err := ps.Join(t.name)
		if err != nil {
			return fmt.Errorf("join catalog topic %s: %w", t.name, err)
		}
		sub, err := topic.Subscribe(pubsub.WithBufferSize(256))
		if err != nil {
			return fmt.Errorf("subscribe to catalog topic %s: %w", t.name, err)
		}
		*t.dst = topic
		g.subs = append(g.subs, sub)
	}
	p.host.SetStreamHandler(ProtocolCatalogSync, p.handleCatalogSync)
	if g.nodes != nil {
		p.host.SetStreamHandler(ProtocolNodeInfo, p.handleNodeInfo)
	}
	return nil
}

// stopGossip removes the catalog's protocol handlers; pubsub itself ends
// with p.ctx, which the caller has cancelled.
func (p *Peer) stopGossip() {
	g := p.cat.gossip
	if g == nil {
		return
	}
	p.host.RemoveStreamHandler(ProtocolCatalogSync)
	if g.nodes != nil {
		p.host.RemoveStreamHandler(ProtocolNodeInfo)
	}
	for _, id := range g.protocols {
		p.host.RemoveStreamHandler(id)
	}
}

// runCatalog feeds received entries to the backend and runs anti-entropy
// until ctx is cancelled or the Peer closes; Run calls it. Without a
// CatalogBackend it returns at once.
func (p *Peer) runCatalog(ctx context.Context) error {
	cb, g := p.catalogBackend(), p.cat.gossip
	if cb == nil || g == nil {
		return nil
	}
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.wg.Add(1)
	p.mu.Unlock()
	defer p.wg.Done()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	defer context.AfterFunc(p.ctx, cancel)()

	queue := make(chan learnItem, p.learnQueue)
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel() // before wg.Wait: every goroutine below ends with ctx
	for _, sub := range g.subs {
		wg.Go(func() { p.readTopic(ctx, sub, queue) })
	}
	wg.Go(func() { p.learnLoop(ctx, cb, queue) })
	wg.Go(func() { p.announceNodes(ctx) })

	conns := make(chan peer.ID, 256)
	notifee := &network.NotifyBundle{ConnectedF: func(_ network.Network, c network.Conn) {
		select {
		case conns <- c.RemotePeer():
		default: // the periodic sync catches up
		}
	}}
	p.host.Network().Notify(notifee)
	defer p.host.Network().StopNotify(notifee)
	p.syncLoop(ctx, &wg, conns, queue)
	return nil
}

// validateEntry is the topic validator: it decodes the message, rejecting
// malformed or oversized ones, and checks that the entry's Publisher (Node)
// signed it. The decoded entry travels on as ValidatorData.
func (p *Peer) validateEntry(_ context.Context, from peer.ID, m *pubsub.Message) pubsub.ValidationResult {
	local := from == p.host.ID()
	reject := func(kind string, err error) pubsub.ValidationResult {
		if !local {
			p.metrics.catalogMsgs.WithLabelValues(kind, "rejected").Inc()
			p.log.Debug("rejected catalog message", "peer_id", from.String(), "author", m.GetFrom().String(), "err", err)
		}
		return pubsub.ValidationReject
	}
	kind := "catalog"
	switch m.GetTopic() {
	case TopicProfiles:
		kind = "profile"
	case TopicNodes:
		kind = "node"
	}
	if !local && p.Bad(m.GetFrom()) {
		// Reported bad (ReportBad): its announcements wait out the TTL. The
		// relay is not at fault, so ignore rather than reject.
		p.metrics.catalogMsgs.WithLabelValues(kind, "ignored").Inc()
		return pubsub.ValidationIgnore
	}
	if len(m.Data) > MaxCatalogEntrySize {
		return reject(kind, badEntry("%d bytes (max %d)", len(m.Data), MaxCatalogEntrySize))
	}
	switch kind {
	case "catalog":
		e, err := DecodeCatalogEntry(m.Data)
		if err != nil {
			return reject(kind, err)
		}
		if e.Publisher != m.GetFrom() {
			return reject(kind, fmt.Errorf("entry published by %s signed by %s", e.Publisher, m.GetFrom()))
		}
		if err := p.verifyEncoded(m.Data, &e); err != nil {
			return p.rejectForged(local, m.GetFrom(), reject(kind, err), err)
		}
		m.ValidatorData = &e
	case "node":
		e, err := DecodeNodeInfo(m.Data)
		if err != nil {
			return reject(kind, err)
		}
		if e.Node != m.GetFrom() {
			return reject(kind, fmt.Errorf("node info of %s signed by %s", e.Node, m.GetFrom()))
		}
		m.ValidatorData = &e
	default:
		e, err := DecodeProfileEntry(m.Data)
		if err != nil {
			return reject(kind, err)
		}
		if e.Node != m.GetFrom() {
			return reject(kind, fmt.Errorf("profile of node %s signed by %s", e.Node, m.GetFrom()))
		}
		if err := p.verifyEncoded(m.Data, &e); err != nil {
			return p.rejectForged(local, m.GetFrom(), reject(kind, err), err)
		}
		m.ValidatorData = &e
	}
	if !local {
		p.metrics.catalogMsgs.WithLabelValues(kind, "accepted").Inc()
	}
	return pubsub.ValidationAccept
}

// rejectForged demotes the author of a message (pubsub checked that it
// signed the message) whose entry carries a false signature, and returns r.
func (p *Peer) rejectForged(local bool, author peer.ID, r pubsub.ValidationResult, why error) pubsub.ValidationResult {
	if !local {
		p.markBad(author, fmt.Errorf("announced a catalog entry with a false signature: %w", why))
	}
	return r
}

// readTopic hands every validated message of sub from another peer to the
// learn queue, dropping it (with a count) when the queue is full. The
// subscription outlives it: Run may run again.
func (p *Peer) readTopic(ctx context.Context, sub *pubsub.Subscription, queue chan<- learnItem) {
	for {
		m, err := sub.Next(ctx)
		if err != nil {
			return
		}
		if m.ReceivedFrom == p.host.ID() {
			continue
		}
		it := learnItem{from: m.ReceivedFrom}
		switch v := m.ValidatorData.(type) {
		case *CatalogEntry:
			it.cat = v
		case *ProfileEntry:
			it.profile = v
		case *NodeInfo:
			it.node = v
		default:
			continue
		}
		select {
		case queue <- it:
		default:
			p.metrics.catalogDropped.Inc()
		}
	}
}

// learnLoop feeds queued entries to the backend, one at a time.
func (p *Peer) learnLoop(ctx context.Context, cb CatalogBackend, queue <-chan learnItem) {
	for {
		select {
		case <-ctx.Done():
			return
		case it := <-queue:
			switch {
			case it.cat != nil:
				cb.LearnCatalog(it.from, *it.cat)
			case it.profile != nil:
				cb.LearnProfile(it.from, *it.profile)
			case it.node != nil:
				if nb := p.nodeBackend(); nb != nil {
					nb.LearnNode(it.from, *it.node)
				}
			}
		}
	}
}

// catalogGossip returns the node's gossip, or an error saying why there is none.
func (p *Peer) catalogGossip() (*gossip, error) {
	if p.cat.gossip == nil {
		return nil, ErrCatalogOff
	}
	if p.ctx.Err() != nil {
		return nil, errors.New("p2p node closed")
	}
	return p.cat.gossip, nil
}

// PublishCatalog announces e to every peer on the catalog topic. e.Publisher
// must be this node or empty (then filled in): a node announces only its own
// changes, and peers reject a message whose signer is not the Publisher. It
// works from New on, Run or not; with no peer connected it succeeds and sends
// nothing. Peers that miss the announcement learn e at their next sync, from
// any node that has it (so the node should record e before publishing it).
func (p *Peer) PublishCatalog(ctx context.Context, e CatalogEntry) error {
	if e.Publisher == "" {
		e.Publisher = p.host.ID()
	}
	if e.Publisher != p.host.ID() {
		return fmt.Errorf("publish catalog entry of %s: publisher %s is not this node; only the publisher announces a change (peers learn others' entries by sync)", e.Manifest, e.Publisher)
	}
	e, err := p.SignCatalog(e)
	if err != nil {
		return fmt.Errorf("publish: %w", err)
	}
	b, err := AppendCatalogEntry(nil, e)
	if err != nil {
		return fmt.Errorf("publish catalog entry of %s: %w", e.Manifest, err)
	}
	t, err := p.catalogGossip()
	if err != nil {
		return fmt.Errorf("publish catalog entry of %s: %w", e.Manifest, err)
	}
	if err := t.catalog.Publish(ctx, b); err != nil {
		return fmt.Errorf("publish catalog entry of %s: %w", e.Manifest, err)
	}
	return nil
}

// PublishProfile announces e on the profiles topic, as PublishCatalog; e.Node
// must be this node or empty.
func (p *Peer) PublishProfile(ctx context.Context, e ProfileEntry) error {
	if e.Node == "" {
		e.Node = p.host.ID()
	}
	if e.Node != p.host.ID() {
		return fmt.Errorf("publish profile of %s: node %s is not this node; only a profile's node announces it", e.Manifest, e.Node)
	}
	e, err := p.SignProfile(e)
	if err != nil {
		return fmt.Errorf("publish: %w", err)
	}
	b, err := AppendProfileEntry(nil, e)
	if err != nil {
		return fmt.Errorf("publish profile of %s: %w", e.Manifest, err)
	}
	t, err := p.catalogGossip()
	if err != nil {
		return fmt.Errorf("publish profile of %s: %w", e.Manifest, err)
	}
	if err := t.profiles.Publish(ctx, b); err != nil {
		return fmt.Errorf("publish profile of %s: %w", e.Manifest, err)
	}
	return nil
}

// SignCatalog returns e signed with this node's identity key: what the node
// records before it publishes (PublishCatalog signs again, to the same
// signature) and serves by sync. e.Publisher must be this node or empty.
func (p *Peer) SignCatalog(e CatalogEntry) (CatalogEntry, error) {
	return SignCatalogEntry(p.host.Peerstore().PrivKey(p.host.ID()), e)
}

// SignProfile is SignCatalog for a profile; e.Node must be this node or empty.
func (p *Peer) SignProfile(e ProfileEntry) (ProfileEntry, error) {
	return SignProfileEntry(p.host.Peerstore().PrivKey(p.host.ID()), e)
}

// ReportBad demotes id, as a peer that sent bytes failing verification: the
// node calls it when an entry from id fails its CID check. id is left out of
// selection and its catalog syncs are refused for the bad-peer TTL.
func (p *Peer) ReportBad(id peer.ID, why error) {
	if id == "" || id == p.host.ID() {
		return
	}
	p.markBad(id, why)
}

// syncLoop syncs with each newly connected peer (debounced) and, every sync
// interval, with syncFanout random connected peers; at most once per peer per
// interval, syncConcurrency at a time. Sync goroutines join wg.
func (p *Peer) syncLoop(ctx context.Context, wg *sync.WaitGroup, conns <-chan peer.ID, queue chan<- learnItem) {
	sem := make(chan struct{}, syncConcurrency)
	pending := map[peer.ID]bool{}
	// Peers connected before the notifiee was registered.
	for _, id := range p.host.Network().Peers() {
		pending[id] = true
	}
	debounce := time.NewTimer(syncDebounce)
	defer debounce.Stop()
	tick := time.NewTicker(p.o.catalogSyncInterval)
	defer tick.Stop()
	start := func(id peer.ID) {
		if !p.claimSync(id) {
			return
		}
		wg.Go(func() {
			defer p.releaseSync(id)
			select {
			case sem <- struct{}{}:
			case <-ctx.Done():
				return
			}
			defer func() { <-sem }()
			if p.cat.gossip.nodes != nil {
				if err := p.askNodeInfo(ctx, id, queue); err != nil && ctx.Err() == nil {
					p.log.Debug("node info not learned", "peer_id", id.String(), "err", err)
				}
			}
			n, err := p.syncCatalog(ctx, id, queue)
			if err != nil && ctx.Err() == nil {
				p.log.Debug("catalog sync failed", "peer_id", id.String(), "err", err)
			} else if err == nil {
				p.log.Debug("catalog synced", "peer_id", id.String(), "entries", n)
			}
		})
	}
	for {
		select {
		case <-ctx.Done():
			return
		case id := <-conns:
			pending[id] = true
			debounce.Reset(syncDebounce)
		case <-debounce.C:
			for id := range pending {
				start(id)
			}
			clear(pending)
		case <-tick.C:
			peers := p.host.Network().Peers()
			rand.Shuffle(len(peers), func(i, j int) { peers[i], peers[j] = peers[j], peers[i] })
			for _, id := range peers[:min(len(peers), syncFanout)] {
				start(id)
			}
		}
	}
}

// claimSync reports whether id may be synced with now (not bad, not asked in
// the last interval, no sync under way) and, if so, records the attempt.
func (p *Peer) claimSync(id peer.ID) bool {
	if id == p.host.ID() || !p.connected(id) || p.Bad(id) {
		return false
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	now := time.Now()
	if p.cat.syncing[id] || now.Sub(p.cat.lastSync[id]) < p.o.catalogSyncInterval {
		return false
	}
	for q, t := range p.cat.lastSync {
		if now.Sub(t) >= p.o.catalogSyncInterval {
			delete(p.cat.lastSync, q)
		}
	}
	p.cat.lastSync[id] = now
	p.cat.syncing[id] = true
	return true
}

func (p *Peer) releaseSync(id peer.ID) {
	p.mu.Lock()
	delete(p.cat.syncing, id)
	p.mu.Unlock()
}

// syncCatalog asks id for its whole catalog and profiles and queues every
// entry for the backend's Learn* (waiting for room in the queue), returning
// how many entries arrived. The periodic and on-connect syncs call it; it
// ignores the per-peer rate limit.
func (p *Peer) syncCatalog(ctx context.Context, id peer.ID, queue chan<- learnItem) (n int, err error) {
	defer func() {
		result := "ok"
		if err != nil {
			result = "error"
		}
		p.metrics.catalogSyncs.WithLabelValues(result).Inc()
		p.metrics.catalogSyncEntries.Add(float64(n))
	}()
	ctx, cancel := context.WithTimeout(ctx, syncTimeout)
	defer cancel()
	s, err := p.host.NewStream(ctx, id, ProtocolCatalogSync)
	if err != nil {
		return 0, fmt.Errorf("catalog sync with %s: %w", id, err)
	}
	clean := false
	defer func() {
		if !clean {
			s.Reset()
		}
	}()
	stop := context.AfterFunc(ctx, func() { s.Reset() })
	defer stop()
	s.SetWriteDeadline(time.Now().Add(p.writeTimeout(16)))
	if _, err := s.Write(appendFrame(nil, []byte{syncRequest, 0})); err != nil {
		return 0, fmt.Errorf("catalog sync with %s: %w", id, err)
	}
	s.CloseWrite()
	r := bufio.NewReaderSize(s, 64<<10)
	var buf []byte
	total := 0
	for {
		s.SetReadDeadline(time.Now().Add(p.writeTimeout(MaxCatalogEntrySize)))
		frame, err := readFrame(r, buf)
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return n, fmt.Errorf("catalog sync with %s: %w", id, err)
		}
		buf = frame[:0]
		total += len(frame)
		if total > maxSyncBytes+4096 || n > maxSyncEntries {
			return n, fmt.Errorf("catalog sync with %s: %w: reply over %d bytes or %d entries", id, errProtocol, maxSyncBytes, maxSyncEntries)
		}
		it := learnItem{from: id}
		switch frame[0] {
		case syncEnd:
			if len(frame) != 2 || frame[1]&^1 != 0 {
				return n, fmt.Errorf("catalog sync with %s: %w: bad end frame", id, errProtocol)
			}
			if frame[1]&1 != 0 {
				p.log.Warn("peer's catalog was truncated in sync", "peer_id", id.String(), "entries", n)
			}
			clean = true
			s.Close()
			return n, nil
		case entryCatalog:
			e, err := DecodeCatalogEntry(frame)
			if err != nil {
				return n, fmt.Errorf("catalog sync with %s: %w", id, err)
			}
			if err := p.verifyEncoded(frame, &e); err != nil {
				return n, p.forgedInSync(id, err)
			}
			it.cat = &e
		case entryProfile:
			e, err := DecodeProfileEntry(frame)
			if err != nil {
				return n, fmt.Errorf("catalog sync with %s: %w", id, err)
			}
			if err := p.verifyEncoded(frame, &e); err != nil {
				return n, p.forgedInSync(id, err)
			}
			it.profile = &e
		default:
			return n, fmt.Errorf("catalog sync with %s: %w: unknown frame type %#x", id, errProtocol, frame[0])
		}
		select {
		case queue <- it:
			n++
		case <-ctx.Done():
			return n, fmt.Errorf("catalog sync with %s: %w", id, ctx.Err())
		}
	}
}

// forgedInSync demotes id, which served an entry whose signature is false
// (forged, or altered on its way), and returns the sync's error.
func (p *Peer) forgedInSync(id peer.ID, why error) error {
	err := fmt.Errorf("catalog sync with %s: served a false entry, peer demoted: %w", id, why)
	p.markBad(id, err)
	p.metrics.catalogMsgs.WithLabelValues("sync", "rejected").Inc()
	return err
}

// appendFrame appends uvarint(len(body)) body to b.
func appendFrame(b, body []byte) []byte {
	b = binary.AppendUvarint(b, uint64(len(body)))
	return append(b, body...)
}

// handleCatalogSync serves one sync request: every entry of the backend's
// Catalog and Profiles, one frame each, then END.
func (p *Peer) handleCatalogSync(s network.Stream) {
	remote := s.Conn().RemotePeer()
	p.mu.Lock()
	closed, busy := p.closed, p.cat.serving >= maxServedSyncs
	if !closed && !busy {
		p.served[s] = struct{}{}
		p.wg.Add(1)
		p.cat.serving++
	}
	p.mu.Unlock()
	if closed || busy {
		s.Reset()
		return
	}
	defer func() {
		p.mu.Lock()
		p.cat.serving--
		p.mu.Unlock()
		p.unserve(s)
	}()
	if p.Bad(remote) {
		s.Reset()
		return
	}
	ctx, cancel := context.WithTimeout(p.ctx, syncTimeout)
	defer cancel()
	defer context.AfterFunc(ctx, func() { s.Reset() })()
	s.SetReadDeadline(time.Now().Add(p.o.writeTimeout))
	frame, err := readFrame(bufio.NewReaderSize(s, 64), nil)
	if err != nil || len(frame) != 2 || frame[0] != syncRequest || frame[1] != 0 {
		p.log.Debug("closing catalog sync stream: bad request", "peer_id", remote.String(), "err", err)
		s.Reset()
		return
	}
	if err := p.serveCatalog(ctx, s); err != nil {
		p.log.Debug("catalog sync not served", "peer_id", remote.String(), "err", err)
		s.Reset()
		return
	}
	s.Close()
}

func (p *Peer) serveCatalog(ctx context.Context, s network.Stream) error {
	w := bufio.NewWriterSize(s, 64<<10)
	write := func(body []byte) error {
		s.SetWriteDeadline(time.Now().Add(p.writeTimeout(w.Buffered() + len(body) + 16)))
		_, err := w.Write(appendFrame(nil, body))
		return err
	}
	var truncated byte
	if cb := p.catalogBackend(); cb != nil {
		cat, err := cb.Catalog(ctx)
		if err != nil {
			return fmt.Errorf("list catalog: %w", err)
		}
		profs, err := cb.Profiles(ctx)
		if err != nil {
			return fmt.Errorf("list profiles: %w", err)
		}
		total, n := 0, 0
		var body []byte
		next := func(b []byte, err error, what string) (bool, error) {
			if err != nil {
				p.log.Warn("not syncing an entry out of bounds", "entry", what, "err", err)
				return true, nil
			}
			if total+len(b) > maxSyncBytes || n >= maxSyncEntries {
				truncated = 1
				return false, nil
			}
			total += len(b)
			n++
			return true, write(b)
		}
		unsigned := 0
		defer func() {
			if unsigned > 0 {
				p.log.Debug("not syncing unsigned entries (learned before entries were signed; their publishers serve them signed)", "entries", unsigned)
			}
		}()
		for _, e := range cat {
			if len(e.Sig) == 0 {
				unsigned++
				continue
			}
			body, err = AppendCatalogEntry(body[:0], e)
			if more, err := next(body, err, e.Manifest.String()); err != nil {
				return err
			} else if !more {
				break
			}
		}
		for _, e := range profs {
			if truncated != 0 {
				break
			}
			if len(e.Sig) == 0 {
				unsigned++
				continue
			}
			body, err = AppendProfileEntry(body[:0], e)
			if more, err := next(body, err, "profile of "+e.Manifest.String()); err != nil {
				return err
			} else if !more {
				break
			}
		}
	}
	if err := write([]byte{syncEnd, truncated}); err != nil {
		return err
	}
	return w.Flush()
}
