package nbd

import (
	"math/bits"
	"sync"
)

// Read buffers are pooled by power-of-two size class of their data, from
// 4 KiB up to MaxRequestLength; each has replyRoom spare bytes in front for
// the reply header.
const (
	minClassShift = 12 // 4 KiB
	maxClassShift = 25 // 32 MiB == MaxRequestLength
	numClasses    = maxClassShift - minClassShift + 1
)

var bufPools [numClasses]sync.Pool

func sizeClass(n int) int {
	if n <= 1<<minClassShift {
		return 0
	}
	return bits.Len(uint(n-1)) - minClassShift
}

// getBuf returns a buffer of length replyRoom+n. Return it with putBuf.
func getBuf(n int) *[]byte {
	c := sizeClass(n)
	if c >= numClasses {
		b := make([]byte, replyRoom+n)
		return &b
	}
	if v := bufPools[c].Get(); v != nil {
		bp := v.(*[]byte)
		*bp = (*bp)[:replyRoom+n]
		return bp
	}
	b := make([]byte, replyRoom+n, replyRoom+1<<(c+minClassShift))
	return &b
}

func putBuf(bp *[]byte) {
	n := cap(*bp) - replyRoom
	c := sizeClass(n)
	if c >= numClasses || n != 1<<(c+minClassShift) {
		return
	}
	bufPools[c].Put(bp)
}

// bufSize is the data capacity getBuf(n) allocates: n rounded up to its size
// class (what a read of n bytes costs in memory).
func bufSize(n int) int {
	c := sizeClass(n)
	if c >= numClasses {
		return n
	}
	return 1 << (c + minClassShift)
}
