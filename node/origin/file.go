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
	"syscall"
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
			return nil, invalidf("open image source %q: want file:///absolute/path", ref)
		}
		path = u.Path
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, fmt.Errorf("open image source %q: %w", ref, err)
	}
	// Look before opening: an open of a FIFO blocks (pinning a thread and an
	// fd for good), and the checks below must see the file itself, not a
	// symlink to it.
	real, err := filepath.EvalSymlinks(abs)
	if err != nil {
		return nil, fileErr(ref, err)
	}
	fi, err := os.Lstat(real)
	if err != nil {
		return nil, fileErr(ref, err)
	}
	if err := checkFileKind(ref, fi); err != nil {
		return nil, err
	}
	if err := st.checkAllowed(ref, real, fi); err != nil {
		return nil, err
	}
	// O_NONBLOCK: should a FIFO replace the file after the Lstat, the open
	// returns at once, and the fstat below refuses it.
	f, err := os.OpenFile(real, os.O_RDONLY|syscall.O_NONBLOCK|syscall.O_NOFOLLOW, 0)
	if err != nil {
		return nil, fileErr(ref, err)
	}
	ofi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("open image source %q: %w", ref, err)
	}
	if !os.SameFile(fi, ofi) {
		f.Close()
		return nil, fmt.Errorf("open image source %q: the file changed while it was opened; try again", ref)
	}
	// Reads of files and block devices never return EAGAIN, but leave no
	// surprise for later: back to blocking mode.
	if err := syscall.SetNonblock(int(f.Fd()), false); err != nil {
		f.Close()
		return nil, fmt.Errorf("open image source %q: %w", ref, err)
	}
	var size int64
	if ofi.Mode().IsRegular() {
		size = ofi.Size()
	} else if size, err = f.Seek(0, io.SeekEnd); err != nil {
		// A block device reports size 0 in stat; its end offset is its size.
		f.Close()
		return nil, fmt.Errorf("open image source %q: size of block device: %w", ref, err)
	}
	return &fileSource{f: f, path: abs, size: size, st: st}, nil
}

func fileErr(ref string, err error) error {
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return mark(ErrNotFound, "open image source %q: no such file; check the path", ref)
	case errors.Is(err, fs.ErrPermission):
		return mark(ErrDenied, "open image source %q: permission denied; make the file readable by the hoard user", ref)
	case errors.Is(err, syscall.ELOOP):
		return fmt.Errorf("open image source %q: the file was replaced by a symlink while it was opened; try again", ref)
	}
	return fmt.Errorf("open image source %q: %w", ref, err)
}

// checkFileKind accepts a regular file or a block device.
func checkFileKind(ref string, fi fs.FileInfo) error {
	switch m := fi.Mode(); {
	case m.IsDir():
		return invalidf("open image source %q: it is a directory; give the path of an image file", ref)
	case m.IsRegular(), isBlockDevice(m):
		return nil
	default:
		return invalidf("open image source %q: not a regular file or block device (mode %s); give the path of an image file", ref, m)
	}
}

func isBlockDevice(m fs.FileMode) bool { return m&fs.ModeDevice != 0 && m&fs.ModeCharDevice == 0 }

// systemDirs hold kernel interfaces, never images (block devices under /dev excepted).
var systemDirs = []string{"/proc", "/sys", "/dev"}

// checkAllowed refuses what a file source must never read: /proc, /sys,
// /dev (but block devices), and Config.DenyPaths (the daemon's data dir and
// keys), by path after symlinks are resolved and by identity (a hard link).
func (st *settings) checkAllowed(ref, real string, fi fs.FileInfo) error {
	for _, d := range systemDirs {
		if within(real, d) && !(d == "/dev" && isBlockDevice(fi.Mode())) {
			return mark(ErrForbidden, "open image source %q: %s is under %s, which holds no images; give the path of an image file", ref, real, d)
		}
	}
	for _, d := range st.DenyPaths {
		if d == "" {
			continue
		}
		if r, err := filepath.EvalSymlinks(d); err == nil {
			d = r
		} else if d, err = filepath.Abs(d); err != nil {
			continue
		}
		same := false
		if dfi, err := os.Stat(d); err == nil && !dfi.IsDir() {
			same = os.SameFile(fi, dfi)
		}
		if same || within(real, d) {
			return mark(ErrForbidden, "open image source %q: %s is hoard's own data or key; hoard never exports it", ref, real)
		}
	}
	return nil
}

// within reports whether path is dir or inside it (both clean and absolute).
func within(path, dir string) bool {
	dir = filepath.Clean(dir)
	return path == dir || strings.HasPrefix(path, strings.TrimSuffix(dir, "/")+"/")
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
