package node

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/hoardvm/hoard/chunkstore"
	"golang.org/x/sync/errgroup"
)

// recorder collects the entry indices an attach reads, in first-read order,
// for a window after the first read.
type recorder struct {
	window time.Duration

	mu    sync.Mutex
	start time.Time
	seen  map[int]struct{}
	order []int
}

func newRecorder(window time.Duration) *recorder {
	return &recorder{window: window, seen: make(map[int]struct{})}
}

// add records entry i; it reports false once the window is over.
func (r *recorder) add(i int) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	now := time.Now()
	if r.start.IsZero() {
		r.start = now
	} else if now.Sub(r.start) > r.window {
		return false
	}
	if _, ok := r.seen[i]; !ok {
		r.seen[i] = struct{}{}
		r.order = append(r.order, i)
	}
	return true
}

func (r *recorder) indices() []int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]int(nil), r.order...)
}

// record notes that entry i of img was read. The first read after the
// recording window saves the profile (VMs may run for weeks; their boot is over).
func (img *image) record(n *Node, i int) {
	img.mu.Lock()
	rec := img.rec
	img.mu.Unlock()
	if rec == nil || rec.add(i) {
		return
	}
	img.mu.Lock()
	if img.rec != rec {
		img.mu.Unlock()
		return
	}
	img.rec = nil
	img.mu.Unlock()
	n.saveProfile(img, rec)
}

// saveProfile merges a finished recording into the image's stored profile.
// Attaches that read nothing (NBD_OPT_INFO probes, qemu-img create) are not boots.
func (n *Node) saveProfile(img *image, rec *recorder) {
	if rec == nil {
		return
	}
	order := rec.indices()
	if len(order) == 0 {
		return
	}
	ctx := context.Background()
	p, err := n.store.GetProfile(ctx, img.id, len(img.m.Entries))
	switch {
	case errors.Is(err, chunkstore.ErrNotFound):
		p = &chunkstore.Profile{}
	case err != nil:
		n.log.Warn("stored profile unreadable; starting a new one", "image", img.id.String(), "err", err)
		p = &chunkstore.Profile{}
	}
	before := len(p.Chunks)
	p.Merge(order)
	if err := n.store.PutProfile(ctx, img.id, p); err != nil {
		n.log.Warn("cannot save boot profile", "image", img.id.String(), "err", err)
		return
	}
	n.evict.profileSaved(ctx, n.store, img.id, img.m, p)
	n.log.Info("boot profile saved", "image", img.id.String(), "boots", p.Boots, "chunks", len(p.Chunks), "new_chunks", len(p.Chunks)-before)
	if n.cat != nil {
		n.cat.ProfileSaved(ctx, img.id, *p)
	}
}

// prefetchProfile fetches the image's stored profile in order, in the
// background, ahead of the guest.
func (n *Node) prefetchProfile(img *image) {
	p, err := n.store.GetProfile(context.Background(), img.id, len(img.m.Entries))
	if err != nil {
		if !errors.Is(err, chunkstore.ErrNotFound) {
			n.log.Warn("cannot read boot profile", "image", img.id.String(), "err", err)
		}
		return
	}
	// Missing chunks are fetched; with the hot tier on, stored ones are
	// decoded into it too, so that the boot reads them as from a raw file.
	var todo []int
	for _, i := range p.Chunks {
		e := img.m.Entries[i]
		if e.Zero {
			continue
		}
		inStore, err := n.store.Has(context.Background(), e.ID)
		if err == nil && inStore && (n.hot == nil || n.hot.Has(img.id, i)) {
			continue
		}
		todo = append(todo, i)
	}
	if len(todo) == 0 {
		return
	}
	ctx := n.runCtx
	if ctx == nil || ctx.Err() != nil {
		return
	}
	n.log.Debug("prefetching boot profile", "image", img.id.String(), "chunks", len(todo))
	n.bg.Add(1)
	go func() {
		defer n.bg.Done()
		start := time.Now()
		g, gctx := errgroup.WithContext(ctx)
		g.SetLimit(n.cfg.PrefetchConcurrency)
		for _, i := range todo {
			// Stop when nobody is attached any more.
			img.mu.Lock()
			open := img.opens > 0
			img.mu.Unlock()
			if !open {
				break
			}
			g.Go(func() error {
				_, _, err := n.chunk(gctx, img, i, forProfile)
				return err
			})
		}
		err := g.Wait()
		n.log.Info("boot profile prefetched", "image", img.id.String(), "chunks", len(todo), "duration", time.Since(start).Round(time.Millisecond), "err", err)
	}()
}
