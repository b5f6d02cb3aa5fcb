package p2p

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"net"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/cenkalti/backoff/v5"
	"github.com/hoardvm/hoard/chunkstore"
	"github.com/ipfs/go-cid"
	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/peerstore"
	"github.com/libp2p/go-libp2p/core/sec"
	ma "github.com/multiformats/go-multiaddr"
	manet "github.com/multiformats/go-multiaddr/net"
	mh "github.com/multiformats/go-multihash"
	"golang.org/x/sync/errgroup"
)

// reprovideConcurrency bounds the DHT announcements in flight while reproviding.
const reprovideConcurrency = 8

// NameKey is the DHT key under which providers of a name (an image name or a
// Glance image ID) are found: CIDv1 raw of sha256("hoard-name:" + name).
func NameKey(name string) cid.Cid {
	d := sha256.Sum256([]byte("hoard-name:" + name))
	h, err := mh.Encode(d[:], mh.SHA2_256)
	if err != nil {
		panic(err) // the digest length is right
	}
	return cid.NewCidV1(cid.Raw, h)
}

// Provide announces in the DHT that this node holds chunks of manifest, and keeps
// announcing it (Run) until Withdraw. The key is kept even when this first
// announcement fails (for instance before the node has joined); Run retries it.
func (p *Peer) Provide(ctx context.Context, manifest chunkstore.ID) error {
	return p.provide(ctx, manifest.CID(), "manifest "+manifest.String())
}

// ProvideName announces that this node can resolve name to manifest, and
// answers peers' RESOLVE requests for it. Withdraw(manifest) or WithdrawName
// stops it.
func (p *Peer) ProvideName(ctx context.Context, name string, manifest chunkstore.ID) error {
	if name == "" || len(name) > maxNameLen {
		return fmt.Errorf("provide name %q: want 1 to %d bytes", name, maxNameLen)
	}
	p.mu.Lock()
	p.names[name] = manifest
	p.mu.Unlock()
	return p.provide(ctx, NameKey(name), "name "+name)
}

func (p *Peer) provide(ctx context.Context, key cid.Cid, what string) error {
	p.mu.Lock()
	p.provided[key] = what
	p.mu.Unlock()
	if err := p.dht.Provide(ctx, key, true); err != nil {
		p.mu.Lock()
		p.retry[key] = what
		p.mu.Unlock()
		return fmt.Errorf("announce %s: %w (kept; retried in a few seconds)", what, err)
	}
	return nil
}

// retryInterval is how soon a failed announcement is tried again.
const retryInterval = 3 * time.Second

// retryFailed announces again the keys whose last announcement failed.
func (p *Peer) retryFailed(ctx context.Context) {
	p.mu.Lock()
	keys := make(map[cid.Cid]string, len(p.retry))
	for k, v := range p.retry {
		if _, still := p.provided[k]; still {
			keys[k] = v
		} else {
			delete(p.retry, k) // withdrawn meanwhile
		}
	}
	p.mu.Unlock()
	if len(keys) == 0 || p.dht.RoutingTable().Size() == 0 {
		return
	}
	var g errgroup.Group
	g.SetLimit(reprovideConcurrency)
	for k, what := range keys {
		g.Go(func() error {
			cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			defer cancel()
			if err := p.dht.Provide(cctx, k, true); err != nil {
				p.log.Debug("announce retry failed", "key", what, "err", err)
				return nil
			}
			p.mu.Lock()
			delete(p.retry, k)
			p.mu.Unlock()
			return nil
		})
	}
	g.Wait()
}

// Withdraw stops announcing manifest and the names that resolve to it. Records
// already held by other nodes (and this node's own, which kad-dht cannot
// delete) expire after the record TTL; until then a peer that asks gets an
// empty have-bitmap and moves on.
func (p *Peer) Withdraw(manifest chunkstore.ID) {
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.provided, manifest.CID())
	for name, id := range p.names {
		if id == manifest {
			delete(p.names, name)
			delete(p.provided, NameKey(name))
		}
	}
}

// WithdrawName stops announcing name.
func (p *Peer) WithdrawName(name string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.names, name)
	delete(p.provided, NameKey(name))
}

// Provided returns how many keys this node announces.
func (p *Peer) Provided() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.provided)
}

// FindProviders returns up to 20 peers announcing manifest (not this node),
// connected neighbours first, then by measured latency. Their addresses are
// added to the peerstore.
func (p *Peer) FindProviders(ctx context.Context, manifest chunkstore.ID) ([]peer.AddrInfo, error) {
	return p.findProviders(ctx, manifest.CID())
}

func (p *Peer) findProviders(ctx context.Context, key cid.Cid) ([]peer.AddrInfo, error) {
	defer p.observe("find_providers", time.Now())
	ctx, cancel := context.WithTimeout(ctx, p.o.lookupTimeout)
	defer cancel()
	var out []peer.AddrInfo
	for ai := range p.dht.FindProvidersAsync(ctx, key, p.o.maxProviders) {
		if ai.ID == p.host.ID() || ai.ID == "" {
			continue
		}
		if len(ai.Addrs) > 0 {
			p.host.Peerstore().AddAddrs(ai.ID, ai.Addrs, peerstore.TempAddrTTL)
		}
		out = append(out, ai)
	}
	if len(out) == 0 && ctx.Err() != nil && errors.Is(context.Cause(ctx), context.Canceled) {
		return nil, ctx.Err()
	}
	slices.SortStableFunc(out, func(a, b peer.AddrInfo) int {
		ca, cb := p.connected(a.ID), p.connected(b.ID)
		if ca != cb {
			if ca {
				return -1
			}
			return 1
		}
		la, lb := p.host.Peerstore().LatencyEWMA(a.ID), p.host.Peerstore().LatencyEWMA(b.ID)
		return int(la - lb)
	})
	return out, nil
}

// ErrNameConflict is returned by ResolveName when the providers of a name do
// not agree on the manifest it stands for (two nodes imported different images
// under one name): no answer is picked silently.
var ErrNameConflict = errors.New("image name claimed by different images")

// resolveTimeout bounds each provider's answer to a RESOLVE.
const resolveTimeout = 5 * time.Second

// ResolveName finds the manifest name stands for by asking every provider of
// its name key (NameKey, up to 20 peers, concurrently, each for at most 5 s),
// and returns it with the peers that said so, then the others. When
// providers disagree it returns an error wrapping ErrNameConflict that names
// the manifests and their peers: a name record is not verifiable (a manifest
// is, once fetched), so a node must not take whichever answer came first. A
// name this node provides itself resolves to its own manifest.
func (p *Peer) ResolveName(ctx context.Context, name string) (chunkstore.ID, []peer.AddrInfo, error) {
	p.mu.Lock()
	local, ok := p.names[name]
	p.mu.Unlock()
	provs, err := p.findProviders(ctx, NameKey(name))
	if err != nil {
		return chunkstore.ID{}, nil, fmt.Errorf("resolve %q: %w", name, err)
	}
	if ok {
		return local, provs, nil
	}
	type answer struct {
		ai  peer.AddrInfo
		id  chunkstore.ID
		err error
	}
	answers := make([]answer, len(provs))
	var g errgroup.Group
	for i, ai := range provs {
		answers[i].ai = ai
		if p.Bad(ai.ID) {
			answers[i].err = ErrBadPeer
			continue
		}
		g.Go(func() error {
			rctx, cancel := context.WithTimeout(ctx, resolveTimeout)
			defer cancel()
			answers[i].id, answers[i].err = p.resolve(rctx, ai.ID, name)
			return nil
		})
	}
	g.Wait()
	var lastErr error = chunkstore.ErrNotFound
	byID := map[chunkstore.ID][]peer.AddrInfo{}
	var order []chunkstore.ID // in provider order: connected, then nearest first
	for _, a := range answers {
		if a.err != nil {
			if !errors.Is(a.err, chunkstore.ErrNotFound) {
				lastErr = a.err
			}
			continue
		}
		if _, seen := byID[a.id]; !seen {
			order = append(order, a.id)
		}
		byID[a.id] = append(byID[a.id], a.ai)
	}
	switch len(order) {
	case 0:
		if ctx.Err() != nil {
			return chunkstore.ID{}, nil, fmt.Errorf("resolve %q: %w", name, ctx.Err())
		}
		return chunkstore.ID{}, nil, fmt.Errorf("resolve %q: no peer knows it (%w); add the image on one node with hoard image add", name, lastErr)
	case 1:
		id := order[0]
		agree := byID[id]
		var rest []peer.AddrInfo
		for _, a := range provs {
			if !slices.ContainsFunc(agree, func(b peer.AddrInfo) bool { return b.ID == a.ID }) {
				rest = append(rest, a)
			}
		}
		return id, append(slices.Clone(agree), rest...), nil
	}
	claims := make([]string, 0, len(order))
	for _, id := range order {
		var who []string
		for _, a := range byID[id] {
			who = append(who, a.ID.String())
		}
		claims = append(claims, fmt.Sprintf("%s (peers %s)", id, strings.Join(who, ", ")))
	}
	return chunkstore.ID{}, nil, fmt.Errorf("resolve %q: %w: %s; pull the one you mean by its manifest CID (hoard image pull <cid>), and rename or remove the other on its node",
		name, ErrNameConflict, strings.Join(claims, " and "))
}

// Run joins the cluster through the bootstrap peers (retrying with backoff, and
// again whenever the routing table empties) and re-announces every provided key
// each reprovide interval, and runs the catalog (gossip and sync) when the
// backend is a CatalogBackend. It returns nil when ctx is cancelled.
func (p *Peer) Run(ctx context.Context) error {
	p.log.Info("p2p node up", "peer_id", p.ID().String(), "addrs", fmt.Sprint(p.Addrs()))
	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error { p.bootstrapLoop(ctx); return nil })
	g.Go(func() error { p.reprovideLoop(ctx); return nil })
	g.Go(func() error { p.idleLoop(ctx); return nil })
	g.Go(func() error { return p.runCatalog(ctx) })
	return g.Wait()
}

// idleLoop closes chunk streams no request used for the idle timeout (5 min),
// and with them the pools of peers no longer asked.
func (p *Peer) idleLoop(ctx context.Context) {
	t := time.NewTicker(p.o.streamIdle / 2)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			if n := p.closeIdle(now.Add(-p.o.streamIdle)); n > 0 {
				p.log.Debug("closed idle chunk streams", "streams", n)
			}
		}
	}
}

func (p *Peer) reprovideLoop(ctx context.Context) {
	t := time.NewTicker(p.o.reprovideInterval)
	defer t.Stop()
	r := time.NewTicker(retryInterval)
	defer r.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-r.C:
			p.retryFailed(ctx)
			continue
		case <-t.C:
		case <-p.kick:
		}
		p.Reprovide(ctx)
	}
}

// Reprovide announces every provided key now, reprovideConcurrency at a time,
// and returns how many announcements failed.
func (p *Peer) Reprovide(ctx context.Context) int {
	p.mu.Lock()
	keys := make(map[cid.Cid]string, len(p.provided))
	for k, v := range p.provided {
		keys[k] = v
	}
	p.mu.Unlock()
	if len(keys) == 0 || p.dht.RoutingTable().Size() == 0 {
		return len(keys)
	}
	start := time.Now()
	var g errgroup.Group
	g.SetLimit(reprovideConcurrency)
	var mu sync.Mutex
	failed := 0
	for k, what := range keys {
		g.Go(func() error {
			cctx, cancel := context.WithTimeout(ctx, time.Minute)
			defer cancel()
			if err := p.dht.Provide(cctx, k, true); err != nil && ctx.Err() == nil {
				p.log.Debug("reprovide failed", "key", what, "err", err)
				mu.Lock()
				failed++
				mu.Unlock()
			}
			return nil
		})
	}
	g.Wait()
	p.log.Info("reprovided", "keys", len(keys), "failed", failed, "seconds", time.Since(start).Seconds())
	return failed
}

func (p *Peer) bootstrapLoop(ctx context.Context) {
	if len(p.o.bootstrap) == 0 {
		<-ctx.Done()
		return
	}
	// Failed joins are retried after 1 s, doubling up to a minute (jittered,
	// so that nodes started together do not retry in step).
	bo := &backoff.ExponentialBackOff{InitialInterval: time.Second, RandomizationFactor: 0.2, Multiplier: 2, MaxInterval: time.Minute}
	for {
		err := p.Bootstrap(ctx)
		if ctx.Err() != nil {
			return
		}
		wait := 5 * time.Minute
		if err != nil {
			wait = bo.NextBackOff()
			p.log.Warn("cannot join the cluster yet; retrying", "err", err, "retry_in", wait.Round(time.Millisecond).String())
		} else {
			bo.Reset()
			select {
			case p.kick <- struct{}{}:
			default:
			}
		}
		for {
			select {
			case <-ctx.Done():
				return
			case <-time.After(wait):
			}
			if err != nil || p.dht.RoutingTable().Size() == 0 {
				break
			}
		}
	}
}

// Bootstrap connects to the bootstrap peers once and refreshes the routing
// table. It fails when no bootstrap peer could be reached.
func (p *Peer) Bootstrap(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	targets, err := p.bootstrapTargets(ctx)
	if err != nil && len(targets) == 0 {
		return err
	}
	var mu sync.Mutex
	var errs []error
	ok := 0
	var g errgroup.Group
	for _, ai := range targets {
		g.Go(func() error {
			err := p.connect(ctx, ai)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				errs = append(errs, err)
			} else {
				ok++
			}
			return nil
		})
	}
	g.Wait()
	if ok == 0 {
		hint := "check p2p.bootstrap and that those nodes are up"
		if p.o.pskPath != "" || p.o.psk != nil {
			path := p.o.pskPath
			if path == "" {
				path = "p2p.swarm_key_file"
			}
			hint = "if they are up, this node's swarm key may not match the cluster's: copy the cluster's swarm.key to " + path
		}
		return fmt.Errorf("cannot join the cluster: no bootstrap peer reachable (%w); %s", errors.Join(errs...), hint)
	}
	// Connect returns before identify has told the DHT that the peer speaks it;
	// wait for the routing table to take it, then fill the table.
	for p.dht.RoutingTable().Size() == 0 {
		select {
		case <-ctx.Done():
			return fmt.Errorf("cannot join the cluster: connected to %d bootstrap peers but none speaks the hoard DHT", ok)
		case <-time.After(10 * time.Millisecond):
		}
	}
	select {
	case err := <-p.dht.RefreshRoutingTable():
		if err != nil {
			p.log.Debug("routing table refresh", "err", err)
		}
	case <-ctx.Done():
	}
	return nil
}

// connect dials a bootstrap peer. When its ID is unknown (a dns: entry) it
// first dials with a throwaway ID: the security handshake fails with the
// peer's real ID, which the second dial uses (the way spegel bootstraps from a
// headless service).
func (p *Peer) connect(ctx context.Context, ai peer.AddrInfo) error {
	if ai.ID == p.ID() {
		return nil
	}
	if ai.ID == "" {
		priv, _, err := crypto.GenerateEd25519Key(nil)
		if err != nil {
			return err
		}
		fake, _ := peer.IDFromPrivateKey(priv)
		ai.ID = fake
		err = p.host.Connect(ctx, ai)
		p.host.Peerstore().ClearAddrs(fake)
		p.host.Peerstore().RemovePeer(fake)
		var mismatch sec.ErrPeerIDMismatch
		if !errors.As(err, &mismatch) {
			if err == nil {
				err = errors.New("peer accepted a made-up ID")
			}
			return fmt.Errorf("%v: %w", ai.Addrs, err)
		}
		ai.ID = mismatch.Actual
		if ai.ID == p.ID() {
			return nil
		}
	}
	if err := p.host.Connect(ctx, ai); err != nil {
		return fmt.Errorf("%s: %w", ai.ID, err)
	}
	return nil
}

// bootstrapTargets resolves the bootstrap entries: multiaddrs with /p2p/ID, and
// dns:NAME[:PORT] names resolved to every A/AAAA record (ID unknown).
func (p *Peer) bootstrapTargets(ctx context.Context) ([]peer.AddrInfo, error) {
	var out []peer.AddrInfo
	var errs []error
	self := map[string]bool{}
	for _, a := range p.host.Addrs() {
		self[a.String()] = true
	}
	for _, s := range p.o.bootstrap {
		if rest, ok := strings.CutPrefix(s, "dns:"); ok {
			host, port := rest, p.tcpPort
			if h, pt, err := net.SplitHostPort(rest); err == nil {
				host, port = h, pt
			}
			ips, err := net.DefaultResolver.LookupNetIP(ctx, "ip", host)
			if err != nil {
				errs = append(errs, fmt.Errorf("resolve bootstrap name %s: %w", host, err))
				continue
			}
			for _, ip := range ips {
				ipm, err := manet.FromIP(ip.AsSlice())
				if err != nil {
					continue
				}
				tcp, _ := ma.NewMultiaddr("/tcp/" + port)
				addr := ipm.Encapsulate(tcp)
				if self[addr.String()] {
					continue
				}
				out = append(out, peer.AddrInfo{Addrs: []ma.Multiaddr{addr}})
			}
			continue
		}
		ai, err := peer.AddrInfoFromString(s)
		if err != nil {
			errs = append(errs, fmt.Errorf("bootstrap entry %q: %w (want /ip4/…/tcp/…/p2p/ID or dns:NAME[:PORT])", s, err))
			continue
		}
		out = append(out, *ai)
	}
	return out, errors.Join(errs...)
}
