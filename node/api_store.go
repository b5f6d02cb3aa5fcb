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
			res, err := n.store.Verify(r.Context(), nil)
			reply(w, res, err)
		})},
		{"POST /v1/store/gc", long(func(w http.ResponseWriter, r *http.Request) {
			res, err := n.store.GC(r.Context())
			reply(w, res, err)
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
	var v chunkstore.VerifyResult
	return v, c.do(ctx, http.MethodPost, "/v1/store/verify", nil, &v)
}

// StoreGC returns POST /v1/store/gc.
func (c *Client) StoreGC(ctx context.Context) (chunkstore.GCResult, error) {
	var v chunkstore.GCResult
	return v, c.do(ctx, http.MethodPost, "/v1/store/gc", nil, &v)
}
