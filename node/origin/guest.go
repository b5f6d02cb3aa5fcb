package origin

import (
	"bytes"
	"container/list"
	"context"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/klauspost/compress/zstd"
	"github.com/lima-vm/go-qcow2reader/image"
	"github.com/lima-vm/go-qcow2reader/image/qcow2"
	qlog "github.com/lima-vm/go-qcow2reader/log"
)

// Containers: disk image formats whose guest content hoard can serve (see
// [OpenGuest]). Only qcow2 is read; the others are recognised so that an
// import can say what to do with them.
const (
	ContainerQcow2 = "qcow2"
	ContainerVMDK  = "vmdk"
	ContainerVHDX  = "vhdx"
	ContainerVDI   = "vdi"
	ContainerVPC   = "vpc"
)

// ErrContainer is wrapped by the errors of images whose container hoard
// cannot read the guest content of: a qcow2 with a backing file, an encrypted
// or corrupt one, a container format it has no reader for. It also matches
// ErrInvalid: fixing the image or the request (--format raw) helps, retrying
// does not.
var ErrContainer = errors.New("cannot read the image's guest content")

// containerError is an image that cannot be opened as a guest view: its
// message as written; errors.Is(err, ErrContainer) and errors.Is(err, ErrInvalid).
type containerError struct{ msg string }

func (e *containerError) Error() string { return e.msg }
func (e *containerError) Is(target error) bool {
	return target == ErrContainer || target == ErrInvalid
}

func containerf(format string, args ...any) error {
	return &containerError{fmt.Sprintf(format, args...)}
}

func init() {
	// go-qcow2reader logs warnings (dirty bit, header oddities) through the
	// standard logger; hoard checks what matters itself (qcow2Header.check).
	qlog.SetWarnFunc(nil)
	qcow2.SetDecompressor(qcow2.CompressionTypeZstd, func(r io.Reader) (io.ReadCloser, error) {
		// A cluster is at most 2 MiB: a frame that claims a larger window
		// is corrupt, and must not make the decoder allocate it.
		d, err := zstd.NewReader(r, zstd.WithDecoderConcurrency(1), zstd.WithDecoderLowmem(true), zstd.WithDecoderMaxMemory(8<<20), zstd.WithDecoderMaxWindow(8<<20))
		if err != nil {
			return nil, err
		}
		return d.IOReadCloser(), nil
	})
}

// SniffContainer names the container whose magic starts head (the first
// sector or more of an image), or returns "" for anything else (raw). A VHD
// (vpc) is recognised by its dynamic-disk header; a fixed VHD is raw bytes
// followed by a footer and sniffs as raw.
func SniffContainer(head []byte) string {
	switch {
	case bytes.HasPrefix(head, []byte(qcow2.Magic)):
		return ContainerQcow2
	case bytes.HasPrefix(head, []byte("KDMV")), bytes.HasPrefix(head, []byte("COWD")), bytes.HasPrefix(head, []byte("# Disk DescriptorFile")):
		return ContainerVMDK
	case bytes.HasPrefix(head, []byte("vhdxfile")):
		return ContainerVHDX
	case bytes.HasPrefix(head, []byte("conectix")):
		return ContainerVPC
	case len(head) >= 0x44 && binary.LittleEndian.Uint32(head[0x40:]) == 0xbeda107f:
		return ContainerVDI
	}
	return ""
}

// ContainerOf maps a Glance disk_format to a container ("" for raw and the
// formats whose bytes are what the guest sees, such as iso).
func ContainerOf(diskFormat string) string {
	switch f := strings.ToLower(diskFormat); f {
	case ContainerQcow2, ContainerVMDK, ContainerVHDX, ContainerVDI:
		return f
	case "vhd":
		return ContainerVPC
	}
	return ""
}

// Guest sizes.
const (
	// guestBlock is the unit of the origin reads under a guest view: qcow2
	// metadata and (compressed) clusters are small and mostly adjacent in
	// guest order, so each is read as part of a block shared with its
	// neighbours instead of by a request of its own.
	guestBlock = 128 << 10
	// guestCacheBlocks bounds the origin blocks a guest view keeps (16 MiB).
	guestCacheBlocks = 128
	// guestIdleReaders bounds the opened qcow2 readers kept for reuse.
	guestIdleReaders = 8
	// maxL1Bytes is qemu's limit on the L1 table (QCOW_MAX_L1_SIZE).
	maxL1Bytes = 32 << 20
)

// GuestSource is the guest view of a container (qcow2) in an origin: a Source
// whose bytes are what the guest sees, read lazily through go-qcow2reader
// over the container source's ReadAt. Unallocated and zero clusters read as
// zeros without an origin read. It is safe for concurrent use.
//
// go-qcow2reader reads through an io.ReaderAt, which takes no context. Each
// operation (ReadAt, a Stream's Read) takes an opened reader of its own from
// a pool, hands that reader's adapter the operation's context, and returns it
// when done: so every origin read runs under the context of the operation
// that caused it, and concurrent operations never share a reader (whose L2
// table cache is not safe for concurrent use).
type GuestSource struct {
	src       Source
	container string
	size      int64
	blocks    *blockCache

	mu   sync.Mutex
	idle []*guestReader
}

// guestReader is one opened qcow2 reader and the adapter under it.
type guestReader struct {
	img image.Image
	ra  *ctxReaderAt
}

// ctxReaderAt is the io.ReaderAt go-qcow2reader reads the container
// through: the origin, read in blocks (blockCache), under ctx, which the
// operation holding the reader sets before it reads and clears after.
type ctxReaderAt struct {
	ctx    context.Context
	blocks *blockCache
}

func (r *ctxReaderAt) ReadAt(p []byte, off int64) (int, error) {
	size := r.blocks.size
	if off < 0 {
		return 0, fmt.Errorf("read at negative offset %d", off)
	}
	if off >= size {
		return 0, io.EOF
	}
	n := int(min(int64(len(p)), size-off))
	if err := r.blocks.readAt(r.ctx, p[:n], off); err != nil {
		return 0, err
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// OpenGuest opens the guest view of src, whose content is in container
// (ContainerQcow2; others give an error saying what to do). It reads and
// checks the header first and refuses, with an error naming the image and
// what to do (wrapping ErrContainer), a qcow2 with a backing file, an
// encrypted one, one with an external data file, or a corrupt header. The
// returned source owns src: its Close closes src.
func OpenGuest(ctx context.Context, src Source, container string) (*GuestSource, error) {
	name := Redact(src.Ref().Location)
	if container != ContainerQcow2 {
		return nil, containerf("image %s is %s: hoard reads the guest content of qcow2 images only; convert it (qemu-img convert -O qcow2 IN OUT, or -O raw) and add that, or add it with --format raw to serve its bytes as they are", name, container)
	}
	g := &GuestSource{src: src, container: container, blocks: newBlockCache(src)}
	head := make([]byte, min(int64(qcow2HeaderMax), src.Size()))
	if err := g.blocks.readAt(ctx, head, 0); err != nil {
		return nil, fmt.Errorf("read the qcow2 header of %s: %w", name, err)
	}
	h, err := parseQcow2Header(head, src.Size())
	if err != nil {
		return nil, containerf("image %s: %v", name, err)
	}
	if h.backingOffset != 0 {
		bname := ""
		b := make([]byte, h.backingSize) // checked by parseQcow2Header
		if g.blocks.readAt(ctx, b, int64(h.backingOffset)) == nil {
			bname = fmt.Sprintf(" (%q)", b)
		}
		return nil, containerf("image %s is a qcow2 with a backing file%s: hoard serves self-contained images only; flatten it (qemu-img convert -O qcow2 IN OUT) and add that", name, bname)
	}
	if h.cryptMethod != 0 {
		method := "aes"
		if h.cryptMethod == 2 {
			method = "luks"
		}
		return nil, containerf("image %s is an encrypted qcow2 (%s): hoard cannot read its guest content; decrypt it (qemu-img convert --object secret,... --image-opts ... -O qcow2 OUT) and add that, or add it with --format raw to serve the encrypted bytes as they are", name, method)
	}
	r, err := g.open(ctx)
	if err != nil {
		return nil, containerf("image %s: corrupt qcow2: %v; check it with qemu-img check, or add it with --format raw", name, err)
	}
	g.size = r.img.Size()
	if g.size != int64(h.size) {
		return nil, containerf("image %s: corrupt qcow2: virtual size %d, header says %d", name, g.size, h.size)
	}
	g.put(r)
	return g, nil
}

// open opens a new qcow2 reader over the block cache, under ctx.
func (g *GuestSource) open(ctx context.Context) (*guestReader, error) {
	ra := &ctxReaderAt{ctx: ctx, blocks: g.blocks}
	defer func() { ra.ctx = nil }()
	// nil openWithType: a backing file (refused before) is never opened.
	img, err := qcow2.Open(ra, nil)
	if err != nil {
		return nil, err
	}
	if err := img.Readable(); err != nil {
		return nil, err
	}
	return &guestReader{img: img, ra: ra}, nil
}

// get takes an idle reader, or opens one.
func (g *GuestSource) get(ctx context.Context) (*guestReader, error) {
	g.mu.Lock()
	if n := len(g.idle); n > 0 {
		r := g.idle[n-1]
		g.idle = g.idle[:n-1]
		g.mu.Unlock()
		return r, nil
	}
	g.mu.Unlock()
	r, err := g.open(ctx)
	if err != nil {
		return nil, fmt.Errorf("open the qcow2 image %s: %w", Redact(g.src.Ref().Location), err)
	}
	return r, nil
}

// put returns a reader for reuse.
func (g *GuestSource) put(r *guestReader) {
	r.ra.ctx = nil
	g.mu.Lock()
	defer g.mu.Unlock()
	if len(g.idle) < guestIdleReaders {
		g.idle = append(g.idle, r)
	}
}

// Ref is the container's origin reference.
func (g *GuestSource) Ref() Ref { return g.src.Ref() }

// Size is the guest (virtual) size.
func (g *GuestSource) Size() int64 { return g.size }

// Container is the container format, ContainerQcow2.
func (g *GuestSource) Container() string { return g.container }

// Format reports "raw": the guest view's bytes are a raw disk.
func (g *GuestSource) Format() string { return "raw" }

// OriginBytes is how many bytes the guest view read from the origin so far.
func (g *GuestSource) OriginBytes() int64 {
	g.blocks.mu.Lock()
	defer g.blocks.mu.Unlock()
	return g.blocks.fetched
}

// ReadAt fills p with the guest bytes at off; [off, off+len(p)) must lie
// within Size. The origin reads it causes run under ctx.
func (g *GuestSource) ReadAt(ctx context.Context, p []byte, off int64) error {
	if err := checkSpan(Redact(g.src.Ref().Location), g.size, len(p), off); err != nil {
		return err
	}
	if len(p) == 0 {
		return nil
	}
	r, err := g.get(ctx)
	if err != nil {
		return err
	}
	r.ra.ctx = ctx
	n, err := readFull(r.img, p, off)
	if err != nil {
		// The reader's state may not be whole after a failed read: drop it.
		r.img.Close()
		if cerr := ctx.Err(); cerr != nil && !errors.Is(err, cerr) {
			err = fmt.Errorf("%w (%w)", err, cerr)
		}
		return fmt.Errorf("read the guest content of %s at [%d, %d): %w", Redact(g.src.Ref().Location), off, off+int64(len(p)), err)
	}
	if n != len(p) {
		r.img.Close()
		return fmt.Errorf("%w: guest content of %s: read %d bytes at %d, want %d", ErrShort, Redact(g.src.Ref().Location), n, off, len(p))
	}
	g.put(r)
	return nil
}

// readFull reads all of p at off from img. go-qcow2reader v0.7.0 ends a read
// with a (wrapped) io.EOF as soon as a compressed cluster's stream ends within
// the Read that returned its last bytes, though more of p was asked for:
// such a read made progress, and goes on where it stopped.
func readFull(img image.Image, p []byte, off int64) (int, error) {
	n := 0
	for n < len(p) {
		k, err := img.ReadAt(p[n:], off+int64(n))
		n += max(k, 0)
		if err == nil && k == 0 {
			return n, io.ErrNoProgress
		}
		if err == nil {
			continue
		}
		if errors.Is(err, io.EOF) && k > 0 {
			continue
		}
		if n == len(p) && errors.Is(err, io.EOF) {
			break
		}
		return n, err
	}
	return n, nil
}

// Stream reads the guest content from the start, in order. When the origin
// announced a checksum, the stream also hashes the container's blocks in
// file order as it goes (reading the few blocks the guest view never needs,
// such as refcount tables, when it passes them), and at its end it returns
// an error wrapping ErrChecksum instead of io.EOF if they do not match. Only
// the first such stream of a GuestSource verifies.
func (g *GuestSource) Stream(ctx context.Context) (io.ReadCloser, error) {
	s := &guestStream{g: g, ctx: ctx}
	algo, want, h, err := parseChecksum(g.src.Ref().Checksum)
	if err != nil {
		return nil, fmt.Errorf("stream %s: %w", Redact(g.src.Ref().Location), err)
	}
	if h != nil {
		v := &verifier{algo: algo, want: want, h: h}
		if g.blocks.verify.CompareAndSwap(nil, v) {
			s.v = v
		}
	}
	return s, nil
}

// Close closes the container source.
func (g *GuestSource) Close() error {
	g.mu.Lock()
	g.idle = nil
	g.mu.Unlock()
	return g.src.Close()
}

// guestStream reads a GuestSource in order, in large reads.
type guestStream struct {
	g   *GuestSource
	ctx context.Context
	off int64
	v   *verifier // nil: no checksum to verify
}

func (s *guestStream) Read(p []byte) (int, error) {
	if s.off >= s.g.size {
		if s.v != nil {
			if err := s.v.finish(s.ctx, s.g.blocks, Redact(s.g.src.Ref().Location)); err != nil {
				return 0, err
			}
		}
		return 0, io.EOF
	}
	n := int(min(int64(len(p)), s.g.size-s.off, 4<<20))
	if err := s.g.ReadAt(s.ctx, p[:n], s.off); err != nil {
		return 0, err
	}
	s.off += int64(n)
	return n, nil
}

func (s *guestStream) Close() error { return nil }

// verifier hashes a container's blocks in file order, for its checksum.
type verifier struct {
	algo, want string

	mu   sync.Mutex
	h    hash.Hash
	next int64 // the next block to hash
	err  error // the first read error, which ends the verification
}

// upTo hashes the blocks up to and including idx that are not hashed yet,
// reading those that are not cached.
func (v *verifier) upTo(ctx context.Context, c *blockCache, idx int64) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	for v.err == nil && v.next <= idx {
		b, err := c.block(ctx, v.next)
		if err != nil {
			v.err = err
			break
		}
		v.h.Write(b)
		v.next++
	}
	return v.err
}

// finish hashes the rest of the container and checks the sum.
func (v *verifier) finish(ctx context.Context, c *blockCache, name string) error {
	if c.size > 0 {
		if err := v.upTo(ctx, c, (c.size-1)/guestBlock); err != nil {
			return fmt.Errorf("verify the checksum of %s: %w", name, err)
		}
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if got := hex.EncodeToString(v.h.Sum(nil)); got != v.want {
		return mark(ErrChecksum, "image %s: checksum mismatch: %s is %s, the origin announced %s: the image is corrupt or changed at the origin; re-upload it or fix the announced checksum", name, v.algo, got, v.want)
	}
	return nil
}

// blockCache reads an origin in aligned guestBlock blocks and keeps the last
// guestCacheBlocks of them; concurrent reads of one block share one origin
// read.
type blockCache struct {
	src  Source
	size int64

	// verify, when set, is a verifying Stream's: every read first hashes
	// the blocks before the ones it reads (see Stream).
	verify atomic.Pointer[verifier]

	mu      sync.Mutex
	blocks  map[int64]*cacheBlock
	lru     list.List // of *cacheBlock with data, most recent first
	fetched int64     // bytes read from the origin
}

type cacheBlock struct {
	idx  int64
	done chan struct{} // closed once data or err is set
	data []byte
	err  error
	elem *list.Element
}

func newBlockCache(src Source) *blockCache {
	return &blockCache{src: src, size: src.Size(), blocks: make(map[int64]*cacheBlock)}
}

// readAt fills p from off; the span must lie within the origin.
func (c *blockCache) readAt(ctx context.Context, p []byte, off int64) error {
	if ctx == nil {
		return errors.New("guest view read outside of an operation; this is a bug")
	}
	if off < 0 || off+int64(len(p)) > c.size {
		return fmt.Errorf("read [%d, %d) of the container: outside its %d bytes", off, off+int64(len(p)), c.size)
	}
	if v := c.verify.Load(); v != nil && len(p) > 0 {
		if err := v.upTo(ctx, c, (off+int64(len(p))-1)/guestBlock); err != nil {
			return err
		}
	}
	for len(p) > 0 {
		idx := off / guestBlock
		b, err := c.block(ctx, idx)
		if err != nil {
			return err
		}
		n := copy(p, b[off-idx*guestBlock:])
		p = p[n:]
		off += int64(n)
	}
	return nil
}

// block returns block idx, reading it from the origin if needed.
func (c *blockCache) block(ctx context.Context, idx int64) ([]byte, error) {
	c.mu.Lock()
	b := c.blocks[idx]
	if b != nil {
		if b.elem != nil {
			c.lru.MoveToFront(b.elem)
		}
		c.mu.Unlock()
		select {
		case <-b.done:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		if b.err != nil {
			return nil, b.err
		}
		return b.data, nil
	}
	b = &cacheBlock{idx: idx, done: make(chan struct{})}
	c.blocks[idx] = b
	c.mu.Unlock()

	start := idx * guestBlock
	buf := make([]byte, min(guestBlock, c.size-start))
	err := c.src.ReadAt(ctx, buf, start)

	c.mu.Lock()
	if err != nil {
		// Not cached: the next read tries again.
		delete(c.blocks, idx)
		b.err = err
	} else {
		b.data = buf
		c.fetched += int64(len(buf))
		b.elem = c.lru.PushFront(b)
		for c.lru.Len() > guestCacheBlocks {
			old := c.lru.Remove(c.lru.Back()).(*cacheBlock)
			delete(c.blocks, old.idx)
		}
	}
	c.mu.Unlock()
	close(b.done)
	return b.data, err
}

// qcow2HeaderMax is how many bytes of a qcow2 file parseQcow2Header reads:
// the v3 header with the compression type byte, and then some.
const qcow2HeaderMax = 512

// qcow2Header is what hoard checks of a qcow2 header before handing the
// image to go-qcow2reader.
type qcow2Header struct {
	version       uint32
	backingOffset uint64
	backingSize   uint32
	clusterBits   uint32
	size          uint64
	cryptMethod   uint32
	l1Size        uint32
	l1Offset      uint64
}

// parseQcow2Header parses and checks the header at the start of a qcow2 file
// of fileSize bytes. Its errors say what is wrong, without the image's name.
// A backing file and encryption are reported by the caller from the fields.
func parseQcow2Header(b []byte, fileSize int64) (*qcow2Header, error) {
	be := binary.BigEndian
	if len(b) < 72 || string(b[:4]) != qcow2.Magic {
		return nil, errors.New("not a qcow2 image (no qcow2 header); add it with --format raw if its bytes are what the guest sees")
	}
	h := &qcow2Header{
		version:       be.Uint32(b[4:]),
		backingOffset: be.Uint64(b[8:]),
		backingSize:   be.Uint32(b[16:]),
		clusterBits:   be.Uint32(b[20:]),
		size:          be.Uint64(b[24:]),
		cryptMethod:   be.Uint32(b[32:]),
		l1Size:        be.Uint32(b[36:]),
		l1Offset:      be.Uint64(b[40:]),
	}
	corrupt := func(format string, args ...any) error {
		return fmt.Errorf("corrupt qcow2 header: "+format+"; check the image with qemu-img check, or add it with --format raw", args...)
	}
	if h.version != 2 && h.version != 3 {
		return nil, fmt.Errorf("qcow2 version %d is not supported (want 2 or 3); convert it with qemu-img convert -O qcow2 IN OUT", h.version)
	}
	if h.clusterBits < 9 || h.clusterBits > 21 {
		return nil, corrupt("cluster bits %d out of range [9, 21]", h.clusterBits)
	}
	cluster := uint64(1) << h.clusterBits
	if h.backingOffset != 0 {
		// As qemu checks it: the name lies in the first cluster.
		if h.backingSize == 0 || h.backingSize > 1023 || h.backingOffset > cluster || h.backingOffset+uint64(h.backingSize) > uint64(fileSize) {
			return nil, corrupt("backing file name of %d bytes at %d", h.backingSize, h.backingOffset)
		}
		return h, nil // the caller explains
	}
	if h.cryptMethod != 0 {
		if h.cryptMethod > 2 {
			return nil, corrupt("encryption method %d", h.cryptMethod)
		}
		return h, nil // the caller explains
	}
	if h.size > 1<<55 {
		return nil, corrupt("virtual size %d out of range", h.size)
	}
	if h.version == 3 {
		if len(b) < 104 {
			return nil, corrupt("version 3 header truncated")
		}
		incompat := be.Uint64(b[72:])
		hlen := be.Uint32(b[100:])
		if hlen < 104 || uint64(hlen) > cluster || int64(hlen) > fileSize {
			return nil, corrupt("header length %d", hlen)
		}
		const (
			dirty      = 1 << 0
			corruptBit = 1 << 1
			external   = 1 << 2
			compress   = 1 << 3
			extendedL2 = 1 << 4
		)
		if incompat&corruptBit != 0 {
			return nil, errors.New("qcow2 image marked corrupt by qemu; repair it (qemu-img check -r all) and add it again")
		}
		if incompat&external != 0 {
			return nil, errors.New("qcow2 image with an external data file: hoard serves self-contained images only; convert it (qemu-img convert -O qcow2 IN OUT) and add that")
		}
		if incompat&^(dirty|compress|extendedL2) != 0 {
			return nil, fmt.Errorf("qcow2 image with unknown incompatible features %#x; convert it with this host's qemu-img (qemu-img convert -O qcow2 IN OUT) and add that", incompat&^(dirty|compress|extendedL2))
		}
		if incompat&compress != 0 {
			if hlen < 105 || len(b) < 105 {
				return nil, corrupt("compression type bit set, header length %d", hlen)
			}
			if ct := b[104]; ct > 1 {
				return nil, fmt.Errorf("qcow2 compression type %d is not supported (zlib and zstd are); convert it (qemu-img convert -O qcow2 IN OUT) and add that", ct)
			}
		} else if hlen >= 105 && len(b) >= 105 && b[104] != 0 {
			return nil, corrupt("compression type %d without the compression type feature", b[104])
		}
	}
	// The L1 table maps the whole virtual size and lies within the file.
	l2Entries := cluster / 8
	if h.version == 3 && be.Uint64(b[72:])&(1<<4) != 0 {
		l2Entries = cluster / 16
	}
	need := (h.size + cluster*l2Entries - 1) / (cluster * l2Entries)
	if uint64(h.l1Size) < need {
		return nil, corrupt("L1 table of %d entries for %d bytes (needs %d)", h.l1Size, h.size, need)
	}
	if uint64(h.l1Size)*8 > maxL1Bytes {
		return nil, corrupt("L1 table of %d entries is larger than qemu's limit", h.l1Size)
	}
	if h.l1Size > 0 && (h.l1Offset == 0 || h.l1Offset%cluster != 0 || h.l1Offset > uint64(fileSize) || uint64(h.l1Size)*8 > uint64(fileSize)-h.l1Offset) {
		return nil, corrupt("L1 table at %d (%d entries) is not within the %d-byte file", h.l1Offset, h.l1Size, fileSize)
	}
	return h, nil
}
