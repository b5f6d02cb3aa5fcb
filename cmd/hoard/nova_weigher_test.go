package main

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hoardvm/hoard/node/origin/glancetest"
)

// TestNovaWeigher runs contrib/nova's HoardWeigher inside Nova's own weigher
// handler (Debian's python3-nova, /usr/bin/python3) against 3 real daemons
// of one cluster, of which one (hv-a) imported a Glance image: asked with
// the Glance image ID on another node (hv-b), the handler ranks hv-a first,
// alone and with all of Nova's weighers; with hoard unreachable or silent
// every weight is equal and no exception escapes. hoard place --json on the
// same node ranks the same.
func TestNovaWeigher(t *testing.T) {
	t.Parallel()
	if err := exec.Command("/usr/bin/python3", "-c", "import nova.scheduler.weights, nova.tests.unit.scheduler.fakes").Run(); err != nil {
		t.Skip("python3-nova not installed for /usr/bin/python3 (scripts/install-test-deps.sh installs it)")
	}
	g := glancetest.Shared(t)
	id := g.Upload(t, "nova-weigher-test", "raw", imageBytes(21, 4<<20))
	var hdrs []string
	for k, v := range g.Headers() {
		hdrs = append(hdrs, k+"="+v)
	}
	glanceEnv := []string{"HOARD_ORIGIN_GLANCE_URL=" + g.URL(), "HOARD_ORIGIN_GLANCE_HEADERS=" + strings.Join(hdrs, ",")}

	dataA, dataB, dataC := t.TempDir(), t.TempDir(), t.TempDir()
	mustHoard(t, dataA, nil, "cluster", "keygen")
	key, _ := os.ReadFile(filepath.Join(dataA, "swarm.key"))
	for _, d := range []string{dataB, dataC} {
		os.WriteFile(filepath.Join(d, "swarm.key"), key, 0o600)
	}
	// Hoarding off: only hv-a holds the image.
	a := startPeerDaemon(t, dataA, append(glanceEnv, "HOARD_NODE_NAME=hv-a"), "--hoard-budget", "0")
	boot := a.status(t).Cluster.Addrs[0]
	mustHoard(t, dataA, glanceEnv, "image", "add", "glance://"+id)
	b := startPeerDaemon(t, dataB, append(glanceEnv, "HOARD_NODE_NAME=hv-b"), "--hoard-budget", "0", "--p2p-bootstrap", boot)
	startPeerDaemon(t, dataC, append(glanceEnv, "HOARD_NODE_NAME=hv-c"), "--hoard-budget", "0", "--p2p-bootstrap", boot)
	waitPeers(t, b, 2)

	type host struct {
		Host  string  `json:"host"`
		Score float64 `json:"score"`
	}
	var ranked []host
	eventually(t, 60*time.Second, func() bool {
		out, _, err := hoard(t, dataB, nil, "place", id, "--json")
		if err != nil || json.Unmarshal([]byte(out), &ranked) != nil {
			return false
		}
		return len(ranked) == 3 && ranked[0].Host == "hv-a" && ranked[0].Score > ranked[2].Score
	}, "hoard place %s on hv-b did not rank hv-a first among 3 hosts: %+v", id, &ranked)
	t.Logf("hoard place on hv-b: %+v", ranked)

	addr, err := os.ReadFile(filepath.Join(dataB, "api.addr"))
	if err != nil {
		t.Fatal(err)
	}
	token, err := os.ReadFile(filepath.Join(dataB, "api.token"))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	py := exec.CommandContext(ctx, "/usr/bin/python3", "../../contrib/nova/test_hoard_weigher.py", id, "hv-a", "hv-c", "hv-b", "hv-a")
	py.Env = append(os.Environ(), "HOARD_API_URL=http://"+strings.TrimSpace(string(addr)), "HOARD_API_TOKEN="+strings.TrimSpace(string(token)))
	out, err := py.CombinedOutput()
	t.Logf("test_hoard_weigher.py:\n%s", out)
	if err != nil {
		t.Fatalf("the Nova weigher test failed: %v", err)
	}
	if !strings.Contains(string(out), "\nOK") {
		t.Fatal("the Nova weigher test did not end with OK")
	}
}
