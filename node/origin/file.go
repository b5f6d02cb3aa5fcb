package origin

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/url"
	"os"
	"path/filepath"
	"strings"
)

// fileSource is a regular file or a block device.
type fileSource struct {
	f    *os.File
	path string
	size int64
	st   *settings
}

func openFile(_ context.Context, ref string, st *settings) (Source, error) {
	path := ref
	if strings.HasPrefix(strings.ToLower(ref), "file://") {
		u, err := url.Parse(ref)
		if err != nil || (u.Host != "" && u.Host != "localhost") || u.Path == "" {
			return nil, fmt.Errorf("open image source %q: want file:///absolute/path", ref)
		}
		path = u.Path
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, fmt.Errorf("open image source %q: %w", ref, err)
	}
	f, err := os.Open(abs)
	if err != nil {
		switch {
		case errors.Is(err, fs.ErrNotExist):
			return nil, mark(ErrNotFound, "open image source %q: no such file; check the path", ref)
		case errors.Is(err, fs.ErrPermission):
			return nil, mark(ErrDenied, "open image source %q: permission denied; make the file readable by the hoard user", ref)
		}
		return nil, fmt.Errorf("open image source %q: %w", ref, err)
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("open image source %q: %w", ref, err)
	}
	var size int64
	switch m := fi.Mode(); {
	case m.IsDir():
		f.Close()
		return nil, fmt.Errorf("open image source %q: it is a directory; give the path of an image file", ref)
	case m.IsRegular():
		size = fi.Size()
	case m&fs.ModeDevice != 0 && m&fs.ModeCharDevice == 0:
		// A block device reports size 0 in stat; its end offset is its size.
		if size, err = f.Seek(0, io.SeekEnd); err != nil {
			f.Close()
			return nil, fmt.Errorf("open image source %q: size of block device: %w", ref, err)
		}
	default:
		f.Close()
		return nil, fmt.Errorf("open image source %q: not a regular file or block device (mode %s); give the path of an image file", ref, m)
	}
	return &fileSource{f: f, path: abs, size: size, st: st}, nil
}

func (s *fileSource) Ref() Ref       { return Ref{Kind: "file", Location: s.path} }
func (s *fileSource) Size() int64    { return s.size }
func (s *fileSource) Format() string { return "" }
func (s *fileSource) Close() error   { return s.f.Close() }

func (s *fileSource) ReadAt(ctx context.Context, p []byte, off int64) error {
	if err := checkSpan(s.path, s.size, len(p), off); err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("read %s: %w", s.path, err)
	}
	n, err := s.f.ReadAt(p, off)
	if err == io.EOF {
		return mark(ErrShort, "read %s at %d: got %d of %d bytes: the file shrank since it was opened; open it again", s.path, off, n, len(p))
	}
	if err != nil {
		return fmt.Errorf("read %s at %d: %w", s.path, off, err)
	}
	return nil
}

func (s *fileSource) Stream(ctx context.Context) (io.ReadCloser, error) {
	open := func(_ context.Context, pos int64) (io.ReadCloser, error) {
		// Read to the file's real end (not Size) so that growth is reported as ErrLong.
		return io.NopCloser(io.NewSectionReader(s.f, pos, 1<<62)), nil
	}
	return newStream(ctx, s.path, s.size, "", s.st, open, nil)
}
