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
// Usage (chunks, bytes) is derived from the index at open and kept in memory,
// so it cannot drift from what is stored.
//
// # Crash safety
//
// A commit (Batch.Commit, or Put for one chunk) appends entries to the current
// pack, fdatasyncs each pack it wrote, and only then writes all index records in
// one synced pebble batch. So an index record never points at bytes that are not
// durable, and entries written but never indexed (a crash between the two
// steps) are dead bytes that no one reads. After an unclean shutdown, packs with
// nothing live are deleted at open; other dead bytes are reclaimed by
// compaction, which copies the live entries of mostly dead packs into a new
// pack, commits their new locations, then deletes the old pack.
//
// # Quota and eviction
//
// When the packs pass the high watermark (95% of the quota by default), live
// bytes are evicted down to the low watermark (85%), least recently used first
// (an EvictionPolicy can replace LRU), skipping every pinned chunk; then packs
// are compacted. Access times are batched in memory and written to the index
// every 4096 reads. A commit that cannot fit even after that fails with ErrFull.
//
// # References and pins
//
// Storing a manifest records a reference from it to each of its chunks; removing
// a manifest removes those, and GC deletes chunks that nothing references or
// pins. So removing one image never deletes a chunk another image still uses.
// Pins are per owner (an image, a live export, an import in progress) and
// idempotent.
package chunkstore
