// Package node is the hoard daemon: it owns the chunk store, serves every
// registered image as a read-only NBD export, fetches missing chunks (local
// store -> peers -> origin), learns boot profiles, and answers the admin HTTP
// API.
//
// # Rooms
//
// The daemon core (this package: lifecycle, exports, read path, profiles,
// metrics, the p2p.Backend it serves peers from) wires rooms that each hold
// one concern, with arrows one way (cmd/hoard's TestLayering keeps them):
//
//	node ──> cluster   views of peers, designated fetcher, advertising, remote resolve  ──> p2p
//	     ──> catalog   the cluster catalog and every node's profiles, merged            ──> p2p, planner
//	     ──> hoarder   keeps every known image's working set local, planned by planner  ──> planner
//	     ──> placement the live nodes' names and load; ranks hosts for an image         ──> p2p, planner
//	     ──> glancemirror  the Glance v2 download mirror (glance.listen), authorized by Glance
//	     ──> api       wire types, the HTTP handler over api.Service (*Node), the Go client
//	     ──> local     add / describe / remove / profile on a store this process holds ──> api, importer
//	     ──> importer  the import pipeline (split, hash, compress, commit)             ──> origin
//	     ──> hot       the hot tier: decoded chunks in sparse raw files, CRC-checked
//	     ──> origin    file, HTTP range and Glance sources
//
// The CLI uses api.Client against a daemon and package local on a data dir
// no daemon holds: one image service, two implementations. None of the rooms
// imports node; cluster consumes only the store and the p2p peer, and the
// read path consumes cluster through the small Fetcher interface.
//
// # Read path
//
// An NBD read is mapped to manifest entries by binary search. Zero entries
// read as zeroes and are reported as holes. For each data chunk: the
// in-memory cache of verified chunks, then the local store, then (one fetch
// per chunk ID however many readers wait: singleflight) the [Fetcher] (peers: package cluster)
// if any, then the origin: a range read of exactly the chunk's span
// [Offset, Offset+Length) from the image's recorded source, bounded by
// Config.OriginTimeout and Config.OriginConcurrency. Bytes from anywhere but
// the local store are verified against the chunk ID before they are stored
// (copy-on-read) and served; a mismatch is an error, never served. An origin
// failure fails only the reads that need it (NBD EIO); cached reads go on.
//
// A sequential reader (each read starting where the previous one ended)
// triggers readahead of the next Config.Readahead chunks in the background,
// bounded by Config.PrefetchConcurrency; when the bound is reached readahead is
// skipped rather than queued. Readahead follows the reader: until a read of
// the export has needed a fetch, it only decompresses local chunks into
// memory, so a warm reader never sends the node to the origin.
//
// # Cluster
//
// With a swarm key (Config.P2P.SwarmKeyFile, default DataDir/swarm.key), or
// bootstrap/listen addresses or an injected host, Run starts a p2p.Peer under
// its errgroup; otherwise the node runs standalone and says once how to join
// a cluster. The node serves its store to peers (p2p.Backend: manifests, a
// have-bitmap per image cached and updated as chunks are fetched, chunks in
// their stored form) and advertises image-level keys: the manifest CID and
// every name (and Glance ID) of each registered image, at start and on add;
// removing an image withdraws them.
//
// When the cluster is on and Config.Fetcher is nil, the peers are the read
// path's Fetcher. For a missing chunk: the have-bitmaps of the image's peers
// (providers from the DHT plus this node's neighbours, asked again after
// Config.P2P.ViewTTL) name the peers that hold it, and p2p.FetchFrom gets it
// from one (least loaded, connected first, hedged). When none holds it, the
// chunk's designated fetcher is p2p.Designated over the cluster's members as
// this node sees them: the live nodes it heard a NodeInfo from (gossiped on
// /hoard/nodes/1, and asked of every peer on connect), its connected peers,
// the peers its view knows to serve the image, and this node; less the peers
// that misbehaved or just stalled a fetch. Membership, not the answers to
// Have requests, so that a node that just learnt the image, or whose Have
// requests timed out under load, designates the peer the others do. If that
// is this node, it goes to the origin; if another, it is asked with the fetch
// flag and runs this same read path (a member that has not learnt the image
// yet fetches its manifest from the asker first, CID-checked), and after
// Config.P2P.DesignatedTimeout this node goes to the origin itself. As
// the designated peer always has a higher rendezvous score than the asker,
// askers whose views differ still climb to the same peer and never loop: one
// origin fetch per chunk for the cluster, however many nodes miss it at once.
//
// Opening an export name (or manifest CID) this node does not know resolves
// it through the cluster (p2p.ResolveName), fetches the manifest from a
// provider (verified by CID), registers it lazily and advertises it; so does
// POST /v1/images/{name}/pull (hoard image pull).
//
// # Live exports and eviction
//
// While an export of an image is open, or a Glance mirror download reads
// it, its chunks are never evicted. Rather
// than writing a pin per chunk to the index on every attach (and leaving stale
// pins behind after a crash), the node wraps the store's eviction policy and
// filters out the chunks of images with an open export, from an in-memory
// reference count. Pins (image:<manifest>) remain the durable mechanism for
// images imported in full.
//
// # Profiles
//
// For each image, the node records the manifest entry indices read during
// the first Config.ProfileWindow after the first read of an attach, in
// first-read order. When the image's last export closes (or the daemon stops)
// the recording is merged into the stored profile (chunkstore.Profile.Merge)
// and persisted. When an image with a stored profile is attached, its chunks
// are prefetched in profile order in the background, ahead of the guest.
//
// # Admin API
//
// JSON over HTTP on Config.APIListen; when Config.APIToken is set every
// request but /healthz needs "Authorization: Bearer TOKEN".
//
//	GET    /healthz                     liveness
//	GET    /readyz                      200 once the store is open and NBD listens
//	GET    /metrics                     Prometheus
//	GET    /v1/status                   store usage, read counters, open exports
//	GET    /v1/images                   registered images
//	POST   /v1/images                   add an image: api.ImportRequest -> importer.Result
//	GET    /v1/images/{name}            one image (?entries=1 for its extents)
//	DELETE /v1/images/{name}            remove an image -> api.RemoveResult
//	GET    /v1/images/{name}/profile    its boot profile
//	POST   /v1/images/{name}/pull       register an image a peer has, lazily
//	GET    /v1/peers                    the p2p peers (409 when the cluster is off)
//	GET    /v1/place?image=I[&hosts=..] hosts ranked for booting image I (package placement)
//
// api.Client is the Go client the CLI uses.
package node
