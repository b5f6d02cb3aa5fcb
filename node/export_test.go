package node

import "github.com/hoardvm/hoard/node/api"

// RoutePatterns lists every admin API route ("METHOD /path"), for tests.
func RoutePatterns(*Node) []string { return api.Patterns() }

// PublicRoute reports whether pattern is served without the API token.
func PublicRoute(pattern string) bool { return api.Public(pattern) }

// LiveMembers is the cluster members this node heard a NodeInfo from.
func (n *Node) LiveMembers() int { return len(n.liveMembers()) }
