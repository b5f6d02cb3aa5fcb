package origin_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/hoardvm/hoard/node/origin"
)

// TestFileRefusesFIFO (issue 7, item 14): a FIFO is refused at once, before
// any blocking open, with no thread or fd left behind; so is a symlink to one.
func TestFileRefusesFIFO(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	fifo := filepath.Join(dir, "pipe.raw")
	if err := syscall.Mkfifo(fifo, 0o644); err != nil {
		t.Skipf("mkfifo: %v", err)
	}
	link := filepath.Join(dir, "link.raw")
	if err := os.Symlink(fifo, link); err != nil {
		t.Fatal(err)
	}
	for _, ref := range []string{fifo, link, "file://" + fifo} {
		done := make(chan error, 1)
		go func() {
			src, err := origin.Open(context.Background(), ref, origin.Config{})
			if err == nil {
				src.Close()
			}
			done <- err
		}()
		select {
		case err := <-done:
			wantErr(t, err, nil, "not a regular file or block device")
		case <-time.After(5 * time.Second):
			// Unblock the stuck open so the test ends.
			if f, err := os.OpenFile(fifo, os.O_WRONLY|syscall.O_NONBLOCK, 0); err == nil {
				f.Close()
			}
			t.Fatalf("Open(%s) still blocked after 5s", ref)
		}
	}
	_, err := origin.Open(t.Context(), "/dev/null", origin.Config{})
	wantErr(t, err, nil, "not a regular file or block device")
}

// TestFileDenyPaths (issue 7, item 15): the daemon's data dir, its keys and
// kernel interfaces are refused, through symlinks and hard links too.
func TestFileDenyPaths(t *testing.T) {
	t.Parallel()
	data := t.TempDir()
	key := filepath.Join(data, "swarm.key")
	tok := filepath.Join(data, "api.token")
	for _, p := range []string{key, tok, filepath.Join(data, "identity.key")} {
		if err := os.WriteFile(p, []byte("secret"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	os.MkdirAll(filepath.Join(data, "store"), 0o700)
	os.WriteFile(filepath.Join(data, "store", "pack-1"), []byte("pack"), 0o600)
	outside := t.TempDir()
	extKey := filepath.Join(outside, "ext-swarm.key") // a swarm key outside the data dir
	os.WriteFile(extKey, []byte("secret"), 0o600)
	linkDir := t.TempDir()
	symlink := filepath.Join(linkDir, "innocent.raw")
	os.Symlink(key, symlink)
	hardlink := filepath.Join(outside, "hard.raw")
	if err := os.Link(tok, hardlink); err != nil {
		t.Fatal(err)
	}
	dirLink := filepath.Join(linkDir, "d")
	os.Symlink(data, dirLink)
	cfg := origin.Config{DenyPaths: []string{data, extKey, key, tok}} // as node.Config sets it
	for _, ref := range []string{
		key, tok, filepath.Join(data, "identity.key"), filepath.Join(data, "store", "pack-1"), extKey,
		symlink, hardlink, filepath.Join(dirLink, "swarm.key"), "file://" + key,
		"/proc/self/environ", "/proc/self/root" + key, "/sys/kernel/notes",
	} {
		src, err := origin.Open(t.Context(), ref, cfg)
		if err == nil {
			src.Close()
			t.Errorf("Open(%s) succeeded, want refused", ref)
			continue
		}
		if !errors.Is(err, origin.ErrForbidden) {
			t.Errorf("Open(%s): %v, want ErrForbidden", ref, err)
		}
	}
	// An image next to (not in) the data dir is fine.
	img := filepath.Join(outside, "ok.raw")
	os.WriteFile(img, []byte("image"), 0o644)
	open(t, img, cfg).Close()
	os.WriteFile(data+"-sibling.raw", []byte("image"), 0o644)
	open(t, data+"-sibling.raw", cfg).Close()
}
