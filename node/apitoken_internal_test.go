package node

import (
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

// TestLoadOrCreateToken: racing first starts agree on one token; the file
// is 0600; a group-readable file is tightened; a symlink is refused.
func TestLoadOrCreateToken(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	path := filepath.Join(dir, APITokenFile)
	var wg sync.WaitGroup
	toks := make([]string, 8)
	errs := make([]error, 8)
	for i := range toks {
		wg.Go(func() { toks[i], errs[i] = loadOrCreateToken(path) })
	}
	wg.Wait()
	for i := range toks {
		if errs[i] != nil || toks[i] != toks[0] || len(toks[0]) != 64 {
			t.Fatalf("racing creators: %q %v, first %q", toks[i], errs[i], toks[0])
		}
	}
	if fi, _ := os.Stat(path); fi.Mode().Perm() != 0o600 {
		t.Fatalf("mode %s", fi.Mode().Perm())
	}
	if left, _ := filepath.Glob(filepath.Join(dir, ".api.token-*")); len(left) != 0 {
		t.Errorf("temp files left: %v", left)
	}
	os.Chmod(path, 0o644)
	if tok, err := loadOrCreateToken(path); err != nil || tok != toks[0] {
		t.Fatalf("reload: %q %v", tok, err)
	}
	if fi, _ := os.Stat(path); fi.Mode().Perm() != 0o600 {
		t.Errorf("a 0644 token file stays %s, want 0600", fi.Mode().Perm())
	}
	link := filepath.Join(t.TempDir(), APITokenFile)
	os.Symlink(path, link)
	if _, err := loadOrCreateToken(link); err == nil || !strings.Contains(err.Error(), "symlink") {
		t.Errorf("symlinked token file: %v, want refused", err)
	}
}
