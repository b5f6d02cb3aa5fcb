package origin

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
)

// redactedMark replaces the userinfo and the query of a URL in Redact.
const redactedMark = "REDACTED"

// Redact returns ref fit to be shown, logged, or recorded in a manifest
// that peers receive: a URL loses its userinfo (user:password@) and its
// query (presigned URLs carry their signature there), each replaced by
// REDACTED; the fragment (#sha256=...) stays. Paths and glance:// refs
// carry no secret and come back as they are. Only the request to the origin
// itself uses the real URL.
func Redact(ref string) string {
	if !strings.Contains(ref, "://") || strings.HasPrefix(strings.ToLower(ref), "glance://") {
		return ref
	}
	u, err := url.Parse(ref)
	if err != nil {
		// Unparseable: keep scheme://host-ish part only.
		scheme, rest, _ := strings.Cut(ref, "://")
		if i := strings.LastIndex(rest, "@"); i >= 0 {
			rest = redactedMark + "@" + rest[i+1:]
		}
		if i := strings.IndexAny(rest, "?#"); i >= 0 {
			rest = rest[:i] + "?" + redactedMark
		}
		return scheme + "://" + rest
	}
	if u.User != nil {
		u.User = url.User(redactedMark)
	}
	if u.RawQuery != "" || u.ForceQuery {
		u.RawQuery, u.ForceQuery = redactedMark, false
	}
	return u.String()
}

// isRedacted reports whether u came out of Redact with something removed.
func isRedacted(u *url.URL) bool {
	return (u.User != nil && u.User.String() == redactedMark) || u.RawQuery == redactedMark
}

// Credentials keeps, in a local file that is never sent to peers, the real
// URLs of HTTP origins whose manifests record only the redacted form, so
// that the node can reopen them (lazy reads after a restart). Keys are the
// redacted URLs: two URLs that differ only in their credentials or query
// share a record, the last one opened wins. Safe for concurrent use; the
// file is written atomically with mode 0600.
type Credentials struct {
	path string
	mu   sync.Mutex
}

// NewCredentials returns the store in file path (created on first use).
func NewCredentials(path string) *Credentials { return &Credentials{path: path} }

func (c *Credentials) load() (map[string]string, error) {
	b, err := os.ReadFile(c.path)
	if errors.Is(err, fs.ErrNotExist) {
		return map[string]string{}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("origin credentials: %w", err)
	}
	m := map[string]string{}
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("origin credentials %s: %w; fix or remove the file (then add the images with credentials again)", c.path, err)
	}
	return m, nil
}

// put records the real URL of a redacted one.
func (c *Credentials) put(redacted, real string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	m, err := c.load()
	if err != nil {
		return err
	}
	if m[redacted] == real {
		return nil
	}
	m[redacted] = real
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(c.path), 0o750); err != nil {
		return fmt.Errorf("origin credentials: %w", err)
	}
	f, err := os.CreateTemp(filepath.Dir(c.path), ".origin-credentials-*") // mode 0600
	if err != nil {
		return fmt.Errorf("origin credentials: %w", err)
	}
	tmp := f.Name()
	_, err = f.Write(b)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, c.path)
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("origin credentials: %w", err)
	}
	if d, err := os.Open(filepath.Dir(c.path)); err == nil {
		d.Sync()
		d.Close()
	}
	return nil
}

// get returns the real URL recorded for a redacted one.
func (c *Credentials) get(redacted string) (string, bool, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	m, err := c.load()
	if err != nil {
		return "", false, err
	}
	real, ok := m[redacted]
	return real, ok, nil
}
