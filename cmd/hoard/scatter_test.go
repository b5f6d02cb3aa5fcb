package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hoardvm/hoard/node/api"
)

// TestScatterHoarding is the acceptance test of scatter hoarding on real
// daemons. Five daemons on loopback share a swarm key, all bootstrapping to
// the first (a sixth, the new node, joins near the end); an image is added
// --lazy on the first from a counting HTTP origin over the test guest's raw
// disk; the fifth (the returning node) is stopped once it knows the image. A real guest (qemu TCG) boots once on
// node 1. Then:
//   - within 60 s the running nodes hold >= 99% of the working set
//     (hoard image ls --json);
//   - guests boot on nodes 2, 3 and 4 at once with the right checksum, their
//     nodes reading nothing from peers or the origin, and the origin has
//     served at most 1.1x the working set's bytes beyond what the lazy add
//     read to hash the image;
//   - a new daemon and the returning node learn the image and hoard its
//     working set from peers, the origin serving nothing more;
//   - hoard image rm --cluster on one node removes the image everywhere,
//     also on a node that was down then and is started afterwards.
//
// Every step logs what it measured.
func TestScatterHoarding(t *testing.T) {
	if testing.Short() {
		t.Skip("boots VMs; skipped with -short")
	}
	kdir, base, want := guestKit(t)
	start := time.Now()
	ctx, cancel := context.WithTimeout(t.Context(), 6*time.Minute)
	defer cancel()

	org := newCountingOrigin(t, base)
	nodes := make([]*peerDaemon, 7) // nodes[1..6]
	datas := make([]string, 7)
	for i := 1; i <= 6; i++ {
		datas[i] = t.TempDir()
	}
	mustHoard(t, datas[1], nil, "cluster", "keygen")
	key, err := os.ReadFile(filepath.Join(datas[1], "swarm.key"))
	if err != nil {
		t.Fatal(err)
	}
	for i := 2; i <= 6; i++ {
		if err := os.WriteFile(filepath.Join(datas[i], "swarm.key"), key, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	const allowLoopback = "HOARD_ORIGIN_ALLOW_LOOPBACK=true" // origin.allow_loopback
	var boot string
	starts := map[int]int{}
	startNode := func(i int) {
		t.Helper()
		env := []string{allowLoopback}
		if boot != "" {
			env = append(env, "HOARD_P2P_BOOTSTRAP="+boot)
		}
		starts[i]++
		var d *peerDaemon
		keepLogs(t, fmt.Sprintf("node%d.%d", i, starts[i]), &d)
		d = startPeerDaemon(t, datas[i], env)
		nodes[i] = d
	}
	startNode(1)
	boot = nodes[1].status(t).Cluster.Addrs[0]
	for i := 2; i <= 5; i++ {
		startNode(i)
	}
	for i := 2; i <= 5; i++ {
		waitPeers(t, nodes[i], 1)
	}

	const name = "guest"
	mustHoard(t, datas[1], nil, "image", "add", org.srv.URL+"/base.raw", "--lazy", "--name", name)
	addBytes := org.bytes.Load()
	t.Logf("lazy add: origin served %s (%d bytes) to hash the image (size %d)", formatSize(addBytes), addBytes, org.size)
	for i := 2; i <= 5; i++ {
		eventually(t, 30*time.Second, func() bool { _, ok := lsImage(t, nodes[i], name); return ok },
			"node %d did not learn image %q from the catalog", i, name)
	}
	for i := 1; i <= 5; i++ {
		if row, _ := lsImage(t, nodes[i], name); row.WorkingSetBytes != 0 {
			t.Fatalf("node %d: working set %d bytes before any boot; want 0 (no profile yet)", i, row.WorkingSetBytes)
		}
	}
	// The returning node knows the image, then is down for the first boot
	// and the profile it brings.
	stopPeerDaemon(t, nodes[5])

	// First boot, on node 1: from the origin.
	ov1 := filepath.Join(t.TempDir(), "vm1.qcow2")
	mustHoard(t, datas[1], nil, "vm", "overlay", name, ov1)
	r := bootGuest(ctx, kdir, ov1, 3*time.Minute)
	if r.err != nil {
		t.Fatalf("first boot on node 1: %v\n%s", r.err, r.console)
	}
	checkGuest(t, "node 1", r, want)
	booted := time.Now()
	t.Logf("first boot on node 1: %v; origin served %s since the add", r.took.Round(time.Millisecond), formatSize(org.bytes.Load()-addBytes))

	// Within 60 s every running node holds the working set.
	var ws int64
	reached := map[int]time.Duration{}
	deadline := booted.Add(60 * time.Second)
	for len(reached) < 4 {
		for i := 1; i <= 4; i++ {
			if _, ok := reached[i]; ok {
				continue
			}
			row, ok := lsImage(t, nodes[i], name)
			if ok && row.WorkingSetBytes > 0 && float64(row.WorkingSetLocalBytes) >= 0.99*float64(row.WorkingSetBytes) {
				reached[i] = time.Since(booted)
				ws = max(ws, row.WorkingSetBytes)
				t.Logf("node %d: working set %s, %s local, %v after the first boot ended", i,
					formatSize(row.WorkingSetBytes), formatSize(row.WorkingSetLocalBytes), reached[i].Round(time.Millisecond))
			}
		}
		if len(reached) == 4 {
			break
		}
		if time.Now().After(deadline) {
			for i := 1; i <= 4; i++ {
				row, _ := lsImage(t, nodes[i], name)
				t.Logf("node %d: working set %d bytes, %d local; hoard %s", i, row.WorkingSetBytes, row.WorkingSetLocalBytes, hoardSummary(nodes[i].status(t)))
			}
			t.Fatalf("the working set did not reach every node within 60 s of the first boot (reached: %v)", reached)
		}
		time.Sleep(500 * time.Millisecond)
	}
	t.Logf("working set (%s) on all 4 nodes %v after the first boot ended", formatSize(ws), time.Since(booted).Round(time.Millisecond))
	for i := 1; i <= 4; i++ {
		t.Logf("node %d after hoarding: %s", i, hoardSummary(nodes[i].status(t)))
	}

	// Guests on nodes 2, 3 and 4 at once, each reading only its own disk.
	before := map[int]api.Counters{}
	ovs := map[int]string{}
	for i := 2; i <= 4; i++ {
		before[i] = nodes[i].status(t).Counters
		ovs[i] = filepath.Join(t.TempDir(), fmt.Sprintf("vm%d.qcow2", i))
		mustHoard(t, datas[i], nil, "vm", "overlay", name, ovs[i])
	}
	originBefore := org.bytes.Load()
	results := map[int]bootResult{}
	var mu sync.Mutex
	var wg sync.WaitGroup
	concurrentStart := time.Now()
	for i := 2; i <= 4; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := bootGuest(ctx, kdir, ovs[i], 4*time.Minute)
			mu.Lock()
			results[i] = r
			mu.Unlock()
		}()
	}
	wg.Wait()
	t.Logf("3 concurrent boots (nodes 2-4) done in %v", time.Since(concurrentStart).Round(time.Millisecond))
	for i := 2; i <= 4; i++ {
		r := results[i]
		if r.err != nil {
			t.Fatalf("boot on node %d: %v\n%s", i, r.err, r.console)
		}
		checkGuest(t, fmt.Sprintf("node %d", i), r, want)
		after := nodes[i].status(t).Counters
		peer := after.ReadBytes["peer"] - before[i].ReadBytes["peer"]
		orig := after.ReadBytes["origin"] - before[i].ReadBytes["origin"]
		local := after.ReadBytes["local"] - before[i].ReadBytes["local"]
		t.Logf("node %d boot: %v (guest %ss); NBD reads local %s, peer %d bytes, origin %d bytes; node origin bytes +%d",
			i, r.took.Round(time.Millisecond), r.guestTime, formatSize(local), peer, orig, after.OriginBytes-before[i].OriginBytes)
		if peer != 0 || orig != 0 {
			t.Errorf("node %d read %d bytes from peers and %d from the origin during its boot; want 0 and 0 (the working set hoarded)", i, peer, orig)
		}
		if local == 0 {
			t.Errorf("node %d served its guest nothing from its own store", i)
		}
	}
	if d := org.bytes.Load() - originBefore; d != 0 {
		t.Errorf("the origin served %d bytes during the boots on nodes 2-4; want 0", d)
	}
	served := org.bytes.Load() - addBytes
	ratio := float64(served) / float64(ws)
	t.Logf("origin: %s beyond the lazy add for a working set of %s: %.3fx (requests %d)", formatSize(served), formatSize(ws), ratio, org.reqs.Load())
	if ratio > 1.1 {
		t.Errorf("the origin served %d bytes beyond the add, %.3fx the working set's %d; want <= 1.1x", served, ratio, ws)
	}

	// A new daemon and the returning node hoard the working set from peers.
	originBefore = org.bytes.Load()
	lateStart := time.Now()
	startNode(6)
	startNode(5)
	for _, i := range []int{6, 5} {
		waitPeers(t, nodes[i], 1)
		// Well within the hoarder's 30 s tick: learning the image kicks it.
		eventually(t, 25*time.Second, func() bool {
			row, ok := lsImage(t, nodes[i], name)
			return ok && row.WorkingSetBytes > 0 && float64(row.WorkingSetLocalBytes) >= 0.99*float64(row.WorkingSetBytes)
		}, "node %d did not hoard the working set from its peers", i)
		row, _ := lsImage(t, nodes[i], name)
		s := nodes[i].status(t)
		t.Logf("node %d (%s): working set %s, %s local, %v after it started; %s", i, map[int]string{5: "returning", 6: "new"}[i],
			formatSize(row.WorkingSetBytes), formatSize(row.WorkingSetLocalBytes), time.Since(lateStart).Round(time.Millisecond), hoardSummary(s))
		if s.Counters.OriginBytes != 0 || (s.Hoard != nil && s.Hoard.BySource["origin"] != 0) {
			t.Errorf("node %d fetched %d bytes from the origin (hoarded %d); want all from peers", i, s.Counters.OriginBytes, s.Hoard.BySource["origin"])
		}
		if s.Hoard == nil || s.Hoard.BySource["peer"] == 0 {
			t.Errorf("node %d hoarded nothing from its peers: %+v", i, s.Hoard)
		}
	}
	if d := org.bytes.Load() - originBefore; d != 0 {
		t.Errorf("the origin served %d bytes while nodes 5 and 6 hoarded; want 0", d)
	}

	// Every node's boot profile reached the new node: four boots, four
	// contributors.
	var p api.ProfileInfo
	eventually(t, 20*time.Second, func() bool {
		p = profileOf(t, nodes[6], name)
		return p.Boots == 4 && p.Contributors == 4
	}, "the new node's merged profile of %q is not 4 boots from 4 nodes: %+v", name, &p)
	t.Logf("merged profile on the new node: %d boots from %d nodes, %d chunks, %s", p.Boots, p.Contributors, p.Chunks, formatSize(p.Bytes))

	// image rm --cluster on node 2 while node 4 is down.
	stopPeerDaemon(t, nodes[4])
	mustHoard(t, datas[2], nil, "image", "rm", name, "--cluster")
	rmAt := time.Now()
	for _, i := range []int{1, 2, 3, 5, 6} {
		eventually(t, 30*time.Second, func() bool { _, ok := lsImage(t, nodes[i], name); return !ok },
			"node %d still lists %q after image rm --cluster on node 2", i, name)
	}
	t.Logf("image rm --cluster: gone from the 5 running nodes %v after", time.Since(rmAt).Round(time.Millisecond))
	for _, i := range []int{1, 2, 3, 5, 6} {
		checkRemoved(t, i, nodes[i])
	}
	startNode(4)
	back := time.Now()
	eventually(t, 60*time.Second, func() bool { _, ok := lsImage(t, nodes[4], name); return !ok },
		"node 4, down during image rm --cluster, still lists %q after it came back", name)
	t.Logf("image rm --cluster: gone from node 4 %v after it came back", time.Since(back).Round(time.Millisecond))
	checkRemoved(t, 4, nodes[4])
	t.Logf("TestScatterHoarding took %v", time.Since(start).Round(time.Second))
}

// countingOrigin is an HTTP range origin over a file that counts the bytes
// and requests it serves.
type countingOrigin struct {
	srv         *httptest.Server
	size        int64
	bytes, reqs atomic.Int64
}

func newCountingOrigin(t *testing.T, path string) *countingOrigin {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	fi, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	o := &countingOrigin{size: fi.Size()}
	o.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		o.reqs.Add(1)
		// A reader of its own per request: ServeContent seeks.
		http.ServeContent(countingWriter{w, &o.bytes}, r, "base.raw", fi.ModTime(), io.NewSectionReader(f, 0, fi.Size()))
	}))
	t.Cleanup(o.srv.Close)
	return o
}

type countingWriter struct {
	http.ResponseWriter
	n *atomic.Int64
}

func (w countingWriter) Write(p []byte) (int, error) {
	n, err := w.ResponseWriter.Write(p)
	w.n.Add(int64(n))
	return n, err
}

// bootResult is one guest boot: its console, wall time, the guest's own
// HOARD-GUEST-TIME and the error that ended it (nil: qemu exited 0).
type bootResult struct {
	console   string
	took      time.Duration
	guestTime string
	err       error
}

// bootGuest boots the test guest on the overlay ov under qemu TCG and waits
// for it to power off, at most timeout.
func bootGuest(ctx context.Context, kdir, ov string, timeout time.Duration) bootResult {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	qemu := exec.CommandContext(ctx, "qemu-system-x86_64", "-accel", "tcg", "-nographic", "-m", "512",
		"-kernel", filepath.Join(kdir, "vmlinuz"), "-initrd", filepath.Join(kdir, "initrd.gz"),
		"-append", "console=ttyS0 panic=-1 quiet", "-no-reboot", "-nic", "none",
		"-drive", "file="+ov+",if=none,id=d0,format=qcow2", "-device", "nvme,drive=d0,serial=hoard")
	var console syncBuffer
	qemu.Stdout, qemu.Stderr = &console, &console
	qemu.WaitDelay = 5 * time.Second
	began := time.Now()
	err := qemu.Run()
	if ctx.Err() != nil {
		err = fmt.Errorf("guest did not power off within %v: %w", timeout, ctx.Err())
	}
	r := bootResult{console: console.String(), took: time.Since(began), err: err}
	for _, l := range strings.Split(r.console, "\n") {
		if rest, ok := strings.CutPrefix(strings.TrimSpace(l), "HOARD-GUEST-TIME "); ok {
			r.guestTime = rest
		}
	}
	return r
}

// checkGuest fails the test unless the guest read its files with no I/O
// error and printed the checksum want.
func checkGuest(t *testing.T, where string, r bootResult, want string) {
	t.Helper()
	if m := guestIOError.FindString(r.console); m != "" {
		t.Fatalf("guest on %s logged %q\n%s", where, m, r.console)
	}
	if m := guestOK.FindStringSubmatch(r.console); m == nil || m[1] != want {
		t.Fatalf("guest on %s: checksum %v, want %s\n%s", where, m, want, r.console)
	}
}

// lsImage is the image named name in d's hoard image ls --json.
func lsImage(t *testing.T, d *peerDaemon, name string) (api.ImageInfo, bool) {
	t.Helper()
	var rows []api.ImageInfo
	if err := json.Unmarshal([]byte(mustHoard(t, d.data, nil, "image", "ls", "--json")), &rows); err != nil {
		t.Fatal(err)
	}
	for _, r := range rows {
		if r.Name == name {
			return r, true
		}
	}
	return api.ImageInfo{}, false
}

// checkRemoved waits (10 s) until the hoarder of d (node i) plans for no
// image and its store holds no chunk: the only image was removed, and its
// chunks with it.
func checkRemoved(t *testing.T, i int, d *peerDaemon) {
	t.Helper()
	var s api.Status
	eventually(t, 10*time.Second, func() bool {
		s = d.status(t)
		return s.Hoard != nil && len(s.Hoard.Images) == 0 && s.Store.Chunks == 0
	}, "node %d after image rm --cluster: want no image planned and no chunk stored: store %+v, hoard %+v", i, &s.Store, &s.Hoard)
	t.Logf("node %d after image rm --cluster: store %d chunks, %s stored", i, s.Store.Chunks, formatSize(s.Store.StoredBytes))
}

// profileOf is d's hoard image profile NAME --json.
func profileOf(t *testing.T, d *peerDaemon, name string) api.ProfileInfo {
	t.Helper()
	var p api.ProfileInfo
	if err := json.Unmarshal([]byte(mustHoard(t, d.data, nil, "image", "profile", name, "--json")), &p); err != nil {
		t.Fatal(err)
	}
	return p
}

// hoardSummary is the hoarder's bytes by source and progress from a status.
func hoardSummary(s api.Status) string {
	h := s.Hoard
	if h == nil {
		return "no hoarder"
	}
	return fmt.Sprintf("hoarded local %s, peer %s, origin %s; passes %d, failures %d; node origin bytes %d",
		formatSize(h.BySource["local"]), formatSize(h.BySource["peer"]), formatSize(h.BySource["origin"]), h.Passes, h.Failures, s.Counters.OriginBytes)
}

// stopPeerDaemon stops d with SIGINT and waits for it (20 s), so that the
// next daemon on its data dir is not mistaken for it.
func stopPeerDaemon(t *testing.T, d *peerDaemon) {
	t.Helper()
	d.cmd.Process.Signal(os.Interrupt)
	select {
	case err := <-d.done:
		if err != nil {
			t.Fatalf("daemon %s exited with %v on SIGINT\n%s", d.data, err, tail(d.logs.String(), 40))
		}
	case <-time.After(20 * time.Second):
		d.kill()
		t.Fatalf("daemon %s did not stop within 20 s of SIGINT", d.data)
	}
	if _, err := os.Stat(filepath.Join(d.data, "api.addr")); err == nil {
		t.Fatalf("daemon %s left api.addr behind after a clean stop", d.data)
	}
}

// keepLogs writes the log of the daemon *d to $HOARD_TEST_LOGDIR/name.log
// at the end of the test when that variable is set. Called before the
// daemon starts, so that it runs after the daemon has stopped.
func keepLogs(t *testing.T, name string, d **peerDaemon) {
	dir := os.Getenv("HOARD_TEST_LOGDIR")
	if dir == "" {
		return
	}
	t.Cleanup(func() {
		if *d == nil {
			return
		}
		if err := os.WriteFile(filepath.Join(dir, name+".log"), []byte((*d).logs.String()), 0o644); err != nil {
			t.Errorf("keep the log of %s: %v", name, err)
		}
	})
}
