package main

import (
	"os/exec"
	"strings"
	"testing"
)

// TestLayering keeps DESIGN.md's dependency direction true:
// cmd -> node -> {p2p, nbd, planner} -> chunkstore; nbd and chunkstore import
// nothing of ours; p2p, nbd and planner never import one another; nothing
// imports cmd or node (except cmd). Inside node (node/doc.go draws it), the
// rooms point one way: node -> {cluster, api, local, importer, hot, origin};
// local -> {api, importer, origin}; api -> {importer, hot, origin, p2p types};
// cluster -> p2p; catalog -> {p2p, planner}; hoarder -> planner; placement -> {p2p, planner}; api -> hoarder (its status types); importer -> origin; hot and origin import nothing of ours
// but chunkstore; glancemirror imports nothing of ours.
func TestLayering(t *testing.T) {
	t.Parallel()
	const mod = "github.com/hoardvm/hoard/"
	rules := map[string][]string{ // package -> ours it may import (transitively)
		"chunkstore":        {},
		"nbd":               {},
		"planner":           {"chunkstore"},
		"p2p":               {"chunkstore"},
		"node/origin":       {},
		"node/glancemirror": {},
		"node/hot":          {"chunkstore"},
		"node/importer":     {"chunkstore", "node/origin"},
		"node/cluster":      {"chunkstore", "p2p"},
		"node/catalog":      {"chunkstore", "p2p", "planner"},
		"node/hoarder":      {"chunkstore", "planner"},
		"node/placement":    {"chunkstore", "p2p", "planner"},
		"node/api":          {"chunkstore", "node/importer", "node/origin", "node/hot", "node/hoarder", "planner", "p2p"},
		"node/local":        {"chunkstore", "node/api", "node/importer", "node/origin", "node/hot", "node/hoarder", "planner", "p2p"},
	}
	for pkg, allowed := range rules {
		out, err := exec.Command("go", "list", "-deps", "-f", "{{.ImportPath}}", "../../"+pkg).CombinedOutput()
		if err != nil {
			t.Fatalf("go list %s: %v\n%s", pkg, err, out)
		}
		for _, dep := range strings.Fields(string(out)) {
			if !strings.HasPrefix(dep, mod) || dep == mod+pkg {
				continue
			}
			ok := false
			for _, a := range allowed {
				if dep == mod+a {
					ok = true
				}
			}
			if !ok {
				t.Errorf("%s imports %s: against the dependency direction of DESIGN.md", pkg, strings.TrimPrefix(dep, mod))
			}
		}
	}
}
