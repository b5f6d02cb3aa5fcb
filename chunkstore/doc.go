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
//	reserve               disk reserve file (see Full disk)
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
//	xrebuild                  -> ""                (present while the index is rebuilt from the packs)
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
// and returns the error; compaction keeps a pack it cannot read whole, and
// Verify counts the chunk as unreadable (VerifyResult.Unreadable) and goes on.
//
// # Full disk
//
// pebble cannot survive ENOSPC: a failed WAL write reaches Logger.Fatalf
// (which exits the process by default) or panics while rotating the WAL, and
// a failed flush is retried at once, for ever (Open then never returns). So
// the store keeps the index away from a full disk: reserve, a file of 1/16 of
// the filesystem (2 to 64 MiB), holds space for it; every write that adds
// data (chunks, manifests, names, pins, profiles) first checks free space
// (statfs) and fails with ErrDiskFull ("free space under DIR or lower
// store.quota") once less than the reserve's size again is free. When the
// index still hits ENOSPC (vfs.OnDiskFull), the reserve is deleted so it can
// finish, and writes are refused as above; with no reserve left its retries
// are slowed to a few a second, OpenContext gives up with ErrDiskFull, and
// pebble's errors are logged at most about once every 10 s. Writes that free
// space (unpin, remove, GC) go on while the index is not stalled, and reads
// go on throughout. Once twice the reserve is free again, the reserve is
// recreated and writes are accepted. Fatalf never exits: it fails the store
// (ErrFailed, or ErrDiskFull for ENOSPC) until it is reopened; every index
// write goes through one helper (Store.commit) that checks for it, before
// and after the write, so a write that pebble reported only through Fatalf
// fails instead of returning nil, and a failed store writes nothing more
// (Close then keeps the unclean-shutdown marker). Compaction writes its
// copies before it frees a pack, so it too keeps the reserve's worth of
// space free: on a nearly full disk it stops with ErrDiskFull (packs with
// nothing live are still removed), and a Delete, GC or image removal stands
// with its compaction postponed.
//
// # Losing the index
//
// The store checks, at most every 100 ms on a write, that index/ and packs/
// are still the directories Open found (same device and inode); if one was
// deleted or replaced, writes fail with ErrFailed telling the user to
// restart (they would go to unlinked files and be lost). What a lost index
// costs: every manifest, name, pin, reference and profile lives only in the
// index, so the images are gone (re-import them, or pull them from peers:
// manifests are fetched by name). The chunk bytes survive in the packs, and
// each pack entry carries its digest, codec and lengths: an Open that finds
// an index with no key at all and packs holding data rebuilds the chunk
// records by reading every pack and verifying each entry (one pass over the
// packs; corrupt entries are skipped, a torn tail ends a pack). The rebuilt
// chunks are unreferenced until their images are registered again, so GC
// or eviction may drop them before that.
//
// # Quota and eviction
//
// A new entry is admitted only if the packs, with it, stay within the quota:
// the room is reserved as the entry is appended, so concurrent writers cannot
// overshoot. When it does not fit, and when a commit finds the packs past the
// high watermark (95% of the quota by default), live bytes are evicted down to
// the low watermark (85%), least recently used first (an EvictionPolicy can
// replace LRU), skipping every pinned chunk and every chunk an open batch found
// already stored (held until the batch commits and pins it, or aborts; GC
// and image removal skip those too); then
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
// RemoveName does all of it in one step under the eviction lock. Pins are per
// owner (an image, a live export, an import in progress) and idempotent. An
// import's pins (owner "import:...") cannot outlive its process: Open drops
// them. A name points at one manifest: PutNamedManifest stores both in one
// commit, and a name that points elsewhere fails with ErrExists.
//
// # Closing
//
// Every exported call that uses the index or the packs registers with Close
// (Store.enter); Close waits for those in flight and then closes the index,
// and every call after Close fails with ErrClosed. A call that waits for
// another (for room, for a compaction, for another commit's claim on a
// chunk) gives up with ErrClosed when Close begins, so Close waits only for
// work that is running.
//
// # Locks and I/O
//
// The pack set's lock, which every pack read takes, is never held across a
// file create or fsync: a new pack is created and its directory synced under
// a separate lock (rotateMu), then installed.
package chunkstore
