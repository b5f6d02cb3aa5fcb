// Package p2p is a hoard node's presence in its cluster: a go-libp2p host on a
// private network, a private Kademlia DHT for discovery, and the chunk-exchange
// protocol. It imports only chunkstore of hoard's.
//
// # Network
//
// The cluster is a private libp2p network: every connection is Noise-encrypted,
// and the Noise handshake is bound to the cluster's pre-shared key (the standard
// /key/swarm/psk/1.0.0/ swarm.key; GenerateSwarmKey, LoadSwarmKey) through its
// prologue, so a peer without the same key cannot complete a handshake. (This
// replaces go-libp2p's pnet layer, a second cipher over the whole connection
// that halved transfer throughput.) A node refuses to start without a key
// unless told it is a test (WithInsecureNoSwarmKey). QUIC's TLS handshake
// cannot carry the key, so a private node drops its QUIC listen addresses. An allow-list of peer IDs
// (WithAllowList) can further restrict who connects. The node key lives in the
// data dir (WithIdentityFile), so the peer ID is stable. The resource manager
// allows many connections per address and unlimited ones from private ranges:
// data-center peers often share a NAT or a pod network (spegel #1523).
//
// Bootstrap entries are multiaddrs ending in /p2p/ID, or dns:NAME[:PORT]
// (compose service names, Kubernetes headless services): every A/AAAA record is
// dialled with a made-up peer ID, the Noise handshake fails and reports the
// real ID, and the node dials again with it (spegel's technique).
//
// # Discovery
//
// The DHT (kad-dht, server mode, protocol prefix /hoard, records in a leveldb
// datastore in the data dir) holds image-level keys only, never one per chunk:
// the manifest CID ("I hold chunks of this image") and NameKey(name), a CID of
// sha256("hoard-name:"+name), whose providers answer RESOLVE with the manifest
// ID. ResolveName asks every provider it finds: when they name different
// manifests (two nodes imported different images under one name) it refuses
// with ErrNameConflict, naming both CIDs, rather than take the first answer;
// the user pulls the one meant by its CID. A node that needs chunks finds the image's providers, asks them for have
// bitmaps, and fetches each chunk from a peer that has it. Run re-announces
// every key each reprovide interval (default 30 min, 8 at a time); records live
// 3 intervals, so a withdrawn image stops being found after at most that.
//
// # Chunk protocol (/hoard/chunks/1.0.0)
//
// A client keeps a few long-lived streams per peer (WithStreamsPerPeer) and
// pipelines requests on them; replies to different requests may interleave.
// Every message is a frame:
//
//	uvarint(length) body            length <= MaxMessageSize (4 MiB + 4 KiB)
//	body = type(1) uvarint(request id) fields...
//
// Requests (client to server) and their replies:
//
//	0x01 HAVE     digest(32)                       -> BITMAP
//	0x02 GET      digest(32) flags(1) uvarint(n) n×uvarint(entry index)
//	                                               -> n × (CHUNK | NOTFOUND), then END
//	0x03 MANIFEST digest(32)                       -> DATA..., END (client checks sha256)
//	0x04 RESOLVE  name bytes                       -> ID
//	0x05 CANCEL   (no fields; stop request id)     -> nothing (replies may still come)
//
//	0x81 BITMAP   bitmap bytes (bit i = entry i held, LSB first; empty: nothing held)
//	0x82 CHUNK    uvarint(entry index) codec(1) uvarint(raw length) payload
//	0x83 NOTFOUND uvarint(entry index)
//	0x84 DATA     bytes (a part of up to 1 MiB of a manifest)
//	0x85 END
//	0x86 ERROR    code(1: not found, 2: other) text
//	0x87 ID       digest(32)
//
// digest is the sha2-256 digest of a manifest ID; flags bit 0 of GET means "you
// are the designated fetcher: go to the origin if you must" (see Designated);
// n <= MaxBatch. A chunk is sent as stored (codec 0 raw, 1 zstd, 2 s2), never
// recompressed, and the receiver verifies it against the chunk ID from its
// manifest before using it; a peer that sends bytes that do not verify is
// marked bad and not asked again for a while. A server works on up to 16
// requests per stream at once and sends chunks through the upload token bucket
// (WithUploadLimit). Any malformed frame resets the stream.
//
// Every write on a chunk stream, by either side, has a deadline (the write
// timeout, default 10 s, plus the frame's size at 1 MiB/s; WithWriteTimeout):
// a peer that stops reading gets its stream reset, and the requests on it fail
// and are asked of another holder. A holder that lets a fetch stall (another
// holder's hedged copy arrives first, or nothing arrives before the stall
// timeout) is asked last for 30 s, so a stopped peer, whose connection stays up
// until keep-alives fail, costs one hedge delay rather than one per read.
// Close resets every stream, client or served, and waits for their goroutines.
//
// # Nodes
//
// For placement every node learns every other's name and load (NodeInfo:
// node.name, open exports, free quota, announcement interval), when its
// backend implements NodeBackend as well as CatalogBackend. A node announces
// its own info on the GossipSub topic /hoard/nodes/1 every node-info interval
// (WithNodeInfoInterval, default 10 s) and within a second of a change of
// its name or open exports, signed and checked like catalog entries (the
// signer must be the info's Node); and a node asks each peer it syncs the
// catalog with for its info over /hoard/node-info/1.0.0 (the server writes
// one frame and closes), so a new node learns its neighbours at once. The
// info is encoded (see AppendNodeInfo)
//
//	node: 0x03 uvarint(version) uvarint(len) node peer ID uvarint(len) name
//	      uvarint(open exports) uvarint(free quota+1) uvarint(interval ms)
//
// Infos are not relayed by sync: each is heard from its node (directly or
// by pubsub), so a receiver can forget a node that went quiet.
//
// # Glance registration (/hoard/glance-register/1.0.0)
//
// A backend that implements GlanceBackend registers Glance images for the
// cluster's Glance mirror: a node asked to download an image no node knows
// asks the image's registrar (AskGlanceRegister) to register it now. The
// asker writes one frame, 0x01 and the Glance image ID (1 to MaxGlanceIDLen
// printable ASCII bytes); the registrar answers 0x02 uvarint(done)
// uvarint(total) progress frames every 2 s while it streams the image from
// Glance, then 0x03, the manifest's sha2-256 digest and the image name, or
// 0x04 and an error text (at most MaxGlanceRegisterError bytes). Frames are
// bounded; a registrar that sends anything else is marked bad; an asker
// waits at most its stall bound between frames. At most 32 requests are
// served at once, each for at most 30 minutes.
//
// # Catalog
//
// Every node learns every image of the cluster (CatalogEntry: a manifest, its
// names, or a tombstone left by image rm --cluster) and every node's boot
// profile of it (ProfileEntry), when its backend implements CatalogBackend.
// New then starts GossipSub on the host (before the node connects anywhere,
// so no peer's first gossipsub stream can miss it), Run feeds the backend and
// syncs, and Close stops both. Two ways carry entries, and both end in the
// backend's LearnCatalog and LearnProfile, called one at a time from a queue
// of 4096 entries:
//
//   - Announcements: GossipSub topics /hoard/catalog/1 and /hoard/profiles/1,
//     one entry per message, strictly signed (the pubsub default) and
//     flood-published (to every connected peer on the topic). A topic
//     validator decodes every message and rejects it when it is malformed,
//     over MaxCatalogEntrySize (1 MiB), or signed by another peer than the
//     entry's Publisher (Node for a profile): a node announces only its own
//     changes (PublishCatalog, PublishProfile). Accepted messages that find
//     the learn queue full are dropped and counted; sync brings them back.
//   - Anti-entropy: /hoard/catalog-sync/1.0.0. A node asks a peer for its
//     whole catalog and profiles when it connects to it (gathered for 0.5 s)
//     and, every sync interval (WithCatalogSyncInterval, default 1 min), asks
//     3 random connected peers; never one peer more than once per interval,
//     nor a peer marked bad, at most 4 syncs at a time (and at most 16
//     served at a time; more are reset). So a node that was
//     offline learns every image and tombstone it missed, from any node that
//     has them. LearnCatalog's from names the serving peer; a node that finds
//     an entry false (its manifest does not match its CID) calls ReportBad,
//     which leaves the peer out of selection and of syncs, both ways, and
//     ignores its announcements, for the bad-peer TTL.
//   - Signatures: every entry carries its Publisher's (Node's) signature of
//     its encoding without the signature, prefixed by a domain string
//     (SignCatalogEntry, SignProfileEntry), and, when the peer ID does not
//     embed the public key (ed25519 IDs do), that key. Both paths check it
//     (VerifyCatalogEntry): whoever relays or serves an entry cannot forge or
//     alter one of another publisher. A sync that serves an entry whose
//     signature is false fails and its server is marked bad (as ReportBad);
//     so is the author of such an announcement. Checked encodings are
//     remembered (by hash, 2 × 2^17 at most), so a periodic sync of an
//     unchanged catalog costs no signature checks. A node serves only signed
//     entries (an entry kept from before signatures is skipped; its
//     publisher signs it again when it joins).
//
// The sync stream uses the chunk protocol's frames (uvarint(length) body,
// length <= MaxMessageSize). The client sends one request and closes its side:
//
//	0x10 SYNC    flags(1) = 0
//
// and the server answers with one frame per entry, catalog entries first, then
//
//	0x11 END     flags(1): bit 0 = truncated (the reply reached 64 MiB or 2^20 entries)
//
// Every write has the chunk protocol's write deadline, every read waits at
// most as long, and one sync lasts at most 5 min; any malformed frame fails
// the sync (entries before it are kept). Entries, as pubsub messages and sync
// frames (uvarint, the unsigned LEB128 varint of encoding/binary):
//
//	catalog: 0x01 digest(32) flags(1: bit 0 removed, bit 1 pin, bit 2 full) uvarint(version)
//	         uvarint(len) publisher peer ID
//	         uvarint(n) n × (uvarint(len) name)
//	         signature
//	profile: 0x02 digest(32) uvarint(version) uvarint(len) node peer ID
//	         signature
//	         chunkstore profile ("HOARDPF" 1 uvarint(boots) uvarint(n) n × uvarint(index))
//	signature: uvarint(len 1..512) signature, uvarint(len 0..1024) public key
//
// What is signed is "hoard catalog entry v1\x00" (or "hoard profile entry
// v1\x00") followed by the entry's encoding without its signature field.
//
// Bounds: at most MaxCatalogNames (64) names of 1 to MaxCatalogNameLen (1024)
// bytes of UTF-8, distinct; peer IDs of at most 128 bytes that parse;
// profiles of at most MaxProfileChunks (2^17) distinct indices below 2^32;
// an entry of at most 1 MiB. Decoding is strict: an encoding that is not the
// one Append* would produce (non-minimal varints, unknown flags, trailing
// bytes) is an error.
//
// Semantics: per manifest the entry that Supersedes wins: the greater
// Version (a hybrid logical clock, NextVersion: milliseconds << 16, or one
// more than the greatest version seen), then at equal versions a tombstone
// over a live entry, then the greater Publisher, then the greater encoding,
// so every node converges on one winner whatever the order of arrival. A
// tombstone is an entry like any other: nodes keep it and sync it, so an
// image removed while a node was down stays removed when it returns; an
// import after the removal, with a greater version, brings it back. Per
// (manifest, node) the greater profile Version wins; merging the profiles
// of different nodes is the node's business.
package p2p
