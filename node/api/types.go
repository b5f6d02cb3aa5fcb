package api

import (
	"encoding/json"
	"errors"

	"github.com/hoardvm/hoard/chunkstore"
	"github.com/hoardvm/hoard/node/hoarder"
	"github.com/hoardvm/hoard/node/hot"
	"github.com/hoardvm/hoard/node/importer"
)

// ImportResult is the answer of POST /v1/images.
type ImportResult = importer.Result

var (
	// ErrInUse: the image has open exports, so it cannot be removed now (the
	// API answers 409).
	ErrInUse = errors.New("is in use")
	// ErrInvalid: the request is malformed (the API answers 400).
	ErrInvalid = errors.New("invalid request")
	// ErrClusterOff: the node runs standalone, so it has no peers (the API
	// answers 409).
	ErrClusterOff = errors.New("the cluster is off on this node (no swarm key); create one with hoard cluster keygen")
)

// ImageInfo is what a listing shows of an image.
type ImageInfo struct {
	Name     string        `json:"name"`
	Manifest chunkstore.ID `json:"manifest"`
	Format   string        `json:"format"`
	// Container is "qcow2" when the image is a qcow2's guest content
	// (Format is then raw); empty otherwise.
	Container    string `json:"container,omitempty"`
	Size         int64  `json:"size"`
	NonZeroBytes int64  `json:"non_zero_bytes"`
	Chunks       int    `json:"unique_chunks"`
	Present      int    `json:"present_chunks"`
	Pinned       bool   `json:"pinned"`
	Source       string `json:"source"`
	OpenExports  int    `json:"open_exports"`
	// WorkingSetBytes is the raw bytes of the image's boot working set as
	// the cluster knows it; WorkingSetLocalBytes, how much of it is here.
	WorkingSetBytes      int64 `json:"working_set_bytes"`
	WorkingSetLocalBytes int64 `json:"working_set_local_bytes"`
}

// ImportRequest asks the daemon to add an image.
type ImportRequest struct {
	Source   string `json:"source"`             // path (absolute), URL or glance://ID
	Name     string `json:"name,omitempty"`     // default: derived from the source
	Chunking string `json:"chunking,omitempty"` // cdc (default) or fixed
	Lazy     bool   `json:"lazy,omitempty"`
	Pin      bool   `json:"pin,omitempty"`
	// Format is "auto" (also ""): a qcow2 is imported by its guest content
	// and exported raw; or "raw": the source's bytes as they are.
	Format string `json:"format,omitempty"`
}

// RemoveResult says what removing an image freed.
type RemoveResult struct {
	Name        string        `json:"name"`
	Manifest    chunkstore.ID `json:"manifest"`
	FreedChunks int           `json:"freed_chunks"`
	FreedBytes  int64         `json:"freed_stored_bytes"`
}

// ProfileInfo is an image's boot profile, for display.
type ProfileInfo struct {
	Name     string        `json:"name"`
	Manifest chunkstore.ID `json:"manifest"`
	Boots    int           `json:"boots"`
	Chunks   int           `json:"chunks"`
	Bytes    int64         `json:"bytes"`
	// Contributors is how many nodes' profiles the working set merges (1:
	// this node's only; 0: none recorded).
	Contributors int            `json:"contributors"`
	Entries      []ProfileEntry `json:"entries"`
}

// ProfileEntry is one chunk of a profile, in first-read order.
type ProfileEntry struct {
	Index  int           `json:"index"`
	Offset int64         `json:"offset"`
	Length int64         `json:"length"`
	ID     chunkstore.ID `json:"id"`
}

// Status is the answer of GET /v1/status.
type Status struct {
	DataDir   string           `json:"data_dir"`
	NBDSocket string           `json:"nbd_socket,omitempty"`
	NBDListen string           `json:"nbd_listen,omitempty"`
	Store     chunkstore.Usage `json:"store"`
	Quota     int64            `json:"store_quota"`
	Images    int              `json:"images"`
	Counters  Counters         `json:"counters"`
	Hot       hot.Stats        `json:"hot_cache"`
	Exports   []ExportStatus   `json:"exports"`
	// Cluster is this node's p2p identity; nil when the cluster is off.
	Cluster *ClusterStatus `json:"cluster,omitempty"`
	// Hoard is the hoarder's progress: the working sets it keeps local.
	Hoard *hoarder.Status `json:"hoard,omitempty"`
}

// ClusterStatus is a node's p2p identity and neighbourhood.
type ClusterStatus struct {
	PeerID         string   `json:"peer_id"`
	Addrs          []string `json:"addrs"` // full dialable multiaddrs, ending in /p2p/ID
	Peers          int      `json:"peers"` // known peers (connected or in the routing table)
	ConnectedPeers int      `json:"connected_peers"`
	Provided       int      `json:"provided_keys"`
}

// ExportStatus is an image with open exports.
type ExportStatus struct {
	Manifest chunkstore.ID `json:"manifest"`
	Names    []string      `json:"names"`
	Open     int           `json:"open"`
}

// errorBody is the JSON body of every API error.
type errorBody struct {
	Error string `json:"error"`
}

// ImageDetail is the answer of GET /v1/images/{name}.
type ImageDetail struct {
	ImageInfo
	Chunking chunkstore.Chunking `json:"chunking"`
	Checksum string              `json:"source_checksum,omitempty"`
	Entries  []chunkstore.Entry  `json:"entries,omitempty"`
}

// Counters are the node's read counters since it started.
type Counters struct {
	ReadBytes      map[string]int64 `json:"read_bytes"`  // bytes of data chunks served to NBD readers, by where the chunk came from
	ReadChunks     map[string]int64 `json:"read_chunks"` // chunk reads, by source
	ZeroBytes      int64            `json:"zero_bytes"`  // bytes of holes served
	OriginBytes    int64            `json:"origin_bytes"`
	OriginErrors   int64            `json:"origin_errors"`
	PrefetchChunks map[string]int64 `json:"prefetch_chunks"` // chunks fetched in the background, by reason
	ExportsOpen    int64            `json:"exports_open"`
	// DesignatedFallbacks counts chunks whose designated fetcher (another
	// peer) did not deliver in time, so this node went to the origin itself.
	DesignatedFallbacks int64 `json:"designated_fallbacks"`
}

// MediaNDJSON is the media type of a streamed answer.
const MediaNDJSON = "application/x-ndjson"

// Progress is how far a long operation is.
type Progress struct {
	Phase string `json:"phase"`          // import, pull, verify, gc
	Unit  string `json:"unit,omitempty"` // bytes or chunks; empty: no count, only alive
	Done  int64  `json:"done"`
	Total int64  `json:"total"` // 0: not known (yet)
}

// StreamEvent is one line of a streamed answer: Progress, or, on the last
// line, Result or Error.
type StreamEvent struct {
	Progress *Progress       `json:"progress,omitempty"`
	Result   json.RawMessage `json:"result,omitempty"`
	Error    string          `json:"error,omitempty"`
	Status   int             `json:"status,omitempty"` // with Error: the HTTP status of a plain answer
}

// Placement is GET /v1/place's answer: hosts ranked for booting an image.
type Placement struct {
	// Image is the name asked for; Manifest the image it resolved to.
	Image    string `json:"image"`
	Manifest string `json:"manifest"`
	// WorkingSetBytes and ImageBytes are the raw bytes of the image's boot
	// working set (merged profile; the whole image when none is known yet)
	// and of the whole image.
	WorkingSetBytes int64 `json:"working_set_bytes"`
	ImageBytes      int64 `json:"image_bytes"`
	// Partial reports that this node's view of the peers' have-bitmaps was
	// missing or stale (a refresh now runs in the background): ask again in
	// a moment for a fuller answer.
	Partial bool `json:"partial,omitempty"`
	// Hosts are ranked best first.
	Hosts []PlaceHost `json:"hosts"`
}

// PlaceHost is one host of a Placement.
type PlaceHost struct {
	// Host is the node's node.name (what Nova calls the compute host).
	Host string `json:"host"`
	// Score is in [0, 1], higher is better; see planner.PlaceScores.
	Score float64 `json:"score"`
	// PeerID is the host's node, empty for a host no live node answers for.
	PeerID string `json:"peer_id,omitempty"`
	// Self marks the node that answered.
	Self                 bool    `json:"self,omitempty"`
	WorkingSetShare      float64 `json:"working_set_share"`
	ImageShare           float64 `json:"image_share"`
	LoadScore            float64 `json:"load_score"`
	WorkingSetLocalBytes int64   `json:"working_set_local_bytes"`
	ImageLocalBytes      int64   `json:"image_local_bytes"`
	OpenExports          int     `json:"open_exports"`
	// FreeQuota is the bytes the host's store can still take; -1: no quota.
	FreeQuota int64  `json:"free_quota"`
	Reason    string `json:"reason"`
}
