package origin_test

import (
	"bytes"
	"crypto/md5"
	"crypto/sha512"
	"encoding/hex"
	"fmt"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/hoardvm/hoard/node/origin"
	"github.com/hoardvm/hoard/node/origin/glancetest"
)

// fakeGlance serves one image record and its data, checking the auth headers.
func fakeGlance(t *testing.T, record string, data []byte) string {
	t.Helper()
	srv, _ := newServer(t, func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("X-Auth-Token") != "secret" || r.Header.Get("X-Extra") != "yes" {
			http.Error(w, "who are you", http.StatusUnauthorized)
			return
		}
		switch r.URL.Path {
		case "/v2/images/img-1":
			w.Header().Set("Content-Type", "application/json")
			fmt.Fprint(w, record)
		case "/v2/images/img-1/file":
			serveData(data)(w, r)
		default:
			http.NotFound(w, r)
		}
	})
	return srv.URL
}

func TestGlanceFake(t *testing.T) {
	t.Parallel()
	data := randomData(t, 300_000)
	m5 := md5.Sum(data)
	cfg := func(url, token string) origin.Config {
		c := fastCfg()
		c.GlanceURL, c.GlanceToken, c.GlanceHeaders = url, token, map[string]string{"X-Extra": "yes"}
		return c
	}

	t.Run("md5 only, qcow2, endpoint with /v2/", func(t *testing.T) {
		t.Parallel()
		url := fakeGlance(t, fmt.Sprintf(`{"id":"img-1","status":"active","size":%d,"checksum":"%x","disk_format":"qcow2"}`, len(data), m5), data)
		src := open(t, "glance://img-1", cfg(url+"/v2/", "secret"))
		if got, want := src.Ref(), (origin.Ref{Kind: "glance", Location: "img-1", Checksum: fmt.Sprintf("md5:%x", m5)}); got != want {
			t.Fatalf("Ref = %+v, want %+v", got, want)
		}
		if f, ok := src.(origin.Formatter); !ok || f.Format() != "qcow2" {
			t.Fatalf("Format: want qcow2")
		}
		got, err := readAll(t, src)
		if err != nil || !bytes.Equal(got, data) {
			t.Fatalf("Stream: %d bytes, %v", len(got), err)
		}
	})
	t.Run("not active", func(t *testing.T) {
		t.Parallel()
		url := fakeGlance(t, `{"id":"img-1","status":"saving","size":null}`, data)
		_, err := origin.Open(t.Context(), "glance://img-1", cfg(url, "secret"))
		wantErr(t, err, origin.ErrUnavailable, `"saving", not active yet`, "wait until its upload finishes")
	})
	t.Run("killed", func(t *testing.T) {
		t.Parallel()
		url := fakeGlance(t, `{"id":"img-1","status":"killed"}`, data)
		_, err := origin.Open(t.Context(), "glance://img-1", cfg(url, "secret"))
		wantErr(t, err, origin.ErrNotFound, "killed", "upload it again")
	})
	t.Run("bad token", func(t *testing.T) {
		t.Parallel()
		url := fakeGlance(t, `{}`, data)
		_, err := origin.Open(t.Context(), "glance://img-1", cfg(url, "wrong"))
		wantErr(t, err, origin.ErrDenied, "HTTP 401", "origin.glance.token")
	})
	t.Run("checksum mismatch", func(t *testing.T) {
		t.Parallel()
		url := fakeGlance(t, fmt.Sprintf(`{"id":"img-1","status":"active","size":%d,"os_hash_algo":"sha512","os_hash_value":"%s","checksum":"%x"}`,
			len(data), strings.Repeat("ab", 64), m5), data)
		src := open(t, "glance://img-1", cfg(url, "secret"))
		if !strings.HasPrefix(src.Ref().Checksum, "sha512:abab") {
			t.Fatalf("Ref.Checksum = %q, want the sha512 one", src.Ref().Checksum)
		}
		_, err := readAll(t, src)
		wantErr(t, err, origin.ErrChecksum)
	})
	t.Run("bad id", func(t *testing.T) {
		t.Parallel()
		_, err := origin.Open(t.Context(), "glance://a/b", cfg("http://127.0.0.1:1", ""))
		wantErr(t, err, nil, "want glance://<image-id>")
	})
}

// TestMain stops the Glance that glancetest.Shared started, once all tests ran.
func TestMain(m *testing.M) {
	code := m.Run()
	glancetest.StopShared()
	os.Exit(code)
}

// TestGlanceReal runs against Debian's glance-api without keystone.
func TestGlanceReal(t *testing.T) {
	t.Parallel()
	g := glancetest.Shared(t)
	cfg := origin.Config{GlanceURL: g.URL(), GlanceHeaders: g.Headers(), Retries: 2, RetryBase: 50 * time.Millisecond}

	data := randomData(t, 5<<20+4321)
	sum := sha512.Sum512(data)
	id := g.Upload(t, "hoard-test-raw", "raw", data)
	qid := g.Upload(t, "hoard-test-qcow2", "qcow2", data[:1<<20])

	t.Run("open, read ranges, stream", func(t *testing.T) {
		t.Parallel()
		src := open(t, "glance://"+id, cfg)
		if src.Size() != int64(len(data)) {
			t.Fatalf("Size = %d, want %d", src.Size(), len(data))
		}
		want := origin.Ref{Kind: "glance", Location: id, Checksum: "sha512:" + hex.EncodeToString(sum[:])}
		if got := src.Ref(); got != want {
			t.Fatalf("Ref = %+v, want %+v", got, want)
		}
		if f, ok := src.(origin.Formatter); !ok || f.Format() != "raw" {
			t.Fatalf("Format: want raw")
		}
		checkRandomReads(t, src, data, 40)
		got, err := readAll(t, src)
		if err != nil || !bytes.Equal(got, data) {
			t.Fatalf("Stream: %d bytes, %v", len(got), err)
		}
	})
	t.Run("disk format", func(t *testing.T) {
		t.Parallel()
		src := open(t, "glance://"+qid, cfg)
		if f := src.(origin.Formatter).Format(); f != "qcow2" || src.Size() != 1<<20 {
			t.Fatalf("Format = %q, Size = %d; want qcow2, %d", f, src.Size(), 1<<20)
		}
	})
	t.Run("unknown id", func(t *testing.T) {
		t.Parallel()
		_, err := origin.Open(t.Context(), "glance://00000000-0000-0000-0000-000000000000", cfg)
		wantErr(t, err, origin.ErrNotFound, "HTTP 404", `glance image "00000000-0000-0000-0000-000000000000" does not exist`, "openstack image list")
	})
}
