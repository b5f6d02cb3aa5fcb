package hoarder

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/goleak"

	"github.com/hoardvm/hoard/chunkstore"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// spec is one manifest entry of a test image: a chunk named key of size
// bytes, or (key "") a zero run.
type spec struct {
	key  string
	size int64
}

func cid(key string) chunkstore.ID { return chunkstore.Sum([]byte("chunk:" + key)) }

// newImage builds an image whose entries are specs and whose working set is
// ws (entry indices).
func newImage(name string, boots int, entries []spec, ws []int) Image {
	m := &chunkstore.Manifest{Format: chunkstore.FormatRaw, Source: chunkstore.Source{Kind: "file", Location: name}}
	for _, s := range entries {
		e := chunkstore.Entry{Offset: m.Size, Length: s.size}
		if s.key == "" {
			e.Zero = true
		} else {
			e.ID = cid(s.key)
		}
		m.Entries = append(m.Entries, e)
		m.Size += s.size
	}
	return Image{ID: m.ID(), Manifest: m, WorkingSet: ws, Boots: boots}
}

// chunks returns n specs named prefix0.. of size bytes each.
func chunks(prefix string, n int, size int64) []spec {
	s := make([]spec, n)
	for i := range s {
		s[i] = spec{fmt.Sprintf("%s%d", prefix, i), size}
	}
	return s
}

func seq(n int) []int {
	s := make([]int, n)
	for i := range s {
		s[i] = i
	}
	return s
}

// fakeSource is an in-memory node: a local store, peers holding some chunks
// (the origin the rest), controllable Busy, slow and failing fetches.
type fakeSource struct {
	mu          sync.Mutex
	images      []Image
	local       map[chunkstore.ID]bool
	peers       map[chunkstore.ID]bool
	fail        map[chunkstore.ID]bool
	fetches     map[chunkstore.ID]int
	order       []chunkstore.ID // fetched, in completion order
	imgErr      error
	delay       time.Duration
	ratio       float64
	busy        atomic.Bool
	busyHits    atomic.Int64 // Busy calls
	busyFetches atomic.Int64 // fetches started while Busy was true
	busyLeft    atomic.Int64 // Busy is true for this many more calls
	inflight    atomic.Int64
	maxIn       atomic.Int64
	started     chan struct{} // a fetch started (non-blocking send)
}

func newFake(images ...Image) *fakeSource {
	return &fakeSource{
		images:  images,
		local:   map[chunkstore.ID]bool{},
		peers:   map[chunkstore.ID]bool{},
		fail:    map[chunkstore.ID]bool{},
		fetches: map[chunkstore.ID]int{},
		started: make(chan struct{}, 1),
	}
}

func (f *fakeSource) Images(context.Context) ([]Image, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]Image(nil), f.images...), f.imgErr
}

func (f *fakeSource) Has(_ context.Context, id chunkstore.ID) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.local[id]
}

func (f *fakeSource) Fetch(ctx context.Context, manifest chunkstore.ID, index int) (int64, string, error) {
	if f.busy.Load() || f.busyLeft.Load() > 0 {
		f.busyFetches.Add(1)
	}
	n := f.inflight.Add(1)
	defer f.inflight.Add(-1)
	for {
		m := f.maxIn.Load()
		if n <= m || f.maxIn.CompareAndSwap(m, n) {
			break
		}
	}
	select {
	case f.started <- struct{}{}:
	default:
	}
	f.mu.Lock()
	var e *chunkstore.Entry
	for _, img := range f.images {
		if img.ID == manifest && index >= 0 && index < len(img.Manifest.Entries) {
			e = &img.Manifest.Entries[index]
		}
	}
	delay := f.delay
	f.mu.Unlock()
	if e == nil || e.Zero {
		return 0, "", fmt.Errorf("no data entry %d in %s", index, manifest)
	}
	if delay > 0 {
		t := time.NewTimer(delay)
		defer t.Stop()
		select {
		case <-ctx.Done():
			return 0, "", ctx.Err()
		case <-t.C:
		}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.local[e.ID] {
		return e.Length, SourceLocal, nil
	}
	if f.fail[e.ID] {
		return 0, "", errors.New("origin said 503")
	}
	f.fetches[e.ID]++
	f.order = append(f.order, e.ID)
	f.local[e.ID] = true
	if f.peers[e.ID] {
		return e.Length, SourcePeer, nil
	}
	return e.Length, SourceOrigin, nil
}

func (f *fakeSource) Busy() bool {
	f.busyHits.Add(1)
	if f.busyLeft.Add(-1) >= 0 {
		return true
	}
	return f.busy.Load()
}

func (f *fakeSource) StoredRatio() float64 { return f.ratio }

func (f *fakeSource) fetched() (map[chunkstore.ID]int, []chunkstore.ID) {
	f.mu.Lock()
	defer f.mu.Unlock()
	m := make(map[chunkstore.ID]int, len(f.fetches))
	for k, v := range f.fetches {
		m[k] = v
	}
	return m, append([]chunkstore.ID(nil), f.order...)
}

func (f *fakeSource) setLocal(keys ...string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, k := range keys {
		f.local[cid(k)] = true
	}
}

// waitFor polls cond until it holds or d passes.
func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func imageStatus(t *testing.T, h *Hoarder, id chunkstore.ID) ImageStatus {
	t.Helper()
	is, ok := h.Image(id)
	if !ok {
		t.Fatalf("image %s not in status %+v", id, h.Status().Images)
	}
	return is
}

func TestPassRespectsBudget(t *testing.T) {
	t.Parallel()
	// 3 images × 6 chunks of 1000 raw bytes, stored at half: 500 each.
	a := newImage("a", 3, chunks("a", 6, 1000), seq(6))
	b := newImage("b", 2, chunks("b", 6, 1000), seq(6))
	c := newImage("c", 1, chunks("c", 6, 1000), seq(6))
	for _, budget := range []int64{0, 499, 500, 2500, 4000, 100000} {
		t.Run(fmt.Sprint(budget), func(t *testing.T) {
			t.Parallel()
			f := newFake(a, b, c)
			f.ratio = 0.5
			f.setLocal("a1") // held: counts against the budget
			h := New(f, Config{Budget: budget})
			h.pass(t.Context())
			got, _ := f.fetched()
			// The hoard holds slots chunks in plan order a0 a1 .. c5; a1,
			// held, takes its slot when the plan reaches it.
			slots := min(budget/500, 18)
			want := slots - 1
			if slots <= 1 {
				want = slots // a0 alone, or nothing
			}
			if stored := 500 * int64(len(got)); slots >= 2 && stored+500 > budget {
				t.Errorf("hoard is %d stored bytes with a1, over the budget %d", stored+500, budget)
			}
			if len(got) != int(want) {
				t.Errorf("fetched %d chunks, want %d", len(got), want)
			}
			st := h.Status()
			if st.Chunks != int(want) || st.Done != int(want) || st.DoneBytes != want*1000 {
				t.Errorf("status chunks %d done %d done bytes %d, want %d %d %d", st.Chunks, st.Done, st.DoneBytes, want, want, want*1000)
			}
			if st.HeldBytes+st.PlannedBytes > budget {
				t.Errorf("status held %d + planned %d > budget %d", st.HeldBytes, st.PlannedBytes, budget)
			}
			if len(st.Images) != 3 {
				t.Fatalf("status has %d images, want 3", len(st.Images))
			}
			var local int64
			for _, is := range st.Images {
				if is.WorkingSetBytes != 6000 {
					t.Errorf("image %s working set %d bytes, want 6000", is.Manifest, is.WorkingSetBytes)
				}
				local += is.LocalBytes
			}
			if local != 1000+want*1000 {
				t.Errorf("local bytes over images %d, want %d", local, 1000+want*1000)
			}
		})
	}
}

func TestMostBootedFirst(t *testing.T) {
	t.Parallel()
	rare := newImage("rare", 1, chunks("r", 4, 1000), seq(4))
	hot := newImage("hot", 9, chunks("h", 4, 1000), []int{3, 1, 0, 2})
	mid := newImage("mid", 5, chunks("m", 4, 1000), seq(4))
	f := newFake(rare, hot, mid)
	h := New(f, Config{Budget: 6000, Concurrency: 1}) // hot whole, then 2 of mid
	h.pass(t.Context())
	_, order := f.fetched()
	want := []chunkstore.ID{cid("h3"), cid("h1"), cid("h0"), cid("h2"), cid("m0"), cid("m1")}
	if fmt.Sprint(order) != fmt.Sprint(want) {
		t.Errorf("fetch order\n got %v\nwant %v", order, want)
	}
	st := h.Status()
	if st.Images[0].Manifest != hot.ID || st.Images[1].Manifest != mid.ID || st.Images[2].Manifest != rare.ID {
		t.Errorf("status images not most booted first: %+v", st.Images)
	}
	if is := imageStatus(t, h, mid.ID); is.LocalBytes != 2000 || is.Complete {
		t.Errorf("mid: %+v, want 2000 local bytes and not complete", is)
	}
	if is := imageStatus(t, h, hot.ID); is.LocalBytes != 4000 || !is.Complete {
		t.Errorf("hot: %+v, want 4000 local bytes and complete", is)
	}
}

func TestSharedChunkFetchedOnce(t *testing.T) {
	t.Parallel()
	base := chunks("base", 8, 500)
	a := newImage("a", 2, append(append([]spec{}, base...), spec{"a-own", 500}, spec{"base3", 500}), seq(10))
	b := newImage("b", 2, append([]spec{{"b-own", 500}}, base...), seq(9))
	f := newFake(a, b)
	f.delay = 5 * time.Millisecond
	h := New(f, Config{Budget: 1 << 30, Concurrency: 3})
	h.pass(t.Context())
	got, _ := f.fetched()
	if len(got) != 10 {
		t.Errorf("fetched %d distinct chunks, want 10 (8 shared + 2 own)", len(got))
	}
	for id, n := range got {
		if n != 1 {
			t.Errorf("chunk %s fetched %d times, want once", id, n)
		}
	}
	if m := f.maxIn.Load(); m > 3 {
		t.Errorf("%d fetches in flight, want at most Concurrency 3", m)
	}
	for _, img := range []Image{a, b} {
		is := imageStatus(t, h, img.ID)
		if is.WorkingSetBytes != 4500 || is.LocalBytes != 4500 {
			t.Errorf("image %s: %+v, want working set and local 4500 bytes (repeated chunk once)", img.ID, is)
		}
	}
	st := h.Status()
	if st.BySource[SourceOrigin] != 5000 {
		t.Errorf("by source %v, want 5000 origin bytes", st.BySource)
	}
}

func TestWorkingSetIsAHint(t *testing.T) {
	t.Parallel()
	img := newImage("x", 1, []spec{{"x0", 100}, {"", 4096}, {"x2", 100}}, []int{-1, 0, 1, 7, 2, 2, 99})
	f := newFake(img)
	h := New(f, Config{Budget: 1 << 20})
	h.pass(t.Context())
	got, _ := f.fetched()
	if len(got) != 2 || got[cid("x0")] != 1 || got[cid("x2")] != 1 {
		t.Errorf("fetched %v, want x0 and x2 once each", got)
	}
	if st := h.Status(); st.Failed != 0 || st.LastError != "" {
		t.Errorf("status %+v, want no failures", st)
	}
	if is := imageStatus(t, h, img.ID); is.WorkingSetBytes != 200 || is.Chunks != 2 {
		t.Errorf("image %+v, want 2 chunks of 200 bytes", is)
	}
}

func TestBudgetZeroPlansButFetchesNothing(t *testing.T) {
	t.Parallel()
	img := newImage("x", 1, chunks("x", 5, 100), seq(5))
	f := newFake(img)
	f.setLocal("x1", "x3")
	h := New(f, Config{})
	h.pass(t.Context())
	if got, _ := f.fetched(); len(got) != 0 {
		t.Errorf("budget 0 fetched %d chunks", len(got))
	}
	is := imageStatus(t, h, img.ID)
	if is.WorkingSetBytes != 500 || is.LocalBytes != 200 {
		t.Errorf("image %+v, want 500 working-set bytes, 200 local", is)
	}
}

func TestRateLimit(t *testing.T) {
	t.Parallel()
	// 8 chunks of 2000 raw bytes at 10000 B/s, burst one chunk: >= 1.4 s.
	img := newImage("x", 1, chunks("x", 8, 2000), seq(8))
	f := newFake(img)
	h := New(f, Config{Budget: 1 << 30, Rate: 10000, Concurrency: 8})
	start := time.Now()
	h.pass(t.Context())
	took := time.Since(start)
	if got, _ := f.fetched(); len(got) != 8 {
		t.Fatalf("fetched %d chunks, want 8", len(got))
	}
	if expect := 1400 * time.Millisecond; took < expect/2 {
		t.Errorf("16000 bytes at 10000 B/s took %v, want >= %v", took, expect/2)
	}
	if took > 10*time.Second {
		t.Errorf("rate-limited pass took %v, far too long", took)
	}
	t.Logf("16000 bytes at 10000 B/s (burst 2000): %v", took)
}

func TestBusyYields(t *testing.T) {
	t.Parallel()
	img := newImage("x", 1, chunks("x", 4, 100), seq(4))
	f := newFake(img)
	f.busy.Store(true)
	h := New(f, Config{Budget: 1 << 20})
	done := make(chan struct{})
	go func() {
		defer close(done)
		h.pass(t.Context())
	}()
	waitFor(t, 2*time.Second, "the hoarder to yield", func() bool { return h.Status().Yielding })
	time.Sleep(150 * time.Millisecond)
	if got, _ := f.fetched(); len(got) != 0 {
		t.Fatalf("fetched %d chunks while VM reads were waiting", len(got))
	}
	if st := h.Status(); !st.Running || st.Done != 0 {
		t.Errorf("status while yielding %+v, want running, nothing done", st)
	}
	f.busy.Store(false)
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("pass did not resume once VM reads were served")
	}
	if got, _ := f.fetched(); len(got) != 4 {
		t.Errorf("fetched %d chunks after yielding, want 4", len(got))
	}
	if n := f.busyFetches.Load(); n != 0 {
		t.Errorf("%d fetches started while VM reads were waiting", n)
	}
	if st := h.Status(); st.Yielding || st.Running {
		t.Errorf("status after the pass %+v, want idle", st)
	}
}

func TestKickPlansBeforeInterval(t *testing.T) {
	t.Parallel()
	a := newImage("a", 1, chunks("a", 2, 100), seq(2))
	f := newFake(a)
	h := New(f, Config{Budget: 1 << 20, Interval: time.Hour})
	ctx, cancel := context.WithCancel(t.Context())
	errc := make(chan error, 1)
	go func() { errc <- h.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-errc; err != nil {
			t.Errorf("Run: %v", err)
		}
	}()
	waitFor(t, 5*time.Second, "the first pass", func() bool { return h.Status().Passes == 1 })
	select { // the first pass's fetch
	case <-f.started:
	default:
	}
	b := newImage("b", 1, chunks("b", 3, 100), seq(3))
	f.mu.Lock()
	f.images = append(f.images, b)
	f.delay = 100 * time.Millisecond
	f.mu.Unlock()
	h.Kick()
	select {
	case <-f.started:
	case <-time.After(5 * time.Second):
		t.Fatal("a kick did not start a pass within 5 s (Interval is an hour)")
	}
	for range 5 {
		h.Kick() // during the pass: coalesce into one more, never block
	}
	waitFor(t, 5*time.Second, "the kicked pass to fetch b", func() bool {
		is, ok := h.Image(b.ID)
		return ok && is.LocalBytes == 300
	})
	waitFor(t, 5*time.Second, "the pass the kicks asked for", func() bool { return h.Status().Passes >= 3 })
	time.Sleep(100 * time.Millisecond)
	if p := h.Status().Passes; p != 3 {
		t.Errorf("%d passes, want 3: the first, the kicked one, one for the 5 kicks during it", p)
	}
}

func TestRunStopsOnCancel(t *testing.T) {
	t.Parallel()
	img := newImage("x", 1, chunks("x", 20, 100), seq(20))
	f := newFake(img)
	f.delay = time.Minute
	h := New(f, Config{Budget: 1 << 20, Interval: time.Hour})
	ctx, cancel := context.WithCancel(t.Context())
	errc := make(chan error, 1)
	go func() { errc <- h.Run(ctx) }()
	select {
	case <-f.started:
	case <-time.After(5 * time.Second):
		t.Fatal("no fetch started")
	}
	if err := h.Run(t.Context()); err == nil {
		t.Error("a second Run did not fail")
	}
	start := time.Now()
	cancel()
	select {
	case err := <-errc:
		if err != nil {
			t.Errorf("Run after cancel: %v, want nil", err)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("Run did not return within 2 s of cancel")
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("Run took %v to stop", d)
	}
	if st := h.Status(); st.Failed != 0 || st.LastError != "" {
		t.Errorf("cancelled fetches counted as failures: %+v", st)
	}
}

func TestFetchErrorsCountedNotFatal(t *testing.T) {
	t.Parallel()
	img := newImage("x", 1, chunks("x", 6, 100), seq(6))
	f := newFake(img)
	f.fail[cid("x1")] = true
	f.fail[cid("x4")] = true
	f.peers[cid("x0")] = true
	h := New(f, Config{Budget: 1 << 20})
	r := h.pass(t.Context())
	if r.fetched != 4 || r.failed != 2 {
		t.Errorf("pass fetched %d failed %d, want 4 and 2", r.fetched, r.failed)
	}
	st := h.Status()
	if st.Failed != 2 || st.Failures != 2 || st.LastError == "" || st.Done != 4 {
		t.Errorf("status %+v, want 2 failed, 4 done and the last error", st)
	}
	if st.BySource[SourcePeer] != 100 || st.BySource[SourceOrigin] != 300 {
		t.Errorf("by source %v, want peer 100, origin 300", st.BySource)
	}
	// the next pass tries the failed ones again
	f.mu.Lock()
	delete(f.fail, cid("x1"))
	f.mu.Unlock()
	r = h.pass(t.Context())
	if r.fetched != 1 || r.failed != 1 {
		t.Errorf("second pass fetched %d failed %d, want 1 and 1", r.fetched, r.failed)
	}
	if st := h.Status(); st.Failures != 3 {
		t.Errorf("failures since start %d, want 3", st.Failures)
	}
}

func TestNoProgressBacksOff(t *testing.T) {
	t.Parallel()
	img := newImage("x", 1, chunks("x", 2, 100), seq(2))
	f := newFake(img)
	f.fail[cid("x0")] = true
	f.fail[cid("x1")] = true
	h := New(f, Config{Budget: 1 << 20, Interval: time.Hour})
	ctx, cancel := context.WithCancel(t.Context())
	errc := make(chan error, 1)
	go func() { errc <- h.Run(ctx) }()
	waitFor(t, 5*time.Second, "the first pass", func() bool { return h.Status().Passes == 1 })
	h.Kick()
	time.Sleep(200 * time.Millisecond)
	if p := h.Status().Passes; p != 1 {
		t.Errorf("%d passes: a kick after a pass without progress should wait for the tick", p)
	}
	cancel()
	if err := <-errc; err != nil {
		t.Errorf("Run: %v", err)
	}
}

func TestImagesErrorIsReported(t *testing.T) {
	t.Parallel()
	f := newFake()
	f.imgErr = errors.New("catalog unavailable")
	h := New(f, Config{Budget: 1})
	h.pass(t.Context())
	if st := h.Status(); st.LastError != "catalog unavailable" || st.Passes != 1 {
		t.Errorf("status %+v, want the Images error", st)
	}
}

func TestPrefetch(t *testing.T) {
	t.Parallel()
	entries := []spec{{"p0", 100}, {"", 1000}, {"p2", 200}, {"p0", 100}, {"p4", 300}, {"", 50}, {"p6", 400}}
	img := newImage("p", 1, entries, []int{4, 2})
	other := newImage("q", 1, chunks("q", 2, 10), seq(2))
	for _, tc := range []struct {
		full      bool
		wantIDs   []string
		wantTotal int64
	}{
		{false, []string{"p4", "p2"}, 500},
		{true, []string{"p0", "p2", "p4", "p6"}, 1000},
	} {
		t.Run(fmt.Sprint("full=", tc.full), func(t *testing.T) {
			t.Parallel()
			f := newFake(img, other)
			f.setLocal("p2")
			// budget 0 and a tiny rate: Prefetch ignores both
			h := New(f, Config{Rate: 1, Concurrency: 2})
			h.pass(t.Context()) // status knows the image
			f.busyLeft.Store(4) // VM reads wait for the first 4 polls
			var calls []int64
			var total int64
			start := time.Now()
			res, err := h.Prefetch(t.Context(), img.ID, tc.full, func(done, tot int64) {
				calls = append(calls, done)
				total = tot
			})
			if err != nil {
				t.Fatal(err)
			}
			if took := time.Since(start); took > 5*time.Second {
				t.Errorf("prefetch took %v: want it not to wait for the rate", took)
			}
			if n := f.busyFetches.Load(); n != 0 {
				t.Errorf("%d fetches started while VM reads were waiting", n)
			}
			if n := f.busyHits.Load(); n < 5 {
				t.Errorf("Busy asked %d times, want the prefetch to have polled it while yielding", n)
			}
			got, _ := f.fetched()
			if len(got)+1 != len(tc.wantIDs) {
				t.Errorf("fetched %v, want %v but p2 (local)", got, tc.wantIDs)
			}
			for _, k := range tc.wantIDs {
				if k != "p2" && got[cid(k)] != 1 {
					t.Errorf("chunk %s fetched %d times, want once", k, got[cid(k)])
				}
			}
			if total != tc.wantTotal || res.Bytes != tc.wantTotal || res.Chunks != len(tc.wantIDs) || res.Local != 1 || res.LocalBytes != 200 {
				t.Errorf("result %+v, total %d; want %d bytes in %d chunks, p2 local", res, total, tc.wantTotal, len(tc.wantIDs))
			}
			if len(calls) != len(tc.wantIDs) || calls[0] != 200 || calls[len(calls)-1] != tc.wantTotal {
				t.Errorf("progress %v, want from 200 to %d, once at start and per fetch", calls, tc.wantTotal)
			}
			for i := 1; i < len(calls); i++ {
				if calls[i] < calls[i-1] {
					t.Errorf("progress went back: %v", calls)
				}
			}
			if is := imageStatus(t, h, img.ID); is.LocalBytes != 500 {
				t.Errorf("status after prefetch: %+v, want the working set (500 bytes) local", is)
			}
		})
	}
}

func TestPrefetchErrors(t *testing.T) {
	t.Parallel()
	img := newImage("p", 1, chunks("p", 3, 100), seq(3))
	f := newFake(img)
	h := New(f, Config{})
	if _, err := h.Prefetch(t.Context(), chunkstore.Sum([]byte("nope")), false, nil); !errors.Is(err, ErrUnknownImage) {
		t.Errorf("prefetch of an unknown image: %v, want ErrUnknownImage", err)
	}
	f.fail[cid("p1")] = true
	res, err := h.Prefetch(t.Context(), img.ID, true, nil)
	if err == nil || res.Failed != 1 || res.Fetched != 2 {
		t.Errorf("prefetch with a failing chunk: %+v, %v; want 1 failed, 2 fetched and an error", res, err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if _, err := h.Prefetch(ctx, img.ID, true, nil); !errors.Is(err, context.Canceled) {
		t.Errorf("prefetch with a cancelled ctx: %v", err)
	}
}

// gathered returns the value of every series of metric name in reg, by its
// label values joined with ",".
func gathered(t *testing.T, reg *prometheus.Registry, name string) map[string]float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatalf("gather: %v", err)
	}
	out := map[string]float64{}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			var k string
			for i, l := range m.GetLabel() {
				if i > 0 {
					k += ","
				}
				k += l.GetValue()
			}
			switch {
			case m.GetCounter() != nil:
				out[k] = m.GetCounter().GetValue()
			case m.GetGauge() != nil:
				out[k] = m.GetGauge().GetValue()
			}
		}
	}
	return out
}

func TestMetrics(t *testing.T) {
	t.Parallel()
	a := newImage("a", 2, chunks("a", 3, 100), seq(3))
	b := newImage("b", 1, chunks("b", 2, 100), seq(2))
	f := newFake(a, b)
	f.peers[cid("a0")] = true
	reg := prometheus.NewPedanticRegistry()
	h := New(f, Config{Budget: 4000, Registerer: reg})
	h.pass(t.Context())
	bytes := gathered(t, reg, "hoard_hoard_bytes_total")
	if bytes[SourcePeer] != 100 || bytes[SourceOrigin] != 400 || bytes[SourceLocal] != 0 || len(bytes) != 3 {
		t.Errorf("hoard_hoard_bytes_total %v, want peer 100, origin 400, local 0", bytes)
	}
	if v := gathered(t, reg, "hoard_hoard_budget_bytes"); v[""] != 4000 {
		t.Errorf("hoard_hoard_budget_bytes %v, want 4000", v)
	}
	ws := gathered(t, reg, "hoard_working_set_bytes")
	local := gathered(t, reg, "hoard_working_set_local_bytes")
	if len(ws) != 2 || ws[a.ID.String()] != 300 || ws[b.ID.String()] != 200 {
		t.Errorf("hoard_working_set_bytes %v, want a 300, b 200", ws)
	}
	if len(local) != 2 || local[a.ID.String()] != 300 || local[b.ID.String()] != 200 {
		t.Errorf("hoard_working_set_local_bytes %v, want a 300, b 200", local)
	}
	f.mu.Lock()
	f.images = f.images[:1]
	f.mu.Unlock()
	h.pass(t.Context())
	if ws := gathered(t, reg, "hoard_working_set_bytes"); len(ws) != 1 || ws[a.ID.String()] != 300 {
		t.Errorf("hoard_working_set_bytes after b went away: %v, want a alone", ws)
	}
	if local := gathered(t, reg, "hoard_working_set_local_bytes"); len(local) != 1 {
		t.Errorf("hoard_working_set_local_bytes after b went away: %v, want a alone", local)
	}
	// a second hoarder on the same registry logs and goes on without metrics
	if h2 := New(f, Config{Registerer: reg}); h2.m != nil {
		t.Error("second registration succeeded")
	}
}

func TestStatusJSON(t *testing.T) {
	t.Parallel()
	img := newImage("x", 4, chunks("x", 3, 100), seq(3))
	f := newFake(img)
	f.setLocal("x0")
	h := New(f, Config{})
	h.pass(t.Context())
	b, err := json.Marshal(h.Status())
	if err != nil {
		t.Fatal(err)
	}
	var got struct {
		Images []map[string]any `json:"images"`
	}
	if err := json.Unmarshal(b, &got); err != nil {
		t.Fatal(err)
	}
	if len(got.Images) != 1 {
		t.Fatalf("images in %s: want 1", b)
	}
	is := got.Images[0]
	if is["manifest"] != img.ID.String() || is["working_set_bytes"] != 300.0 || is["working_set_local_bytes"] != 100.0 || is["boots"] != 4.0 {
		t.Errorf("image status JSON %v: want manifest %s, working_set_bytes 300, working_set_local_bytes 100, boots 4", is, img.ID)
	}
}
