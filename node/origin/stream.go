package origin

import (
	"context"
	"crypto/md5"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/hex"
	"fmt"
	"hash"
	"io"
	"log/slog"
	"strings"
	"time"

	"github.com/cenkalti/backoff/v5"
)

// parseChecksum splits "algo:hex" and returns a hash for it. It returns a nil hash for ""
// and an error for an unknown algorithm or malformed hex.
func parseChecksum(sum string) (algo, want string, h hash.Hash, err error) {
	if sum == "" {
		return "", "", nil, nil
	}
	algo, want, ok := strings.Cut(sum, ":")
	if !ok {
		return "", "", nil, fmt.Errorf("checksum %q: want algo:hex, e.g. sha256:<hex>", sum)
	}
	algo = strings.ToLower(algo)
	want = strings.ToLower(want)
	var size int
	switch algo {
	case "sha256":
		h, size = sha256.New(), sha256.Size
	case "sha512":
		h, size = sha512.New(), sha512.Size
	case "md5":
		h, size = md5.New(), md5.Size
	default:
		return "", "", nil, fmt.Errorf("checksum %q: unsupported algorithm %q; use sha256, sha512 or md5", sum, algo)
	}
	if b, err := hex.DecodeString(want); err != nil || len(b) != size {
		return "", "", nil, fmt.Errorf("checksum %q: not %d hex-encoded bytes of %s", sum, size, algo)
	}
	return algo, want, h, nil
}

// stream is the verifying, resuming reader behind Source.Stream.
type stream struct {
	ctx  context.Context
	name string // what the errors name: the path or URL
	size int64
	// open returns the content from byte pos on. Its own errors are final (it retries
	// internally where that makes sense).
	open func(ctx context.Context, pos int64) (io.ReadCloser, error)
	// resumable reports whether a read error mid-body may be resumed by calling open again;
	// nil means never.
	resumable func(err error) bool
	st        *settings

	algo, want string
	h          hash.Hash

	body  io.ReadCloser
	pos   int64
	fails int                         // consecutive resumes without progress
	bo    *backoff.ExponentialBackOff // delays between those resumes; reset on progress
	err   error
}

func newStream(ctx context.Context, name string, size int64, checksum string, st *settings,
	open func(context.Context, int64) (io.ReadCloser, error), resumable func(error) bool) (*stream, error) {
	algo, want, h, err := parseChecksum(checksum)
	if err != nil {
		return nil, fmt.Errorf("stream %s: %w", name, err)
	}
	return &stream{ctx: ctx, name: name, size: size, open: open, resumable: resumable, st: st,
		algo: algo, want: want, h: h}, nil
}

func (s *stream) Read(p []byte) (int, error) {
	if s.err != nil {
		return 0, s.err
	}
	if err := s.ctx.Err(); err != nil {
		return 0, s.fail(fmt.Errorf("stream %s: stopped at byte %d of %d: %w", s.name, s.pos, s.size, err))
	}
	for {
		if s.body == nil {
			b, err := s.open(s.ctx, s.pos)
			if err != nil {
				return 0, s.fail(fmt.Errorf("stream %s at byte %d: %w", s.name, s.pos, err))
			}
			s.body = b
		}
		n, err := s.body.Read(p)
		if n > 0 {
			if over := s.pos + int64(n) - s.size; over > 0 {
				n -= int(over)
				s.account(p[:n])
				return n, s.fail(mark(ErrLong, "stream %s: more than the announced %d bytes arrived: the image changed at the origin; open it again", s.name, s.size))
			}
			s.account(p[:n])
		}
		switch {
		case err == nil:
			if n == 0 {
				continue
			}
			return n, nil
		case err == io.EOF:
			s.closeBody()
			return n, s.fail(s.finish())
		}
		s.closeBody()
		if s.ctx.Err() != nil {
			return n, s.fail(fmt.Errorf("stream %s: stopped at byte %d of %d: %w", s.name, s.pos, s.size, s.ctx.Err()))
		}
		if s.resumable == nil || !s.resumable(err) || s.fails >= s.st.Retries {
			return n, s.fail(fmt.Errorf("stream %s: read failed at byte %d of %d after %d %s (%w): %w; check the origin and retry", s.name, s.pos, s.size, s.fails, plural(s.fails, "resume"), err, ErrShort))
		}
		s.fails++
		s.st.log.Warn("origin stream interrupted; resuming", "source", s.name, "at", s.pos, "size", s.size, "err", err, "attempt", s.fails)
		if err := sleep(s.ctx, s.nextBackoff()); err != nil {
			return n, s.fail(fmt.Errorf("stream %s: stopped at byte %d of %d: %w", s.name, s.pos, s.size, err))
		}
		if n > 0 {
			return n, nil
		}
	}
}

func (s *stream) account(b []byte) {
	if len(b) == 0 {
		return
	}
	s.pos += int64(len(b))
	s.fails = 0
	if s.h != nil {
		s.h.Write(b)
	}
}

// finish runs the end-of-stream checks and returns io.EOF when they pass.
func (s *stream) finish() error {
	if s.pos < s.size {
		return mark(ErrShort, "stream %s: got %d of the announced %d bytes: the image is truncated or changed at the origin; check it and open it again", s.name, s.pos, s.size)
	}
	if s.h != nil {
		got := hex.EncodeToString(s.h.Sum(nil))
		if got != s.want {
			return mark(ErrChecksum, "stream %s: checksum mismatch: %s is %s, the origin announced %s: the image is corrupt or changed at the origin; re-upload it or fix the announced checksum", s.name, s.algo, got, s.want)
		}
		s.st.log.Debug("origin stream verified", "source", s.name, "size", s.size, "checksum", s.algo+":"+got)
	}
	return io.EOF
}

func (s *stream) fail(err error) error {
	s.err = err
	s.closeBody()
	if err != io.EOF {
		s.st.log.LogAttrs(s.ctx, slog.LevelDebug, "origin stream ended with error", slog.String("source", s.name), slog.Any("err", err))
	}
	return err
}

func (s *stream) closeBody() {
	if s.body != nil {
		s.body.Close()
		s.body = nil
	}
}

// Close releases the connection or file handle; it is safe to call more than once.
func (s *stream) Close() error {
	s.closeBody()
	if s.err == nil {
		s.err = fmt.Errorf("stream %s: read after close", s.name)
	}
	return nil
}

// nextBackoff is the delay before the next resume.
func (s *stream) nextBackoff() time.Duration {
	if s.bo == nil || s.fails <= 1 {
		s.bo = s.st.backoff()
	}
	return s.bo.NextBackOff()
}
