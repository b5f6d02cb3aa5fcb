package node_test

import (
	"context"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hoardvm/hoard/node"
	"github.com/hoardvm/hoard/p2p"
)

// TestLazyAddRefusedWithoutRanges: a lazy add from a server that ignores
// Range requests (python3 -m http.server) is refused at add time with the
// reason and what to do, instead of registering an image every read of
// which fails; the same source imports whole.
func TestLazyAddRefusedWithoutRanges(t *testing.T) {
	t.Parallel()
	data := make([]byte, 300_000)
	for i := range data {
		data[i] = byte(i * 7)
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", strconv.Itoa(len(data)))
		if r.Method != http.MethodHead {
			w.Write(data) // the whole image, whatever the Range header says
		}
	}))
	t.Cleanup(srv.Close)
	tn := startNode(t, node.Config{})
	_, err := tn.client.AddImage(t.Context(), node.ImportRequest{Source: srv.URL + "/disk.raw", Name: "lazy", Lazy: true})
	if err == nil {
		t.Fatal("lazy add from a server without Range support was accepted")
	}
	for _, want := range []string{"Range", "without --lazy"} {
		if !strings.Contains(err.Error(), want) {
			t.Fatalf("error %q does not mention %q", err, want)
		}
	}
	if imgs, err := tn.client.Images(t.Context()); err != nil || len(imgs) != 0 {
		t.Fatalf("images after the refused add: %+v, %v", imgs, err)
	}
	res := addImage(t, tn, node.ImportRequest{Source: srv.URL + "/disk.raw", Name: "whole"})
	if res.Size != int64(len(data)) {
		t.Fatalf("whole import: size %d, want %d", res.Size, len(data))
	}
}

// TestPullWithNoPeerSaysHowToJoin: a node with a swarm key but no peer (its
// key differs from the cluster's, or no p2p.bootstrap) says it is not in a
// cluster yet and how to join, instead of only that no peer knows the image.
func TestPullWithNoPeerSaysHowToJoin(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "swarm.key"), p2p.GenerateSwarmKey(), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := node.Config{DataDir: dir}
	cfg.P2P.Listen = []string{"/ip4/127.0.0.1/tcp/0"}
	tn := startNode(t, cfg)
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	_, err := tn.client.PullImage(ctx, "debian-12")
	if err == nil {
		t.Fatal("pull of an unknown image on a node without peers succeeded")
	}
	for _, want := range []string{"connected to no peer", "not in a cluster", "hoard cluster keygen", "p2p.bootstrap"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("pull error %q does not mention %q", err, want)
		}
	}
}
