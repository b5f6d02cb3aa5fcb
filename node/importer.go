package node

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"runtime"
	"sync"
	"time"

	"github.com/hoardvm/hoard/chunkstore"
	"github.com/hoardvm/hoard/node/origin"
	"golang.org/x/sync/errgroup"
)

// ImportOptions controls Import.
type ImportOptions struct {
	Name     string              // name to register; empty: only the manifest CID
	Chunking chunkstore.Chunking // zero value: chunkstore.DefaultCDC
	Lazy     bool                // record the manifest only; chunks arrive on demand
	Pin      bool                // pin the image's chunks so they are never evicted
	Workers  int                 // hashing/compression workers; 0: GOMAXPROCS
	// Progress, if set, is called from one goroutine as bytes are consumed.
	Progress func(done, total int64)
}

// ImportResult summarises an import.
type ImportResult struct {
	Name             string        `json:"name,omitempty"`
	Manifest         chunkstore.ID `json:"manifest"`
	Format           string        `json:"format"`
	Source           origin.Ref    `json:"source"`
	Size             int64         `json:"size"`
	NonZeroBytes     int64         `json:"non_zero_bytes"`
	Chunks           int           `json:"chunks"`
	UniqueChunks     int           `json:"unique_chunks"`
	NewChunks        int           `json:"new_chunks"`
	NewStoredBytes   int64         `json:"new_stored_bytes"`
	NewRawBytes      int64         `json:"new_raw_bytes"`
	DedupRatio       float64       `json:"dedup_ratio"`       // non-zero bytes / bytes of the distinct chunks
	CompressionRatio float64       `json:"compression_ratio"` // raw / stored, of the new chunks
	Duration         time.Duration `json:"duration_ns"`
	Lazy             bool          `json:"lazy"`
}

// segmentChunks is how many chunks share one durable commit (~64 MiB).
const segmentChunks = 1024

type importJob struct {
	idx  int
	seg  int
	data []byte
	buf  *[]byte
}

type importSeg struct {
	batch   *chunkstore.Batch
	pending int             // chunks handed to workers and not finished
	closed  bool            // the reader has moved past this segment
	written []chunkstore.ID // new chunks written by this segment, in inflight until it commits
}

// Import streams src once: it cuts it into chunks, hashes them, and (unless
// Lazy) compresses and stores the new ones in parallel, then registers the
// manifest (and name) atomically. If anything fails, no image is registered and
// chunks written only for this import are removed.
func Import(ctx context.Context, st *chunkstore.Store, src origin.Source, o ImportOptions) (*ImportResult, error) {
	start := time.Now()
	if o.Chunking.Kind == "" {
		o.Chunking = chunkstore.DefaultCDC
	}
	if o.Name != "" {
		if err := chunkstore.ValidateName(o.Name); err != nil {
			return nil, err
		}
	}
	workers := o.Workers
	if workers <= 0 {
		workers = runtime.GOMAXPROCS(0)
	}
	rc, err := src.Stream(ctx)
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	// The splitter reads in large blocks itself: no bufio in between, which
	// only added a copy of every byte.
	var r io.Reader = rc
	format := ""
	if f, ok := src.(origin.Formatter); ok {
		format = f.Format()
	}
	if format == "" {
		format = chunkstore.FormatRaw
		var magic [4]byte
		n, err := io.ReadFull(rc, magic[:])
		if err != nil && !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) {
			return nil, fmt.Errorf("import %s: %w", src.Ref().Location, err)
		}
		if string(magic[:n]) == "QFI\xfb" {
			format = chunkstore.FormatQcow2
		}
		r = io.MultiReader(bytes.NewReader(magic[:n]), rc)
	}
	split, err := chunkstore.NewSplitter(r, o.Chunking)
	if err != nil {
		return nil, err
	}
	var nonce [8]byte
	rand.Read(nonce[:])
	owner := "import:" + hex.EncodeToString(nonce[:])

	type result struct {
		length int64
		id     chunkstore.ID
		zero   bool
	}
	var (
		mu        sync.Mutex
		results   []result
		segs      = map[int]*importSeg{}
		newIDs    []chunkstore.ID
		newRaw    int64
		newStored int64
		commitCh  = make(chan *importSeg, 2)
		// inflight holds the chunks written by segments not committed yet:
		// the store cannot see them, so a chunk that recurs in the next
		// segment would otherwise be written twice.
		inflight = map[chunkstore.ID]struct{}{}
	)
	pool := sync.Pool{New: func() any { b := make([]byte, o.Chunking.Max); return &b }}
	jobs := make(chan importJob, workers*4)
	ictx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	g, gctx := errgroup.WithContext(ictx)

	// finish marks one chunk of seg done and hands a complete segment to the committer.
	finish := func(seg int) {
		s := segs[seg]
		s.pending--
		if s.closed && s.pending == 0 {
			delete(segs, seg)
			if !o.Lazy {
				commitCh <- s
			}
		}
	}

	// Reader: cut the stream into chunks.
	g.Go(func() error {
		defer close(jobs)
		var done int64
		total := src.Size()
		lastProgress := time.Now()
		for i := 0; ; i++ {
			b, err := split.Next()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				return err // the origin's error names the source and what to do
			}
			buf := pool.Get().(*[]byte)
			data := append((*buf)[:0], b...)
			seg := i / segmentChunks
			mu.Lock()
			results = append(results, result{length: int64(len(data))})
			s := segs[seg]
			if s == nil {
				s = &importSeg{batch: st.NewBatch(owner)}
				segs[seg] = s
				if prev := segs[seg-1]; prev != nil {
					prev.closed = true
					prev.pending++ // balance the finish below
					finish(seg - 1)
				}
			}
			s.pending++
			mu.Unlock()
			select {
			case jobs <- importJob{idx: i, seg: seg, data: data, buf: buf}:
			case <-gctx.Done():
				return gctx.Err()
			}
			done += int64(len(data))
			if o.Progress != nil && time.Since(lastProgress) > 100*time.Millisecond {
				o.Progress(done, total)
				lastProgress = time.Now()
			}
		}
		mu.Lock()
		for seg, s := range segs {
			s.closed = true
			s.pending++
			finish(seg)
		}
		mu.Unlock()
		if o.Progress != nil {
			o.Progress(done, total)
		}
		return nil
	})

	// Workers: zero check, hash, compress and write.
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		g.Go(func() error {
			defer wg.Done()
			for j := range jobs {
				r := result{length: int64(len(j.data)), zero: chunkstore.IsZero(j.data)}
				var stored int64
				switch {
				case r.zero:
				case o.Lazy:
					r.id = chunkstore.Sum(j.data)
				default:
					r.id = chunkstore.Sum(j.data)
					mu.Lock()
					s := segs[j.seg]
					_, dup := inflight[r.id]
					inflight[r.id] = struct{}{}
					mu.Unlock()
					if !dup {
						var err error
						// The ID was just computed from these bytes: no second hash.
						if stored, err = s.batch.PutHashed(gctx, r.id, j.data); err != nil {
							return err
						}
					}
					mu.Lock()
					switch {
					case stored > 0:
						s.written = append(s.written, r.id)
					case !dup:
						delete(inflight, r.id) // already in the store
					}
					mu.Unlock()
				}
				pool.Put(j.buf)
				mu.Lock()
				results[j.idx] = r
				if stored > 0 {
					newIDs = append(newIDs, r.id)
					newRaw += r.length
					newStored += stored
				}
				finish(j.seg)
				mu.Unlock()
			}
			return nil
		})
	}
	go func() { wg.Wait(); close(commitCh) }()

	// Committer: make each finished segment durable while later ones are cut.
	// After a failure it keeps draining (aborting) so that no sender blocks.
	g.Go(func() error {
		var failed error
		for s := range commitCh {
			if failed != nil {
				s.batch.Abort()
				continue
			}
			if err := s.batch.Commit(gctx); err != nil {
				failed = err
				cancel(err)
				continue
			}
			mu.Lock()
			for _, id := range s.written {
				delete(inflight, id)
			}
			mu.Unlock()
		}
		return failed
	})

	fail := func(err error) (*ImportResult, error) {
		// Leave nothing behind: drop the import's pins and the chunks it added
		// that no image references.
		cctx := context.WithoutCancel(ctx)
		mu.Lock()
		for _, s := range segs {
			s.batch.Abort()
		}
		mu.Unlock()
		st.Unpin(cctx, owner)
		var orphans []chunkstore.ID
		for _, id := range newIDs {
			if ref, _ := st.Referenced(cctx, id); !ref {
				if pin, _ := st.Pinned(cctx, id); !pin {
					orphans = append(orphans, id)
				}
			}
		}
		st.Delete(cctx, orphans...)
		return nil, fmt.Errorf("import %s: %w", src.Ref().Location, err)
	}
	if err := g.Wait(); err != nil {
		return fail(err)
	}

	ref := src.Ref()
	mb := chunkstore.NewBuilder(o.Chunking, format, chunkstore.Source{Kind: ref.Kind, Location: ref.Location, Checksum: ref.Checksum})
	for _, r := range results {
		mb.Add(r.length, r.id, r.zero)
	}
	m := mb.Manifest()
	if m.Size != src.Size() {
		return fail(fmt.Errorf("%w: read %d bytes, the source announced %d", origin.ErrShort, m.Size, src.Size()))
	}
	mid, err := st.PutManifest(ctx, m)
	if err != nil {
		return fail(err)
	}
	if o.Pin {
		if err := st.Pin(ctx, chunkstore.PinOwnerImage(mid), m.ChunkIDs()); err != nil {
			return fail(err)
		}
	}
	if o.Name != "" {
		if err := st.SetName(ctx, o.Name, mid); err != nil {
			return fail(err)
		}
	}
	if err := st.Unpin(ctx, owner); err != nil {
		return nil, err
	}
	sum := m.Summarize()
	res := &ImportResult{Name: o.Name, Manifest: mid, Format: format, Source: ref, Size: m.Size,
		NonZeroBytes: sum.NonZeroBytes, Chunks: sum.Chunks, UniqueChunks: sum.UniqueChunks,
		NewChunks: len(newIDs), NewRawBytes: newRaw, Duration: time.Since(start), Lazy: o.Lazy}
	var uniqueRaw int64
	seen := map[chunkstore.ID]bool{}
	for _, e := range m.Entries {
		if !e.Zero && !seen[e.ID] {
			seen[e.ID] = true
			uniqueRaw += e.Length
		}
	}
	if uniqueRaw > 0 {
		res.DedupRatio = float64(sum.NonZeroBytes) / float64(uniqueRaw)
	}
	res.NewStoredBytes = newStored
	if res.NewStoredBytes > 0 {
		res.CompressionRatio = float64(newRaw) / float64(res.NewStoredBytes)
	}
	return res, nil
}
