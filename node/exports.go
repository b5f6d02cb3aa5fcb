package node

import (
	"context"
	"errors"
	"fmt"
	"iter"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hoardvm/hoard/chunkstore"
	"github.com/hoardvm/hoard/nbd"
	"golang.org/x/sync/errgroup"
)

// Open implements nbd.Exporter: name is an image name or a manifest CID.
func (n *Node) Open(ctx context.Context, name string) (nbd.Export, error) {
	if name == "" {
		return nil, fmt.Errorf("no export name given; use an image name (hoard image ls): %w", nbd.ErrUnknownExport)
	}
	id, err := n.store.Resolve(ctx, name)
	if errors.Is(err, chunkstore.ErrNotFound) && n.cl != nil {
		// An image this node never saw: ask the cluster.
		rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		id, err = n.cl.Resolve(rctx, name)
		cancel()
		if err != nil && !errors.Is(err, chunkstore.ErrNotFound) {
			n.log.Info("cannot resolve export name through the cluster", "image", name, "err", err)
			err = fmt.Errorf("image %q: %w", name, errors.Join(err, chunkstore.ErrNotFound))
		}
	}
	if err != nil {
		if errors.Is(err, chunkstore.ErrNotFound) {
			return nil, fmt.Errorf("%w: %w", nbd.ErrUnknownExport, err)
		}
		return nil, err
	}
	for {
		img, err := n.image(ctx, id)
		if err != nil {
			return nil, err
		}
		x := &export{n: n, img: img, name: name}
		x.next.Store(-1)
		if n.attach(img, x) {
			return x, nil
		}
		// Forgotten as idle between the lookup and the attach: load it again.
	}
}

// List implements nbd.Exporter: every name, and the CID of manifests without one.
func (n *Node) List(ctx context.Context) ([]nbd.ExportInfo, error) {
	names, err := n.store.Names(ctx)
	if err != nil {
		return nil, err
	}
	ids, err := n.store.Manifests(ctx)
	if err != nil {
		return nil, err
	}
	named := map[chunkstore.ID]bool{}
	var out []nbd.ExportInfo
	for _, nm := range names {
		named[nm.Manifest] = true
		out = append(out, nbd.ExportInfo{Name: nm.Name, Description: "hoard image " + nm.Manifest.String()})
	}
	for _, id := range ids {
		if !named[id] {
			out = append(out, nbd.ExportInfo{Name: id.String(), Description: "hoard image (unnamed)"})
		}
	}
	return out, nil
}

// attach counts an open export; the first one of an image protects its chunks
// from eviction, starts a profile recording and prefetches the stored profile.
// It reports false, attaching nothing, if img was dropped from the node.
func (n *Node) attach(img *image, x *export) bool {
	img.mu.Lock()
	if img.dropped.Load() {
		img.mu.Unlock()
		return false
	}
	n.stats.exportsOpen.Add(1)
	img.touch()
	img.opens++
	img.exps[x] = struct{}{}
	first := img.opens == 1
	if first {
		img.rec = newRecorder(n.cfg.ProfileWindow)
	}
	img.mu.Unlock()
	if first {
		n.live.add(img.m)
		if !n.cfg.NoProfilePrefetch {
			n.prefetchProfile(img)
		}
	}
	return true
}

// detach undoes attach; the last export of an image persists its profile.
func (n *Node) detach(img *image, x *export) {
	n.stats.exportsOpen.Add(-1)
	img.touch()
	img.mu.Lock()
	img.opens--
	delete(img.exps, x)
	last := img.opens == 0
	var rec *recorder
	if last {
		rec, img.rec = img.rec, nil
	}
	img.mu.Unlock()
	if last {
		n.live.remove(img.m)
		n.saveProfile(img, rec)
	}
}

// loadedImages returns the images the node has loaded (opened at least once).
func (n *Node) loadedImages() []*image {
	n.mu.Lock()
	defer n.mu.Unlock()
	imgs := make([]*image, 0, len(n.images))
	for _, img := range n.images {
		imgs = append(imgs, img)
	}
	return imgs
}

// shutdownImages persists the profiles of images still attached and closes
// origin sources; Run calls it after every connection has ended.
func (n *Node) shutdownImages() {
	imgs := n.loadedImages()
	for _, img := range imgs {
		img.mu.Lock()
		rec := img.rec
		img.rec = nil
		img.mu.Unlock()
		img.srcLock <- struct{}{} // nothing reads any more: never waits long
		src := img.src
		img.src = nil
		<-img.srcLock
		n.saveProfile(img, rec)
		if src != nil {
			src.Close()
		}
	}
}

// export is one open NBD export (one client connection).
type export struct {
	n    *Node
	img  *image
	name string
	next atomic.Int64 // where a sequential reader's next read starts
	seq  atomic.Int32 // consecutive sequential reads
	// cold is set once a read of this export had to fetch a chunk (peer or
	// origin). Until then readahead only decompresses local chunks into
	// memory: a warm reader never makes the node go to the origin, so a warm
	// boot costs the origin nothing, deterministically.
	cold atomic.Bool
	once sync.Once
	// mirror is set on a Glance mirror download's reader: it counts the
	// bytes served by source (mirrorServed).
	mirror bool
}

func (x *export) Size() int64 { return x.img.m.Size }

func (x *export) Description() string {
	return fmt.Sprintf("hoard image %s (%s)", x.img.id, x.img.m.Format)
}

func (x *export) Close() error {
	x.once.Do(func() { x.n.detach(x.img, x) })
	return nil
}

// ReadAt implements nbd.Export.
func (x *export) ReadAt(ctx context.Context, p []byte, off int64) error {
	n, m := x.n, x.img.m
	end := off + int64(len(p))
	first := m.Find(off)
	if first < 0 {
		return fmt.Errorf("read at %d: outside the image (size %d)", off, m.Size)
	}
	last := first
	for last+1 < len(m.Entries) && m.Entries[last+1].Offset < end {
		last++
	}
	// Fetch data chunks; several at once when a read spans many.
	fill := func(ctx context.Context, i int) error {
		e := m.Entries[i]
		lo, hi := max(e.Offset, off), min(e.End(), end)
		dst := p[lo-off : hi-off]
		if e.Zero {
			clear(dst)
			n.stats.zeroBytes.Add(hi - lo)
			x.mirrorServed(mirrorZero, hi-lo)
			return nil
		}
		b, from, err := n.chunk(ctx, x.img, i, forRead)
		if err != nil {
			return fmt.Errorf("read %s [%d, %d): %w", x.name, e.Offset, e.End(), err)
		}
		if from == fromOrigin || from == fromPeer {
			x.cold.Store(true)
		}
		copy(dst, b[lo-e.Offset:hi-e.Offset])
		n.stats.read(from, int(hi-lo))
		x.mirrorServed(slot(from), hi-lo)
		return nil
	}
	// Zero entries and entries in the hot tier are served here; the rest,
	// several at once when a read spans many.
	var misses []int
	for i := first; i <= last; i++ {
		e := m.Entries[i]
		if e.Zero {
			lo, hi := max(e.Offset, off), min(e.End(), end)
			clear(p[lo-off : hi-off])
			n.stats.zeroBytes.Add(hi - lo)
			x.mirrorServed(mirrorZero, hi-lo)
			continue
		}
		x.img.record(n, i) // in offset order, before the fetches race
		if n.hot != nil {
			lo, hi := max(e.Offset, off), min(e.End(), end)
			if n.hot.Read(x.img.id, i, p[lo-off:hi-off], lo-e.Offset) {
				n.stats.read(fromLocal, int(hi-lo))
				x.mirrorServed(slot(fromLocal), hi-lo)
				continue
			}
		}
		misses = append(misses, i)
	}
	var err error
	switch len(misses) {
	case 0:
	case 1:
		err = fill(ctx, misses[0])
	default:
		g, gctx := errgroup.WithContext(ctx)
		g.SetLimit(4)
		for _, i := range misses {
			g.Go(func() error { return fill(gctx, i) })
		}
		err = g.Wait()
	}
	x.readahead(off, end, last)
	return err
}

// readahead prefetches the chunks after last when reads are sequential.
func (x *export) readahead(off, end int64, last int) {
	ra := x.n.cfg.Readahead
	if ra < 0 {
		return
	}
	prev := x.next.Swap(end)
	if prev != off {
		x.seq.Store(0)
		return
	}
	if x.seq.Add(1) < 2 {
		return
	}
	m := x.img.m
	// At least as far ahead as one read of this size.
	want := ra
	for i := m.Find(off); i >= 0 && i <= last && i < len(m.Entries); i++ {
		if want++; want >= 4*ra {
			break
		}
	}
	var todo []int
	for i := last + 1; i < len(m.Entries) && i <= last+2*want && len(todo) < want; i++ {
		if e := m.Entries[i]; !e.Zero && !x.n.cache.has(e.ID) && (x.n.hot == nil || !x.n.hot.Has(x.img.id, i)) {
			todo = append(todo, i)
		}
	}
	fetch := x.cold.Load()
	for _, i := range todo {
		x.n.goBackground(func(ctx context.Context) {
			if !fetch {
				x.n.warm(ctx, x.img, i)
				return
			}
			x.n.chunk(ctx, x.img, i, forReadahead)
		})
	}
}

// Extents implements nbd.Extenter: zero runs are holes.
func (x *export) Extents(ctx context.Context, off, length int64) ([]nbd.Extent, error) {
	m := x.img.m
	i := m.Find(off)
	if i < 0 {
		return nil, fmt.Errorf("extents at %d: outside the image (size %d)", off, m.Size)
	}
	end := off + length
	var out []nbd.Extent
	for pos := off; i < len(m.Entries) && pos < end; i++ {
		e := m.Entries[i]
		l := e.End() - pos
		if k := len(out); k > 0 && out[k-1].Hole == e.Zero {
			out[k-1].Length += l
		} else {
			out = append(out, nbd.Extent{Length: l, Hole: e.Zero})
		}
		pos = e.End()
		if len(out) >= 1024 {
			break
		}
	}
	return out, nil
}

// Cache implements nbd.Cacher: fetch the range's chunks into the store.
func (x *export) Cache(ctx context.Context, off, length int64) error {
	m := x.img.m
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(x.n.cfg.PrefetchConcurrency)
	for i := m.Find(off); i >= 0 && i < len(m.Entries) && m.Entries[i].Offset < off+length; i++ {
		if m.Entries[i].Zero {
			continue
		}
		g.Go(func() error {
			_, _, err := x.n.chunk(gctx, x.img, i, forCache)
			return err
		})
	}
	return g.Wait()
}

// liveSet counts, per chunk, the open images that use it. An image's chunk
// set is computed when it is first opened and dropped at its last close:
// opening an image already open (a mirror download, each Range request of
// one) costs O(1), whatever its size.
type liveSet struct {
	mu   sync.RWMutex
	refs map[chunkstore.ID]int               // chunk -> the open images (manifests) that use it
	open map[*chunkstore.Manifest]*liveImage // manifest -> its opens
}

// liveImage is an open manifest: how many times it is open, and its chunks.
type liveImage struct {
	opens  int
	chunks []chunkstore.ID
}

func (l *liveSet) add(m *chunkstore.Manifest) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if li := l.open[m]; li != nil {
		li.opens++
		return
	}
	if l.refs == nil {
		l.refs = make(map[chunkstore.ID]int)
		l.open = make(map[*chunkstore.Manifest]*liveImage)
	}
	li := &liveImage{opens: 1, chunks: m.ChunkIDs()}
	l.open[m] = li
	for _, id := range li.chunks {
		l.refs[id]++
	}
}

func (l *liveSet) remove(m *chunkstore.Manifest) {
	l.mu.Lock()
	defer l.mu.Unlock()
	li := l.open[m]
	if li == nil {
		return
	}
	if li.opens--; li.opens > 0 {
		return
	}
	delete(l.open, m)
	for _, id := range li.chunks {
		if l.refs[id]--; l.refs[id] <= 0 {
			delete(l.refs, id)
		}
	}
}

func (l *liveSet) has(id chunkstore.ID) bool {
	l.mu.RLock()
	defer l.mu.RUnlock()
	return l.refs[id] > 0
}

// liveFilter is the store's eviction policy: next, minus the chunks of images
// with an open export. It passes the store's Forget on to next.
type liveFilter struct {
	live *liveSet
	next chunkstore.EvictionPolicy
}

func (f liveFilter) Victims(need int64, candidates iter.Seq[chunkstore.Candidate]) []chunkstore.ID {
	return f.next.Victims(need, func(yield func(chunkstore.Candidate) bool) {
		for c := range candidates {
			if !f.live.has(c.ID) && !yield(c) {
				return
			}
		}
	})
}

// Forget implements chunkstore.Forgetter for next, when next keeps state
// per chunk.
func (f liveFilter) Forget(id chunkstore.ID) {
	if g, ok := f.next.(chunkstore.Forgetter); ok {
		g.Forget(id)
	}
}
