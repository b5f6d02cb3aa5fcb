package hoarder

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/hoardvm/hoard/chunkstore"
)

// ErrUnknownImage is wrapped by Prefetch when the node does not know the
// image.
var ErrUnknownImage = errors.New("image not known to this node")

// PrefetchResult is what Prefetch did. Byte counts are raw bytes.
type PrefetchResult struct {
	Manifest chunkstore.ID `json:"manifest"`
	// Full reports that every non-zero entry was asked for, not only the
	// working set.
	Full bool `json:"full"`
	// Chunks and Bytes are the distinct chunks asked for; Local and
	// LocalBytes those that were local already.
	Chunks     int   `json:"chunks"`
	Bytes      int64 `json:"bytes"`
	Local      int   `json:"local"`
	LocalBytes int64 `json:"local_bytes"`
	// Fetched is the chunks fetched; BySource their raw bytes by where
	// they came from; Failed the chunks that could not be fetched.
	Fetched  int              `json:"fetched"`
	BySource map[string]int64 `json:"by_source"`
	Failed   int              `json:"failed"`
	Duration time.Duration    `json:"duration_ns"`
}

// Prefetch fetches an image's working set now (with full, every non-zero
// entry of the image), outside the budget and the rate but still yielding to
// VM reads, at most Config.Concurrency fetches at a time. Each distinct chunk
// is fetched once. progress, if not nil, is called with the raw bytes local
// so far and the total, once at the start and after each chunk, from one
// goroutine at a time with done never decreasing. When some chunks could not
// be fetched the result counts them and the error says how many; the node
// should pin only after a nil error.
func (h *Hoarder) Prefetch(ctx context.Context, manifest chunkstore.ID, full bool, progress func(done, total int64)) (PrefetchResult, error) {
	start := time.Now()
	res := PrefetchResult{Manifest: manifest, Full: full, BySource: map[string]int64{}}
	imgs, err := h.src.Images(ctx)
	if err != nil {
		return res, fmt.Errorf("prefetch %s: list images: %w", manifest, err)
	}
	var img *Image
	for i := range imgs {
		if imgs[i].ID == manifest && imgs[i].Manifest != nil {
			img = &imgs[i]
			break
		}
	}
	if img == nil {
		return res, fmt.Errorf("prefetch %s: %w; list images with hoard image ls, or pull it with hoard image pull", manifest, ErrUnknownImage)
	}
	entries := img.Manifest.Entries
	var indices []int
	if full {
		indices = make([]int, len(entries))
		for i := range entries {
			indices[i] = i
		}
	} else {
		indices = img.WorkingSet
	}
	seen := make(map[chunkstore.ID]bool)
	var tasks []task
	for _, i := range indices {
		if i < 0 || i >= len(entries) {
			continue
		}
		e := entries[i]
		if e.Zero || !e.ID.Defined() || e.Length <= 0 || seen[e.ID] {
			continue
		}
		seen[e.ID] = true
		res.Chunks++
		res.Bytes += e.Length
		if h.src.Has(ctx, e.ID) {
			res.Local++
			res.LocalBytes += e.Length
			continue
		}
		tasks = append(tasks, task{id: e.ID, size: e.Length, loc: location{manifest, i}})
	}

	var (
		mu       sync.Mutex
		done     = res.LocalBytes
		firstErr error
	)
	report := func() { // under mu
		if progress != nil {
			progress(done, res.Bytes)
		}
	}
	mu.Lock()
	report()
	mu.Unlock()
	g := new(errgroup.Group)
	g.SetLimit(h.cfg.Concurrency)
	for _, t := range tasks {
		if ctx.Err() != nil {
			break
		}
		g.Go(func() error {
			if err := h.yield(ctx); err != nil {
				return nil
			}
			n, from, err := h.src.Fetch(ctx, t.loc.manifest, t.loc.index)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				if ctx.Err() != nil {
					return nil
				}
				res.Failed++
				h.failure()
				if firstErr == nil {
					firstErr = err
				}
				h.log.Debug("prefetch fetch failed", "chunk_id", t.id, "image", manifest, "index", t.loc.index, "err", err)
				return nil
			}
			res.Fetched++
			res.BySource[sourceLabel(from)] += n
			h.account(n, from)
			h.landed(t.id)
			done += t.size
			report()
			return nil
		})
	}
	_ = g.Wait()
	res.Duration = time.Since(start)
	if err := ctx.Err(); err != nil {
		return res, fmt.Errorf("prefetch %s: stopped after %d of %d chunks: %w", manifest, res.Local+res.Fetched, res.Chunks, err)
	}
	if res.Failed > 0 {
		return res, fmt.Errorf("prefetch %s: %d of %d chunks could not be fetched (first: %w); run the prefetch again to retry them",
			manifest, res.Failed, res.Chunks, firstErr)
	}
	return res, nil
}
