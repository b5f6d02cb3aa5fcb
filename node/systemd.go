package node

import (
	"fmt"
	"net"

	"github.com/coreos/go-systemd/v22/activation"
	"github.com/coreos/go-systemd/v22/daemon"
)

// Socket activation (contrib/systemd/hoard.socket): systemd owns the listening
// NBD socket, so it stays open while the daemon restarts. A QEMU that
// reconnects meanwhile waits in the socket's backlog instead of finding no
// socket, and the path never changes. The sockets are told apart by their
// FileDescriptorName.
const (
	systemdNBDSocket = "nbd" // unix socket: NBD exports
	systemdNBDTCP    = "nbd-tcp"
	systemdAPI       = "api" // TCP: the admin API
)

// systemdListeners returns the listening sockets systemd passed to this
// process by name, or an empty map when it was not socket-activated. It
// unsets LISTEN_FDS so that no child inherits them.
func systemdListeners() (map[string]net.Listener, error) {
	named, err := activation.ListenersWithNames()
	if err != nil {
		return nil, fmt.Errorf("systemd socket activation: %w", err)
	}
	out := make(map[string]net.Listener, len(named))
	for name, lns := range named {
		for _, ln := range lns {
			if ln == nil {
				continue
			}
			if _, dup := out[name]; dup {
				return nil, fmt.Errorf("systemd passed two sockets named %q; give each ListenStream of hoard.socket its own FileDescriptorName (nbd, nbd-tcp, api)", name)
			}
			out[name] = ln
		}
	}
	return out, nil
}

// notifySystemd tells systemd (Type=notify) the daemon's state, e.g.
// daemon.SdNotifyReady; without NOTIFY_SOCKET it does nothing.
func notifySystemd(state string) {
	_, _ = daemon.SdNotify(false, state)
}
