package node_test

import (
	"os"
	"strings"
	"testing"

	"github.com/hoardvm/hoard/node"
)

// TestREADMEListsEveryRoute: the README's Admin API table names every route
// the daemon serves, so the documented list cannot fall behind.
func TestREADMEListsEveryRoute(t *testing.T) {
	t.Parallel()
	b, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	readme := string(b)
	i := strings.Index(readme, "## Admin API")
	if i < 0 {
		t.Fatal("README has no Admin API section")
	}
	section := readme[i:]
	if j := strings.Index(section[3:], "\n## "); j >= 0 {
		section = section[:j+3]
	}
	n, err := node.New(node.Config{DataDir: t.TempDir()}, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range node.RoutePatterns(n) {
		method, path, _ := strings.Cut(p, " ")
		if strings.HasPrefix(path, "/debug/pprof/") && path != "/debug/pprof/" {
			path = strings.TrimPrefix(path, "/debug/pprof")
		}
		if !strings.Contains(section, path) || (method != "GET" && !strings.Contains(section, "`"+method+" ")) {
			t.Errorf("route %q is not in the README's Admin API section", p)
		}
	}
}
