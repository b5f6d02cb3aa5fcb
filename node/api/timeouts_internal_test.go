package api

import (
	"io"
	"net"
	"net/http"
	"testing"
	"time"
)

// TestLongRoutesOutliveServerTimeouts (issue 7, item 12): the API server's
// read and write timeouts bound ordinary requests, but a long route (an
// import) keeps its context and delivers its answer past them.
func TestLongRoutesOutliveServerTimeouts(t *testing.T) {
	t.Parallel()
	slow := func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-time.After(800 * time.Millisecond):
		case <-r.Context().Done():
			return
		}
		w.Write([]byte("done"))
	}
	mux := http.NewServeMux()
	mux.HandleFunc("POST /long", long(slow))
	mux.HandleFunc("POST /short", slow)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hs := &http.Server{Handler: mux, ReadTimeout: 200 * time.Millisecond, WriteTimeout: 200 * time.Millisecond}
	go hs.Serve(ln)
	t.Cleanup(func() { hs.Close() })
	post := func(path string) (string, error) {
		c := &http.Client{Timeout: 10 * time.Second}
		resp, err := c.Post("http://"+ln.Addr().String()+path, "application/json", nil)
		if err != nil {
			return "", err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		return string(b), err
	}
	if body, err := post("/long"); err != nil || body != "done" {
		t.Errorf("long route past the server timeouts: %q %v, want done", body, err)
	}
	if body, err := post("/short"); err == nil && body == "done" {
		t.Errorf("an ordinary route outlived the write timeout; the test does not test anything")
	}
}
