// Package placement is a node's room for placement (hoard place, the Nova
// weigher): it keeps the latest NodeInfo of every live node of the cluster
// (learned by p2p gossip: name, open exports, free quota) and ranks hosts for
// booting an image with planner.PlaceScores, from the have-bitmaps the node
// already holds. It never asks a peer anything: a node that stopped
// announcing itself drops out after a few of its announcement intervals.
package placement

import (
	"fmt"
	"sort"
	"sync"
	"time"

	"github.com/hoardvm/hoard/p2p"
	"github.com/hoardvm/hoard/planner"
	"github.com/libp2p/go-libp2p/core/peer"
)

const (
	// ExpireIntervals is how many of a node's announcement intervals pass
	// without news before it drops out.
	ExpireIntervals = 3
	// minInterval and maxInterval clamp the interval a node claims.
	minInterval = 50 * time.Millisecond
	maxInterval = 10 * time.Minute
)

// Nodes is the latest NodeInfo of each live node. Its methods are safe for
// concurrent use and never block on anything but its own lock.
type Nodes struct {
	now func() time.Time

	mu    sync.Mutex
	nodes map[peer.ID]learned
}

type learned struct {
	info    p2p.NodeInfo
	expires time.Time
}

// NewNodes returns an empty set; now is the clock (nil: time.Now).
func NewNodes(now func() time.Time) *Nodes {
	if now == nil {
		now = time.Now
	}
	return &Nodes{now: now, nodes: map[peer.ID]learned{}}
}

// Learn records e, unless a greater Version of its node is known, and
// restarts its expiry: ExpireIntervals × e.Interval (clamped) from now.
func (n *Nodes) Learn(e p2p.NodeInfo) {
	if e.Node == "" {
		return
	}
	iv := min(max(e.Interval, minInterval), maxInterval)
	if e.Interval == 0 {
		iv = p2p.DefaultNodeInfoInterval
	}
	now := n.now()
	n.mu.Lock()
	defer n.mu.Unlock()
	if old, ok := n.nodes[e.Node]; ok && old.info.Version > e.Version && old.expires.After(now) {
		return
	}
	n.nodes[e.Node] = learned{info: e, expires: now.Add(ExpireIntervals * iv)}
	for id, l := range n.nodes { // forget the expired
		if !l.expires.After(now) {
			delete(n.nodes, id)
		}
	}
}

// Live returns the info of every node heard from within its expiry, by name.
func (n *Nodes) Live() []p2p.NodeInfo {
	now := n.now()
	n.mu.Lock()
	out := make([]p2p.NodeInfo, 0, len(n.nodes))
	for _, l := range n.nodes {
		if l.expires.After(now) {
			out = append(out, l.info)
		}
	}
	n.mu.Unlock()
	sort.Slice(out, func(i, j int) bool {
		if out[i].Name != out[j].Name {
			return out[i].Name < out[j].Name
		}
		return out[i].Node < out[j].Node
	})
	return out
}

// Request is what Rank ranks.
type Request struct {
	Image planner.PlaceImage
	// Self is this node's info and SelfBits the entries it holds.
	Self     p2p.NodeInfo
	SelfBits p2p.Bitmap
	// Haves are the peers' have-bitmaps of the image this node holds; a
	// live node without one holds none of it, as far as this node knows.
	Haves map[peer.ID]p2p.Bitmap
	// Hosts, when not empty, are the host names to rank (every one is in the
	// answer, unknown ones last with score 0); empty: every live node.
	Hosts []string
}

// Ranked is one host of the answer.
type Ranked struct {
	planner.HostScore
	// Peer is the host's node, "" for an unknown host.
	Peer peer.ID
	Self bool
}

// Rank ranks r's hosts (see planner.PlaceScores) over the live nodes and
// this one. A name that several live nodes claim (a misconfiguration) stands
// for one of them: this node if it is one, else the latest to announce
// itself; the reason says so.
func (n *Nodes) Rank(r Request) []Ranked {
	type claim struct {
		info   p2p.NodeInfo
		claims int
	}
	byName := map[string]*claim{r.Self.Name: {info: r.Self, claims: 1}}
	var names []string
	names = append(names, r.Self.Name)
	for _, e := range n.Live() {
		if e.Node == r.Self.Node {
			continue
		}
		c := byName[e.Name]
		if c == nil {
			byName[e.Name] = &claim{info: e, claims: 1}
			names = append(names, e.Name)
			continue
		}
		c.claims++
		if c.info.Node != r.Self.Node && e.Version > c.info.Version {
			c.info = e
		}
	}
	if len(r.Hosts) > 0 {
		names = names[:0]
		seen := map[string]bool{}
		for _, h := range r.Hosts {
			if !seen[h] {
				seen[h] = true
				names = append(names, h)
			}
		}
	}
	loads := make([]planner.HostLoad, 0, len(names))
	for _, name := range names {
		c := byName[name]
		if c == nil {
			loads = append(loads, planner.HostLoad{Name: name, Note: fmt.Sprintf(
				"no live hoard node named %q: none announced itself with that node.name lately", name)})
			continue
		}
		bits := r.Haves[c.info.Node]
		if c.info.Node == r.Self.Node {
			bits = r.SelfBits
		}
		loads = append(loads, planner.HostLoad{Name: name, Known: true, Bits: bits, OpenExports: c.info.OpenExports, FreeQuota: c.info.FreeQuota})
	}
	scores := planner.PlaceScores(r.Image, loads)
	out := make([]Ranked, len(scores))
	for i, s := range scores {
		out[i] = Ranked{HostScore: s}
		if c := byName[s.Host]; c != nil {
			out[i].Peer, out[i].Self = c.info.Node, c.info.Node == r.Self.Node
			if c.claims > 1 {
				out[i].Reason += fmt.Sprintf("; %d nodes claim this name: give each its own node.name", c.claims)
			}
		}
	}
	return out
}
