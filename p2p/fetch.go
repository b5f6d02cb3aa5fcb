package p2p

import (
	"context"
	"sync/atomic"
	"time"

	"github.com/hoardvm/hoard/chunkstore"
	"github.com/libp2p/go-libp2p/core/peer"
)

// FetchFrom fetches wants of manifest from the peers in haves (their have
// bitmaps), spreading them over the peers that hold each entry (Pick), in
// batches of up to batch chunks (0: 64). A batch that fails (peer gone, bad
// bytes, no chunk within the stall timeout) is retried on another holder; a
// batch still unfinished after the hedge delay has its missing chunks also
// asked of another holder, and the first copy wins. fn is called once per
// delivered index, never concurrently. It returns the indices no peer could
// deliver; the error is ctx's or fn's.
func (p *Peer) FetchFrom(ctx context.Context, manifest chunkstore.ID, wants []Want, haves map[peer.ID]Bitmap, batch int, fn func(Chunk) error) (missing []int, err error) {
	if batch <= 0 || batch > MaxBatch {
		batch = 64
	}
	f := &fetchRun{p: p, manifest: manifest, haves: haves, batch: batch,
		results: make(chan fetchResult, 64), pending: make(map[int]Want, len(wants)),
		tried: map[int]map[peer.ID]bool{}, inFlight: map[int]int{}, jobs: map[*job]bool{}}
	f.ctx, f.cancel = context.WithCancel(ctx)
	defer f.cancel()
	for _, w := range wants {
		if _, dup := f.pending[w.Index]; !dup {
			f.pending[w.Index] = w
			f.order = append(f.order, w.Index)
		}
	}
	defer f.drain()
	f.plan()
	ticker := time.NewTicker(max(p.o.hedgeAfter/4, 10*time.Millisecond))
	defer ticker.Stop()
	for len(f.jobs) > 0 {
		select {
		case r := <-f.results:
			if r.chunk != nil {
				if r.job.delivered == 0 {
					p.clearSlow(r.job.peer)
				}
				r.job.delivered++
				if _, ok := f.pending[r.chunk.Index]; !ok {
					continue // a hedge lost the race
				}
				delete(f.pending, r.chunk.Index)
				if h := r.job; h.of != nil && h.of.delivered == 0 && f.jobs[h.of] {
					// A hedge delivered before the peer first asked sent anything.
					p.markSlow(h.of.peer)
				}
				if err := fn(*r.chunk); err != nil {
					return append(f.missing, f.pendingList()...), err
				}
				if len(f.pending) == 0 {
					f.cancel() // stop hedges still running
				}
				continue
			}
			delete(f.jobs, r.job)
			r.job.cancel()
			for _, w := range r.job.wants {
				f.inFlight[w.Index]--
			}
			if r.job.stalled.Load() {
				p.markSlow(r.job.peer)
			}
			if r.err != nil && f.ctx.Err() == nil {
				p.log.Debug("batch failed; asking another peer", "peer_id", r.job.peer.String(), "err", r.err)
			}
			if f.ctx.Err() == nil {
				f.plan()
			}
		case <-ticker.C:
			for j := range f.jobs {
				if !j.hedge && !j.hedged && time.Since(j.start) > p.o.hedgeAfter {
					j.hedged = true
					f.hedge(j)
				}
			}
		case <-ctx.Done():
			return append(f.missing, f.pendingList()...), ctx.Err()
		}
	}
	if err := ctx.Err(); err != nil && len(f.pending) > 0 {
		return append(f.missing, f.pendingList()...), err
	}
	return append(f.missing, f.pendingList()...), nil
}

type fetchResult struct {
	job   *job
	chunk *Chunk
	err   error
}

type job struct {
	peer      peer.ID
	wants     []Want
	hedge     bool // this job is a hedge
	of        *job // the job this one hedges
	hedged    bool // a hedge was launched for this job
	delivered int  // chunks received (by FetchFrom's loop)
	stalled   atomic.Bool
	start     time.Time
	ctx       context.Context
	cancel    context.CancelFunc
}

// fetchRun is FetchFrom's state, owned by its loop goroutine.
type fetchRun struct {
	p        *Peer
	manifest chunkstore.ID
	haves    map[peer.ID]Bitmap
	batch    int
	ctx      context.Context
	cancel   context.CancelFunc
	results  chan fetchResult
	pending  map[int]Want // not yet delivered
	order    []int
	tried    map[int]map[peer.ID]bool
	inFlight map[int]int // index -> jobs asking for it
	jobs     map[*job]bool
	missing  []int
}

func (f *fetchRun) pendingList() []int {
	var out []int
	for _, idx := range f.order {
		if _, ok := f.pending[idx]; ok {
			out = append(out, idx)
		}
	}
	return out
}

// drain waits for every job goroutine to finish.
func (f *fetchRun) drain() {
	f.cancel()
	for len(f.jobs) > 0 {
		r := <-f.results
		if r.chunk == nil {
			delete(f.jobs, r.job)
		}
	}
}

func (f *fetchRun) launch(j *job) {
	if f.p.launched != nil {
		f.p.launched(j.peer, j.hedge)
	}
	f.jobs[j] = true
	for _, w := range j.wants {
		f.inFlight[w.Index]++
		if f.tried[w.Index] == nil {
			f.tried[w.Index] = map[peer.ID]bool{}
		}
		f.tried[w.Index][j.peer] = true
	}
	j.start = time.Now()
	j.ctx, j.cancel = context.WithCancel(f.ctx)
	stallAfter := f.p.o.stallTimeout
	if f.p.isSlow(j.peer) {
		// It stalled a fetch moments ago (stopped?): when it is the only
		// holder left, give it the hedge delay, not the full stall timeout.
		stallAfter = min(stallAfter, max(f.p.o.hedgeAfter, 100*time.Millisecond))
	}
	go func() {
		stall := time.AfterFunc(stallAfter, func() { j.stalled.Store(true); j.cancel() })
		defer stall.Stop()
		_, err := f.p.Fetch(j.ctx, j.peer, f.manifest, j.wants, false, func(c Chunk) error {
			stall.Reset(stallAfter)
			select {
			case f.results <- fetchResult{job: j, chunk: &c}:
				return nil
			case <-j.ctx.Done():
				return j.ctx.Err()
			}
		})
		f.results <- fetchResult{job: j, err: err}
	}()
}

// plan assigns each pending index that no job asks for to a holder not tried
// yet; an index with no holder left is missing.
func (f *fetchRun) plan() {
	groups := map[peer.ID][]Want{}
	for _, idx := range f.order {
		w, ok := f.pending[idx]
		if !ok || f.inFlight[idx] > 0 {
			continue
		}
		id, ok := f.p.pick(f.haves, idx, f.tried[idx])
		if !ok {
			delete(f.pending, idx)
			f.missing = append(f.missing, idx)
			continue
		}
		groups[id] = append(groups[id], w)
		f.p.addLoad(id, 1) // so the next pick spreads; undone at launch
		if len(groups[id]) == f.batch {
			f.p.addLoad(id, -int64(f.batch))
			f.launch(&job{peer: id, wants: groups[id]})
			delete(groups, id)
		}
	}
	for id, ws := range groups {
		f.p.addLoad(id, -int64(len(ws)))
		f.launch(&job{peer: id, wants: ws})
	}
}

// hedge asks another holder for j's chunks that are still missing.
func (f *fetchRun) hedge(j *job) {
	groups := map[peer.ID][]Want{}
	for _, w := range j.wants {
		if _, ok := f.pending[w.Index]; !ok || f.inFlight[w.Index] != 1 {
			continue
		}
		if id, ok := f.p.pick(f.haves, w.Index, f.tried[w.Index]); ok {
			groups[id] = append(groups[id], w)
		}
	}
	for id, ws := range groups {
		f.launch(&job{peer: id, wants: ws, hedge: true, of: j})
	}
}
