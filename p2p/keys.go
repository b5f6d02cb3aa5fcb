package p2p

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/pnet"
)

// GenerateSwarmKey returns a new random cluster key as the contents of a
// swarm.key file in the standard go-libp2p format:
//
//	/key/swarm/psk/1.0.0/
//	/base16/
//	<64 hex digits>
func GenerateSwarmKey() []byte {
	var k [32]byte
	if _, err := rand.Read(k[:]); err != nil {
		panic(err) // crypto/rand does not fail
	}
	return []byte("/key/swarm/psk/1.0.0/\n/base16/\n" + hex.EncodeToString(k[:]) + "\n")
}

// DecodeSwarmKey parses the contents of a swarm.key file into the 32-byte key.
func DecodeSwarmKey(data []byte) ([]byte, error) {
	psk, err := pnet.DecodeV1PSK(bytes.NewReader(data))
	if err != nil {
		return nil, fmt.Errorf("bad swarm key: %w (want the /key/swarm/psk/1.0.0/ format that hoard cluster keygen writes)", err)
	}
	if len(psk) != 32 {
		return nil, fmt.Errorf("bad swarm key: %d bytes, want 32", len(psk))
	}
	return psk, nil
}

// LoadSwarmKey reads and parses the swarm.key file at path.
func LoadSwarmKey(path string) ([]byte, error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("no swarm key at %s: create one for the cluster with hoard cluster keygen and copy it to every node", path)
	}
	if err != nil {
		return nil, fmt.Errorf("read swarm key: %w", err)
	}
	psk, err := DecodeSwarmKey(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return psk, nil
}

// loadIdentity reads the node key at path, creating an Ed25519 key (mode 0600,
// written atomically) when there is none.
func loadIdentity(path string) (crypto.PrivKey, error) {
	data, err := os.ReadFile(path)
	if err == nil {
		k, err := crypto.UnmarshalPrivateKey(data)
		if err != nil {
			return nil, fmt.Errorf("node identity %s is unreadable: %w (move it away to get a new peer ID)", path, err)
		}
		return k, nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("read node identity: %w", err)
	}
	k, _, err := crypto.GenerateEd25519Key(rand.Reader)
	if err != nil {
		return nil, err
	}
	data, err = crypto.MarshalPrivateKey(k)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return nil, fmt.Errorf("write node identity: %w", err)
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), ".identity-*")
	if err != nil {
		return nil, fmt.Errorf("write node identity: %w", err)
	}
	defer os.Remove(tmp.Name())
	if err := tmp.Chmod(0o600); err != nil {
		tmp.Close()
		return nil, fmt.Errorf("write node identity: %w", err)
	}
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return nil, fmt.Errorf("write node identity: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return nil, fmt.Errorf("write node identity: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return nil, fmt.Errorf("write node identity: %w", err)
	}
	// Link, not rename: two nodes racing on one data dir keep the first key.
	if err := os.Link(tmp.Name(), path); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return loadIdentity(path)
		}
		return nil, fmt.Errorf("write node identity: %w", err)
	}
	return k, nil
}
