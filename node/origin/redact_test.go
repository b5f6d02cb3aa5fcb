package origin_test

import (
	"bytes"
	"errors"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hoardvm/hoard/node/origin"
)

func TestRedact(t *testing.T) {
	t.Parallel()
	for in, want := range map[string]string{
		"http://user:pass@host/x?X-Amz-Signature=abc&X-Amz-Credential=k": "http://REDACTED@host/x?REDACTED",
		"https://host:8443/a/b.raw?sig=1#sha256=ab":                      "https://host:8443/a/b.raw?REDACTED#sha256=ab",
		"https://token@host/x":                                           "https://REDACTED@host/x",
		"HTTPS://host/x":                                                 "https://host/x",
		"https://host/x":                                                 "https://host/x",
		"https://u:p@ho st/x?s=1":                                        "https://REDACTED@ho st/x?REDACTED",
		"/var/images/a.raw":                                              "/var/images/a.raw",
		"glance://1234":                                                  "glance://1234",
	} {
		if got := origin.Redact(in); got != want {
			t.Errorf("Redact(%q) = %q, want %q", in, got, want)
		}
	}
}

// TestHTTPSecretsStayOut (issue 7, item 16): a URL's userinfo and query
// reach the origin, but not Ref (the manifest), error messages or logs;
// the redacted Ref reopens the origin through the local Credentials.
func TestHTTPSecretsStayOut(t *testing.T) {
	t.Parallel()
	data := randomData(t, 300_000)
	const pass, sig = "hunter2", "X-Amz-Signature=deadbeefcafe"
	fail := false
	srv, _ := newServer(t, func(w http.ResponseWriter, r *http.Request) {
		if u, p, ok := r.BasicAuth(); !ok || u != "alice" || p != pass || r.URL.RawQuery != sig {
			http.Error(w, "no", http.StatusForbidden)
			return
		}
		if r.URL.Path != "/img.raw" || fail && r.Method == http.MethodGet {
			http.Error(w, "gone", http.StatusNotFound)
			return
		}
		serveData(data)(w, r)
	})
	full := strings.Replace(srv.URL, "http://", "http://alice:"+pass+"@", 1) + "/img.raw?" + sig
	var logs bytes.Buffer
	cfg := fastCfg()
	cfg.Log = slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	credFile := filepath.Join(t.TempDir(), "creds.json")
	cfg.Credentials = origin.NewCredentials(credFile)
	secret := func(what, s string) {
		t.Helper()
		if strings.Contains(s, pass) || strings.Contains(s, "deadbeef") || strings.Contains(s, "alice") {
			t.Errorf("%s leaks a secret: %s", what, s)
		}
	}

	src := open(t, full, cfg)
	ref := src.Ref()
	secret("Ref", ref.Location)
	if want := origin.Redact(full); ref.Location != want {
		t.Errorf("Ref.Location %q, want %q", ref.Location, want)
	}
	checkRandomReads(t, src, data, 5)
	fail = true
	err := src.ReadAt(t.Context(), make([]byte, 100), 1000)
	if !errors.Is(err, origin.ErrNotFound) {
		t.Fatalf("read of a vanished image: %v", err)
	}
	secret("ReadAt error", err.Error())
	_, err = readAll(t, src)
	secret("Stream error", err.Error())
	fail = false

	// The redacted reference, as a manifest has it, opens the same origin
	// from the local record only.
	if fi, err := os.Stat(credFile); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("credentials file: %v %v", fi, err)
	}
	again := open(t, ref.Location, cfg)
	checkRandomReads(t, again, data, 5)
	noCreds := fastCfg()
	noCreds.Credentials = origin.NewCredentials(filepath.Join(t.TempDir(), "none.json"))
	_, err = origin.Open(t.Context(), ref.Location, noCreds)
	wantErr(t, err, origin.ErrDenied, "credentials are not recorded", "add the image on this node")

	// Open errors name the URL redacted too.
	bad := strings.Replace(full, "/img.raw", "/nope.raw", 1)
	_, err = origin.Open(t.Context(), bad, cfg)
	if err == nil {
		t.Fatal("open of a missing image succeeded")
	}
	secret("Open error", err.Error())
	_, err = origin.Open(t.Context(), "ftp://alice:"+pass+"@host/x?"+sig, cfg)
	secret("unknown scheme error", err.Error())
	secret("log", logs.String())
	if !strings.Contains(logs.String(), "REDACTED") {
		t.Errorf("log does not show the redacted URL:\n%s", logs.String())
	}
}

// TestBlockLoopback (issue 7, item 15): with BlockLoopback, an origin at a
// loopback address is refused (by name, by literal, through a redirect).
func TestBlockLoopback(t *testing.T) {
	t.Parallel()
	data := randomData(t, 1000)
	srv, _ := newServer(t, serveData(data))
	cfg := fastCfg()
	cfg.BlockLoopback = true
	for _, ref := range []string{srv.URL + "/a.raw", strings.Replace(srv.URL, "127.0.0.1", "localhost", 1) + "/a.raw", "http://[::1]:1/a.raw", "http://169.254.169.254/latest/meta-data"} {
		_, err := origin.Open(t.Context(), ref, cfg)
		wantErr(t, err, origin.ErrForbidden, "loopback or link-local", "origin.allow_loopback")
	}
	open(t, srv.URL+"/a.raw", fastCfg()).Close() // allowed without the flag
}
