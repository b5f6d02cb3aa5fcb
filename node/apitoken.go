package node

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
)

// APITokenFile, in the data dir, holds the admin API's bearer token when
// api.token is not configured. The daemon creates it (mode 0600) on first
// start and reuses it afterwards; the CLI reads it. Whoever can read it
// controls the daemon, which runs as root: treat it like the Docker socket.
const APITokenFile = "api.token"

// APIToken is the bearer token the admin API requires: Config.APIToken, or,
// once Run started, the content of DataDir/api.token.
func (n *Node) APIToken() string { return n.cfg.APIToken }

// APITokenFile is where the node keeps its API token, "" when the token
// comes from Config.APIToken.
func (n *Node) APITokenFile() string {
	if n.cfg.apiTokenFile == "" {
		return filepath.Join(n.cfg.DataDir, APITokenFile)
	}
	return n.cfg.apiTokenFile
}

// loadAPIToken sets the node's API token from DataDir/api.token, creating
// the file on first start, unless the config gives one or the API is off.
func (n *Node) loadAPIToken() error {
	if n.cfg.APIToken != "" || n.cfg.APIListen == "-" {
		return nil
	}
	path := filepath.Join(n.cfg.DataDir, APITokenFile)
	tok, err := loadOrCreateToken(path)
	if err != nil {
		return err
	}
	n.cfg.APIToken, n.cfg.apiTokenFile = tok, path
	return nil
}

// ReadAPIToken returns the API token a daemon on dataDir keeps in
// dataDir/api.token.
func ReadAPIToken(dataDir string) (string, error) {
	return readToken(filepath.Join(dataDir, APITokenFile))
}

// loadOrCreateToken reads the token at path, or creates one: 32 random
// bytes, hex, in a 0600 temp file that is fsynced and then hard-linked to
// path, so a reader never sees a partial token and two daemons racing on a
// first start agree on one token.
func loadOrCreateToken(path string) (string, error) {
	for range 3 {
		tok, err := readToken(path)
		if !errors.Is(err, fs.ErrNotExist) {
			return tok, err
		}
		var b [32]byte
		if _, err := rand.Read(b[:]); err != nil {
			return "", fmt.Errorf("create API token: %w", err)
		}
		tok = hex.EncodeToString(b[:])
		f, err := os.CreateTemp(filepath.Dir(path), ".api.token-*") // mode 0600
		if err != nil {
			return "", fmt.Errorf("create API token: %w", err)
		}
		tmp := f.Name()
		_, err = f.WriteString(tok + "\n")
		if err == nil {
			err = f.Sync()
		}
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err == nil {
			err = os.Link(tmp, path)
		}
		os.Remove(tmp)
		switch {
		case err == nil:
			if d, derr := os.Open(filepath.Dir(path)); derr == nil {
				d.Sync()
				d.Close()
			}
			return tok, nil
		case errors.Is(err, fs.ErrExist):
			continue // another daemon made it first: use theirs
		default:
			return "", fmt.Errorf("create API token %s: %w", path, err)
		}
	}
	return "", fmt.Errorf("create API token %s: it keeps appearing and vanishing; is another daemon starting on this data dir?", path)
}

// readToken reads a token file. It refuses a symlink or anything but a
// regular file, and takes group and other permissions away from the file if
// someone granted them.
func readToken(path string) (string, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0)
	if err != nil {
		if errors.Is(err, syscall.ELOOP) {
			return "", fmt.Errorf("API token %s is a symlink; remove it (the daemon makes a new token at start)", path)
		}
		return "", fmt.Errorf("read API token: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return "", fmt.Errorf("read API token: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return "", fmt.Errorf("API token %s is not a regular file (mode %s); remove it (the daemon makes a new token at start)", path, fi.Mode())
	}
	if fi.Mode().Perm()&0o077 != 0 {
		if err := f.Chmod(0o600); err != nil {
			return "", fmt.Errorf("API token %s is readable by others (mode %s) and cannot be fixed: %w; chmod 600 it", path, fi.Mode().Perm(), err)
		}
	}
	b, err := io.ReadAll(io.LimitReader(f, 4096))
	if err != nil {
		return "", fmt.Errorf("read API token: %w", err)
	}
	tok := strings.TrimSpace(string(b))
	if tok == "" {
		return "", fmt.Errorf("API token %s is empty; remove it (the daemon makes a new token at start) or write a token into it", path)
	}
	return tok, nil
}
