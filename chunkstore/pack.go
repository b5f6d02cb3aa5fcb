package chunkstore

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"sync"

	"golang.org/x/sys/unix"
)

// Chunk payloads live in append-only pack files (restic-style), not one file
// per chunk: creating a file costs ~160 us on this kind of disk, which capped
// imports near 75 MiB/s. A pack entry is
//
//	"HP\x01" codec(1) raw-length(4, LE) payload-length(4, LE) sha2-256 digest(32) payload
//
// and the index records (pack, offset, entry length) per chunk. Entries that a
// crash left uncommitted, and entries of deleted chunks, are dead bytes that
// compaction reclaims by copying the live entries of a mostly dead pack forward
// and deleting it.

const (
	packMagic      = "HP\x01"
	packHeaderSize = 3 + 1 + 4 + 4 + 32
	maxPackSize    = 64 << 20 // a pack is sealed once it reaches this size...
	minPackSize    = 64 << 10 // ...or quota/32 when that is smaller, but not below this
)

type pack struct {
	id uint32
	f  *os.File

	mu      sync.Mutex
	size    int64 // bytes reserved (the end of the last entry)
	live    int64 // bytes of indexed entries
	pending int   // appended entries not yet committed or aborted
}

func (p *pack) addLive(n int64) {
	p.mu.Lock()
	p.live += n
	p.mu.Unlock()
}

func (p *pack) done() {
	p.mu.Lock()
	p.pending--
	p.mu.Unlock()
}

// sync makes what was appended to p durable.
func (ps *packSet) sync(p *pack) error {
	if h := ps.faults.sync; h != nil {
		if err := h(p.id); err != nil {
			return err
		}
	}
	return unix.Fdatasync(int(p.f.Fd()))
}

type packSet struct {
	dir    string
	target int64        // seal a pack once it reaches this size
	mu     sync.RWMutex // guards packs, cur and total; readers hold it shared while reading
	packs  map[uint32]*pack
	cur    *pack
	next   uint32
	total  int64 // the sum of the packs' sizes: DiskBytes

	// rotateMu: one goroutine at a time creates the next pack, outside mu,
	// so that reads never wait on the file create and directory fsync.
	// next is changed only under both.
	rotateMu sync.Mutex

	faults faults // test hooks
}

// faults are test hooks that force interleavings and inject I/O errors. All
// are nil outside tests; tests set them before the store is used concurrently.
type faults struct {
	afterLookup func(d [32]byte)                               // a read, between its index lookup and its pack read
	readAt      func(pack uint32, off int64, buf []byte) error // a pack read fails with this error when not nil
	sync        func(pack uint32) error                        // a pack fdatasync fails with this error when not nil
	commit      func() error                                   // a Batch.Commit's index write fails with this error when not nil
	claimWait   func(d [32]byte)                               // a commit starts waiting for another's claim on a chunk
	syncDir     func()                                         // runs before the directory fsync of a new pack
}

func packName(id uint32) string { return fmt.Sprintf("%08x.pack", id) }

func (ps *packSet) open() error {
	ps.packs = map[uint32]*pack{}
	ents, err := os.ReadDir(ps.dir)
	if err != nil {
		return err
	}
	for _, e := range ents {
		var id uint32
		if n, err := fmt.Sscanf(e.Name(), "%08x.pack", &id); n != 1 || err != nil || e.Name() != packName(id) {
			continue
		}
		f, err := os.OpenFile(filepath.Join(ps.dir, e.Name()), os.O_RDWR, 0)
		if err != nil {
			return err
		}
		fi, err := f.Stat()
		if err != nil {
			f.Close()
			return err
		}
		ps.packs[id] = &pack{id: id, f: f, size: fi.Size()}
		ps.total += fi.Size()
		if id >= ps.next {
			ps.next = id + 1
		}
	}
	return nil
}

func (ps *packSet) close() error {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	var err error
	for _, p := range ps.packs {
		if cerr := p.f.Close(); err == nil {
			err = cerr
		}
	}
	ps.packs = nil
	return err
}

func (ps *packSet) addLive(id uint32, n int64) {
	ps.mu.RLock()
	p := ps.packs[id]
	ps.mu.RUnlock()
	if p != nil {
		p.addLive(n)
	}
}

func (ps *packSet) moveLiveToDead(id uint32, n int64) { ps.addLive(id, -n) }

func (ps *packSet) diskBytes() int64 {
	ps.mu.RLock()
	defer ps.mu.RUnlock()
	return ps.total
}

// errNoRoom: an append would take the packs past the limit it was given.
var errNoRoom = errors.New("no room in the quota")

// putEntryHeader writes an entry's header into b[:packHeaderSize].
func putEntryHeader(b []byte, digest [32]byte, codec byte, rawLen, payloadLen int) {
	copy(b, packMagic)
	b[3] = codec
	binary.LittleEndian.PutUint32(b[4:], uint32(rawLen))
	binary.LittleEndian.PutUint32(b[8:], uint32(payloadLen))
	copy(b[12:packHeaderSize], digest[:])
}

// append writes one entry to the current pack (see appendEntry).
func (ps *packSet) append(digest [32]byte, codec byte, rawLen int, payload []byte, limit int64) (*pack, int64, int64, error) {
	buf := make([]byte, packHeaderSize+len(payload))
	putEntryHeader(buf, digest, codec, rawLen, len(payload))
	copy(buf[packHeaderSize:], payload)
	p, off, err := ps.appendEntry(buf, limit)
	return p, off, int64(len(buf)), err
}

// appendEntry writes one whole entry, header included, to the current pack,
// starting a new pack when the current one is full, and returns where it
// went. The entry is not durable until the pack is synced; the caller must
// call p.done() once it has indexed or given up the entry. entry is not
// retained. When limit is not 0 and the entry would take the packs past
// limit bytes, nothing is written and the error is errNoRoom: reserving the
// room here, under the lock, keeps concurrent writers from overshooting.
func (ps *packSet) appendEntry(entry []byte, limit int64) (*pack, int64, error) {
	n := int64(len(entry))
	for {
		ps.mu.Lock()
		if ps.packs == nil {
			ps.mu.Unlock()
			return nil, 0, ErrClosed
		}
		if limit > 0 && ps.total+n > limit {
			ps.mu.Unlock()
			return nil, 0, errNoRoom
		}
		p := ps.cur
		if p == nil || !p.fits(n, ps.target) {
			ps.mu.Unlock()
			if err := ps.rotate(n); err != nil {
				return nil, 0, err
			}
			continue // another writer may have filled the new pack meanwhile
		}
		p.mu.Lock()
		off := p.size
		p.size += n
		p.pending++
		p.mu.Unlock()
		ps.total += n
		ps.mu.Unlock()

		if _, err := p.f.WriteAt(entry, off); err != nil {
			p.done()
			return nil, 0, err
		}
		return p, off, nil
	}
}

// fits reports whether an entry of n bytes goes into p (an empty pack takes
// any entry).
func (p *pack) fits(n, target int64) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.size == 0 || p.size+n <= target
}

// rotate starts a new current pack unless another writer did since the
// caller found the current one full (or missing). The file is created and
// the directory synced outside mu: reads of other packs go on meanwhile.
func (ps *packSet) rotate(n int64) error {
	ps.rotateMu.Lock()
	defer ps.rotateMu.Unlock()
	ps.mu.RLock()
	closed, cur, id := ps.packs == nil, ps.cur, ps.next
	ps.mu.RUnlock()
	switch {
	case closed:
		return ErrClosed
	case cur != nil && cur.fits(n, ps.target):
		return nil
	}
	f, err := os.OpenFile(filepath.Join(ps.dir, packName(id)), os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o640)
	if err != nil {
		return err
	}
	if h := ps.faults.syncDir; h != nil {
		h()
	}
	if err := syncDir(ps.dir); err != nil {
		f.Close()
		os.Remove(f.Name())
		return err
	}
	ps.mu.Lock()
	defer ps.mu.Unlock()
	if ps.packs == nil {
		f.Close()
		os.Remove(f.Name())
		return ErrClosed
	}
	p := &pack{id: id, f: f}
	ps.next = id + 1
	ps.packs[id] = p
	ps.cur = p
	return nil
}

// errPackMissing: a record points into a pack that is not in the set. A
// reader that sees it looks the record up again: compaction moves an entry
// before it removes the pack the entry was in.
var errPackMissing = errors.New("pack missing")

// errBadEntry: an entry's bytes were read and do not match its record.
var errBadEntry = errors.New("pack entry does not match the index")

// readError is a failed read of an entry's bytes (EIO, ENOMEM, a short read):
// it says nothing about the bytes, so it is never a reason to drop a chunk.
type readError struct{ err error }

func (e *readError) Error() string { return "read pack entry: " + e.err.Error() }
func (e *readError) Unwrap() error { return e.err }

// maxEntrySize bounds a pack entry: the largest chunk, stored raw or in a
// codec's worst case, with its header.
const maxEntrySize = packHeaderSize + MaxChunkSize + MaxChunkSize/8

// read returns the entry a record points to, checking its header against the
// record and the digest (the payload is verified by the caller). Its errors
// are errPackMissing, a *readError, or errBadEntry (the bytes are wrong).
func (ps *packSet) read(r record, digest [32]byte) (Stored, error) {
	if r.stored < packHeaderSize || r.stored > maxEntrySize {
		return Stored{}, fmt.Errorf("%w: entry length %d out of range", errBadEntry, r.stored)
	}
	buf := make([]byte, r.stored)
	ps.mu.RLock()
	if ps.packs == nil {
		ps.mu.RUnlock()
		return Stored{}, ErrClosed
	}
	p := ps.packs[r.pack]
	var err error
	if p == nil {
		err = fmt.Errorf("%w: %s", errPackMissing, packName(r.pack))
	} else {
		var rerr error
		if h := ps.faults.readAt; h != nil {
			rerr = h(r.pack, r.off, buf)
		}
		if rerr == nil {
			_, rerr = p.f.ReadAt(buf, r.off)
		}
		if rerr != nil {
			err = &readError{rerr}
			// A short read is transient unless the file really ends before
			// the entry: an indexed entry was synced whole, so then the pack
			// was torn or truncated and the bytes are gone.
			if errors.Is(rerr, io.EOF) || errors.Is(rerr, io.ErrUnexpectedEOF) {
				if fi, serr := p.f.Stat(); serr == nil && fi.Size() < r.off+r.stored {
					err = fmt.Errorf("%w: pack %s ends at %d, inside the entry at %d (torn)", errBadEntry, packName(r.pack), fi.Size(), r.off)
				}
			}
		}
	}
	ps.mu.RUnlock()
	if err != nil {
		return Stored{}, err
	}
	return decodeEntry(buf, r, digest)
}

// decodeEntry checks a whole pack entry, header and payload length, against
// the record and digest it is meant to hold; the payload aliases buf.
func decodeEntry(buf []byte, r record, digest [32]byte) (Stored, error) {
	if int64(len(buf)) != r.stored || len(buf) < packHeaderSize ||
		string(buf[:3]) != packMagic || buf[3] != r.codec ||
		int64(binary.LittleEndian.Uint32(buf[4:])) != r.raw ||
		int64(binary.LittleEndian.Uint32(buf[8:]))+packHeaderSize != r.stored ||
		!bytes.Equal(buf[12:44], digest[:]) {
		return Stored{}, errBadEntry
	}
	return Stored{Codec: r.codec, RawLen: int(r.raw), Payload: buf[packHeaderSize:]}, nil
}

// compactable returns packs with no entry in flight whose live bytes are
// below frac of their size, emptiest first. The current pack qualifies too: it
// is sealed first, so that what it holds can move to a new one.
func (ps *packSet) compactable(frac float64) []*pack {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	var out []*pack
	live := map[*pack]int64{}
	for _, p := range ps.packs {
		p.mu.Lock()
		ok := p.pending == 0 && p.size > 0 && float64(p.live) < frac*float64(p.size)
		live[p] = p.live
		p.mu.Unlock()
		if ok {
			out = append(out, p)
			if p == ps.cur {
				ps.cur = nil
			}
		}
	}
	sort.Slice(out, func(i, j int) bool { return live[out[i]] < live[out[j]] })
	return out
}

// remove deletes a pack with nothing live and nothing in flight; it reports
// whether it did.
func (ps *packSet) remove(p *pack) (int64, bool) {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	p.mu.Lock()
	ok := p.live <= 0 && p.pending == 0 && p != ps.cur
	size := p.size
	p.mu.Unlock()
	if !ok || ps.packs[p.id] != p {
		return 0, false
	}
	delete(ps.packs, p.id)
	ps.total -= size
	p.f.Close()
	os.Remove(p.f.Name())
	return size, true
}

// removeEmpty deletes every pack with nothing live (after a crash, packs that
// only hold uncommitted entries).
func (ps *packSet) removeEmpty() int {
	ps.mu.RLock()
	var empty []*pack
	for _, p := range ps.packs {
		empty = append(empty, p)
	}
	ps.mu.RUnlock()
	n := 0
	for _, p := range empty {
		if _, ok := ps.remove(p); ok {
			n++
		}
	}
	return n
}

func packIndexKey(pack uint32, d [32]byte) []byte {
	k := make([]byte, 0, 37)
	k = append(k, pfxPackIndex)
	k = binary.BigEndian.AppendUint32(k, pack)
	return append(k, d[:]...)
}

func syncDir(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}
