package node

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/hoardvm/hoard/node/importer"
	"github.com/hoardvm/hoard/node/internal/testutil"

	"github.com/hoardvm/hoard/chunkstore"
	"github.com/hoardvm/hoard/node/origin"
)

// openFDs counts this process's open file descriptors on path.
func openFDs(t *testing.T, path string) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skipf("cannot list open files: %v", err)
	}
	k := 0
	for _, e := range ents {
		if p, err := os.Readlink(filepath.Join("/proc/self/fd", e.Name())); err == nil && p == path {
			k++
		}
	}
	return k
}

// TestIdleImagesForgotten (issue 7, item 11): the node forgets an image that
// has no open export once it is idle, closing its origin source, while an
// image with an open export stays loaded with its source; a forgotten image
// is loaded again when it is opened again. Node.images used to keep every
// image ever read, and its origin file or connection, until the daemon
// stopped.
func TestIdleImagesForgotten(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	n, err := New(Config{DataDir: dir, NBDSocket: "-", APIListen: "127.0.0.1:0", HotCache: -1, MemCache: -1, Readahead: -1, NoProfilePrefetch: true}, nil)
	if err != nil {
		t.Fatal(err)
	}
	n.imageIdle = 50 * time.Millisecond
	ctx, cancel := context.WithCancel(context.Background())
	ran := make(chan error, 1)
	go func() { ran <- n.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-ran:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(20 * time.Second):
			t.Error("Run still running 20 s after cancel")
		}
	})
	select {
	case <-n.Ready():
	case err := <-ran:
		t.Fatalf("Run: %v", err)
	case <-time.After(10 * time.Second):
		t.Fatal("node not ready after 10 s")
	}
	data := map[string][]byte{}
	paths := map[string]string{}
	for i, name := range []string{"a", "b"} {
		data[name] = testutil.Image(uint64(20+i), 1<<20)
		p := filepath.Join(t.TempDir(), name+".raw")
		if err := os.WriteFile(p, data[name], 0o600); err != nil {
			t.Fatal(err)
		}
		if p, err = filepath.EvalSymlinks(p); err != nil {
			t.Fatal(err)
		}
		paths[name] = p
		src, err := origin.Open(ctx, p, origin.Config{})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := importer.Import(ctx, n.Store(), src, importer.Options{Name: name, Lazy: true}); err != nil {
			t.Fatal(err)
		}
		src.Close()
	}
	// read reads image name through an export, from its origin (lazy).
	read := func(name string) *export {
		t.Helper()
		x, err := n.Open(ctx, name)
		if err != nil {
			t.Fatal(err)
		}
		p := make([]byte, 256<<10)
		if err := x.ReadAt(ctx, p, 0); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(p, data[name][:len(p)]) {
			t.Fatalf("image %s: wrong bytes", name)
		}
		return x.(*export)
	}
	loaded := func(id chunkstore.ID) bool {
		n.mu.Lock()
		defer n.mu.Unlock()
		return n.images[id] != nil
	}

	xa := read("a")
	ida := xa.img.id
	xa.Close()
	xb := read("b")
	defer func() { xb.Close() }()
	if openFDs(t, paths["b"]) == 0 {
		t.Fatal("image b's origin file is not open while it is read: the test sees nothing")
	}
	eventually(t, 10*time.Second, func() bool { return !loaded(ida) && openFDs(t, paths["a"]) == 0 },
		"image a, without an open export, still loaded or its origin file still open")
	if !loaded(xb.img.id) || openFDs(t, paths["b"]) == 0 {
		t.Fatal("image b, whose export is open, was forgotten or its origin closed")
	}
	// Forgotten is not lost: open it again.
	read("a").Close()
	xb.Close()
	idb := xb.img.id
	eventually(t, 10*time.Second, func() bool { return !loaded(idb) && !loaded(ida) && openFDs(t, paths["b"]) == 0 },
		"idle images still loaded or their origin files open")
}

// eventually polls cond until it holds, failing the test with the message
// (a format and its arguments) when timeout passes first.
func eventually(t testing.TB, timeout time.Duration, cond func() bool, format string, args ...any) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("after %s: "+format, append([]any{timeout}, args...)...)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
