package hoarder

import (
	"context"
	"errors"
	"log/slog"
	"math"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"
	"golang.org/x/time/rate"

	"github.com/hoardvm/hoard/chunkstore"
	"github.com/hoardvm/hoard/planner"
)

// Sources of hoarded bytes, as Source.Fetch reports them and as
// hoard_hoard_bytes_total labels them.
const (
	SourceLocal  = "local"
	SourcePeer   = "peer"
	SourceOrigin = "origin"
)

// Source is what the hoarder needs of the node (the node implements it). All
// methods are called concurrently.
type Source interface {
	// Images returns every image this node knows (registered locally or
	// learned from the cluster catalog) with its merged boot working set.
	// The hoarder does not modify the manifests and keeps them only until
	// the next plan.
	Images(ctx context.Context) ([]Image, error)
	// Has reports whether chunk id is in the local store.
	Has(ctx context.Context, id chunkstore.ID) bool
	// Fetch gets entry index of manifest the way a VM read would (local,
	// else peers, else the origin through the designated fetcher), stores
	// it, and reports its raw bytes and where they came from: SourceLocal,
	// SourcePeer or SourceOrigin. It must return promptly when ctx is done.
	// The node tells its eviction policy of a chunk it stores this way
	// (planner.Eviction.Touch, once), as for a chunk a VM read stores.
	Fetch(ctx context.Context, manifest chunkstore.ID, index int) (n int64, from string, err error)
	// Busy reports whether VM reads are waiting on fetches right now: the
	// hoarder does not start a fetch while it is true. It is called often
	// and must be cheap.
	Busy() bool
	// StoredRatio is stored bytes / raw bytes of the store so far, used to
	// estimate what an unheld chunk will cost against the budget; 0 (or
	// anything not positive) means unknown and counts as 1.
	StoredRatio() float64
}

// Image is one image the node knows, with its merged boot working set.
type Image struct {
	// ID is the manifest's CID: the image identity.
	ID chunkstore.ID
	// Manifest is the image's recipe; WorkingSet indexes its Entries.
	Manifest *chunkstore.Manifest
	// WorkingSet is the boot working set as entry indices in boot order
	// (chunkstore.Profile.Chunks). Zero entries and indices out of range
	// are ignored.
	WorkingSet []int
	// Boots is how many boots the profile merges; it ranks images.
	Boots int
}

// Config tunes a Hoarder. The zero value plans every 30 s and fetches
// nothing (Budget 0).
type Config struct {
	// Budget is hoard.budget in stored bytes: the whole hoard fits in it.
	// 0 (or less) turns fetching off.
	Budget int64
	// Rate is hoard.rate: raw bytes per second the hoarder fetches at
	// most; 0 is unlimited.
	Rate int64
	// Interval is the time between the end of a pass and the next one;
	// 0 is DefaultInterval.
	Interval time.Duration
	// Concurrency is the most fetches in flight; 0 is DefaultConcurrency.
	Concurrency int
	// Log receives the hoarder's log; nil discards it.
	Log *slog.Logger
	// Registerer receives the hoarder's metrics; nil: none.
	Registerer prometheus.Registerer
}

// Defaults for Config.
const (
	DefaultInterval    = 30 * time.Second
	DefaultConcurrency = 4
)

// pollBusy is how often the hoarder asks Source.Busy while it yields.
const pollBusy = 25 * time.Millisecond

// Status is the hoarder's last plan and the progress since.
type Status struct {
	// Budget is the budget in stored bytes; 0: fetching is off.
	Budget int64 `json:"budget_bytes"`
	// Rate is the rate limit in raw bytes per second; 0: unlimited.
	Rate int64 `json:"rate_bytes_per_second"`
	// Running reports that a pass is under way; Yielding that it waits
	// for VM reads.
	Running  bool `json:"running"`
	Yielding bool `json:"yielding"`
	// Passes is the number of passes finished since start.
	Passes int64 `json:"passes"`
	// Planned is when the last plan was made (zero: never).
	Planned time.Time `json:"planned,omitzero"`
	// HeldBytes is the stored bytes of the working-set chunks already held
	// that the plan keeps in the hoard; PlannedBytes the stored bytes of
	// the chunks it fetches; HeldBytes+PlannedBytes <= Budget.
	HeldBytes    int64 `json:"held_bytes"`
	PlannedBytes int64 `json:"planned_bytes"`
	// Chunks and RawBytes are what the last plan fetches; Done and
	// DoneBytes what of it is local now; Failed how many fetches of it
	// failed.
	Chunks    int   `json:"chunks"`
	RawBytes  int64 `json:"raw_bytes"`
	Done      int   `json:"done"`
	DoneBytes int64 `json:"done_bytes"`
	Failed    int   `json:"failed"`
	// BySource is the raw bytes hoarded since start (passes and Prefetch)
	// by where they came from: local, peer, origin.
	BySource map[string]int64 `json:"by_source"`
	// Failures is the number of failed fetches since start.
	Failures int64 `json:"failures"`
	// Images is every image of the last plan, most booted first.
	Images []ImageStatus `json:"images"`
	// LastError is the last pass's error ("" when it had none).
	LastError string `json:"last_error,omitempty"`
}

// ImageStatus is one image's working set as the hoarder sees it, in raw
// bytes, each distinct chunk counted once.
type ImageStatus struct {
	Manifest chunkstore.ID `json:"manifest"`
	Boots    int           `json:"boots"`
	// Chunks is the number of distinct chunks of the working set.
	Chunks int `json:"chunks"`
	// WorkingSetBytes is the raw bytes of the working set
	// (working_set_bytes); LocalBytes how many of them are local
	// (working_set_local_bytes).
	WorkingSetBytes int64 `json:"working_set_bytes"`
	LocalBytes      int64 `json:"working_set_local_bytes"`
	// PlannedBytes is the raw bytes of the working set the last plan
	// fetches; Complete reports that the working set is wholly local once
	// it has.
	PlannedBytes int64 `json:"planned_bytes"`
	Complete     bool  `json:"complete"`
}

// Hoarder keeps the boot working sets of the node's images local. Its
// methods are safe for concurrent use.
type Hoarder struct {
	src     Source
	cfg     Config
	log     *slog.Logger
	kick    chan struct{}
	limiter *rate.Limiter // nil: unlimited
	m       *metrics      // nil: no Registerer

	running atomic.Bool // a Run loop is under way

	mu       sync.Mutex
	st       Status
	yielders int                   // fetches waiting for VM reads
	byID     map[chunkstore.ID]int // manifest -> index in st.Images
	member   map[chunkstore.ID]*wsChunk
}

// wsChunk is a working-set chunk of the last plan.
type wsChunk struct {
	size    int64
	images  []int // indices in Status.Images whose working set holds it
	local   bool  // counted in those images' LocalBytes
	planned bool  // the plan fetches it: counted in Status.Done once local
}

// New returns a Hoarder over src. It starts nothing: call Run.
func New(src Source, cfg Config) *Hoarder {
	if cfg.Interval <= 0 {
		cfg.Interval = DefaultInterval
	}
	if cfg.Concurrency <= 0 {
		cfg.Concurrency = DefaultConcurrency
	}
	if cfg.Budget < 0 {
		cfg.Budget = 0
	}
	if cfg.Rate < 0 {
		cfg.Rate = 0
	}
	log := cfg.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	h := &Hoarder{
		src:  src,
		cfg:  cfg,
		log:  log.With("component", "hoarder"),
		kick: make(chan struct{}, 1),
		st:   Status{Budget: cfg.Budget, Rate: cfg.Rate, BySource: map[string]int64{}},
	}
	if cfg.Rate > 0 {
		h.limiter = rate.NewLimiter(rate.Limit(cfg.Rate), 1)
	}
	if cfg.Registerer != nil {
		m, err := newMetrics(cfg.Registerer, cfg.Budget)
		if err != nil {
			h.log.Warn("hoarder metrics not registered; /metrics will lack hoard_hoard_*", "err", err)
		} else {
			h.m = m
		}
	}
	return h
}

// Kick asks for a pass soon (the catalog or a profile changed). It never
// blocks; kicks coalesce.
func (h *Hoarder) Kick() {
	select {
	case h.kick <- struct{}{}:
	default:
	}
}

// Run plans and fetches at once, then after every Config.Interval and soon
// after each Kick, until ctx is done; then it returns nil, once the fetches
// in flight have returned. A second concurrent Run is an error.
func (h *Hoarder) Run(ctx context.Context) error {
	if !h.running.CompareAndSwap(false, true) {
		return errors.New("hoarder already running; run one hoarder per node")
	}
	defer h.running.Store(false)
	timer := time.NewTimer(0) // first pass at once
	defer timer.Stop()
	backoff := false
	for {
		kick := h.kick
		if backoff {
			kick = nil // a pass that fetched nothing waits for the tick
		}
		select {
		case <-ctx.Done():
			return nil
		case <-timer.C:
		case <-kick:
		}
		select { // this pass covers a pending kick
		case <-h.kick:
		default:
		}
		r := h.pass(ctx)
		if ctx.Err() != nil {
			return nil
		}
		backoff = r.attempted > 0 && r.fetched == 0
		timer.Reset(h.cfg.Interval)
	}
}

// passResult is what one pass did.
type passResult struct {
	attempted, fetched, failed int
}

// location names a (manifest, entry) that holds a chunk.
type location struct {
	manifest chunkstore.ID
	index    int
}

// task is one distinct chunk to fetch.
type task struct {
	id   chunkstore.ID
	size int64
	loc  location
}

// pass plans and fetches the plan.
func (h *Hoarder) pass(ctx context.Context) passResult {
	h.mu.Lock()
	h.st.Running = true
	h.mu.Unlock()
	defer func() {
		h.mu.Lock()
		h.st.Running = false
		h.st.Passes++
		h.mu.Unlock()
	}()

	imgs, err := h.src.Images(ctx)
	if err != nil {
		if ctx.Err() == nil {
			h.log.Warn("hoarder cannot list images; it tries again at the next tick", "err", err)
			h.setError(err.Error())
		}
		return passResult{}
	}
	tasks := h.plan(ctx, imgs)
	if len(tasks) == 0 {
		h.setError("")
		return passResult{}
	}
	start := time.Now()
	r, firstErr := h.fetchAll(ctx, tasks)
	if r.fetched > 0 {
		st := h.Status()
		h.log.Info("hoarded working-set chunks", "fetched", r.fetched, "failed", r.failed,
			"planned", len(tasks), "done_bytes", st.DoneBytes, "raw_bytes", st.RawBytes,
			"took", time.Since(start).Round(time.Millisecond))
	}
	if r.failed > 0 && ctx.Err() == nil {
		h.log.Warn("hoarder fetches failed; the next pass tries them again",
			"failed", r.failed, "fetched", r.fetched, "planned", len(tasks), "err", firstErr)
		h.setError(firstErr.Error())
	} else {
		h.setError("")
	}
	return r
}

func (h *Hoarder) setError(s string) {
	h.mu.Lock()
	h.st.LastError = s
	h.mu.Unlock()
}

// plan builds the planner's images, plans, publishes the plan in Status and
// the metrics, and returns the chunks to fetch in plan order (none when the
// budget is 0).
func (h *Hoarder) plan(ctx context.Context, imgs []Image) []task {
	ratio := h.src.StoredRatio()
	if !(ratio > 0) || math.IsInf(ratio, 0) {
		ratio = 1
	}
	locs := make(map[chunkstore.ID]location)
	sizes := make(map[chunkstore.ID]int64)
	pimgs := make([]planner.Image, 0, len(imgs))
	seen := make(map[chunkstore.ID]bool, len(imgs))
	for _, img := range imgs {
		if img.Manifest == nil || seen[img.ID] {
			continue
		}
		seen[img.ID] = true
		pi := planner.Image{Manifest: img.ID, Boots: img.Boots}
		for _, i := range img.WorkingSet {
			if i < 0 || i >= len(img.Manifest.Entries) {
				continue
			}
			e := img.Manifest.Entries[i]
			if e.Zero || !e.ID.Defined() || e.Length <= 0 {
				continue
			}
			pi.WorkingSet = append(pi.WorkingSet, planner.Chunk{ID: e.ID, Size: e.Length, Stored: storedEstimate(e.Length, ratio)})
			if _, ok := locs[e.ID]; !ok {
				locs[e.ID] = location{img.ID, i}
				sizes[e.ID] = e.Length
			}
		}
		pimgs = append(pimgs, pi)
	}
	have := make(map[chunkstore.ID]bool)
	plan := planner.Hoard(pimgs, func(id chunkstore.ID) bool {
		v, ok := have[id]
		if !ok {
			v = h.src.Has(ctx, id)
			have[id] = v
		}
		return v
	}, h.cfg.Budget)

	// Status: every image of the plan, and which images each chunk is in.
	byID := make(map[chunkstore.ID]int, len(plan.Images))
	images := make([]ImageStatus, len(plan.Images))
	for n, ip := range plan.Images {
		byID[ip.Manifest] = n
		images[n] = ImageStatus{
			Manifest: ip.Manifest, Boots: ip.Boots, Chunks: ip.Chunks,
			WorkingSetBytes: ip.WorkingSetBytes, LocalBytes: ip.HeldBytes,
			PlannedBytes: ip.PlannedBytes, Complete: ip.Complete,
		}
	}
	member := make(map[chunkstore.ID]*wsChunk, len(sizes))
	for _, pi := range pimgs {
		n := byID[pi.Manifest]
		for _, c := range pi.WorkingSet {
			w := member[c.ID]
			if w == nil {
				w = &wsChunk{size: c.Size, local: have[c.ID]}
				member[c.ID] = w
			}
			if k := len(w.images); k == 0 || w.images[k-1] != n {
				w.images = append(w.images, n)
			}
		}
	}
	var tasks []task
	if h.cfg.Budget > 0 {
		tasks = make([]task, 0, len(plan.Chunks))
		for _, id := range plan.Chunks {
			tasks = append(tasks, task{id: id, size: sizes[id], loc: locs[id]})
			member[id].planned = true
		}
	}
	var raw int64
	for _, t := range tasks {
		raw += t.size
	}
	h.mu.Lock()
	h.st.Planned = time.Now()
	h.st.HeldBytes = plan.HeldBytes
	h.st.PlannedBytes = 0
	if len(tasks) > 0 {
		h.st.PlannedBytes = plan.Bytes
	}
	h.st.Chunks, h.st.RawBytes = len(tasks), raw
	h.st.Done, h.st.DoneBytes, h.st.Failed = 0, 0, 0
	h.st.Images = images
	h.byID, h.member = byID, member
	if h.m != nil {
		h.m.setImages(images) // under h.mu: landed updates the same series
	}
	h.mu.Unlock()
	h.log.Debug("hoard plan", "images", len(images), "chunks", len(tasks), "raw_bytes", raw,
		"held_bytes", plan.HeldBytes, "planned_bytes", plan.Bytes, "budget_bytes", h.cfg.Budget)
	return tasks
}

// storedEstimate is what a chunk of size raw bytes is expected to take in
// the store.
func storedEstimate(size int64, ratio float64) int64 {
	s := int64(math.Ceil(float64(size) * ratio))
	if s < 1 {
		s = 1
	}
	return s
}

// fetchAll fetches tasks in order, at most Concurrency at a time, within
// the rate, yielding to VM reads before each fetch.
func (h *Hoarder) fetchAll(ctx context.Context, tasks []task) (passResult, error) {
	if h.limiter != nil {
		var largest int64 = 1
		for _, t := range tasks {
			largest = max(largest, t.size)
		}
		h.limiter.SetBurst(int(min(largest, math.MaxInt32)))
	}
	var (
		mu       sync.Mutex
		r        passResult
		firstErr error
	)
	g := new(errgroup.Group)
	g.SetLimit(h.cfg.Concurrency)
	for _, t := range tasks {
		if ctx.Err() != nil {
			break
		}
		if h.src.Has(ctx, t.id) { // a VM read brought it in since the plan
			h.landed(t.id)
			continue
		}
		if h.limiter != nil {
			if err := h.limiter.WaitN(ctx, int(min(t.size, math.MaxInt32))); err != nil {
				break // ctx done
			}
		}
		g.Go(func() error {
			if err := h.yield(ctx); err != nil {
				return nil
			}
			err := h.fetch(ctx, t)
			mu.Lock()
			defer mu.Unlock()
			r.attempted++
			if err != nil {
				if ctx.Err() == nil {
					r.failed++
					if firstErr == nil {
						firstErr = err
					}
				}
				return nil
			}
			r.fetched++
			return nil
		})
	}
	_ = g.Wait() // workers return nil: failures are counted
	return r, firstErr
}

// fetch fetches one chunk through the Source and accounts it.
func (h *Hoarder) fetch(ctx context.Context, t task) error {
	n, from, err := h.src.Fetch(ctx, t.loc.manifest, t.loc.index)
	if err != nil {
		if ctx.Err() != nil {
			return err
		}
		h.log.Debug("hoard fetch failed", "chunk_id", t.id, "image", t.loc.manifest, "index", t.loc.index, "err", err)
		h.mu.Lock()
		h.st.Failed++
		h.mu.Unlock()
		h.failure()
		return err
	}
	h.account(n, from)
	h.landed(t.id)
	return nil
}

// sourceLabel bounds the sources a Source may report to the known ones and
// "other".
func sourceLabel(from string) string {
	switch from {
	case SourceLocal, SourcePeer, SourceOrigin:
		return from
	}
	return "other"
}

// failure counts a failed fetch.
func (h *Hoarder) failure() {
	h.mu.Lock()
	h.st.Failures++
	h.mu.Unlock()
	if h.m != nil {
		h.m.failures.Inc()
	}
}

// account counts n raw bytes hoarded from source from.
func (h *Hoarder) account(n int64, from string) {
	from = sourceLabel(from)
	h.mu.Lock()
	h.st.BySource[from] += n
	h.mu.Unlock()
	if h.m != nil {
		h.m.bytes.WithLabelValues(from).Add(float64(n))
	}
}

// landed records that chunk id is local now: the working sets holding it
// count its bytes as local, and the plan's progress counts it if planned.
func (h *Hoarder) landed(id chunkstore.ID) {
	h.mu.Lock()
	defer h.mu.Unlock()
	w := h.member[id]
	if w == nil || w.local {
		return
	}
	w.local = true
	if w.planned {
		h.st.Done++
		h.st.DoneBytes += w.size
	}
	for _, n := range w.images {
		img := &h.st.Images[n]
		img.LocalBytes += w.size
		if h.m != nil {
			h.m.local.WithLabelValues(img.Manifest.String()).Set(float64(img.LocalBytes))
		}
	}
}

// yield waits while VM reads wait on fetches; it returns ctx's error when
// ctx is done first.
func (h *Hoarder) yield(ctx context.Context) error {
	if !h.src.Busy() {
		return ctx.Err()
	}
	h.setYielding(true)
	defer h.setYielding(false)
	t := time.NewTicker(pollBusy)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
			if !h.src.Busy() {
				return nil
			}
		}
	}
}

func (h *Hoarder) setYielding(v bool) {
	h.mu.Lock()
	if v {
		h.yielders++
	} else {
		h.yielders--
	}
	h.mu.Unlock()
}

// Status returns the last plan and the progress since. The result is a
// copy the caller owns.
func (h *Hoarder) Status() Status {
	h.mu.Lock()
	defer h.mu.Unlock()
	s := h.st
	s.Yielding = h.yielders > 0
	s.BySource = make(map[string]int64, len(h.st.BySource))
	for k, v := range h.st.BySource {
		s.BySource[k] = v
	}
	s.Images = append([]ImageStatus(nil), h.st.Images...)
	return s
}

// Image returns the status of one image of the last plan.
func (h *Hoarder) Image(manifest chunkstore.ID) (ImageStatus, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	n, ok := h.byID[manifest]
	if !ok {
		return ImageStatus{}, false
	}
	return h.st.Images[n], true
}
