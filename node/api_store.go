package node

import (
	"context"
	"net/http"

	"github.com/hoardvm/hoard/chunkstore"
)

// storeRoutes adds the chunk store's endpoints, so that `hoard store ...`
// works while the daemon holds the store:
//
//	GET  /v1/store/stats    chunkstore.Stats
//	POST /v1/store/verify   chunkstore.VerifyResult
//	POST /v1/store/gc       chunkstore.GCResult
func (n *Node) storeRoutes() []route {
	return []route{
		{"GET /v1/store/stats", func(w http.ResponseWriter, r *http.Request) {
			s, err := n.store.Stats(r.Context())
			reply(w, s, err)
		}},
		{"POST /v1/store/verify", long(func(w http.ResponseWriter, r *http.Request) {
			answer(w, r, "verify", "chunks", func(ctx context.Context, report func(done, total int64)) (any, error) {
				return n.store.Verify(ctx, report)
			})
		})},
		{"POST /v1/store/gc", long(func(w http.ResponseWriter, r *http.Request) {
			answer(w, r, "gc", "", func(ctx context.Context, _ func(done, total int64)) (any, error) {
				return n.store.GC(ctx)
			})
		})},
	}
}

// StoreStats returns GET /v1/store/stats.
func (c *Client) StoreStats(ctx context.Context) (chunkstore.Stats, error) {
	var s chunkstore.Stats
	return s, c.do(ctx, http.MethodGet, "/v1/store/stats", nil, &s)
}

// StoreVerify returns POST /v1/store/verify.
func (c *Client) StoreVerify(ctx context.Context) (chunkstore.VerifyResult, error) {
	return c.StoreVerifyProgress(ctx, nil)
}

// StoreVerifyProgress is StoreVerify; progress, if not nil, is called with
// the chunks checked of the total as the daemon reports them.
func (c *Client) StoreVerifyProgress(ctx context.Context, progress func(Progress)) (chunkstore.VerifyResult, error) {
	var v chunkstore.VerifyResult
	return v, c.stream(ctx, http.MethodPost, "/v1/store/verify", nil, &v, progress)
}

// StoreGC returns POST /v1/store/gc.
func (c *Client) StoreGC(ctx context.Context) (chunkstore.GCResult, error) {
	return c.StoreGCProgress(ctx, nil)
}

// StoreGCProgress is StoreGC; progress, if not nil, is called every few
// seconds while the daemon collects (without counts: Unit is empty).
func (c *Client) StoreGCProgress(ctx context.Context, progress func(Progress)) (chunkstore.GCResult, error) {
	var v chunkstore.GCResult
	return v, c.stream(ctx, http.MethodPost, "/v1/store/gc", nil, &v, progress)
}
