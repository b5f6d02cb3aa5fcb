package node

import (
	"fmt"
	"testing"
	"time"

	"github.com/hoardvm/hoard/chunkstore"
	"github.com/hoardvm/hoard/p2p"
)

// TestMarkHaveDuringScan: the have-bitmap's store scan (one Has per entry)
// does not hold haveMu, so a fetch's markHave does not wait for it, and the
// mark lands in the scan's result.
func TestMarkHaveDuringScan(t *testing.T) {
	t.Parallel()
	st, err := chunkstore.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	const entries = 400_000
	b := chunkstore.NewBuilder(chunkstore.Fixed64K, "raw", chunkstore.Source{Kind: "file", Location: "/x"})
	for i := range entries {
		b.Add(64<<10, chunkstore.Sum(fmt.Append(nil, "chunk", i)), false)
	}
	n := &Node{store: st}
	img := &image{m: b.Manifest()}
	done := make(chan p2p.Bitmap, 1)
	go func() { done <- n.haveBitmap(t.Context(), img) }()
	deadline := time.Now().Add(30 * time.Second)
	for {
		img.haveMu.Lock()
		scanning := img.haveScan != nil
		img.haveMu.Unlock()
		if scanning {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the scan never started")
		}
		time.Sleep(time.Millisecond)
	}
	img.markHave(7)
	img.haveMu.Lock()
	stillScanning := img.haveScan != nil
	img.haveMu.Unlock()
	var bm p2p.Bitmap
	select {
	case bm = <-done:
	case <-time.After(time.Minute):
		t.Fatal("haveBitmap did not return within a minute")
	}
	if !stillScanning {
		t.Fatalf("markHave returned only after the scan of %d entries ended: it waited for the store scan", entries)
	}
	if !bm.Has(7) {
		t.Fatal("a chunk marked during the scan is missing from its result")
	}
}
