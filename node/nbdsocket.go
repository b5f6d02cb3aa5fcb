package node

import (
	"fmt"
	"io/fs"
	"os"
	"os/user"
	"strconv"
	"sync"
)

// socketPerms holds, per NBD socket path, the group and mode the socket is
// given when listenUnix creates it (Config.NBDSocketGroup, NBDSocketMode),
// recorded by Config.withDefaults. Keyed by path because listenUnix takes
// only the path; a path is served by one node at a time.
var socketPerms sync.Map // path -> socketPerm

type socketPerm struct {
	group string
	mode  fs.FileMode
}

func setSocketPerms(path, group string, mode fs.FileMode) {
	socketPerms.Store(path, socketPerm{group: group, mode: mode})
}

// applySocketPerms gives the unix socket at path its configured group and
// mode (default: the daemon's group, 0660). The socket is the local trust
// boundary: whoever can open it reads every image, so the group should hold
// exactly the users that run VMs (kvm or libvirt-qemu under libvirt).
func applySocketPerms(path string) error {
	p := socketPerm{mode: 0o660}
	if v, ok := socketPerms.Load(path); ok {
		p = v.(socketPerm)
	}
	if p.group != "" {
		gid, err := lookupGroup(p.group)
		if err != nil {
			return err
		}
		if err := os.Lchown(path, -1, gid); err != nil {
			return fmt.Errorf("nbd.socket_group %s: %w; the daemon must run as root or be a member of the group", p.group, err)
		}
	}
	if err := os.Chmod(path, p.mode.Perm()); err != nil {
		return fmt.Errorf("nbd.socket_mode %04o: %w", p.mode.Perm(), err)
	}
	return nil
}

// lookupGroup resolves a group name or numeric GID.
func lookupGroup(group string) (int, error) {
	if gid, err := strconv.Atoi(group); err == nil && gid >= 0 {
		return gid, nil
	}
	g, err := user.LookupGroup(group)
	if err != nil {
		return 0, fmt.Errorf("nbd.socket_group %s: %w; create the group or name an existing one (getent group)", group, err)
	}
	gid, err := strconv.Atoi(g.Gid)
	if err != nil {
		return 0, fmt.Errorf("nbd.socket_group %s: gid %q is not a number", group, g.Gid)
	}
	return gid, nil
}
