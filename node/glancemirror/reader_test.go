package glancemirror_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hoardvm/hoard/node/glancemirror"
)

// slowImage serves data with a random delay per read, counting the reads in
// flight; it fails reads at failAt (when >= 0).
type slowImage struct {
	data     []byte
	failAt   int64
	inflight atomic.Int64
	peak     atomic.Int64
}

func (s *slowImage) Size() int64 { return int64(len(s.data)) }

func (s *slowImage) ReadAt(ctx context.Context, p []byte, off int64) error {
	k := s.inflight.Add(1)
	defer s.inflight.Add(-1)
	for {
		if old := s.peak.Load(); k <= old || s.peak.CompareAndSwap(old, k) {
			break
		}
	}
	select {
	case <-time.After(time.Duration(rand.IntN(20)) * time.Millisecond):
	case <-ctx.Done():
		return ctx.Err()
	}
	if s.failAt >= 0 && off <= s.failAt && s.failAt < off+int64(len(p)) {
		return errors.New("read failed")
	}
	copy(p, s.data[off:])
	return nil
}

func (s *slowImage) Close() error { return nil }

// TestReaderReadsAhead: NewReader returns the image's bytes in order with
// several reads in flight (at most ReadAhead), stops at the first failed
// read with its error, and Close mid-way leaves no read running.
// Not parallel: it counts goroutines.
func TestReaderReadsAhead(t *testing.T) {
	data := make([]byte, 20<<20+12345)
	for i := range data {
		data[i] = byte(i * 7 / 3)
	}
	img := &slowImage{data: data, failAt: -1}
	r := glancemirror.NewReader(t.Context(), img)
	got, err := io.ReadAll(r)
	r.Close()
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read %d of %d bytes, identical %v, %v", len(got), len(data), bytes.Equal(got, data), err)
	}
	if p := img.peak.Load(); p < 2 || p > glancemirror.ReadAhead {
		t.Errorf("%d reads in flight at most, want 2 to %d", p, glancemirror.ReadAhead)
	}

	bad := &slowImage{data: data, failAt: 7<<20 + 5}
	r = glancemirror.NewReader(t.Context(), bad)
	got, err = io.ReadAll(r)
	r.Close()
	if err == nil || len(got) != 7<<20 || !bytes.Equal(got, data[:len(got)]) {
		t.Errorf("failing read: %d bytes, %v; want the 7 MiB before the failed block, then its error", len(got), err)
	}

	before := runtime.NumGoroutine()
	r = glancemirror.NewReader(t.Context(), img)
	buf := make([]byte, 100)
	if _, err := io.ReadFull(r, buf); err != nil {
		t.Fatal(err)
	}
	r.Close()
	if n := img.inflight.Load(); n != 0 {
		t.Errorf("%d reads still running after Close", n)
	}
	if _, err := r.Read(buf); err == nil {
		t.Error("Read after Close succeeded")
	}
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > before && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := runtime.NumGoroutine(); n > before {
		t.Errorf("%d goroutines after Close, %d before", n, before)
	}
}
