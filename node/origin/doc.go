// Package origin is where image bytes come from when no local store and no peer has them:
// a local file or block device, an HTTP(S) server, or an OpenStack Glance (Image API v2).
//
// [Open] parses a reference and returns a [Source]:
//
//	/var/images/debian.raw, ./debian.raw, file:///var/images/debian.raw   a file or block device
//	https://example.org/debian.raw#sha256=<hex>                         an HTTP(S) URL (fragment optional)
//	glance://<image-id>                                                  an image in Config.GlanceURL
//
// A Source serves two access patterns. ReadAt fetches one span lazily (a chunk missed by a
// booting VM) with an HTTP Range request; it needs an origin that supports byte ranges.
// Stream reads the whole image once (import); it resumes a dropped connection with a Range
// request from the byte where it stopped, and at EOF it checks that exactly Size bytes arrived
// ([ErrShort], [ErrLong]) and that they hash to the checksum the origin announced
// ([ErrChecksum]): Glance's os_hash_value (sha512) or md5 checksum, or a #sha256=<hex>
// (also #sha512=, #md5=) fragment on an HTTP URL. Files and plain HTTP URLs announce none.
//
// Network failures, HTTP 5xx, 408 and 429 are transient: they are retried Config.Retries
// times with exponential backoff and jitter (a Retry-After header is honoured, capped at 5s);
// when retries run out the error wraps [ErrUnavailable]. 404, 410, 401, 403 and other 4xx
// answers are permanent and never retried ([ErrNotFound], [ErrDenied]). A request that gets no
// answer, or a body that sends nothing, for Config.StallTimeout is abandoned and counts as
// transient, so a silent origin cannot hang an import.
//
// Glance without keystone (a test or lab deployment) trusts X-Roles and X-Tenant-Id headers
// instead of a token: put them in Config.GlanceHeaders, which are sent on every Glance request
// in addition to X-Auth-Token (set only when Config.GlanceToken is not empty). The image's
// disk_format is available through the optional [Formatter] interface, so the caller knows
// whether the bytes are raw or qcow2; file and HTTP sources report "" (unknown: sniff the
// qcow2 magic).
//
// This package imports nothing of hoard's.
package origin
