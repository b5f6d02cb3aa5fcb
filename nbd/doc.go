// Package nbd is a read-only Network Block Device server: the wire
// protocol, server side, as described in the NBD protocol document
// (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md).
//
// The package knows nothing of chunks, stores or peers. A [Server] asks its
// [Exporter] to open exports by name and serves reads from the returned
// [Export]. It is shaped like net/http: fill in a Server and call
// [Server.Serve] with a listener (unix socket or TCP).
//
// # Handshake
//
// Only the fixed newstyle handshake is spoken (NBD_FLAG_FIXED_NEWSTYLE,
// NBD_FLAG_NO_ZEROES). Supported options: NBD_OPT_EXPORT_NAME, NBD_OPT_GO,
// NBD_OPT_INFO, NBD_OPT_LIST, NBD_OPT_ABORT, NBD_OPT_STRUCTURED_REPLY,
// NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT (for the single
// context "base:allocation"). Anything else, including NBD_OPT_STARTTLS and
// NBD_OPT_EXTENDED_HEADERS, is answered with NBD_REP_ERR_UNSUP. NBD_OPT_GO and
// NBD_OPT_INFO answer NBD_INFO_EXPORT and NBD_INFO_BLOCK_SIZE (minimum 1,
// preferred 4096, maximum 32 MiB) always, and NBD_INFO_NAME and
// NBD_INFO_DESCRIPTION when asked. An export the Exporter does not know is
// answered with NBD_REP_ERR_UNKNOWN (or a hard disconnect after
// NBD_OPT_EXPORT_NAME, which cannot carry an error).
//
// A hostile client cannot make the server allocate: option payloads larger
// than 64 KiB end the connection, strings are limited to 4096 bytes, and the
// whole handshake must finish within [Server.HandshakeTimeout].
//
// # Transmission
//
// Every export is read-only. Transmission flags: NBD_FLAG_HAS_FLAGS,
// NBD_FLAG_READ_ONLY, NBD_FLAG_SEND_FLUSH, NBD_FLAG_SEND_CACHE,
// NBD_FLAG_CAN_MULTI_CONN, and NBD_FLAG_SEND_DF when structured replies were
// negotiated (a read is always answered with a single NBD_REPLY_TYPE_OFFSET_DATA
// chunk, so "don't fragment" holds trivially).
//
//   - NBD_CMD_READ calls [Export.ReadAt]; an error fails that request only (EIO).
//   - NBD_CMD_BLOCK_STATUS answers base:allocation from [Extenter]; holes are
//     NBD_STATE_HOLE|NBD_STATE_ZERO. Exports without Extenter are all data.
//   - NBD_CMD_CACHE calls [Cacher] if implemented, and always succeeds.
//   - NBD_CMD_FLUSH succeeds at once (nothing is ever written).
//   - NBD_CMD_WRITE, NBD_CMD_TRIM and NBD_CMD_WRITE_ZEROES fail with EPERM (the
//     write payload is read and discarded).
//   - Requests beyond the end of the export, of zero length, or longer than
//     32 MiB, and unknown commands, fail with EINVAL.
//
// Requests on one connection are served concurrently (up to
// [Server.MaxInflight] at a time, holding at most 64 MiB of read buffers) and
// answered out of order, so a slow read does not hold up a fast one. Read
// buffers come from per-size-class pools. Replies are written whole, one at a
// time (in 256 KiB pieces, so progress is visible). When a client
// disconnects, the contexts of its in-flight requests are cancelled and the
// export is closed once they return.
//
// Limits against clients that misbehave: [Server.MaxConns] connections per
// listener (more wait in the backlog); all connections together hold at most
// [Server.MaxBufferedBytes] of read buffers, one connection at most a quarter
// (a request waits to be read until its buffer fits); a client that takes no
// reply for [Server.WriteTimeout] is dropped, and one whose reply has not
// moved for [Server.StallEvict] is dropped as soon as another request waits
// for buffer memory.
//
// Errors are reported in simple replies, or, once structured replies are
// negotiated, as NBD_REPLY_TYPE_ERROR chunks carrying a message.
package nbd
