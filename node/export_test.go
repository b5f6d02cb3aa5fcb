package node

// RoutePatterns lists every admin API route ("METHOD /path"), for tests.
func RoutePatterns(n *Node) []string {
	var out []string
	for _, rt := range n.routes() {
		out = append(out, rt.pattern)
	}
	return out
}

// PublicRoute reports whether pattern is served without the API token.
func PublicRoute(pattern string) bool { return publicRoutes[pattern] }
