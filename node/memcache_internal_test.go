package node

import (
	"fmt"
	"testing"

	"github.com/hoardvm/hoard/chunkstore"
)

// TestMemCacheBoundedLRU: the cache never holds more bytes than its bound,
// evicts the least recently used first, and a disabled cache holds nothing.
func TestMemCacheBoundedLRU(t *testing.T) {
	t.Parallel()
	id := func(i int) chunkstore.ID { return chunkstore.Sum(fmt.Append(nil, i)) }
	c := newMemCache(40 << 10)
	for i := range 10 {
		c.add(id(i), make([]byte, 8<<10))
		if c.size > c.max {
			t.Fatalf("after %d adds: %d bytes held, bound %d", i+1, c.size, c.max)
		}
	}
	if c.size != 40<<10 {
		t.Fatalf("%d bytes held, want the bound %d", c.size, 40<<10)
	}
	if c.has(id(4)) || !c.has(id(5)) || !c.has(id(9)) {
		t.Fatal("not the 5 most recent chunks held")
	}
	c.get(id(5))                        // 5 is now the most recent
	c.add(id(10), make([]byte, 16<<10)) // evicts 6 and 7
	if !c.has(id(5)) || c.has(id(6)) || c.has(id(7)) || !c.has(id(8)) {
		t.Fatal("eviction did not follow recency")
	}
	c.add(id(11), make([]byte, 41<<10)) // larger than the cache
	if c.has(id(11)) || c.size > c.max {
		t.Fatal("a chunk larger than the cache was kept")
	}
	off := newMemCache(0)
	off.add(id(1), []byte("x"))
	if _, ok := off.get(id(1)); ok || off.has(id(1)) {
		t.Fatal("a disabled cache held a chunk")
	}
}
