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
package p2p
