package node_test

import (
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"

	"github.com/hoardvm/hoard/node"
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
