package node

import (
	"context"

	"github.com/hoardvm/hoard/node/api"
)

// RoutePatterns lists every admin API route ("METHOD /path"), for tests.
func RoutePatterns(*Node) []string { return api.Patterns() }

// PublicRoute reports whether pattern is served without the API token.
func PublicRoute(pattern string) bool { return api.Public(pattern) }

// LiveMembers is the cluster members this node heard a NodeInfo from.
func (n *Node) LiveMembers() int { return len(n.liveMembers()) }

// UnregisterBehindCatalog removes image name from the store and the loaded
// images without telling the catalog, which still lists it: the state of a
// node that learnt a catalog entry and has not registered it yet.
func (n *Node) UnregisterBehindCatalog(ctx context.Context, name string) error {
	id, err := n.store.Resolve(ctx, name)
	if err != nil {
		return err
	}
	if _, err := n.store.RemoveName(ctx, name); err != nil {
		return err
	}
	n.mu.Lock()
	img := n.images[id]
	n.mu.Unlock()
	if img != nil {
		n.forget(img)
	}
	return nil
}
