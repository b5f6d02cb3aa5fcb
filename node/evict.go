package node

import (
	"context"
	"errors"
	"log/slog"
	"maps"
	"slices"
	"sync"
	"time"

	"github.com/hoardvm/hoard/chunkstore"
	"github.com/hoardvm/hoard/planner"
)

// evictor is the node's eviction policy (Config.Eviction) and what the node
// tells it: the read path touches the chunks it reads, and the boot working
// sets (each image's profiled chunks) are given to it at start and whenever
// a profile is saved, not per read. The store sees the policy through
// liveFilter, which keeps open exports' chunks out of its reach. A nil
// evictor ignores everything (nodes built by hand in tests).
type evictor struct {
	policy planner.Eviction

	mu sync.Mutex // serializes SetWorkingSets so the latest sets win
	ws map[chunkstore.ID][]chunkstore.ID
}

func newEvictor(p planner.Eviction) *evictor {
	return &evictor{policy: p, ws: make(map[chunkstore.ID][]chunkstore.ID)}
}

// touch tells the policy that the chunk was read.
func (e *evictor) touch(id chunkstore.ID) {
	if e != nil {
		e.policy.Touch(id)
	}
}

// workingSet is the chunk IDs of the entries p lists (zero runs have none).
func workingSet(m *chunkstore.Manifest, p *chunkstore.Profile) []chunkstore.ID {
	ids := make([]chunkstore.ID, 0, len(p.Chunks))
	for _, i := range p.Chunks {
		if i < 0 || i >= len(m.Entries) || m.Entries[i].Zero {
			continue
		}
		ids = append(ids, m.Entries[i].ID)
	}
	return ids
}

// load gives the policy the working set of every image with a stored
// profile; Run calls it once the store is open. An unreadable manifest or
// profile is logged and skipped: the policy works without it.
func (e *evictor) load(ctx context.Context, st *chunkstore.Store, log *slog.Logger) error {
	if e == nil {
		return nil
	}
	start := time.Now()
	ids, err := st.Manifests(ctx)
	if err != nil {
		return err
	}
	ws := make(map[chunkstore.ID][]chunkstore.ID)
	for _, id := range ids {
		if err := ctx.Err(); err != nil {
			return err
		}
		m, err := st.GetManifest(ctx, id)
		if err != nil {
			log.Warn("cannot read manifest for the eviction policy's working sets; skipping it", "image", id.String(), "err", err)
			continue
		}
		p, err := st.GetProfile(ctx, id, len(m.Entries))
		if errors.Is(err, chunkstore.ErrNotFound) {
			continue
		}
		if err != nil {
			log.Warn("cannot read boot profile for the eviction policy's working sets; skipping it", "image", id.String(), "err", err)
			continue
		}
		if s := workingSet(m, p); len(s) > 0 {
			ws[id] = s
		}
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	e.ws = ws
	e.policy.SetWorkingSets(e.ws)
	log.Info("eviction policy given the working sets", "policy", e.policy.Name(), "images", len(ws), "duration", time.Since(start).Round(time.Millisecond))
	return nil
}

// profileSaved replaces image id's working set with the one p lists and
// gives the policy every image's. Images no longer in the store (removed
// since) are dropped from the sets on the way.
func (e *evictor) profileSaved(ctx context.Context, st *chunkstore.Store, id chunkstore.ID, m *chunkstore.Manifest, p *chunkstore.Profile) {
	if e == nil {
		return
	}
	ids, err := st.Manifests(ctx)
	e.mu.Lock()
	defer e.mu.Unlock()
	if err == nil {
		stored := make(map[chunkstore.ID]struct{}, len(ids))
		for _, id := range ids {
			stored[id] = struct{}{}
		}
		maps.DeleteFunc(e.ws, func(id chunkstore.ID, _ []chunkstore.ID) bool {
			_, ok := stored[id]
			return !ok
		})
	}
	e.ws[id] = workingSet(m, p)
	e.policy.SetWorkingSets(e.ws)
}

// setAll replaces every image's working set (the cluster-wide ones).
func (e *evictor) setAll(ws map[chunkstore.ID][]chunkstore.ID) {
	if e == nil {
		return
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	e.ws = ws
	e.policy.SetWorkingSets(e.ws)
}

// workingSets returns a copy of the working sets the policy was given (tests).
func (e *evictor) workingSets() map[chunkstore.ID][]chunkstore.ID {
	e.mu.Lock()
	defer e.mu.Unlock()
	out := make(map[chunkstore.ID][]chunkstore.ID, len(e.ws))
	for id, s := range e.ws {
		out[id] = slices.Clone(s)
	}
	return out
}
