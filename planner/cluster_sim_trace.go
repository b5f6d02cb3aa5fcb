package planner

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"sort"

	"github.com/hoardvm/hoard/chunkstore"
)

// TraceVersion is the version a cluster trace's header line carries
// ("hoard_trace": 1).
const TraceVersion = 1

// Defaults of a trace header's optional fields.
const (
	DefaultTraceSlots     = 16
	DefaultTraceChunkSize = 8 << 20
	// DefaultTraceWSFraction is an image's working set when the header
	// gives none: this fraction of its size.
	DefaultTraceWSFraction = 0.05
	// DefaultTraceReadFraction is what a VM reads after boot, beyond its
	// working set, when the header gives none: this fraction of its
	// image's size.
	DefaultTraceReadFraction = 0.05
	// DefaultTraceShared is the fraction of an image's working set drawn
	// from its family's base when the header gives none.
	DefaultTraceShared = 0.7
)

// Event types of a cluster trace.
const (
	TraceStart = "start"
	TraceFail  = "fail"
	TraceJoin  = "join"
)

// ClusterTrace is a cluster workload for SimulateCluster, as hoard sim reads
// it (ReadTrace) or generates it (GenerateTrace).
//
// # Format
//
// JSON Lines: the first line is the header, every other line an event; blank
// lines are skipped; unknown fields are refused. The header:
//
//	{"hoard_trace": 1, "nodes": 200, "slots": 16, "chunk_size": 8388608,
//	 "images": [{"family": "ubuntu", "size": 4294967296, "ws": 209715200, "shared": 0.7}, ...]}
//
// nodes is the number of nodes up at t=0 (numbered from 0); slots the VMs a
// node runs at most (default 16); chunk_size the unit the simulator moves
// (default 8 MiB: a simulated chunk stands for a run of real chunks that a
// boot reads together). Each image has a family (OS family: images of a
// family share a base working set), a size in bytes, optionally its boot
// working set in bytes (ws, default 5% of size), the fraction of the
// working set drawn from the family base (shared, default 0.7; the rest is
// the image's own) and what each VM reads after boot beyond the working set
// (reads, default 5% of size, -1 for none): a run of the image's other
// chunks from a random offset, as a VM's reads fill a store between boots. Images are numbered by their order in the list.
//
// An event:
//
//	{"t": 12.5, "type": "start", "image": 7, "dur": 3600}
//	{"t": 900, "type": "fail", "node": 3}
//	{"t": 2700, "type": "join", "node": 3}
//
// t is seconds from the trace's start; events may come in any order (they
// are sorted by t, ties kept in file order). start boots a VM of image (an
// index into images) for dur seconds (0 or absent: to the end); the
// simulator places it, so a node given is ignored. fail takes node down: its
// cache is lost and its VMs restart elsewhere at once. join brings node up
// with an empty cache: a failed node, or a new one (any number up to 65535).
//
// # Working sets
//
// The trace names no chunk: working sets derive from the header alone,
// deterministically. Each family has a base of 1.25 times the largest shared
// part of its images (in chunks); an image reads a random subset of the base
// (shared × ws bytes, in base order, drawn by a generator seeded with the
// image's index) with its own chunks interleaved, ws bytes in all (rounded
// up to whole chunks). Images of a family thus share most of their boot
// reads, as Squirrel measured on Azure images.
type ClusterTrace struct {
	Header TraceHeader
	Events []TraceEvent
}

// TraceHeader is a trace's first line.
type TraceHeader struct {
	Version   int          `json:"hoard_trace"`
	Nodes     int          `json:"nodes"`
	Slots     int          `json:"slots,omitempty"`
	ChunkSize int64        `json:"chunk_size,omitempty"`
	Images    []TraceImage `json:"images"`
}

// TraceImage is one image of a trace header.
type TraceImage struct {
	Family string `json:"family"`
	Size   int64  `json:"size"`
	// WS is the boot working set in bytes; 0 means DefaultTraceWSFraction
	// of Size.
	WS int64 `json:"ws,omitempty"`
	// Shared is the fraction of the working set from the family base; nil
	// means DefaultTraceShared.
	Shared *float64 `json:"shared,omitempty"`
	// Reads is what each VM reads after boot, beyond its working set: a
	// run of the image's other chunks from a random offset. 0 means
	// DefaultTraceReadFraction of Size; -1 none.
	Reads int64 `json:"reads,omitempty"`
}

// TraceEvent is one event of a trace.
type TraceEvent struct {
	T     float64 `json:"t"`
	Type  string  `json:"type"`
	Node  int     `json:"node,omitempty"`
	Image int     `json:"image,omitempty"`
	Dur   float64 `json:"dur,omitempty"`
}

// maxTraceNode bounds node numbers, so that a trace cannot make the
// simulator allocate without bound.
const maxTraceNode = 65535

// ReadTrace parses a trace (see ClusterTrace). An error names the line and
// what to fix.
func ReadTrace(r io.Reader) (ClusterTrace, error) {
	var tr ClusterTrace
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 64<<20)
	line, header := 0, false
	strict := func(b []byte, v any) error {
		dec := json.NewDecoder(bytes.NewReader(b))
		dec.DisallowUnknownFields()
		if err := dec.Decode(v); err != nil {
			return err
		}
		if dec.More() {
			return errors.New("more than one JSON value on the line")
		}
		return nil
	}
	for sc.Scan() {
		line++
		b := bytes.TrimSpace(sc.Bytes())
		if len(b) == 0 {
			continue
		}
		if !header {
			if err := strict(b, &tr.Header); err != nil {
				return tr, fmt.Errorf("trace line %d: header: %v; the first line must be {\"hoard_trace\": 1, \"nodes\": N, \"images\": [...]}", line, err)
			}
			if err := tr.Header.check(); err != nil {
				return tr, fmt.Errorf("trace line %d: header: %w", line, err)
			}
			header = true
			continue
		}
		var ev TraceEvent
		if err := strict(b, &ev); err != nil {
			return tr, fmt.Errorf("trace line %d: %v; an event is {\"t\": seconds, \"type\": \"start\"|\"fail\"|\"join\", \"node\": N, \"image\": N}", line, err)
		}
		if err := ev.check(len(tr.Header.Images)); err != nil {
			return tr, fmt.Errorf("trace line %d: %w", line, err)
		}
		tr.Events = append(tr.Events, ev)
	}
	if err := sc.Err(); err != nil {
		return tr, fmt.Errorf("trace line %d: %w", line+1, err)
	}
	if !header {
		return tr, errors.New("trace is empty: it needs a header line and events (hoard sim --write-trace FILE writes an example)")
	}
	sort.SliceStable(tr.Events, func(i, j int) bool { return tr.Events[i].T < tr.Events[j].T })
	return tr, nil
}

func (h *TraceHeader) check() error {
	switch {
	case h.Version != TraceVersion:
		return fmt.Errorf("hoard_trace is %d: this hoard reads version %d", h.Version, TraceVersion)
	case h.Nodes < 1 || h.Nodes > maxTraceNode+1:
		return fmt.Errorf("nodes is %d: give 1 to %d nodes", h.Nodes, maxTraceNode+1)
	case h.Slots < 0 || h.Slots > 1<<16:
		return fmt.Errorf("slots is %d: give 1 to 65536, or omit it for %d", h.Slots, DefaultTraceSlots)
	case h.ChunkSize < 0 || (h.ChunkSize > 0 && h.ChunkSize < 4096):
		return fmt.Errorf("chunk_size is %d: give at least 4096 bytes, or omit it for %d", h.ChunkSize, DefaultTraceChunkSize)
	case len(h.Images) == 0:
		return errors.New("images is empty: list at least one image")
	}
	for i, img := range h.Images {
		switch {
		case img.Family == "":
			return fmt.Errorf("image %d has no family: give its OS family, e.g. \"ubuntu\"", i)
		case img.Size <= 0:
			return fmt.Errorf("image %d has size %d: give its size in bytes", i, img.Size)
		case img.WS < 0 || img.WS > img.Size:
			return fmt.Errorf("image %d has ws %d: give 0 (default) to its size %d", i, img.WS, img.Size)
		case img.Reads < -1 || img.Reads > img.Size:
			return fmt.Errorf("image %d has reads %d: give -1 (none), 0 (default) or up to its size %d", i, img.Reads, img.Size)
		case img.Shared != nil && (math.IsNaN(*img.Shared) || *img.Shared < 0 || *img.Shared > 1):
			return fmt.Errorf("image %d has shared %v: give a fraction in [0, 1]", i, *img.Shared)
		}
	}
	return nil
}

func (e *TraceEvent) check(images int) error {
	if math.IsNaN(e.T) || math.IsInf(e.T, 0) || e.T < 0 {
		return fmt.Errorf("t is %v: give seconds >= 0", e.T)
	}
	switch e.Type {
	case TraceStart:
		if e.Image < 0 || e.Image >= images {
			return fmt.Errorf("image %d out of range: the header lists %d images (0 to %d)", e.Image, images, images-1)
		}
		if math.IsNaN(e.Dur) || math.IsInf(e.Dur, 0) || e.Dur < 0 {
			return fmt.Errorf("dur is %v: give seconds >= 0 (0: runs to the end)", e.Dur)
		}
	case TraceFail, TraceJoin:
		if e.Node < 0 || e.Node > maxTraceNode {
			return fmt.Errorf("node %d out of range: give 0 to %d", e.Node, maxTraceNode)
		}
	default:
		return fmt.Errorf("type %q unknown: give start, fail or join", e.Type)
	}
	return nil
}

// WriteTrace writes tr in the format ReadTrace reads.
func WriteTrace(w io.Writer, tr ClusterTrace) error {
	bw := bufio.NewWriter(w)
	enc := json.NewEncoder(bw)
	if err := enc.Encode(tr.Header); err != nil {
		return err
	}
	for _, ev := range tr.Events {
		if err := enc.Encode(ev); err != nil {
			return err
		}
	}
	return bw.Flush()
}

// Images returns the images' working sets as the trace defines them (see
// ClusterTrace), with Manifest set and Boots 0; Stored equals Size.
func (tr ClusterTrace) Images() []Image {
	h := tr.Header
	cs := h.ChunkSize
	if cs <= 0 {
		cs = DefaultTraceChunkSize
	}
	type part struct{ ws, shared int }
	parts := make([]part, len(h.Images))
	baseLen := map[string]int{}
	for i, img := range h.Images {
		ws := img.WS
		if ws <= 0 {
			ws = int64(float64(img.Size) * DefaultTraceWSFraction)
		}
		n := int(max((ws+cs-1)/cs, 1))
		sh := DefaultTraceShared
		if img.Shared != nil {
			sh = *img.Shared
		}
		parts[i] = part{n, int(math.Round(sh * float64(n)))}
		baseLen[img.Family] = max(baseLen[img.Family], (parts[i].shared*5+3)/4)
	}
	bases := map[string][]Chunk{}
	fams := make([]string, 0, len(baseLen))
	for f := range baseLen {
		fams = append(fams, f)
	}
	sort.Strings(fams)
	for _, f := range fams {
		b := make([]Chunk, baseLen[f])
		for k := range b {
			b[k] = Chunk{ID: chunkstore.Sum(fmt.Appendf(nil, "family/%s/base/%d", f, k)), Size: cs, Stored: cs}
		}
		bases[f] = b
	}
	out := make([]Image, len(h.Images))
	for i, img := range h.Images {
		r := rand.New(rand.NewPCG(uint64(i), 0x776f726b)) // "work"
		base := bases[img.Family]
		pick := r.Perm(len(base))[:parts[i].shared]
		sort.Ints(pick)
		set := make([]Chunk, 0, parts[i].ws)
		for _, k := range pick {
			set = append(set, base[k])
		}
		for k := range parts[i].ws - parts[i].shared {
			c := Chunk{ID: chunkstore.Sum(fmt.Appendf(nil, "image/%d/own/%d", i, k)), Size: cs, Stored: cs}
			at := r.IntN(len(set) + 1)
			set = append(set, Chunk{})
			copy(set[at+1:], set[at:])
			set[at] = c
		}
		out[i] = Image{Manifest: chunkstore.Sum(fmt.Appendf(nil, "image/%d", i)), WorkingSet: set}
	}
	return out
}

// TraceFamily is an OS family of a generated trace and its share of the
// images.
type TraceFamily struct {
	Name  string
	Share float64
	// MinSize and MaxSize bound its images' sizes; MinWS and MaxWS their
	// boot working sets (uniform); Shared is the fraction of the working set
	// from the family base.
	MinSize, MaxSize, MinWS, MaxWS int64
	Shared                         float64
	// Reads is the fraction of an image's size a VM reads after boot.
	Reads float64
}

// TraceGenConfig describes a generated trace (GenerateTrace).
type TraceGenConfig struct {
	Seed uint64
	// Nodes are up at t=0, each with Slots VM slots.
	Nodes, Slots int
	// Images are spread over Families by share.
	Images   int
	Families []TraceFamily
	// ZipfS (> 1) skews which images start.
	ZipfS float64
	// Duration is the trace's length in seconds.
	Duration float64
	// Starts is the number of background starts, a Poisson process over
	// Duration; Lifetime is VMs' mean lifetime (exponential), seconds.
	Starts   int
	Lifetime float64
	// Storms boot storms each start about StormSize VMs (uniform in [0.5,
	// 1.5] times it) of 1 to StormImages images within StormSpread seconds,
	// at random times; storm VMs live StormLifetime seconds on average.
	Storms, StormSize, StormImages int
	StormSpread, StormLifetime     float64
	// Failures nodes fail at random times and rejoin RejoinAfter seconds
	// later with an empty cache; Joins new nodes join at random times.
	Failures, Joins int
	RejoinAfter     float64
	ChunkSize       int64
}

// DefaultTraceFamilies are the OS families of a generated trace: Ubuntu
// dominates as it did in Squirrel's Azure set (579 of 607 images), the
// others keep a long tail; Windows images are larger and boot more.
func DefaultTraceFamilies() []TraceFamily {
	const gib, mib = 1 << 30, 1 << 20
	return []TraceFamily{
		{Name: "ubuntu", Share: 0.9, MinSize: 2 * gib, MaxSize: 8 * gib, MinWS: 120 * mib, MaxWS: 320 * mib, Shared: 0.75, Reads: 0.05},
		{Name: "centos", Share: 0.05, MinSize: 2 * gib, MaxSize: 8 * gib, MinWS: 150 * mib, MaxWS: 350 * mib, Shared: 0.7, Reads: 0.05},
		{Name: "debian", Share: 0.03, MinSize: 2 * gib, MaxSize: 6 * gib, MinWS: 100 * mib, MaxWS: 250 * mib, Shared: 0.75, Reads: 0.05},
		{Name: "windows", Share: 0.02, MinSize: 20 * gib, MaxSize: 40 * gib, MinWS: 800 * mib, MaxWS: 1500 * mib, Shared: 0.6, Reads: 0.02},
	}
}

// DefaultTraceGen is hoard sim's default trace: 200 nodes of 16 slots, 300
// images in DefaultTraceFamilies with Zipf(1.1) popularity, 6 hours with
// 2,000 background starts (VMs living 2 hours on average) and 8 boot storms
// of about 150 VMs of 1 to 3 images within 60 s (living 30 minutes), 6 node
// failures each rejoining empty after 30 minutes and 4 new nodes joining:
// about 3,200 starts with the storms and the restarts of failed nodes' VMs.
func DefaultTraceGen(seed uint64) TraceGenConfig {
	return TraceGenConfig{Seed: seed, Nodes: 200, Slots: 16, Images: 300, Families: DefaultTraceFamilies(), ZipfS: 1.1,
		Duration: 6 * 3600, Starts: 2000, Lifetime: 2 * 3600, Storms: 8, StormSize: 150, StormImages: 3, StormSpread: 60,
		StormLifetime: 1800, Failures: 6, Joins: 4, RejoinAfter: 1800, ChunkSize: DefaultTraceChunkSize}
}

// GenerateTrace generates the trace cfg describes; the same cfg gives the
// same trace.
func GenerateTrace(cfg TraceGenConfig) ClusterTrace {
	r := rand.New(rand.NewPCG(cfg.Seed, 0x7472616365)) // "trace"
	fams := cfg.Families
	if len(fams) == 0 {
		fams = DefaultTraceFamilies()
	}
	tr := ClusterTrace{Header: TraceHeader{Version: TraceVersion, Nodes: max(cfg.Nodes, 1), Slots: cfg.Slots, ChunkSize: cfg.ChunkSize}}
	var shareSum float64
	for _, f := range fams {
		shareSum += max(f.Share, 0)
	}
	between := func(lo, hi int64) int64 {
		if hi <= lo {
			return lo
		}
		return lo + r.Int64N(hi-lo+1)
	}
	for range max(cfg.Images, 1) {
		x, f := r.Float64()*shareSum, fams[len(fams)-1]
		for _, g := range fams {
			if x < max(g.Share, 0) {
				f = g
				break
			}
			x -= max(g.Share, 0)
		}
		size := max(between(f.MinSize, f.MaxSize), 1)
		ws := min(between(f.MinWS, f.MaxWS), size)
		sh := f.Shared
		reads := int64(-1)
		if f.Reads > 0 {
			reads = min(max(int64(f.Reads*float64(size)), 1), size)
		}
		tr.Header.Images = append(tr.Header.Images, TraceImage{Family: f.Name, Size: size, WS: ws, Shared: &sh, Reads: reads})
	}
	n := len(tr.Header.Images)
	zipf := rand.NewZipf(r, max(cfg.ZipfS, 1.0001), 1, uint64(n-1))
	rank := r.Perm(n) // popularity rank -> image, so that no family is favoured
	popular := func() int { return rank[zipf.Uint64()] }
	life := func(mean float64) float64 {
		if mean <= 0 {
			return 0
		}
		return math.Max(60, math.Round(r.ExpFloat64()*mean))
	}
	dur := max(cfg.Duration, 1)
	at := func() float64 { return math.Round(r.Float64()*dur*10) / 10 }
	var evs []TraceEvent
	for range cfg.Starts {
		evs = append(evs, TraceEvent{T: at(), Type: TraceStart, Image: popular(), Dur: life(cfg.Lifetime)})
	}
	for range cfg.Storms {
		t0 := at()
		imgs := make([]int, 1+r.IntN(max(cfg.StormImages, 1)))
		for k := range imgs {
			imgs[k] = popular()
		}
		size := int(float64(cfg.StormSize) * (0.5 + r.Float64()))
		for range size {
			t := math.Round((t0+r.Float64()*cfg.StormSpread)*10) / 10
			evs = append(evs, TraceEvent{T: t, Type: TraceStart, Image: imgs[r.IntN(len(imgs))], Dur: life(cfg.StormLifetime)})
		}
	}
	for range cfg.Failures {
		node, t := r.IntN(tr.Header.Nodes), at()
		evs = append(evs, TraceEvent{T: t, Type: TraceFail, Node: node},
			TraceEvent{T: t + max(cfg.RejoinAfter, 1), Type: TraceJoin, Node: node})
	}
	for k := range cfg.Joins {
		evs = append(evs, TraceEvent{T: at(), Type: TraceJoin, Node: min(tr.Header.Nodes+k, maxTraceNode)})
	}
	sort.SliceStable(evs, func(i, j int) bool { return evs[i].T < evs[j].T })
	tr.Events = evs
	return tr
}
