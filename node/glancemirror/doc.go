// Package glancemirror serves the OpenStack Image API v2 download of the
// images in a hoard cluster, so that Nova (or any Glance client) pointed at
// the mirror (`[glance] endpoint_override`) gets image bytes from the
// cluster instead of from Glance.
//
// # Authorization first
//
// Every download (GET /v2/images/{id}/file) is first authorized by the real
// Glance with the caller's own credentials: the mirror forwards the caller's
// request headers (X-Auth-Token, X-Identity-Status, X-Project-Id, X-Roles,
// X-User-Id, ...) to Glance's GET /v2/images/{id}. Only a 200 lets the
// download go on, and its image record gives the size, checksum (md5),
// os_hash_algo/os_hash_value and status the mirror serves against. Any other
// answer of Glance (401, 403, 404, ...) is passed to the caller as Glance
// sent it, so the mirror never serves an image to a caller Glance would
// refuse, even when every byte is local. When Glance cannot be asked, nothing
// is served: 502 (no answer) or 503 (Glance answered 5xx), with the reason.
//
// # Data
//
// The bytes come from [Images]: the node's read path (local store, peers,
// origin through the designated fetcher, with hoard's own Glance
// credentials). An image no node knows yet is registered on the fly: streamed
// from Glance once, to the client and into the store at the same time.
//
// A full download carries Content-Length, Content-MD5 (Glance's checksum, as
// Glance sends it) and is verified while it streams: the md5 (and the
// os_hash, when Glance announces one) of the bytes served must match, or the
// connection is aborted before the last block, so the client never sees a
// complete wrong image. (A registration stream whose reader verifies one of
// the record's checksums itself, [Verifying], is only counted, not hashed
// twice.) The image's blocks are read [ReadAhead] ahead of the client,
// concurrently, and hashed in goroutines of their own. A single Range gives
// 206 with Content-Range; an unsatisfiable one 416.
//
// # Everything else
//
// Other GET and HEAD requests (the version document, GET /v2/images/{id},
// the schemas a client fetches) are passed through to Glance with the
// caller's headers; the mirror is read-only and answers other methods with
// 405.
package glancemirror
