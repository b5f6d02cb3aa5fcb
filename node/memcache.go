package node

import (
	"sync"

	"github.com/hashicorp/golang-lru/v2/simplelru"
	"github.com/hoardvm/hoard/chunkstore"
)

// memCache is a byte-bounded LRU of verified, uncompressed chunks (restic's
// bloblru is the template): hashicorp's simplelru keeps the order, and the
// cache evicts the oldest chunks until the new one fits.
type memCache struct {
	max int64

	mu   sync.Mutex
	size int64 // bytes held; updated by the eviction callback
	lru  *simplelru.LRU[chunkstore.ID, []byte]
}

// memMinChunk bounds the entry count: no chunk is smaller (CDC's minimum).
const memMinChunk = 4 << 10

func newMemCache(max int64) *memCache {
	c := &memCache{max: max}
	if max <= 0 {
		return c
	}
	entries := int(min(max/memMinChunk+1, 1<<24))
	l, err := simplelru.NewLRU(entries, func(_ chunkstore.ID, b []byte) { c.size -= int64(len(b)) })
	if err != nil {
		panic(err) // entries > 0
	}
	c.lru = l
	return c
}

func (c *memCache) get(id chunkstore.ID) ([]byte, bool) {
	if c.lru == nil {
		return nil, false
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.lru.Get(id)
}

func (c *memCache) has(id chunkstore.ID) bool {
	if c.lru == nil {
		return false
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.lru.Contains(id)
}

func (c *memCache) add(id chunkstore.ID, b []byte) {
	if c.lru == nil || int64(len(b)) > c.max {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.lru.Contains(id) {
		c.lru.Get(id) // most recently used
		return
	}
	for c.size+int64(len(b)) > c.max {
		if _, _, ok := c.lru.RemoveOldest(); !ok {
			break
		}
	}
	c.lru.Add(id, b)
	c.size += int64(len(b))
}
