package nbd

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Magic numbers.
const (
	magicNBD          = 0x4e42444d41474943 // "NBDMAGIC"
	magicOpt          = 0x49484156454F5054 // "IHAVEOPT"
	magicOptReply     = 0x0003e889045565a9
	magicRequest      = 0x25609513
	magicSimpleReply  = 0x67446698
	magicStructReply  = 0x668e33ef
	requestHeaderSize = 28
)

// Handshake flags (server) and client flags.
const (
	flagFixedNewstyle  = 1 << 0
	flagNoZeroes       = 1 << 1
	flagCFixedNewstyle = 1 << 0
	flagCNoZeroes      = 1 << 1
)

// Transmission flags.
const (
	tflagHasFlags     = 1 << 0
	tflagReadOnly     = 1 << 1
	tflagSendFlush    = 1 << 2
	tflagSendDF       = 1 << 7
	tflagCanMultiConn = 1 << 8
	tflagSendCache    = 1 << 10
)

// Options.
const (
	optExportName      = 1
	optAbort           = 2
	optList            = 3
	optStartTLS        = 5
	optInfo            = 6
	optGo              = 7
	optStructuredReply = 8
	optListMetaContext = 9
	optSetMetaContext  = 10
)

// Option replies.
const (
	repAck         = 1
	repServer      = 2
	repInfo        = 3
	repMetaContext = 4

	repErrUnsup    = 1<<31 + 1
	repErrPolicy   = 1<<31 + 2
	repErrInvalid  = 1<<31 + 3
	repErrUnknown  = 1<<31 + 6
	repErrShutdown = 1<<31 + 7
	repErrTooBig   = 1<<31 + 9
)

// Info types.
const (
	infoExport      = 0
	infoName        = 1
	infoDescription = 2
	infoBlockSize   = 3
)

// Commands.
const (
	cmdRead        = 0
	cmdWrite       = 1
	cmdDisc        = 2
	cmdFlush       = 3
	cmdTrim        = 4
	cmdCache       = 5
	cmdWriteZeroes = 6
	cmdBlockStatus = 7
)

// Command flags.
const (
	cmdFlagDF     = 1 << 2
	cmdFlagReqOne = 1 << 3
)

// Structured reply flags and types.
const (
	replyFlagDone        = 1 << 0
	replyTypeOffsetData  = 1
	replyTypeBlockStatus = 5
	replyTypeError       = 1<<15 + 1
)

// Error values on the wire.
const (
	errnoPerm     = 1
	errnoIO       = 5
	errnoInval    = 22
	errnoShutdown = 108
)

// base:allocation.
const (
	metaBaseAllocation   = "base:allocation"
	metaBaseAllocationID = 1
	stateHole            = 1 << 0
	stateZero            = 1 << 1
)

// Limits.
const (
	maxOptionLen  = 64 << 10 // larger option payloads end the connection
	maxStringLen  = 4096     // export names, queries, messages
	minBlockSize  = 1
	prefBlockSize = 4096
	// MaxRequestLength is the largest read or block-status length served;
	// it is advertised as the maximum block size.
	MaxRequestLength = 32 << 20
)

// request is a decoded transmission-phase request header.
type request struct {
	flags  uint16
	typ    uint16
	handle uint64
	offset uint64
	length uint32
}

var errBadMagic = errors.New("bad request magic")

// parseRequest decodes a 28-byte request header.
func parseRequest(b []byte) (request, error) {
	if len(b) < requestHeaderSize {
		return request{}, fmt.Errorf("short request header (%d bytes)", len(b))
	}
	if m := binary.BigEndian.Uint32(b[0:4]); m != magicRequest {
		return request{}, fmt.Errorf("%w %#x", errBadMagic, m)
	}
	return request{
		flags:  binary.BigEndian.Uint16(b[4:6]),
		typ:    binary.BigEndian.Uint16(b[6:8]),
		handle: binary.BigEndian.Uint64(b[8:16]),
		offset: binary.BigEndian.Uint64(b[16:24]),
		length: binary.BigEndian.Uint32(b[24:28]),
	}, nil
}

// inRange reports whether [off, off+length) lies within an export of size.
func inRange(off uint64, length uint32, size int64) bool {
	s := uint64(size)
	return off <= s && uint64(length) <= s-off
}
