package node_test

import (
	"bufio"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/hoardvm/hoard/node"
)

func openFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skipf("cannot count fds: %v", err)
	}
	return len(ents)
}

// TestAPIIdleConnectionsBounded (issue 7, item 12): many keep-alive
// connections that sit idle after GET /healthz (no token needed) neither
// take more than APIMaxConns fds in the daemon nor stay open forever, and
// NBD keeps accepting. Not parallel: it counts the process's fds.
func TestAPIIdleConnectionsBounded(t *testing.T) {
	const clients, maxConns = 120, 16
	tn := startNode(t, node.Config{HotCache: -1, APIMaxConns: maxConns, APIIdleTimeout: 300 * time.Millisecond})
	before := openFDs(t)
	conns := make([]net.Conn, clients)
	for i := range conns {
		c, err := net.Dial("tcp", tn.APIAddr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if _, err := io.WriteString(c, "GET /healthz HTTP/1.1\r\nHost: hoard\r\n\r\n"); err != nil {
			t.Fatal(err)
		}
		conns[i] = c
	}
	// The daemon's side never holds more than maxConns of them.
	peak := 0
	for range 20 {
		peak = max(peak, openFDs(t)-before-clients)
		time.Sleep(20 * time.Millisecond)
	}
	if peak > maxConns+8 {
		t.Errorf("the daemon held %d more fds with %d idle API clients, want at most about %d (APIMaxConns)", peak, clients, maxConns)
	}
	// NBD still accepts meanwhile.
	nc, err := net.DialTimeout("unix", tn.NBDSocket(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	nc.SetReadDeadline(time.Now().Add(5 * time.Second))
	magic := make([]byte, 8)
	if _, err := io.ReadFull(nc, magic); err != nil || string(magic) != "NBDMAGIC" {
		t.Fatalf("NBD greeting while the API is busy: %q %v", magic, err)
	}
	nc.Close()
	// Every client is answered in turn, and then closed for idleness.
	for i, c := range conns {
		c.SetReadDeadline(time.Now().Add(20 * time.Second))
		br := bufio.NewReader(c)
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatalf("client %d: no answer: %v", i, err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("client %d: %s", i, resp.Status)
		}
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := br.ReadByte(); err == nil || errors.Is(err, os.ErrDeadlineExceeded) || strings.Contains(err.Error(), "timeout") {
			t.Fatalf("client %d: an idle keep-alive connection stays open: %v", i, err)
		}
	}
}
