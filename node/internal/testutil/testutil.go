// Package testutil holds what several of node's test packages share.
package testutil

import (
	"fmt"
	"math/rand/v2"
)

// Image returns n bytes that look like a disk image, the same for the same
// seed: runs of zeros, random bytes and repeated text, 4-256 KiB each.
func Image(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, 99))
	b := make([]byte, n)
	for off := 0; off < n; {
		l := min(n-off, 4096*(1+r.IntN(64)))
		switch r.IntN(3) {
		case 0: // zeros
		case 1:
			for i := off; i < off+l; i++ {
				b[i] = byte(r.Uint32())
			}
		case 2:
			word := []byte(fmt.Sprintf("file-%d ", r.IntN(1000)))
			for i := off; i < off+l; i++ {
				b[i] = word[(i-off)%len(word)]
			}
		}
		off += l
	}
	return b
}
