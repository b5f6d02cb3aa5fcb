package importer

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hoardvm/hoard/node/internal/testutil"

	"github.com/hoardvm/hoard/chunkstore"
	"github.com/hoardvm/hoard/node/origin"
)

func openStore(t *testing.T, dir string) *chunkstore.Store {
	t.Helper()
	st, err := chunkstore.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return st
}

// readBack rebuilds an image from the store through its manifest.
func readBack(t *testing.T, st *chunkstore.Store, id chunkstore.ID) []byte {
	t.Helper()
	m, err := st.GetManifest(t.Context(), id)
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	for _, e := range m.Entries {
		if e.Zero {
			out.Write(make([]byte, e.Length))
			continue
		}
		b, err := st.Get(t.Context(), e.ID)
		if err != nil {
			t.Fatal(err)
		}
		out.Write(b)
	}
	return out.Bytes()
}

func writeFile(t *testing.T, data []byte) string {
	p := filepath.Join(t.TempDir(), "image.raw")
	if err := os.WriteFile(p, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestImportFileRoundTripAndDedup(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	st := openStore(t, t.TempDir())
	img := testutil.Image(1, 8<<20)
	for _, ck := range []chunkstore.Chunking{chunkstore.DefaultCDC, chunkstore.Fixed64K} {
		src, err := origin.Open(ctx, writeFile(t, img), origin.Config{})
		if err != nil {
			t.Fatal(err)
		}
		res, err := Import(ctx, st, src, Options{Name: "a-" + ck.Kind, Chunking: ck, Pin: true})
		if err != nil {
			t.Fatal(err)
		}
		if got := readBack(t, st, res.Manifest); !bytes.Equal(got, img) {
			t.Fatalf("%s: image read back differs", ck.Kind)
		}
		if res.Size != int64(len(img)) || res.NonZeroBytes >= res.Size || res.NewChunks == 0 {
			t.Fatalf("%s: result %+v", ck.Kind, res)
		}
	}
	// A second image sharing most content: only the changed chunks are new.
	before := st.Usage()
	img2 := bytes.Clone(img)
	copy(img2[3<<20:], bytes.Repeat([]byte("patched!"), 1024)) // 8 KiB changed
	img2 = append([]byte("a 22-byte insertion..."), img2...)
	src, _ := origin.Open(ctx, writeFile(t, img2), origin.Config{})
	res, err := Import(ctx, st, src, Options{Name: "b"})
	if err != nil {
		t.Fatal(err)
	}
	grew := st.Usage().RawBytes - before.RawBytes
	if res.NewChunks > 6 || grew > 6*256<<10 {
		t.Fatalf("second image added %d chunks (%d raw bytes); want only the few around the changes", res.NewChunks, grew)
	}
	if got := readBack(t, st, res.Manifest); !bytes.Equal(got, img2) {
		t.Fatal("second image read back differs")
	}
	t.Logf("second image: %d new chunks, %d new raw bytes of %d non-zero", res.NewChunks, grew, res.NonZeroBytes)
}

// TestImportQcow2Detected: with --format raw, the qcow2 magic is recorded as
// the format and the bytes are kept as they are (see qcow2_test.go for auto).
func TestImportQcow2Detected(t *testing.T) {
	t.Parallel()
	img := append([]byte("QFI\xfb\x00\x00\x00\x03"), testutil.Image(2, 1<<20)...)
	st := openStore(t, t.TempDir())
	src, _ := origin.Open(t.Context(), writeFile(t, img), origin.Config{})
	res, err := Import(t.Context(), st, src, Options{Name: "q", Format: FormatRaw})
	if err != nil || res.Format != chunkstore.FormatQcow2 {
		t.Fatalf("format %q, err %v; want qcow2", res.Format, err)
	}
}

func TestImportLazyStoresNoChunks(t *testing.T) {
	t.Parallel()
	st := openStore(t, t.TempDir())
	src, _ := origin.Open(t.Context(), writeFile(t, testutil.Image(3, 2<<20)), origin.Config{})
	res, err := Import(t.Context(), st, src, Options{Name: "lazy", Lazy: true})
	if err != nil {
		t.Fatal(err)
	}
	if u := st.Usage(); u.Chunks != 0 || res.UniqueChunks == 0 {
		t.Fatalf("lazy import stored %d chunks (manifest has %d)", u.Chunks, res.UniqueChunks)
	}
	if _, err := st.Resolve(t.Context(), "lazy"); err != nil {
		t.Fatal(err)
	}
}

// assertNothingRegistered checks that a failed import left no image and no chunks.
func assertNothingRegistered(t *testing.T, st *chunkstore.Store) {
	t.Helper()
	names, _ := st.Names(t.Context())
	ms, _ := st.Manifests(t.Context())
	if len(names) != 0 || len(ms) != 0 {
		t.Fatalf("failed import registered %d names, %d manifests", len(names), len(ms))
	}
	if u := st.Usage(); u.Chunks != 0 {
		t.Fatalf("failed import left %d chunks behind", u.Chunks)
	}
	res, err := st.Verify(t.Context(), nil)
	if err != nil || len(res.Corrupt) != 0 {
		t.Fatalf("store inconsistent after failed import: %+v %v", res, err)
	}
}

func TestImportBadInput(t *testing.T) {
	t.Parallel()
	img := testutil.Image(4, 4<<20)
	sum := sha256.Sum256(img)
	for _, tc := range []struct {
		name    string
		handler http.HandlerFunc
		frag    string
		want    error
		wantMsg string
	}{
		{"404", func(w http.ResponseWriter, r *http.Request) { http.NotFound(w, r) }, "", origin.ErrNotFound, "404"},
		{"500", func(w http.ResponseWriter, r *http.Request) { http.Error(w, "boom", 500) }, "", origin.ErrUnavailable, "500"},
		{"short", func(w http.ResponseWriter, r *http.Request) {
			// Announces the full size but the body always ends early.
			w.Header().Set("Accept-Ranges", "bytes")
			if r.Method == http.MethodHead {
				w.Header().Set("Content-Length", fmt.Sprint(len(img)))
				return
			}
			start := 0
			if rg := r.Header.Get("Range"); rg != "" {
				fmt.Sscanf(rg, "bytes=%d-", &start)
				w.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", start, len(img)-1, len(img)))
				w.Header().Set("Content-Length", fmt.Sprint(len(img)-start))
				w.WriteHeader(http.StatusPartialContent)
			}
			end := min(len(img), 3<<20)
			if start < end {
				w.Write(img[start:end])
			}
		}, "", origin.ErrShort, "truncated"},
		{"checksum", func(w http.ResponseWriter, r *http.Request) {
			http.ServeContent(w, r, "x", time.Time{}, bytes.NewReader(img))
		}, "#sha256=" + strings.Repeat("0", 64), origin.ErrChecksum, "checksum"},
		{"reset", func(w http.ResponseWriter, r *http.Request) {
			// Every connection dies after 1 MiB: the origin resumes with Range
			// requests and the import succeeds.
			rs := &cutReader{r: bytes.NewReader(img), left: 1 << 20}
			http.ServeContent(w, r, "x", time.Time{}, rs)
		}, "#sha256=" + hex.EncodeToString(sum[:]), nil, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			srv := httptest.NewServer(tc.handler)
			defer srv.Close()
			st := openStore(t, t.TempDir())
			cfg := origin.Config{RetryBase: 1}
			src, err := origin.Open(t.Context(), srv.URL+"/image.raw"+tc.frag, cfg)
			if err == nil {
				var res *Result
				res, err = Import(t.Context(), st, src, Options{Name: "x"})
				if err == nil && tc.want == nil {
					if got := readBack(t, st, res.Manifest); !bytes.Equal(got, img) {
						t.Fatal("image differs after resumed download")
					}
					return
				}
			}
			if tc.want == nil {
				t.Fatalf("import failed: %v", err)
			}
			if !errors.Is(err, tc.want) || !strings.Contains(strings.ToLower(err.Error()), tc.wantMsg) {
				t.Fatalf("error %q: want %v mentioning %q", err, tc.want, tc.wantMsg)
			}
			t.Logf("as users see it: %v", err)
			assertNothingRegistered(t, st)
		})
	}
}

func TestImportMissingFile(t *testing.T) {
	t.Parallel()
	_, err := origin.Open(t.Context(), filepath.Join(t.TempDir(), "nope.raw"), origin.Config{})
	if !errors.Is(err, origin.ErrNotFound) || !strings.Contains(err.Error(), "check the path") {
		t.Fatalf("missing file: %v", err)
	}
}

// TestImportDiskFull fills a small tmpfs: the import fails naming the full
// disk, registers nothing, and the store stays consistent and usable.
func TestImportDiskFull(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", dir).CombinedOutput(); err != nil {
		t.Skipf("cannot mount a small tmpfs to fill (needs root): %v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", "-l", dir).Run() })
	st, err := chunkstore.Open(filepath.Join(dir, "store"), chunkstore.WithQuota(0))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	big := make([]byte, 48<<20)
	r := rand.New(rand.NewPCG(5, 5))
	for i := range big {
		big[i] = byte(r.Uint32())
	}
	src, _ := origin.Open(t.Context(), writeFile(t, big), origin.Config{})
	_, err = Import(t.Context(), st, src, Options{Name: "big"})
	if err == nil || !strings.Contains(err.Error(), "disk holding the data dir is full") {
		t.Fatalf("import onto a full disk: %v; want a message naming the full disk", err)
	}
	t.Logf("as users see it: %v", err)
	assertNothingRegistered(t, st)
	small := testutil.Image(6, 1<<20)
	src, _ = origin.Open(t.Context(), writeFile(t, small), origin.Config{})
	res, err := Import(t.Context(), st, src, Options{Name: "small"})
	if err != nil {
		t.Fatalf("store unusable after ENOSPC: %v", err)
	}
	if got := readBack(t, st, res.Manifest); !bytes.Equal(got, small) {
		t.Fatal("image differs")
	}
}

type cutReader struct {
	r    *bytes.Reader
	left int
}

func (c *cutReader) Read(p []byte) (int, error) {
	if c.left <= 0 {
		panic(http.ErrAbortHandler) // drop the connection mid-body
	}
	p = p[:min(len(p), c.left)]
	n, err := c.r.Read(p)
	c.left -= n
	return n, err
}

func (c *cutReader) Seek(off int64, whence int) (int64, error) { return c.r.Seek(off, whence) }

var _ io.ReadSeeker = (*cutReader)(nil)

// BenchmarkImportFile imports the image named by HOARD_BENCH_IMAGE (for
// instance the one scripts/bench-import.sh builds) into a fresh store per
// iteration, as `hoard image add` does; HOARD_BENCH_CODEC picks the codec.
// Profile it with -cpuprofile.
func BenchmarkImportFile(b *testing.B) {
	img := os.Getenv("HOARD_BENCH_IMAGE")
	if img == "" {
		b.Skip("set HOARD_BENCH_IMAGE to an image file (scripts/bench-import.sh builds one)")
	}
	fi, err := os.Stat(img)
	if err != nil {
		b.Fatal(err)
	}
	b.SetBytes(fi.Size())
	for b.Loop() {
		b.StopTimer()
		dir := b.TempDir()
		st, err := chunkstore.Open(filepath.Join(dir, "store"), chunkstore.WithCodec(os.Getenv("HOARD_BENCH_CODEC")))
		if err != nil {
			b.Fatal(err)
		}
		src, err := origin.Open(b.Context(), img, origin.Config{})
		if err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		if _, err := Import(b.Context(), st, src, Options{Name: "bench"}); err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		src.Close()
		st.Close()
		os.RemoveAll(dir)
		b.StartTimer()
	}
}

// TestImportRecurringChunksWrittenOnce: an image whose chunks recur across
// segments (several commits in flight) writes each distinct chunk once: the
// result counts exactly the distinct chunks and no dead bytes are left in the
// packs.
func TestImportRecurringChunksWrittenOnce(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	st := openStore(t, t.TempDir())
	const distinct, blocks = 300, 3 * segmentChunks
	pool := make([][]byte, distinct)
	r := rand.New(rand.NewPCG(8, 8))
	for i := range pool {
		pool[i] = make([]byte, 64<<10)
		for j := range pool[i] {
			pool[i][j] = byte(r.Uint32())
		}
	}
	img := make([]byte, 0, blocks*64<<10)
	for i := range blocks {
		img = append(img, pool[(i*7+i/distinct)%distinct]...)
	}
	src, err := origin.Open(ctx, writeFile(t, img), origin.Config{})
	if err != nil {
		t.Fatal(err)
	}
	res, err := Import(ctx, st, src, Options{Name: "recurring", Chunking: chunkstore.Fixed64K})
	if err != nil {
		t.Fatal(err)
	}
	u := st.Usage()
	if res.NewChunks != distinct || u.Chunks != distinct {
		t.Errorf("new chunks %d, store holds %d; want %d distinct", res.NewChunks, u.Chunks, distinct)
	}
	if u.DiskBytes != u.StoredBytes {
		t.Errorf("pack files hold %d bytes, %d of them live: chunks were written twice", u.DiskBytes, u.StoredBytes)
	}
	if got := readBack(t, st, res.Manifest); !bytes.Equal(got, img) {
		t.Fatal("image read back differs")
	}
}

// TestImportSlowCommitterNoDeadlock (issue 7, item 7): with 4-chunk segments
// and a committer slower than the workers, several segments complete while
// one commit runs. The import used to deadlock there (a worker sent the
// segment to the committer while holding the lock the committer needed
// next); it must finish, read back exactly, and commit every segment.
func TestImportSlowCommitterNoDeadlock(t *testing.T) {
	t.Parallel()
	st := openStore(t, t.TempDir())
	img := testutil.Image(11, 4<<20) // 64 fixed chunks: 16 segments of 4
	src, err := origin.Open(t.Context(), writeFile(t, img), origin.Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	var commits atomic.Int32
	type outcome struct {
		res *Result
		err error
	}
	done := make(chan outcome, 1)
	go func() {
		res, err := Import(t.Context(), st, src, Options{Name: "slow", Chunking: chunkstore.Fixed64K, Workers: 4,
			segmentChunks: 4,
			beforeCommit: func(int) error {
				commits.Add(1)
				time.Sleep(20 * time.Millisecond) // a slow fsync
				return nil
			}})
		done <- outcome{res, err}
	}()
	var o outcome
	select {
	case o = <-done:
	case <-time.After(30 * time.Second):
		t.Fatalf("import with a slow committer still running after 30 s (%d commits started): deadlocked", commits.Load())
	}
	if o.err != nil {
		t.Fatal(o.err)
	}
	if got := readBack(t, st, o.res.Manifest); !bytes.Equal(got, img) {
		t.Fatal("image read back differs")
	}
	if c := commits.Load(); c < 8 {
		t.Errorf("%d commits for 16 segments (some all zero); want one per segment with new chunks", c)
	}
}

// TestImportProgressAndResult: Progress is called with growing byte counts
// up to the size, from one goroutine, and the result adds up.
func TestImportProgressAndResult(t *testing.T) {
	t.Parallel()
	st := openStore(t, t.TempDir())
	img := testutil.Image(12, 6<<20)
	src, err := origin.Open(t.Context(), writeFile(t, img), origin.Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	var calls []int64 // no lock: Progress is called from one goroutine (-race checks)
	res, err := Import(t.Context(), st, src, Options{Name: "p", segmentChunks: 8, Progress: func(done, total int64) {
		if total != int64(len(img)) {
			t.Errorf("progress total %d, want %d", total, len(img))
		}
		calls = append(calls, done)
	}})
	if err != nil {
		t.Fatal(err)
	}
	if len(calls) == 0 || calls[len(calls)-1] != int64(len(img)) {
		t.Fatalf("progress calls %v; want the last at %d", calls, len(img))
	}
	for i := 1; i < len(calls); i++ {
		if calls[i] < calls[i-1] {
			t.Fatalf("progress went back: %v", calls)
		}
	}
	u := st.Usage()
	if res.Size != int64(len(img)) || res.NewChunks != int(u.Chunks) || res.UniqueChunks != int(u.Chunks) ||
		res.NewRawBytes != u.RawBytes || res.NewStoredBytes != u.StoredBytes || res.Chunks < res.UniqueChunks ||
		res.DedupRatio < 1 || res.CompressionRatio <= 1 || res.Format != chunkstore.FormatRaw {
		t.Fatalf("result %+v, store %+v", res, u)
	}
}

// TestImportCommitFails: when the commit of a segment fails after earlier
// ones were made durable, the import fails with that error, promptly, and
// leaves nothing behind: no image, no chunk, no pin.
func TestImportCommitFails(t *testing.T) {
	t.Parallel()
	st := openStore(t, t.TempDir())
	img := testutil.Image(13, 4<<20)
	src, err := origin.Open(t.Context(), writeFile(t, img), origin.Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	boom := errors.New("commit failed (test)")
	done := make(chan error, 1)
	go func() {
		_, err := Import(t.Context(), st, src, Options{Name: "f", Chunking: chunkstore.Fixed64K, segmentChunks: 4, Pin: true,
			beforeCommit: func(seg int) error {
				if seg == 3 {
					return boom
				}
				return nil
			}})
		done <- err
	}()
	select {
	case err = <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("import whose commit failed still running after 30 s")
	}
	if !errors.Is(err, boom) {
		t.Fatalf("import: %v; want the commit's error", err)
	}
	assertNothingRegistered(t, st)
}

// Concurrent imports of different images under one name: exactly one wins,
// the others fail with ErrExists, and no orphan manifest or pin is left.
func TestImportSameNameConcurrently(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	st := openStore(t, t.TempDir())
	const n = 4
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		src, err := origin.Open(ctx, writeFile(t, testutil.Image(uint64(100+i), 1<<20)), origin.Config{})
		if err != nil {
			t.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, errs[i] = Import(ctx, st, src, Options{Name: "same", Chunking: chunkstore.DefaultCDC, Pin: i%2 == 0})
		}()
	}
	wg.Wait()
	won := 0
	for i, err := range errs {
		switch {
		case err == nil:
			won++
		case !errors.Is(err, chunkstore.ErrExists):
			t.Fatalf("import %d: %v; want success or ErrExists", i, err)
		}
	}
	ms, err := st.Manifests(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if won != 1 || len(ms) != 1 {
		t.Fatalf("%d imports won and %d manifests stored; want 1 and 1", won, len(ms))
	}
}
