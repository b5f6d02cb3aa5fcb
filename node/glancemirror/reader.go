package glancemirror

import (
	"context"
	"io"
	"sync"
)

// ReadAhead is how many blocks (of blockSize) a download's reader reads
// ahead of its client, concurrently: the read path then has several chunk
// fetches (from peers or the origin) in flight for one download instead of
// one block's, at the cost of ReadAhead MiB of memory per download.
const ReadAhead = 8

// NewReader reads [0, img.Size()) of img in order, ReadAhead blocks ahead,
// each a ReadAt under ctx. Close stops it and waits for the reads in flight.
func NewReader(ctx context.Context, img Image) io.ReadCloser {
	return newAheadReader(ctx, img, 0, img.Size(), ReadAhead)
}

// aheadReader reads [off, hi) of an image in blocks, depth of them in
// flight, and returns them in order.
type aheadReader struct {
	cancel context.CancelFunc
	blocks chan *aheadBlock
	wg     sync.WaitGroup

	free func() // a block was taken: one more may be read

	cur  []byte // what is left of the block being read
	err  error  // sticky
	once sync.Once
}

type aheadBlock struct {
	buf  []byte
	done chan struct{}
	err  error // set before done is closed
}

func newAheadReader(ctx context.Context, img Image, off, hi int64, depth int) *aheadReader {
	ctx, cancel := context.WithCancel(ctx)
	r := &aheadReader{cancel: cancel, blocks: make(chan *aheadBlock, depth)}
	sem := make(chan struct{}, depth)
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		defer close(r.blocks)
		for off < hi {
			select {
			case sem <- struct{}{}:
			case <-ctx.Done():
				return
			}
			b := &aheadBlock{buf: make([]byte, min(blockSize, hi-off)), done: make(chan struct{})}
			at := off
			off += int64(len(b.buf))
			r.wg.Add(1)
			go func() {
				defer r.wg.Done()
				b.err = img.ReadAt(ctx, b.buf, at)
				close(b.done)
			}()
			select {
			case r.blocks <- b:
			case <-ctx.Done():
				return
			}
		}
	}()
	// The semaphore frees a slot when the reader takes a block: at most
	// depth blocks read or waiting, plus the one being consumed.
	r.free = func() { <-sem }
	return r
}

func (r *aheadReader) Read(p []byte) (int, error) {
	if r.err != nil {
		return 0, r.err
	}
	if len(r.cur) == 0 {
		b, ok := <-r.blocks
		if !ok {
			r.err = io.EOF
			return 0, r.err
		}
		<-b.done
		r.free()
		if b.err != nil {
			r.err = b.err
			return 0, r.err
		}
		r.cur = b.buf
	}
	n := copy(p, r.cur)
	r.cur = r.cur[n:]
	return n, nil
}

// Close stops the reads ahead and waits for them.
func (r *aheadReader) Close() error {
	r.once.Do(func() {
		r.cancel()
		r.wg.Wait()
		if r.err == nil {
			r.err = io.ErrClosedPipe
		}
	})
	return nil
}
