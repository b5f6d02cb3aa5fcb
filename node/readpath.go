package node

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hoardvm/hoard/chunkstore"
	"github.com/hoardvm/hoard/node/cluster"
	"github.com/hoardvm/hoard/node/origin"
	"github.com/hoardvm/hoard/p2p"
)

// errStopping fails the reads that need a fetch while the node stops.
var errStopping = errors.New("the daemon is stopping; retry on its next start")

// ErrOrigin is wrapped by read errors caused by the origin (unreachable,
// failing, too slow, or serving bytes that no longer match the manifest).
var ErrOrigin = errors.New("origin fetch failed")

// image is what the node keeps about one manifest while it serves it.
type image struct {
	id chunkstore.ID
	m  *chunkstore.Manifest

	// srcLock (a one-slot semaphore, so that waiting for it honours a
	// context) guards src and srcUsers, and is held while the origin is
	// opened (a HEAD and its retries): only reads that need the origin
	// wait for it, never mu, which every read takes to record the profile.
	srcLock  chan struct{}
	src      origin.Source // opened on the first miss, then reused
	srcUsers int           // reads using src now
	// dropped is set (under mu) when the image leaves Node.images; its
	// source is closed by the last read using it then.
	dropped atomic.Bool

	lastUsed atomic.Int64 // unix nanos: looked up, attached, detached or read from its origin

	mu    sync.Mutex
	opens int
	rec   *recorder // profile being recorded, nil when none
	exps  map[*export]struct{}

	haveMu    sync.Mutex
	have      p2p.Bitmap // entries in the local store, for peers; nil until asked
	haveAt    time.Time
	haveScan  chan struct{} // closed when the running store scan ends; nil when none runs
	haveMarks []int         // entries marked while a scan runs, added to its result
}

// image returns the node's state for manifest id, loading the manifest once.
func (n *Node) image(ctx context.Context, id chunkstore.ID) (*image, error) {
	n.mu.Lock()
	img := n.images[id]
	n.mu.Unlock()
	if img != nil {
		img.touch()
		return img, nil
	}
	m, err := n.store.GetManifest(ctx, id)
	if err != nil {
		return nil, err
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if img := n.images[id]; img != nil {
		img.touch()
		return img, nil
	}
	img = &image{id: id, m: m, exps: make(map[*export]struct{}), srcLock: make(chan struct{}, 1)}
	img.touch()
	n.images[id] = img
	return img, nil
}

func (img *image) touch() { img.lastUsed.Store(time.Now().UnixNano()) }

// DefaultImageIdle is how long the node keeps an image without open exports
// that nobody reads (NBD, peers) before it forgets it and closes its origin.
const DefaultImageIdle = 5 * time.Minute

// dropIdleImages forgets the images that have no open export and were not
// used since before now-idle, and closes their origin sources: Node.images
// holds the images in use, not every image ever read. An image looked up
// again is loaded again. It returns how many it forgot.
func (n *Node) dropIdleImages(now time.Time, idle time.Duration) int {
	var srcs []origin.Source
	dropped := 0
	n.mu.Lock()
	for id, img := range n.images {
		if now.UnixNano()-img.lastUsed.Load() < idle.Nanoseconds() {
			continue
		}
		img.mu.Lock()
		idle := img.opens == 0
		if idle {
			img.dropped.Store(true) // under mu: attach sees it (see Open)
		}
		img.mu.Unlock()
		if !idle {
			continue
		}
		delete(n.images, id)
		dropped++
		if src := img.closeSource(); src != nil {
			srcs = append(srcs, src)
		}
	}
	n.mu.Unlock()
	for _, src := range srcs {
		src.Close()
	}
	return dropped
}

// sweepImages drops idle images (dropIdleImages) until ctx is done.
func (n *Node) sweepImages(ctx context.Context) {
	t := time.NewTicker(max(n.imageIdle/4, time.Millisecond))
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			if k := n.dropIdleImages(now, n.imageIdle); k > 0 {
				n.log.Debug("forgot idle images and closed their origins", "images", k)
			}
		}
	}
}

// forget removes img from the node (its image was removed) and closes its
// source; reads still under way finish on it.
func (n *Node) forget(img *image) {
	n.mu.Lock()
	if n.images[img.id] == img {
		delete(n.images, img.id)
	}
	n.mu.Unlock()
	img.mu.Lock()
	img.dropped.Store(true)
	img.mu.Unlock()
	if src := img.closeSource(); src != nil {
		src.Close()
	}
}

// closeSource takes the source of a dropped image for the caller to close;
// nil when there is none or when reads use it or open it now: the last of
// them closes it (see source).
func (img *image) closeSource() origin.Source {
	select {
	case img.srcLock <- struct{}{}:
	default:
		return nil // being opened
	}
	defer func() { <-img.srcLock }()
	if img.srcUsers > 0 {
		return nil
	}
	src := img.src
	img.src = nil
	return src
}

// source opens the image's origin on first use; the caller calls release when
// done with it. Failures are not cached, so an origin that comes back is used
// again.
func (n *Node) source(ctx context.Context, img *image) (src origin.Source, release func(), err error) {
	img.touch()
	select {
	case img.srcLock <- struct{}{}:
	case <-ctx.Done():
		return nil, nil, fmt.Errorf("%w: image %s: waited too long for its origin to open: %w", ErrOrigin, img.id, ctx.Err())
	}
	defer func() { <-img.srcLock }()
	if img.src == nil {
		if img.src, err = n.openSource(ctx, img); err != nil {
			return nil, nil, err
		}
	}
	img.srcUsers++
	return img.src, img.releaseSource, nil
}

// releaseSource ends a use of img.src; the last use of a dropped image's
// source closes it.
func (img *image) releaseSource() {
	img.srcLock <- struct{}{} // src is open: nobody holds the lock for long
	img.srcUsers--
	var src origin.Source
	if img.srcUsers == 0 && img.dropped.Load() {
		src, img.src = img.src, nil
	}
	<-img.srcLock
	if src != nil {
		src.Close()
	}
}

// openSource opens img's origin.
func (n *Node) openSource(ctx context.Context, img *image) (origin.Source, error) {
	s := img.m.Source
	ref := s.Location
	switch s.Kind {
	case "glance":
		ref = "glance://" + s.Location
	case "file", "http":
	default:
		return nil, fmt.Errorf("%w: image %s has origin kind %q, which this hoard cannot fetch from", ErrOrigin, img.id, s.Kind)
	}
	src, err := origin.Open(ctx, ref, n.cfg.Origin)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrOrigin, err)
	}
	if c := img.m.Container; c != "" {
		// A guest view: entry [Offset, End) is that range of the guest,
		// read through the container's reader over the origin.
		g, err := origin.OpenGuest(ctx, src, c)
		if err != nil {
			src.Close()
			return nil, fmt.Errorf("%w: %w", ErrOrigin, err)
		}
		src = g
	}
	if src.Size() != img.m.Size {
		src.Close()
		return nil, fmt.Errorf("%w: %s is now %d bytes, the manifest says %d: the image changed at the origin; re-add it (hoard image rm, hoard image add)",
			ErrOrigin, s.Location, src.Size(), img.m.Size)
	}
	return src, nil
}

// Where a chunk came from.
const (
	fromMemory = iota
	fromLocal
	fromPeer
	fromOrigin
)

// Why a chunk is wanted; background fetches are counted by reason.
const (
	forRead = iota
	forReadahead
	forProfile
	forCache // NBD_CMD_CACHE
	forPeer  // a peer asked this node, its designated fetcher
	forHoard // the hoarder, ahead of any boot
)

// chunk returns the verified bytes of entry idx of img. The returned slice is
// shared (cached): callers must not modify it.
func (n *Node) chunk(ctx context.Context, img *image, idx int, why int) ([]byte, int, error) {
	b, from, err := n.chunk1(ctx, img, idx, why)
	if err == nil && n.hot != nil && why != forPeer && why != forHoard {
		// A peer's request is no sign that this node will read the image.
		n.hot.Put(img.id, img.m, idx, b)
	}
	return b, from, err
}

func (n *Node) chunk1(ctx context.Context, img *image, idx int, why int) ([]byte, int, error) {
	e := img.m.Entries[idx]
	// Once per chunk read, hit or miss (a fetch does not touch again). Reads
	// the hot tier serves do not come here: with it on, a chunk read in many
	// small NBD reads counts once per image it was read through.
	n.evict.touch(e.ID)
	if b, ok := n.cache.get(e.ID); ok {
		return b, fromMemory, nil
	}
	b, err := n.store.Get(ctx, e.ID)
	if err == nil {
		n.cache.add(e.ID, b)
		return b, fromLocal, nil
	}
	if !errors.Is(err, chunkstore.ErrNotFound) && !errors.Is(err, chunkstore.ErrCorrupt) {
		return nil, 0, err
	}
	if why == forRead || why == forCache {
		// A VM waits: the hoarder yields until it is served (Busy).
		n.vmWaiting.Add(1)
		defer n.vmWaiting.Add(-1)
	}
	// One fetch per chunk, whoever asks; it runs on the node's context so that
	// a reader that goes away does not cancel it for the others.
	for {
		ch := n.flights.DoChan(e.ID.String(), func() (any, error) {
			// Counted, so that Run closes the store only after the fetch
			// (which stores what it got) has ended.
			if !n.fetches.enter() {
				return nil, errStopping
			}
			defer n.fetches.leave()
			return n.fetch(img, idx, why)
		})
		select {
		case r := <-ch:
			if r.Err != nil {
				if why != forHoard && errors.Is(r.Err, cluster.ErrNotDelivered) {
					// Joined the hoarder's flight, which left the chunk for
					// later: this reader cannot wait, it flies on its own.
					continue
				}
				return nil, 0, r.Err
			}
			f := r.Val.(fetched)
			return f.b, f.from, nil
		case <-ctx.Done():
			return nil, 0, ctx.Err()
		}
	}
}

// warm loads entry idx of img into the hot tier (or, without one, the memory
// cache) if its chunk is stored locally; it never fetches.
func (n *Node) warm(ctx context.Context, img *image, idx int) {
	id := img.m.Entries[idx].ID
	if n.hot != nil {
		if n.hot.Has(img.id, idx) {
			return
		}
		b, ok := n.cache.get(id)
		if !ok {
			var err error
			if b, err = n.store.Get(ctx, id); err != nil {
				return
			}
		}
		n.evict.touch(id) // read ahead for the guest, which reads it from the hot tier
		n.hot.Put(img.id, img.m, idx, b)
		return
	}
	if n.cache.has(id) {
		return
	}
	if b, err := n.store.Get(ctx, id); err == nil {
		n.cache.add(id, b)
	}
}

type fetched struct {
	b    []byte
	from int
}

// fetch gets a missing chunk from the peers or the origin, verifies it,
// stores it and caches it. It runs once per flight: background fetches are
// counted here, by the reason of the caller that started the flight.
func (n *Node) fetch(img *image, idx int, why int) (f fetched, err error) {
	defer func() {
		if err == nil && f.from != fromLocal {
			switch why {
			case forReadahead:
				n.stats.readahead.Add(1)
			case forProfile:
				n.stats.profile.Add(1)
			case forHoard:
				n.stats.hoard.Add(1)
			}
		}
	}()
	e := img.m.Entries[idx]
	// Another flight may have stored it since our miss.
	if b, err := n.store.Get(n.runCtx, e.ID); err == nil {
		n.cache.add(e.ID, b)
		return fetched{b, fromLocal}, nil
	}
	if f := n.fetcher(); f != nil {
		// The peers get a budget of their own, so that time spent waiting
		// for a slow designated fetcher never eats the origin's.
		pctx, pcancel := context.WithTimeout(n.runCtx, n.cfg.OriginTimeout)
		start := time.Now()
		fctx := pctx
		if why == forPeer {
			fctx = cluster.WithDesignated(pctx)
		}
		var b []byte
		var st chunkstore.Stored
		var err error
		verified := false
		if sf, ok := f.(storedFetcher); ok {
			b, st, err = sf.FetchStored(fctx, img.id, idx, e.ID)
			verified = true
		} else {
			b, err = f.Fetch(fctx, img.id, idx, e.ID)
		}
		pcancel()
		if err != nil && why == forHoard && errors.Is(err, cluster.ErrNotDelivered) {
			// Hoarding is never urgent: it does not send the node to the
			// origin beside a designated fetcher that is slow (under load,
			// each would), the next pass gets the chunk from it.
			return fetched{}, fmt.Errorf("hoard chunk %d of %s: %w; left for the hoarder's next pass", idx, img.id, err)
		}
		switch {
		case err == nil && (verified || e.ID.Verify(b)):
			n.m.fetchSeconds.WithLabelValues("peer").Observe(time.Since(start).Seconds())
			if st.Payload != nil {
				// As the peer stored it: no recompression.
				if err := n.store.PutStored(n.runCtx, e.ID, st); err != nil {
					n.log.Warn("cannot store fetched chunk; serving it anyway", "chunk_id", e.ID.String(), "err", err)
				}
				n.cache.add(e.ID, b)
			} else {
				n.keep(n.runCtx, e.ID, b)
			}
			img.markHave(idx)
			return fetched{b, fromPeer}, nil
		case err == nil:
			n.log.Warn("peer sent a chunk that does not match its id; ignoring it", "chunk_id", e.ID.String(), "image", img.id.String())
		case !errors.Is(err, chunkstore.ErrNotFound):
			n.log.Debug("peer fetch failed", "chunk_id", e.ID.String(), "err", err)
		}
	}
	ctx, cancel := context.WithTimeout(n.runCtx, n.cfg.OriginTimeout)
	defer cancel()
	b, err := n.fromOrigin(ctx, img, e)
	if err != nil {
		n.m.fetchErrors.WithLabelValues("origin").Inc()
		n.stats.originErrors.Add(1)
		n.log.Warn("origin fetch failed", "image", img.id.String(), "chunk", idx, "offset", e.Offset, "err", err)
		return fetched{}, err
	}
	n.keep(ctx, e.ID, b)
	img.markHave(idx)
	return fetched{b, fromOrigin}, nil
}

// storedFetcher is a Fetcher that also hands over the chunk's stored form,
// already verified (the cluster).
type storedFetcher interface {
	FetchStored(ctx context.Context, manifest chunkstore.ID, index int, id chunkstore.ID) ([]byte, chunkstore.Stored, error)
}

// fetcher is Config.Fetcher, or the cluster when it is on.
func (n *Node) fetcher() Fetcher {
	if n.cfg.Fetcher != nil {
		return n.cfg.Fetcher
	}
	if n.cl != nil {
		return n.cl
	}
	return nil
}

func (n *Node) fromOrigin(ctx context.Context, img *image, e chunkstore.Entry) ([]byte, error) {
	release, err := n.origSlots.acquire(ctx, originKey(img.m.Source))
	if err != nil {
		return nil, fmt.Errorf("%w: chunk at offset %d: waited too long for an origin slot: %w", ErrOrigin, e.Offset, err)
	}
	defer release()
	if n.originRate != nil {
		// origin.rate: the bytes are paid for before they are asked for.
		if err := n.originRate.WaitN(ctx, int(min(e.Length, int64(n.originRate.Burst())))); err != nil {
			return nil, fmt.Errorf("%w: chunk at offset %d: waited too long under origin.rate (%d bytes/s): %w", ErrOrigin, e.Offset, int64(n.originRate.Limit()), err)
		}
	}
	src, done, err := n.source(ctx, img)
	if err != nil {
		return nil, err
	}
	defer done()
	start := time.Now()
	b := make([]byte, e.Length)
	if err := src.ReadAt(ctx, b, e.Offset); err != nil {
		if ctx.Err() != nil && errors.Is(err, context.DeadlineExceeded) {
			return nil, fmt.Errorf("%w: %s [%d, %d): no answer within %s: %w", ErrOrigin, img.m.Source.Location, e.Offset, e.End(), n.cfg.OriginTimeout, err)
		}
		return nil, fmt.Errorf("%w: %w", ErrOrigin, err)
	}
	n.m.fetchSeconds.WithLabelValues("origin").Observe(time.Since(start).Seconds())
	n.stats.originBytes.Add(int64(len(b)))
	if !e.ID.Verify(b) {
		return nil, fmt.Errorf("%w: %s [%d, %d) does not match chunk %s: the image changed at the origin; re-add it (hoard image rm, hoard image add)",
			ErrOrigin, img.m.Source.Location, e.Offset, e.End(), e.ID)
	}
	return b, nil
}

// originKey names the origin a source's requests go to, for its slots: the
// host of an HTTP URL, Glance, or the file. One hanging origin then holds
// only its own slots, never those of the others.
func originKey(s chunkstore.Source) string {
	if s.Kind == "http" {
		if u, err := url.Parse(s.Location); err == nil {
			return "http:" + u.Host
		}
	}
	if s.Kind == "glance" {
		return "glance"
	}
	return s.Kind + ":" + s.Location
}

// originSlots bounds concurrent requests per origin (Config.OriginConcurrency
// each). An origin's slots are dropped when nobody holds or waits for them.
type originSlots struct {
	per int

	mu sync.Mutex
	m  map[string]*slotSet
}

type slotSet struct {
	ch    chan struct{}
	users int // holders and waiters, under originSlots.mu
}

// acquire takes one of key's slots, waiting until ctx is done; release gives
// it back.
func (o *originSlots) acquire(ctx context.Context, key string) (release func(), err error) {
	o.mu.Lock()
	if o.m == nil {
		o.m = make(map[string]*slotSet)
	}
	s := o.m[key]
	if s == nil {
		s = &slotSet{ch: make(chan struct{}, o.per)}
		o.m[key] = s
	}
	s.users++
	o.mu.Unlock()
	select {
	case s.ch <- struct{}{}:
		return func() { <-s.ch; o.leave(key, s) }, nil
	case <-ctx.Done():
		o.leave(key, s)
		return nil, ctx.Err()
	}
}

func (o *originSlots) leave(key string, s *slotSet) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if s.users--; s.users == 0 {
		delete(o.m, key)
	}
}

// keep stores a fetched chunk (copy-on-read) and caches it. A store failure
// (full of pinned chunks, disk error) is logged: the bytes are still served.
func (n *Node) keep(ctx context.Context, id chunkstore.ID, b []byte) {
	if err := n.store.Put(context.WithoutCancel(ctx), id, b); err != nil {
		n.log.Warn("cannot store fetched chunk; serving it anyway", "chunk_id", id.String(), "err", err)
	}
	n.cache.add(id, b)
}
