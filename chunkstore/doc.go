// Package chunkstore is hoard's local, content-addressed, deduplicated and
// compressed store of image chunks, with the manifests (image recipes) and
// profiles (boot working sets) that refer to them. It imports nothing of
// hoard's.
//
// # Identity
//
// A chunk is named by its ID: CIDv1, codec raw, multihash sha2-256 of the
// uncompressed bytes (the CID IPFS gives the same block). Every read verifies
// the bytes against the ID; a chunk that fails is dropped and reported as
// ErrCorrupt, never served. A manifest's ID is the same kind of CID over its
// canonical encoding (see Manifest.Encode): the image identity.
//
// # On-disk format (a directory)
//
//	packs/XXXXXXXX.pack   append-only pack files of chunk entries
//	index/                a pebble database (the index)
//
// A pack entry is "HP\x01", codec (0 raw, 1 zstd, 2 s2), the raw length and
// the payload length (4 bytes little-endian each), the 32-byte sha2-256
// digest, then the payload. Chunks are compressed with the store's codec (zstd
// by default) and stored raw when that saves less than 1/32. zstd payloads
// are single frames written without a content checksum (the sha2-256 check on
// every read covers it); frames written with one by older versions decode too. Packs are sealed at 64 MiB (quota/32 for small quotas)
// and a new one is started on every open.
//
// Index keys (one byte prefix, then binary fields):
//
//	c digest                  -> chunk record: entry length, raw length, codec, access time, pack, offset
//	a atime(8, BE) digest     -> entry length      (LRU order for eviction)
//	k pack(4, BE) digest      -> ""                (entries of a pack, for compaction)
//	r chunk-digest manifest-digest -> ""           (reference from an image; GC keeps referenced chunks)
//	p digest owner            -> ""                (pin; never evicted while any owner pins it)
//	P owner 0x00 digest       -> ""                (the same pin, by owner, to unpin all at once)
//	m manifest-digest         -> manifest encoding
//	n name                    -> manifest digest
//	f manifest-digest         -> profile encoding
//	xopen                     -> ""                (present while open: detects an unclean shutdown)
//
// Usage (chunks, bytes) and the live bytes of each pack are derived from the
// index at open and then kept in memory, changed only in the same critical
// section as the index write that changes them, so they equal what a recount
// gives: records are moved by one compaction at a time, under the exclusive
// lock; deletes count a repeated chunk once. A pack is removed only when the
// index has nothing in it, whatever the counts say.
//
// # Crash safety
//
// A commit (Batch.Commit, or Put for one chunk) appends entries to the current
// pack, fdatasyncs each pack it wrote, and only then writes all index records in
// one synced pebble batch. So an index record never points at bytes that are not
// durable, and entries written but never indexed (a crash between the two
// steps) are dead bytes that no one reads; so are the entries of a commit that
// failed or a batch that was aborted. After an unclean shutdown, packs with
// nothing live are deleted at open; other dead bytes are reclaimed by
// compaction, which copies the live entries of mostly dead packs into the
// current pack, commits their new locations, then deletes the old pack.
// Compaction has one owner at a time.
//
// # Reads and corrupt chunks
//
// A read looks the chunk's record up, then reads the entry. If the entry is
// gone or wrong and the record has changed meanwhile (compaction moved the
// chunk and removed the pack), it looks again. A chunk is dropped only when
// its bytes were read and failed verification (header, decoding or sha2-256)
// and its record still points where they were read: the check and the delete
// are one step under the lock every move takes. A read that fails (EIO,
// ENOMEM, a short read of a pack whose file is long enough) keeps the chunk
// and returns the error; compaction keeps a pack it cannot read whole.
//
// # Quota and eviction
//
// A new entry is admitted only if the packs, with it, stay within the quota:
// the room is reserved as the entry is appended, so concurrent writers cannot
// overshoot. When it does not fit, and when a commit finds the packs past the
// high watermark (95% of the quota by default), live bytes are evicted down to
// the low watermark (85%), least recently used first (an EvictionPolicy can
// replace LRU), skipping every pinned chunk and every chunk an open batch found
// already stored (held until the batch commits and pins it, or aborts); then
// packs are compacted; and if entries of batches in flight still leave no
// room, more is evicted. A put that cannot fit even after that fails with
// ErrFull. Access times are batched in memory and written to the index every
// 4096 reads.
//
// The slack: the pack files (Usage.DiskBytes) stay within quota + S, where S
// is the size of one pack, quota/32 clamped to [64 KiB, 64 MiB] (or one entry,
// when a single chunk's entry is larger). Only compaction writes past the
// quota: it copies the live bytes of one pack, which is less than the pack,
// before it removes that pack. A pack that compaction cannot read whole stays
// until it can, and its dead bytes with it.
//
// # References and pins
//
// Storing a manifest records a reference from it to each of its chunks; removing
// a manifest removes those, and GC deletes chunks that nothing references or
// pins. So removing one image never deletes a chunk another image still uses.
// Pins are per owner (an image, a live export, an import in progress) and
// idempotent.
package chunkstore
