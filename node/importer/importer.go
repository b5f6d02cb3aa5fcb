package importer

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
	"sync/atomic"
	"time"

	"github.com/hoardvm/hoard/chunkstore"
	"github.com/hoardvm/hoard/node/origin"
	"golang.org/x/sync/errgroup"
)

// Options controls Import.
type Options struct {
	Name     string              // name to register; empty: only the manifest CID
	Chunking chunkstore.Chunking // zero value: chunkstore.DefaultCDC
	Lazy     bool                // record the manifest only; chunks arrive on demand
	Pin      bool                // pin the image's chunks so they are never evicted
	Workers  int                 // hashing/compression workers; 0: GOMAXPROCS
	// Format is FormatAuto (also ""): a container (qcow2, detected by its
	// content or from the origin's disk_format) is imported by its guest
	// content, which the manifest records as raw with Container set; or
	// FormatRaw: the origin's bytes as they are, whatever they hold.
	Format string
	// Progress, if set, is called from one goroutine as bytes are consumed.
	Progress func(done, total int64)

	// For tests: chunks per segment (0: segmentChunks), and a hook the
	// committer calls before committing segment seg (to slow it down, or
	// to fail the commit with the error it returns).
	segmentChunks int
	beforeCommit  func(seg int) error
}

// Import formats (Options.Format).
const (
	FormatAuto = "auto"
	FormatRaw  = "raw"
)

// ParseFormat checks an import format: "" and "auto" are FormatAuto.
func ParseFormat(s string) (string, error) {
	switch s {
	case "", FormatAuto:
		return FormatAuto, nil
	case FormatRaw:
		return FormatRaw, nil
	}
	return "", fmt.Errorf("%w: import format %q: want auto (a qcow2 is imported by its guest content) or raw (the bytes as they are)", chunkstore.ErrInvalid, s)
}

// Result summarises an import.
type Result struct {
	Name     string        `json:"name,omitempty"`
	Manifest chunkstore.ID `json:"manifest"`
	Format   string        `json:"format"`
	// Container is the origin's container (qcow2) when the image is its
	// guest view; Format is then raw.
	Container        string        `json:"container,omitempty"`
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

// Import streams src once: it cuts it into chunks, hashes them, and (unless
// Lazy) compresses and stores the new ones in parallel, then registers the
// manifest (and name) atomically. If anything fails, no image is registered and
// chunks written only for this import are removed.
//
// It is one pipeline under one errgroup (see importPipeline): read and split
// -> hash, compress and write (Workers) -> collect, in chunk order -> commit
// segments, in order. Each stage owns its state and hands values to the next
// over bounded channels, every send also watching the context, and no lock is
// held across a send, so a slow commit only slows the stages before it (and
// bounds the chunk bytes in memory) instead of wedging them.
func Import(ctx context.Context, st *chunkstore.Store, src origin.Source, o Options) (*Result, error) {
	start := time.Now()
	if o.Chunking.Kind == "" {
		o.Chunking = chunkstore.DefaultCDC
	}
	if o.Name != "" {
		if err := chunkstore.ValidateName(o.Name); err != nil {
			return nil, err
		}
	}
	if o.Workers <= 0 {
		o.Workers = runtime.GOMAXPROCS(0)
	}
	if o.segmentChunks <= 0 {
		o.segmentChunks = segmentChunks
	}
	mode, err := ParseFormat(o.Format)
	if err != nil {
		return nil, err
	}
	rc, err := src.Stream(ctx)
	if err != nil {
		return nil, err
	}
	defer func() { rc.Close() }()
	// The splitter reads in large blocks itself: no bufio in between, which
	// only added a copy of every byte.
	var r io.Reader = rc
	format, container := "", ""
	if f, ok := src.(origin.Formatter); ok {
		format = f.Format() // Glance's disk_format
		container = origin.ContainerOf(format)
	}
	if format == "" {
		format = chunkstore.FormatRaw
		var head [512]byte
		n, err := io.ReadFull(rc, head[:])
		if err != nil && !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) {
			return nil, fmt.Errorf("import %s: %w", src.Ref().Location, err)
		}
		container = origin.SniffContainer(head[:n])
		if container == chunkstore.ContainerQcow2 {
			format = chunkstore.FormatQcow2
		}
		r = io.MultiReader(bytes.NewReader(head[:n]), rc)
	}
	if mode == FormatAuto && container != "" {
		// The guest view reads the container by ranges, so the stream
		// ends here, before anything is written: a container hoard cannot
		// read registers nothing.
		rc.Close()
		g, err := origin.OpenGuest(ctx, src, container)
		if err != nil {
			return nil, err // it names the image and says what to do
		}
		// Not closed: that would close src, which the caller owns.
		src = g
		if rc, err = g.Stream(ctx); err != nil {
			return nil, err
		}
		r, format = rc, chunkstore.FormatRaw
	} else {
		container = ""
	}
	split, err := chunkstore.NewSplitter(r, o.Chunking)
	if err != nil {
		return nil, err
	}
	var nonce [8]byte
	rand.Read(nonce[:])
	p := &importPipeline{st: st, o: o, owner: "import:" + hex.EncodeToString(nonce[:]), total: src.Size()}
	if err := p.run(ctx, split); err != nil {
		return p.fail(ctx, src, err)
	}

	ref := src.Ref()
	mb := chunkstore.NewBuilder(o.Chunking, format, chunkstore.Source{Kind: ref.Kind, Location: ref.Location, Checksum: ref.Checksum})
	mb.SetContainer(container)
	for _, r := range p.entries {
		mb.Add(r.length, r.id, r.zero)
	}
	m := mb.Manifest()
	if m.Size != src.Size() {
		return p.fail(ctx, src, fmt.Errorf("%w: read %d bytes, the source announced %d", origin.ErrShort, m.Size, src.Size()))
	}
	// Pin first, then store the manifest and its name in one commit: a
	// concurrent add of another image under the same name loses with
	// ErrExists and leaves no orphan manifest behind.
	mid := m.ID()
	if o.Pin {
		_, merr := st.GetManifestBytes(ctx, mid)
		known := merr == nil
		if err := st.Pin(ctx, chunkstore.PinOwnerImage(mid), m.ChunkIDs()); err != nil {
			return p.fail(ctx, src, err)
		}
		if _, err := st.PutNamedManifest(ctx, o.Name, m); err != nil {
			if !known {
				_ = st.Unpin(ctx, chunkstore.PinOwnerImage(mid))
			}
			return p.fail(ctx, src, err)
		}
	} else if _, err := st.PutNamedManifest(ctx, o.Name, m); err != nil {
		return p.fail(ctx, src, err)
	}
	if err := st.Unpin(ctx, p.owner); err != nil {
		return nil, err
	}
	sum := m.Summarize()
	res := &Result{Name: o.Name, Manifest: mid, Format: format, Container: container, Source: ref, Size: m.Size,
		NonZeroBytes: sum.NonZeroBytes, Chunks: sum.Chunks, UniqueChunks: sum.UniqueChunks,
		NewChunks: len(p.newIDs), NewRawBytes: p.newRaw, NewStoredBytes: p.newStored,
		Duration: time.Since(start), Lazy: o.Lazy}
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
	if res.NewStoredBytes > 0 {
		res.CompressionRatio = float64(p.newRaw) / float64(res.NewStoredBytes)
	}
	return res, nil
}

// The values the import's stages hand each other.
type (
	// importSegment is segmentChunks consecutive chunks that share one
	// durable commit. The reader creates it, the workers put into its
	// batch (safe for concurrent use), the collector counts its chunks and
	// fills written, then hands it to the committer, which alone touches
	// it from then on.
	importSegment struct {
		n       int               // its position: segments commit in order
		batch   *chunkstore.Batch // nil for a lazy import
		written []chunkstore.ID   // chunks this segment wrote (claimed in inflight)
		done    int               // chunks collected (collector)
		settled bool              // committed, or its commit failed (committer)
	}
	// importChunk is one chunk cut by the reader, for a worker. buf goes
	// back to the pool once the worker is done with data.
	importChunk struct {
		idx  int
		seg  *importSegment
		data []byte
		buf  *[]byte
	}
	// importEntry is what the manifest records of a chunk.
	importEntry struct {
		length int64
		id     chunkstore.ID
		zero   bool
	}
	// importDone is a worker's result for one chunk, for the collector.
	importDone struct {
		idx    int
		seg    *importSegment
		entry  importEntry
		stored int64 // > 0: this chunk was written by this import
	}
)

// importPipeline is the state of one Import. The stages own disjoint parts
// of it; Import reads the results after run returns (errgroup.Wait orders it).
type importPipeline struct {
	st    *chunkstore.Store
	o     Options
	owner string // pin owner of the import's chunks until the image is registered
	total int64  // the source's announced size, for Progress

	// inflight holds the chunks written by segments not committed yet: the
	// store cannot see them, so a chunk that recurs in a later segment
	// would otherwise be written twice. Workers claim, the committer
	// releases; nothing blocks while holding it.
	inflight inflightSet

	// Reader's; read by fail after run.
	segs    []*importSegment
	nchunks int         // chunks cut, valid once readAll is set
	readAll atomic.Bool // the reader reached the end of the stream
	// Collector's.
	entries   []importEntry
	newIDs    []chunkstore.ID
	newRaw    int64
	newStored int64
}

// run drives the stages to the end of the stream, or to the first error.
func (p *importPipeline) run(ctx context.Context, split chunkstore.Splitter) error {
	g, gctx := errgroup.WithContext(ctx)
	pool := sync.Pool{New: func() any { b := make([]byte, p.o.Chunking.Max); return &b }}
	chunks := make(chan importChunk, p.o.Workers*4)
	dones := make(chan importDone, p.o.Workers*4)
	// One segment may be committing while two more wait, so that a slow
	// fsync does not stall the reader at once; when a fourth completes the
	// collector blocks, then the workers, then the reader. So an import
	// holds at most 5*Workers+1 chunk buffers in memory, and about five
	// segments of pack bytes that are not durable yet (those complete and
	// the one or two being cut).
	ready := make(chan *importSegment, 2)

	g.Go(func() error {
		err := p.read(gctx, split, &pool, chunks)
		if err == nil {
			p.readAll.Store(true)
		}
		close(chunks)
		return err
	})
	var workers sync.WaitGroup
	for range p.o.Workers {
		workers.Add(1)
		g.Go(func() error {
			defer workers.Done()
			return p.work(gctx, &pool, chunks, dones)
		})
	}
	g.Go(func() error {
		workers.Wait()
		close(dones)
		return nil
	})
	g.Go(func() error {
		defer close(ready)
		return p.collect(gctx, dones, ready)
	})
	g.Go(func() error { return p.commit(gctx, ready) })
	return g.Wait()
}

// read cuts the stream into chunks and hands them to the workers in order.
func (p *importPipeline) read(ctx context.Context, split chunkstore.Splitter, pool *sync.Pool, out chan<- importChunk) error {
	var done int64
	lastProgress := time.Now()
	var seg *importSegment
	n := 0
	for ; ; n++ {
		b, err := split.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return err // the origin's error names the source and what to do
		}
		if n%p.o.segmentChunks == 0 {
			seg = &importSegment{n: len(p.segs)}
			if !p.o.Lazy {
				seg.batch = p.st.NewBatch(p.owner)
			}
			p.segs = append(p.segs, seg)
		}
		buf := pool.Get().(*[]byte)
		data := append((*buf)[:0], b...)
		select {
		case out <- importChunk{idx: n, seg: seg, data: data, buf: buf}:
		case <-ctx.Done():
			pool.Put(buf)
			return ctx.Err()
		}
		done += int64(len(data))
		if p.o.Progress != nil && time.Since(lastProgress) > 100*time.Millisecond {
			p.o.Progress(done, p.total)
			lastProgress = time.Now()
		}
	}
	p.nchunks = n
	if p.o.Progress != nil {
		p.o.Progress(done, p.total)
	}
	return nil
}

// work checks, hashes and (unless lazy) compresses and writes chunks.
func (p *importPipeline) work(ctx context.Context, pool *sync.Pool, in <-chan importChunk, out chan<- importDone) error {
	for c := range in {
		d := importDone{idx: c.idx, seg: c.seg, entry: importEntry{length: int64(len(c.data)), zero: chunkstore.IsZero(c.data)}}
		if !d.entry.zero {
			d.entry.id = chunkstore.Sum(c.data)
			if c.seg.batch != nil && p.inflight.claim(d.entry.id) {
				// The ID was just computed from these bytes: no second hash.
				stored, err := c.seg.batch.PutHashed(ctx, d.entry.id, c.data)
				if err != nil {
					pool.Put(c.buf)
					return err
				}
				if stored == 0 {
					p.inflight.release(d.entry.id) // already in the store
				}
				d.stored = stored
			}
		}
		pool.Put(c.buf)
		select {
		case out <- d:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

// collect records each chunk's manifest entry and hands each complete
// segment, in order, to the committer.
func (p *importPipeline) collect(ctx context.Context, in <-chan importDone, out chan<- *importSegment) error {
	var segs []*importSegment // by position, as they are first seen
	next := 0                 // the first segment not handed on
	collected := 0
	for d := range in {
		collected++
		if d.idx >= len(p.entries) {
			p.entries = append(p.entries, make([]importEntry, d.idx+1-len(p.entries))...)
		}
		p.entries[d.idx] = d.entry
		s := d.seg
		if s.n >= len(segs) {
			segs = append(segs, make([]*importSegment, s.n+1-len(segs))...)
		}
		segs[s.n] = s
		if d.stored > 0 {
			s.written = append(s.written, d.entry.id)
			p.newIDs = append(p.newIDs, d.entry.id)
			p.newRaw += d.entry.length
			p.newStored += d.stored
		}
		s.done++
		for ; next < len(segs) && segs[next] != nil && segs[next].done == p.o.segmentChunks; next++ {
			if err := send(ctx, out, segs[next]); err != nil {
				return err
			}
		}
	}
	// The input ended. Unless a stage failed (its error is the import's),
	// every chunk was collected and only the last segment is not full.
	if !p.readAll.Load() || collected != p.nchunks {
		return nil
	}
	for ; next < len(segs); next++ {
		if err := send(ctx, out, segs[next]); err != nil {
			return err
		}
	}
	return nil
}

// commit makes each segment durable, in order, while later ones are cut.
func (p *importPipeline) commit(ctx context.Context, in <-chan *importSegment) error {
	for s := range in {
		s.settled = true
		if s.batch == nil {
			continue // lazy: nothing was written
		}
		if p.o.beforeCommit != nil {
			if err := p.o.beforeCommit(s.n); err != nil {
				s.batch.Abort()
				return err
			}
		}
		if err := s.batch.Commit(ctx); err != nil {
			return err // the batch removed what it wrote
		}
		p.inflight.release(s.written...)
	}
	return nil
}

// fail undoes an import that cannot complete: it leaves nothing behind, neither
// the import's pins nor the chunks it added that no image references.
func (p *importPipeline) fail(ctx context.Context, src origin.Source, err error) (*Result, error) {
	cctx := context.WithoutCancel(ctx)
	for _, s := range p.segs {
		if s.batch != nil && !s.settled {
			s.batch.Abort()
		}
	}
	p.st.Unpin(cctx, p.owner)
	var orphans []chunkstore.ID
	for _, id := range p.newIDs {
		if ref, _ := p.st.Referenced(cctx, id); !ref {
			if pin, _ := p.st.Pinned(cctx, id); !pin {
				orphans = append(orphans, id)
			}
		}
	}
	p.st.Delete(cctx, orphans...)
	return nil, fmt.Errorf("import %s: %w", src.Ref().Location, err)
}

// send hands v to the next stage, or gives up when ctx is done.
func send[T any](ctx context.Context, ch chan<- T, v T) error {
	select {
	case ch <- v:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// inflightSet is a set of chunk IDs safe for concurrent use.
type inflightSet struct {
	mu  sync.Mutex
	ids map[chunkstore.ID]struct{}
}

// claim adds id and reports whether it was not in the set yet.
func (s *inflightSet) claim(id chunkstore.ID) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.ids[id]; ok {
		return false
	}
	if s.ids == nil {
		s.ids = make(map[chunkstore.ID]struct{})
	}
	s.ids[id] = struct{}{}
	return true
}

func (s *inflightSet) release(ids ...chunkstore.ID) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, id := range ids {
		delete(s.ids, id)
	}
}
