package node_test

import (
	"bytes"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hoardvm/hoard/node"
	"github.com/hoardvm/hoard/node/api"
)

// syncBuffer is a log sink safe for concurrent writes.
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

// TestOriginSecretsRedacted (issue 7, item 16): the userinfo and query of an
// origin URL reach the origin only: not /v1/images, the image detail, the
// manifest (which peers receive), NBD read errors or the log; lazy reads
// still work after a restart, from the local credentials file.
func TestOriginSecretsRedacted(t *testing.T) {
	t.Parallel()
	data := make([]byte, 1<<20)
	r := rand.New(rand.NewPCG(16, 7))
	for i := range data {
		data[i] = byte(r.Uint32())
	}
	const pass, sig = "hunter2", "X-Amz-Signature=deadbeefcafe"
	var fail atomic.Bool
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if u, p, ok := r.BasicAuth(); !ok || u != "alice" || p != pass || r.URL.RawQuery != sig {
			http.Error(w, "no", http.StatusForbidden)
			return
		}
		if fail.Load() && r.Method == http.MethodGet {
			http.Error(w, "gone", http.StatusNotFound)
			return
		}
		http.ServeContent(w, r, "d.raw", time.Time{}, bytes.NewReader(data))
	}))
	t.Cleanup(srv.Close)
	full := strings.Replace(srv.URL, "http://", "http://alice:"+pass+"@", 1) + "/d.raw?" + sig
	leaks := func(what, s string) {
		t.Helper()
		for _, secret := range []string{pass, "deadbeef", "alice"} {
			if strings.Contains(s, secret) {
				t.Errorf("%s leaks %q:\n%.2000s", what, secret, s)
			}
		}
	}

	sockDir, err := os.MkdirTemp("", "hoard-sock")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	cfg := node.Config{DataDir: t.TempDir(), NBDSocket: filepath.Join(sockDir, "nbd.sock"), APIListen: "127.0.0.1:0",
		HotCache: -1, MemCache: -1, Readahead: -1, NoProfilePrefetch: true, OriginTimeout: 5 * time.Second}
	var logs syncBuffer
	log := slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	n, stop := runNodeLog(t, cfg, log)
	cl := api.NewClient(n.APIAddr().String(), n.APIToken())
	res, err := cl.AddImage(t.Context(), api.ImportRequest{Source: full, Name: "secret", Lazy: true, Chunking: "fixed"})
	if err != nil {
		t.Fatal(err)
	}
	imgs, err := cl.Images(t.Context())
	if err != nil || len(imgs) != 1 {
		t.Fatalf("images: %v %v", imgs, err)
	}
	leaks("/v1/images", fmt.Sprintf("%+v", imgs))
	if !strings.Contains(imgs[0].Source, "REDACTED") {
		t.Errorf("/v1/images source %q, want the redacted URL", imgs[0].Source)
	}
	detail, err := cl.Image(t.Context(), "secret", true)
	if err != nil {
		t.Fatal(err)
	}
	leaks("/v1/images/secret", fmt.Sprintf("%+v", detail))
	m, err := n.Store().GetManifest(t.Context(), res.Manifest)
	if err != nil {
		t.Fatal(err)
	}
	leaks("the manifest", fmt.Sprintf("%+v", m.Source))

	read := func(n *node.Node, off int64) error {
		t.Helper()
		exp, err := n.Open(t.Context(), "secret")
		if err != nil {
			t.Fatal(err)
		}
		defer exp.Close()
		p := make([]byte, 4096)
		if err := exp.ReadAt(t.Context(), p, off); err != nil {
			return err
		}
		if !bytes.Equal(p, data[off:off+4096]) {
			t.Fatalf("read at %d: wrong bytes", off)
		}
		return nil
	}
	if err := read(n, 0); err != nil {
		t.Fatalf("lazy read: %v", err)
	}
	fail.Store(true)
	err = read(n, 256<<10)
	if err == nil {
		t.Fatal("read of an uncached chunk of a vanished origin succeeded")
	}
	leaks("the NBD read error", err.Error())
	fail.Store(false)
	stop()
	leaks("the log", logs.String())

	credFile := filepath.Join(cfg.DataDir, node.OriginCredentialsFile)
	if fi, err := os.Stat(credFile); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("credentials file %s: %v %v", credFile, fi, err)
	}
	n2, _ := runNode(t, cfg)
	if err := read(n2, 512<<10); err != nil {
		t.Fatalf("lazy read after a restart: %v", err)
	}
}
