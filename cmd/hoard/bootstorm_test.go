package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/time/rate"
)

// Boot storm parameters: the measurement (4 daemons, a 64 MiB image
// of which 40 MiB are non-zero, an origin capped at 50 MB/s).
const (
	stormNodes     = 4
	stormSize      = 64 << 20
	stormNonZero   = 40 // MiB blocks that are not zero
	stormRate      = 50e6
	stormMaxRatio  = 1.1
	stormDefRuns   = 3
	stormReadLimit = 90 * time.Second
)

// TestBootStorm: stormNodes real daemons on loopback, fresh for each run,
// open an image the moment it was added (lazily, on the first of them) and
// read all of it at once, from an HTTP origin capped at 50 MB/s. Their views
// of who serves the image differ when the storm starts (the others learn the
// image while it runs), yet the origin must serve each non-zero chunk about
// once: at most stormMaxRatio times the image's non-zero bytes in every run.
// HOARD_STORM_RUNS sets the number of runs (scripts/bootstorm.sh runs 20).
func TestBootStorm(t *testing.T) {
	if testing.Short() {
		t.Skip("runs 4 daemons per storm; skipped with -short")
	}
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Skip("qemu-img not installed (apt-get install qemu-utils)")
	}
	runs := stormDefRuns
	if s := os.Getenv("HOARD_STORM_RUNS"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			t.Fatalf("HOARD_STORM_RUNS=%q: want a positive number of runs", s)
		}
		runs = n
	}
	mode := os.Getenv("HOARD_STORM_MODE")
	if mode == "" {
		mode = "meshed,joining"
	}
	org := newStormOrigin(t, stormRate)
	for _, m := range strings.Split(mode, ",") {
		if m != "meshed" && m != "joining" {
			t.Fatalf("HOARD_STORM_MODE=%q: want meshed, joining or both (comma-separated)", mode)
		}
		var ratios []string
		for run := range runs {
			var ratio float64
			ok := t.Run(fmt.Sprintf("%s%02d", m, run+1), func(t *testing.T) {
				ratio = stormRun(t, org, run, m == "joining")
			})
			ratios = append(ratios, fmt.Sprintf("%.2f", ratio))
			// One line per run, for scripts/bootstorm.sh.
			fmt.Printf("bootstorm %s run %d/%d: origin %.3fx the non-zero bytes (ok=%v)\n", m, run+1, runs, ratio, ok)
		}
		t.Logf("%s: origin/non-zero per run: %s", m, strings.Join(ratios, " "))
	}
}

// stormRun is one storm on fresh daemons; it returns the origin's bytes
// during the storm over the image's non-zero bytes. Meshed: every daemon is
// connected to every other before the image is added. Joining: the image is
// added on the first daemon alone, the others start then and the storm
// begins as soon as the last one is up, before the cluster has settled
// (connections, catalog sync): the nodes' views differ most.
func stormRun(t *testing.T, org *stormOrigin, run int, joining bool) float64 {
	dir := t.TempDir()
	img := stormImage(uint64(run) + 1000)
	src := filepath.Join(dir, "disk.raw")
	if err := os.WriteFile(src, img, 0o600); err != nil {
		t.Fatal(err)
	}
	path := fmt.Sprintf("/storm-%d.raw", run)
	org.put(path, img)
	defer org.put(path, nil)

	datas := make([]string, stormNodes)
	for i := range datas {
		datas[i] = t.TempDir()
	}
	mustHoard(t, datas[0], nil, "cluster", "keygen")
	key, _ := os.ReadFile(filepath.Join(datas[0], "swarm.key"))
	for _, d := range datas[1:] {
		os.WriteFile(filepath.Join(d, "swarm.key"), key, 0o600)
	}
	args := []string{"--origin-allow-loopback"}
	ds := make([]*peerDaemon, stormNodes)
	ds[0] = startPeerDaemon(t, datas[0], nil, args...)
	boot := ds[0].status(t).Cluster.Addrs[0]
	others := func() {
		for i := 1; i < stormNodes; i++ {
			ds[i] = startPeerDaemon(t, datas[i], nil, append(args, "--p2p-bootstrap", boot)...)
		}
	}
	if !joining {
		others()
		for _, d := range ds {
			waitPeers(t, d, stormNodes-1)
		}
	}
	var added struct {
		NonZeroBytes int64 `json:"non_zero_bytes"`
	}
	out := mustHoard(t, datas[0], nil, "image", "add", org.srv.URL+path, "--lazy", "--name", "storm", "--json")
	if err := json.Unmarshal([]byte(out), &added); err != nil || added.NonZeroBytes == 0 {
		t.Fatalf("image add --json: %v\n%s", err, out)
	}
	before := org.bytes.Load()
	if joining {
		others()
	}

	// The storm: every node opens the image now, the others before they
	// know it (an open retries until the cluster has told them).
	start := time.Now()
	var wg sync.WaitGroup
	errs := make([]error, stormNodes)
	for i, d := range ds {
		wg.Go(func() { errs[i] = stormRead(t.Context(), src, d.uri("storm")) })
	}
	wg.Wait()
	took := time.Since(start)
	for i, err := range errs {
		if err != nil {
			t.Errorf("node %d: %v", i, err)
		}
	}
	got := org.bytes.Load() - before
	ratio := float64(got) / float64(added.NonZeroBytes)
	var per []string
	for i, d := range ds {
		c := d.status(t).Counters
		per = append(per, fmt.Sprintf("node %d: origin %.1f MB, peers %.1f MB, fallbacks %d", i,
			float64(c.OriginBytes)/1e6, float64(c.ReadBytes["peer"])/1e6, c.DesignatedFallbacks))
	}
	t.Logf("storm of %d nodes in %v: origin served %d bytes for %d non-zero: %.3fx\n  %s",
		stormNodes, took.Round(time.Millisecond), got, added.NonZeroBytes, ratio, strings.Join(per, "\n  "))
	if ratio > stormMaxRatio {
		t.Errorf("origin served %.3fx the image's non-zero bytes in a storm of %d nodes: want <= %.2fx", ratio, stormNodes, stormMaxRatio)
	}
	return ratio
}

// stormRead reads the whole export uri and compares it with src, retrying
// while the node does not know the image yet (or fails) within
// stormReadLimit.
func stormRead(ctx context.Context, src, uri string) error {
	deadline := time.Now().Add(stormReadLimit)
	for {
		cctx, cancel := context.WithDeadline(ctx, deadline)
		out, err := exec.CommandContext(cctx, "qemu-img", "compare", "-f", "raw", "-F", "raw", src, uri).CombinedOutput()
		cancel()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("qemu-img compare: %v\n%s", err, out)
		}
		if !bytes.Contains(out, []byte("export")) && !bytes.Contains(out, []byte("Requested export not available")) {
			return fmt.Errorf("qemu-img compare: %v\n%s", err, out)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// stormImage is a stormSize raw image of random 1 MiB blocks, stormNonZero
// of them non-zero (which ones depends on seed).
func stormImage(seed uint64) []byte {
	r := rand.New(rand.NewPCG(seed, 11))
	b := make([]byte, stormSize)
	blocks := stormSize >> 20
	for _, k := range r.Perm(blocks)[:stormNonZero] {
		for i := k << 20; i < (k+1)<<20; i += 8 {
			v := r.Uint64()
			for j := range 8 {
				b[i+j] = byte(v >> (8 * j))
			}
		}
	}
	return b
}

// stormOrigin is an HTTP range server whose bodies share one token bucket
// (the origin's bandwidth) and are counted.
type stormOrigin struct {
	srv   *httptest.Server
	lim   *rate.Limiter
	bytes atomic.Int64

	mu    sync.Mutex
	files map[string][]byte
}

func newStormOrigin(t *testing.T, bytesPerSec float64) *stormOrigin {
	o := &stormOrigin{lim: rate.NewLimiter(rate.Limit(bytesPerSec), 256<<10), files: map[string][]byte{}}
	o.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		o.mu.Lock()
		b, ok := o.files[r.URL.Path]
		o.mu.Unlock()
		if !ok {
			http.NotFound(w, r)
			return
		}
		http.ServeContent(&throttledWriter{ResponseWriter: w, o: o, ctx: r.Context()}, r, r.URL.Path, time.Time{}, bytes.NewReader(b))
	}))
	t.Cleanup(o.srv.Close)
	return o
}

// put serves b at path; nil removes it.
func (o *stormOrigin) put(path string, b []byte) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if b == nil {
		delete(o.files, path)
	} else {
		o.files[path] = b
	}
}

// throttledWriter writes a body through the origin's token bucket.
type throttledWriter struct {
	http.ResponseWriter
	o   *stormOrigin
	ctx context.Context
}

func (w *throttledWriter) Write(p []byte) (int, error) {
	done := 0
	for len(p) > 0 {
		n := min(len(p), 32<<10)
		if err := w.o.lim.WaitN(w.ctx, n); err != nil {
			return done, err
		}
		k, err := w.ResponseWriter.Write(p[:n])
		w.o.bytes.Add(int64(k))
		done += k
		if err != nil {
			return done, err
		}
		p = p[n:]
	}
	return done, nil
}
