package node

import (
	"errors"
	"fmt"
	"net/http"
	"testing"

	"github.com/hoardvm/hoard/chunkstore"
	"github.com/hoardvm/hoard/node/api"
	"github.com/hoardvm/hoard/node/origin"
)

// TestErrStatus maps errors to HTTP statuses by kind (errors.Is on the
// sentinels, however deeply wrapped), never by the words of the message: an
// error that merely mentions "already exists" or "open export" is a 500.
func TestErrStatus(t *testing.T) {
	t.Parallel()
	_, relErr := (&Node{}).AddImage(t.Context(), api.ImportRequest{Source: "disk.img"}, nil)
	_, chunkErr := chunkstore.ParseChunking("rabin")
	openErr := func(ref string) error {
		_, err := origin.Open(t.Context(), ref, origin.Config{})
		if err == nil {
			t.Fatalf("origin.Open(%q) succeeded", ref)
		}
		return err
	}
	wrap := func(err error) error { return fmt.Errorf("api: %w", fmt.Errorf("image %q: %w", "x", err)) }
	for _, tc := range []struct {
		name string
		err  error
		want int
	}{
		{"not found", wrap(chunkstore.ErrNotFound), http.StatusNotFound},
		{"forbidden", wrap(origin.ErrForbidden), http.StatusForbidden},
		{"name taken", wrap(chunkstore.ErrExists), http.StatusConflict},
		{"image in use", wrap(api.ErrInUse), http.StatusConflict},
		{"no ranges", wrap(origin.ErrNoRanges), http.StatusBadRequest},
		{"invalid store input", wrap(chunkstore.ErrInvalid), http.StatusBadRequest},
		{"invalid request", wrap(api.ErrInvalid), http.StatusBadRequest},
		{"bad image name", wrap(chunkstore.ValidateName("bad/name")), http.StatusBadRequest},
		{"unknown chunking", chunkErr, http.StatusBadRequest},
		{"relative source", relErr, http.StatusBadRequest},
		{"unknown scheme", openErr("ftp://host/x.raw"), http.StatusBadRequest},
		{"a directory", openErr(t.TempDir()), http.StatusBadRequest},
		{"malformed URL", openErr("http://u:p@[::1/x"), http.StatusBadRequest},
		{"glance without Glance", openErr("glance://0c5c7a8e"), http.StatusBadRequest},
		// Words alone decide nothing.
		{"mentions already exists", errors.New("/var/lib/hoard/hot/x already exists"), http.StatusInternalServerError},
		{"mentions open export", errors.New(`open export "vm1": connection reset`), http.StatusInternalServerError},
		{"mentions invalid image name", errors.New("glance: invalid image name in record"), http.StatusInternalServerError},
		{"mentions absolute path", errors.New("mkdir: absolute path too long"), http.StatusInternalServerError},
		{"plain", errors.New("disk on fire"), http.StatusInternalServerError},
	} {
		if got := api.StatusOf(tc.err); got != tc.want {
			t.Errorf("%s: StatusOf(%q) = %d, want %d", tc.name, tc.err, got, tc.want)
		}
	}
}
