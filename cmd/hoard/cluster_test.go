package main

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hoardvm/hoard/node/api"
	"github.com/hoardvm/hoard/p2p"
)

func TestClusterKeygen(t *testing.T) {
	t.Parallel()
	data := t.TempDir()
	mustHoard(t, data, nil, "cluster", "keygen")
	key := filepath.Join(data, "swarm.key")
	fi, err := os.Stat(key)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("swarm key mode %v, want 0600", fi.Mode().Perm())
	}
	first, _ := os.ReadFile(key)
	if _, err := p2p.LoadSwarmKey(key); err != nil {
		t.Fatalf("keygen wrote a key p2p cannot load: %v", err)
	}
	if _, stderr, err := hoard(t, data, nil, "cluster", "keygen"); err == nil || !strings.Contains(stderr, "--force") {
		t.Fatalf("keygen over an existing key: err %v, stderr %q; want a refusal naming --force", err, stderr)
	}
	if again, _ := os.ReadFile(key); !bytes.Equal(again, first) {
		t.Fatal("refused keygen changed the key")
	}
	other := filepath.Join(t.TempDir(), "sub", "k")
	mustHoard(t, data, nil, "cluster", "keygen", other)
	mustHoard(t, data, nil, "cluster", "keygen", "--force", key)
	if again, _ := os.ReadFile(key); bytes.Equal(again, first) {
		t.Fatal("keygen --force kept the old key")
	}
}

func TestParseRate(t *testing.T) {
	t.Parallel()
	for in, want := range map[string]int64{"": 0, "unlimited": 0, "100MiB": 100 << 20, "100MiB/s": 100 << 20,
		"100MiB per second": 100 << 20, "4096": 4096} {
		if got, err := parseRate(in); err != nil || got != want {
			t.Errorf("parseRate(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	if _, err := parseRate("fast"); err == nil {
		t.Error("parseRate(fast) did not fail")
	}
}

// peerDaemon is a `hoard daemon` process of a cluster test.
type peerDaemon struct {
	data, sock string
	cmd        *exec.Cmd
	done       chan error
	logs       *syncBuffer
}

// syncBuffer is a bytes.Buffer a process writes while the test reads it.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// startPeerDaemon runs a daemon listening for peers on loopback; the test
// may kill it (kill), otherwise it is stopped with SIGINT at the end.
func startPeerDaemon(t *testing.T, data string, env []string, args ...string) *peerDaemon {
	t.Helper()
	sockDir, err := os.MkdirTemp("", "hoard-p2p-sock")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	d := &peerDaemon{data: data, sock: filepath.Join(sockDir, "nbd.sock"), done: make(chan error, 1), logs: &syncBuffer{}}
	d.cmd = exec.Command(hoardBin, append([]string{"--data-dir", data, "--log-level", "debug", "daemon", "--api-listen", "127.0.0.1:0",
		"--nbd-socket", d.sock, "--p2p-listen", "/ip4/127.0.0.1/tcp/0"}, args...)...)
	d.cmd.Stderr = d.logs
	d.cmd.Env = append(os.Environ(), env...)
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { d.done <- d.cmd.Wait() }()
	t.Cleanup(func() {
		if d.cmd.ProcessState != nil {
			return
		}
		d.cmd.Process.Signal(os.Interrupt)
		select {
		case <-d.done:
		case <-time.After(10 * time.Second):
			d.cmd.Process.Kill()
			t.Errorf("daemon %s did not stop on SIGINT", data)
		}
		if t.Failed() {
			t.Logf("daemon %s log:\n%s", data, tail(d.logs.String(), 60))
		}
	})
	eventually(t, 15*time.Second, func() bool {
		select {
		case err := <-d.done:
			t.Fatalf("daemon exited: %v\n%s", err, d.logs.String())
		default:
		}
		_, err := os.Stat(filepath.Join(data, "api.addr"))
		return err == nil
	}, "daemon %s not ready (no api.addr)", data)
	return d
}

// eventually polls cond until it holds, failing the test with the message
// (a format and its arguments) when timeout passes first.
func eventually(t testing.TB, timeout time.Duration, cond func() bool, format string, args ...any) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("after %s: "+format, append([]any{timeout}, args...)...)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (d *peerDaemon) kill() {
	d.cmd.Process.Signal(syscall.SIGKILL)
	<-d.done
}

func (d *peerDaemon) status(t *testing.T) api.Status {
	t.Helper()
	var s api.Status
	if err := json.Unmarshal([]byte(mustHoard(t, d.data, nil, "status", "--json")), &s); err != nil {
		t.Fatal(err)
	}
	return s
}

func (d *peerDaemon) uri(name string) string { return "nbd+unix:///" + name + "?socket=" + d.sock }

func tail(s string, n int) string {
	lines := strings.Split(s, "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// TestClusterOfDaemons: three daemons on loopback share one swarm key. An
// image added on the first is resolved by name and served over NBD by the
// second, which never saw it; the third reads it while the first is killed
// mid-read and still gets every byte; a daemon with another key cannot.
func TestClusterOfDaemons(t *testing.T) {
	t.Parallel()
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Skip("qemu-img not installed (apt-get install qemu-utils)")
	}
	dir := t.TempDir()
	src := filepath.Join(dir, "disk.raw")
	os.WriteFile(src, imageBytes(9, 24<<20), 0o600)
	dataA, dataB, dataC, dataX := t.TempDir(), t.TempDir(), t.TempDir(), t.TempDir()
	mustHoard(t, dataA, nil, "cluster", "keygen")
	key, _ := os.ReadFile(filepath.Join(dataA, "swarm.key"))
	for _, d := range []string{dataB, dataC} {
		os.WriteFile(filepath.Join(d, "swarm.key"), key, 0o600)
	}
	mustHoard(t, dataX, nil, "cluster", "keygen") // another cluster's key

	a := startPeerDaemon(t, dataA, nil, "--p2p-upload-limit", "6MiB")
	sa := a.status(t)
	if sa.Cluster == nil || len(sa.Cluster.Addrs) == 0 || !strings.HasSuffix(sa.Cluster.Addrs[0], "/p2p/"+sa.Cluster.PeerID) ||
		!strings.HasPrefix(sa.Cluster.Addrs[0], "/ip4/127.0.0.1/tcp/") {
		t.Fatalf("status --json of a cluster node: %+v; want its peer ID and /ip4/127.0.0.1/tcp/PORT/p2p/ID addrs", sa.Cluster)
	}
	boot := sa.Cluster.Addrs[0]
	if !strings.Contains(a.logs.String(), boot) {
		t.Errorf("the daemon did not log its dialable address %s at start", boot)
	}
	mustHoard(t, dataA, nil, "image", "add", src, "--name", "deb")

	b := startPeerDaemon(t, dataB, nil, "--p2p-bootstrap", boot, "--p2p-upload-limit", "6MiB")
	waitPeers(t, b, 1)
	// B never saw "deb": NBD open resolves it through the cluster.
	if out, err := exec.Command("qemu-img", "compare", "-f", "raw", "-F", "raw", src, b.uri("deb")).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img compare on the node that never saw the image: %v\n%s", err, out)
	}
	sb := b.status(t)
	if sb.Counters.ReadBytes["peer"] == 0 || sb.Counters.OriginBytes != 0 {
		t.Errorf("node B read %d bytes from peers and %d from the origin; want all from peers", sb.Counters.ReadBytes["peer"], sb.Counters.OriginBytes)
	}
	var peers []p2p.PeerInfo
	if err := json.Unmarshal([]byte(mustHoard(t, dataB, nil, "peers", "--json")), &peers); err != nil || len(peers) == 0 {
		t.Errorf("hoard peers --json on B: %v %v", peers, err)
	}

	// C reads while A (which B and C both fetch from) dies.
	// Configured through the environment twins of the flags.
	c := startPeerDaemon(t, dataC, []string{"HOARD_P2P_BOOTSTRAP=" + boot, "HOARD_P2P_UPLOAD_LIMIT=6MiB per second"})
	waitPeers(t, c, 2)
	mustHoard(t, dataC, nil, "image", "pull", "deb")
	cmp := exec.Command("qemu-img", "compare", "-f", "raw", "-F", "raw", src, c.uri("deb"))
	var cmpOut bytes.Buffer
	cmp.Stdout, cmp.Stderr = &cmpOut, &cmpOut
	if err := cmp.Start(); err != nil {
		t.Fatal(err)
	}
	cmpDone := make(chan error, 1)
	go func() { cmpDone <- cmp.Wait() }()
	// Kill A once C is reading from the peers, and not done.
	eventually(t, 20*time.Second, func() bool {
		select {
		case err := <-cmpDone:
			t.Fatalf("node C finished reading (%v) before the serving peer was killed: make the image larger or the upload limit lower", err)
		default:
		}
		return c.status(t).Counters.ReadBytes["peer"] > 0
	}, "node C read nothing from its peers")
	a.kill()
	if err := <-cmpDone; err != nil {
		t.Fatalf("qemu-img compare while the serving peer died: %v\n%s", err, cmpOut.String())
	}
	sc := c.status(t)
	t.Logf("node C: %d bytes from peers, %d from the origin", sc.Counters.ReadBytes["peer"], sc.Counters.OriginBytes)
	if sc.Counters.ReadBytes["peer"] == 0 {
		t.Error("node C read nothing from peers")
	}

	// A node with another swarm key cannot join, so cannot resolve or fetch.
	x := startPeerDaemon(t, dataX, nil, "--p2p-bootstrap", b.status(t).Cluster.Addrs[0])
	if out, err := exec.Command("qemu-img", "compare", "-f", "raw", "-F", "raw", src, x.uri("deb")).CombinedOutput(); err == nil {
		t.Fatalf("a node with another swarm key served the image:\n%s", out)
	}
	if sx := x.status(t); sx.Cluster.ConnectedPeers != 0 || sx.Counters.ReadBytes["peer"] != 0 {
		t.Errorf("node with another key: %d connected peers, %d bytes from peers; want none", sx.Cluster.ConnectedPeers, sx.Counters.ReadBytes["peer"])
	}
}

// waitPeers waits until d is connected to at least n peers.
func waitPeers(t *testing.T, d *peerDaemon, n int) {
	t.Helper()
	eventually(t, 20*time.Second, func() bool {
		s := d.status(t)
		return s.Cluster != nil && s.Cluster.ConnectedPeers >= n
	}, "daemon %s connected to fewer than %d peers", d.data, n)
}
