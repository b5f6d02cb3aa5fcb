package node_test

import (
	"context"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hoardvm/hoard/node"
	"github.com/hoardvm/hoard/node/api"
)

// runNode runs a node on cfg until stop is called (or the test ends).
func runNode(t *testing.T, cfg node.Config) (n *node.Node, stop func()) {
	t.Helper()
	return runNodeLog(t, cfg, nil)
}

// runNodeLog is runNode with a logger.
func runNodeLog(t *testing.T, cfg node.Config, log *slog.Logger) (n *node.Node, stop func()) {
	t.Helper()
	n, err := node.New(cfg, log)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- n.Run(ctx) }()
	stopped := false
	stop = func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	}
	t.Cleanup(stop)
	select {
	case <-n.Ready():
	case err := <-done:
		t.Fatalf("Run: %v", err)
	case <-time.After(10 * time.Second):
		t.Fatal("node not ready after 10s")
	}
	return n, stop
}

func apiRequest(t *testing.T, n *node.Node, method, path, token string) (int, string) {
	t.Helper()
	req, err := http.NewRequestWithContext(t.Context(), method, "http://"+n.APIAddr().String()+path, strings.NewReader("{}"))
	if err != nil {
		t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// TestAPITokenByDefault (issue 7, items 15 and 18): with the default config
// the daemon makes a 0600 token file on first start and reuses it; every
// route but /healthz, /readyz and /metrics, /debug/pprof included, answers
// 401 without it (or with a wrong one) and says where the token is.
func TestAPITokenByDefault(t *testing.T) {
	t.Parallel()
	sockDir, err := os.MkdirTemp("", "hoard-sock")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	cfg := node.Config{DataDir: t.TempDir(), NBDSocket: filepath.Join(sockDir, "nbd.sock"), APIListen: "127.0.0.1:0", HotCache: -1}
	n, stop := runNode(t, cfg)

	tokFile := filepath.Join(cfg.DataDir, node.APITokenFile)
	fi, err := os.Stat(tokFile)
	if err != nil {
		t.Fatalf("no token file after the first start: %v", err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("token file mode %s, want 0600", fi.Mode().Perm())
	}
	tok := n.APIToken()
	if got, err := node.ReadAPIToken(cfg.DataDir); err != nil || got != tok || len(tok) < 32 {
		t.Fatalf("ReadAPIToken = %q, %v; node token %q", got, err, tok)
	}

	patterns := node.RoutePatterns(n)
	if len(patterns) < 10 {
		t.Fatalf("only %d routes: %v", len(patterns), patterns)
	}
	sawPprof := false
	for _, p := range patterns {
		method, path, _ := strings.Cut(p, " ")
		path = strings.ReplaceAll(path, "{name}", "img")
		sawPprof = sawPprof || strings.HasPrefix(path, "/debug/pprof")
		if node.PublicRoute(p) {
			if code, body := apiRequest(t, n, method, path, ""); code == http.StatusUnauthorized {
				t.Errorf("%s without a token: 401 (%s), want it public", p, body)
			}
			continue
		}
		for _, bad := range []string{"", "wrong", tok + "x"} {
			code, body := apiRequest(t, n, method, path, bad)
			if code != http.StatusUnauthorized || !strings.Contains(body, tokFile) {
				t.Errorf("%s with token %q: %d %s; want 401 naming %s", p, bad, code, body, tokFile)
			}
		}
	}
	if !sawPprof {
		t.Errorf("no /debug/pprof route in %v", patterns)
	}
	// Unknown paths are no way around it either.
	if code, _ := apiRequest(t, n, "GET", "/v1/nope", ""); code != http.StatusUnauthorized {
		t.Errorf("unknown path without a token: %d, want 401", code)
	}
	for _, path := range []string{"/v1/status", "/v1/images", "/debug/pprof/"} {
		if code, body := apiRequest(t, n, "GET", path, tok); code != http.StatusOK {
			t.Errorf("GET %s with the token: %d %s", path, code, body)
		}
	}

	// A restart reuses the token.
	stop()
	n2, _ := runNode(t, cfg)
	if n2.APIToken() != tok {
		t.Errorf("token after restart %q, want %q", n2.APIToken(), tok)
	}
}

// TestAPITokenConfigured: api.token overrides the file, and no file is made.
func TestAPITokenConfigured(t *testing.T) {
	t.Parallel()
	sockDir, err := os.MkdirTemp("", "hoard-sock")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	cfg := node.Config{DataDir: t.TempDir(), NBDSocket: filepath.Join(sockDir, "nbd.sock"), APIListen: "127.0.0.1:0", HotCache: -1, APIToken: "s3cret"}
	n, _ := runNode(t, cfg)
	if _, err := os.Stat(filepath.Join(cfg.DataDir, node.APITokenFile)); err == nil {
		t.Error("a token file was made although api.token is set")
	}
	if code, body := apiRequest(t, n, "GET", "/v1/status", ""); code != http.StatusUnauthorized || !strings.Contains(body, "HOARD_API_TOKEN") {
		t.Errorf("without a token: %d %s", code, body)
	}
	if code, body := apiRequest(t, n, "GET", "/v1/status", "s3cret"); code != http.StatusOK {
		t.Errorf("with the token: %d %s", code, body)
	}
}

// TestImportRefusesOwnFiles (issue 7, item 15): even with the token, the
// daemon never imports its data dir, its keys or kernel interfaces.
func TestImportRefusesOwnFiles(t *testing.T) {
	t.Parallel()
	tn := startNode(t, node.Config{HotCache: -1})
	key := filepath.Join(tn.dir, "swarm.key")
	os.WriteFile(key, []byte("not really a key"), 0o600)
	link := filepath.Join(t.TempDir(), "disk.raw")
	os.Symlink(filepath.Join(tn.dir, node.APITokenFile), link)
	// A hard link (from outside the data dir) to the origin credentials.
	creds := filepath.Join(tn.dir, node.OriginCredentialsFile)
	os.WriteFile(creds, []byte(`{"http://h/x":"http://u:secret@h/x"}`), 0o600)
	credLink := filepath.Join(t.TempDir(), "creds.raw")
	if err := os.Link(creds, credLink); err != nil {
		t.Fatal(err)
	}
	for _, src := range []string{
		filepath.Join(tn.dir, node.APITokenFile), key, link, filepath.Join(tn.dir, "store"), credLink,
		"/proc/self/environ", "/proc/self/root" + key, "/sys/kernel/notes",
	} {
		for _, lazy := range []bool{false, true} {
			_, err := tn.client.AddImage(t.Context(), api.ImportRequest{Source: src, Name: "stolen", Lazy: lazy})
			if err == nil || !strings.Contains(err.Error(), "hoard never exports it") && !strings.Contains(err.Error(), "holds no images") &&
				!strings.Contains(err.Error(), "directory") {
				t.Errorf("import %s (lazy %v): %v, want refused", src, lazy, err)
			}
		}
	}
	if imgs, err := tn.client.Images(t.Context()); err != nil || len(imgs) != 0 {
		t.Errorf("images after refused imports: %v %v", imgs, err)
	}
}
