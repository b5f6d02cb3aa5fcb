package main

import (
	"context"
	"errors"

	"github.com/hoardvm/hoard/chunkstore"
	"github.com/hoardvm/hoard/node/api"
	"github.com/hoardvm/hoard/node/importer"
	"github.com/hoardvm/hoard/node/local"
	"github.com/hoardvm/hoard/node/origin"
)

// imageService is what the image and store commands need, served by the
// running daemon (daemonImages, over its API) or, with none, by the store
// on the data dir (localImages). Commands take one and never ask which.
type imageService interface {
	// Add imports an image; progress, if not nil, is called as it goes.
	Add(ctx context.Context, req api.ImportRequest, progress func(api.Progress)) (*importer.Result, error)
	List(ctx context.Context) ([]api.ImageInfo, error)
	Inspect(ctx context.Context, name string, entries bool) (api.ImageDetail, error)
	Profile(ctx context.Context, name string) (api.ProfileInfo, error)
	// Remove removes an image; with cluster, from every node (daemon only).
	Remove(ctx context.Context, name string, cluster bool) (api.RemoveResult, error)
	Stats(ctx context.Context) (chunkstore.Stats, error)
	Verify(ctx context.Context, progress func(api.Progress)) (chunkstore.VerifyResult, error)
	GC(ctx context.Context, progress func(api.Progress)) (chunkstore.GCResult, error)
	// Remote reports whether a daemon does the work (for messages).
	Remote() bool
	Close() error
}

// images returns the daemon's service when one runs on the data dir (or
// HOARD_API names one), else the store's; see backend. With create, a
// missing store is created (image add); without, it is an error.
func (g *globalOptions) images(ctx context.Context, create bool) (imageService, error) {
	st, cl, err := g.backendFor(ctx, create)
	if err != nil {
		return nil, err
	}
	if cl != nil {
		return daemonImages{cl}, nil
	}
	return localImages{st: st, origins: g.originConfig()}, nil
}

// daemonImages is imageService over a daemon's admin API.
type daemonImages struct{ cl *api.Client }

func (d daemonImages) Add(ctx context.Context, req api.ImportRequest, progress func(api.Progress)) (*importer.Result, error) {
	return d.cl.AddImageProgress(ctx, req, progress)
}
func (d daemonImages) List(ctx context.Context) ([]api.ImageInfo, error) { return d.cl.Images(ctx) }
func (d daemonImages) Inspect(ctx context.Context, name string, entries bool) (api.ImageDetail, error) {
	return d.cl.Image(ctx, name, entries)
}
func (d daemonImages) Profile(ctx context.Context, name string) (api.ProfileInfo, error) {
	return d.cl.Profile(ctx, name)
}
func (d daemonImages) Remove(ctx context.Context, name string, cluster bool) (api.RemoveResult, error) {
	return d.cl.RemoveImage(ctx, name, cluster)
}
func (d daemonImages) Stats(ctx context.Context) (chunkstore.Stats, error) {
	return d.cl.StoreStats(ctx)
}
func (d daemonImages) Verify(ctx context.Context, progress func(api.Progress)) (chunkstore.VerifyResult, error) {
	return d.cl.StoreVerifyProgress(ctx, progress)
}
func (d daemonImages) GC(ctx context.Context, progress func(api.Progress)) (chunkstore.GCResult, error) {
	return d.cl.StoreGCProgress(ctx, progress)
}
func (d daemonImages) Remote() bool { return true }
func (d daemonImages) Close() error { return nil }

// localImages is imageService on a store this process opened.
type localImages struct {
	st      *chunkstore.Store
	origins origin.Config
}

func (l localImages) Add(ctx context.Context, req api.ImportRequest, progress func(api.Progress)) (*importer.Result, error) {
	var p func(done, total int64)
	if progress != nil {
		p = func(done, total int64) {
			progress(api.Progress{Phase: "import", Unit: "bytes", Done: done, Total: total})
		}
	}
	return local.Add(ctx, l.st, l.origins, req, p)
}

func (l localImages) List(ctx context.Context) ([]api.ImageInfo, error) {
	names, err := l.st.Names(ctx)
	if err != nil {
		return nil, err
	}
	rows := []api.ImageInfo{}
	for _, n := range names {
		r, _, err := local.Describe(ctx, l.st, n)
		if err != nil {
			return nil, err
		}
		rows = append(rows, r)
	}
	return rows, nil
}

func (l localImages) Inspect(ctx context.Context, name string, entries bool) (api.ImageDetail, error) {
	id, err := l.st.Resolve(ctx, name)
	if err != nil {
		return api.ImageDetail{}, err
	}
	r, m, err := local.Describe(ctx, l.st, chunkstore.Named{Name: name, Manifest: id})
	if err != nil {
		return api.ImageDetail{}, err
	}
	out := api.ImageDetail{ImageInfo: r, Chunking: m.Chunking, Checksum: m.Source.Checksum}
	if entries {
		out.Entries = m.Entries
	}
	return out, nil
}

func (l localImages) Profile(ctx context.Context, name string) (api.ProfileInfo, error) {
	return local.Profile(ctx, l.st, name)
}
func (l localImages) Remove(ctx context.Context, name string, cluster bool) (api.RemoveResult, error) {
	if cluster {
		return api.RemoveResult{}, errors.New("image rm --cluster needs the running daemon (it tells the cluster); start it with hoard daemon, or drop --cluster to remove the image from this data dir only")
	}
	return local.Remove(ctx, l.st, name)
}
func (l localImages) Stats(ctx context.Context) (chunkstore.Stats, error) { return l.st.Stats(ctx) }
func (l localImages) Verify(ctx context.Context, progress func(api.Progress)) (chunkstore.VerifyResult, error) {
	var report func(done, total int64)
	if progress != nil {
		report = func(done, total int64) {
			progress(api.Progress{Phase: "verify", Unit: "chunks", Done: done, Total: total})
		}
	}
	return l.st.Verify(ctx, report)
}
func (l localImages) GC(ctx context.Context, _ func(api.Progress)) (chunkstore.GCResult, error) {
	return l.st.GC(ctx)
}
func (l localImages) Remote() bool { return false }
func (l localImages) Close() error { return l.st.Close() }
