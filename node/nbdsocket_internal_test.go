package node

import (
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
)

// otherGID is a group the test may give a file that is not its own primary
// group (root: any; otherwise a supplementary group), or -1.
func otherGID() int {
	if os.Geteuid() == 0 {
		return 1
	}
	groups, _ := os.Getgroups()
	for _, g := range groups {
		if g != os.Getgid() {
			return g
		}
	}
	return -1
}

// TestNBDSocketPerms: listenUnix gives the NBD socket nbd.socket_group and
// nbd.socket_mode (default 0660, the daemon's group), so libvirt's qemu
// user can be let in.
func TestNBDSocketPerms(t *testing.T) {
	t.Parallel()
	gid := otherGID()
	for _, tc := range []struct {
		name  string
		group string
		mode  fs.FileMode
		want  fs.FileMode
		gid   int
	}{
		{name: "default", want: 0o660, gid: os.Getegid()},
		{name: "mode", mode: 0o600, want: 0o600, gid: os.Getegid()},
		{name: "group", group: strconv.Itoa(gid), mode: 0o640, want: 0o640, gid: gid},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if tc.gid < 0 {
				t.Skip("no second group to give the socket")
			}
			dir, err := os.MkdirTemp("", "hoard-sock")
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { os.RemoveAll(dir) })
			sock := filepath.Join(dir, "nbd.sock")
			if _, err := (Config{DataDir: t.TempDir(), NBDSocket: sock, NBDSocketGroup: tc.group, NBDSocketMode: tc.mode}).withDefaults(); err != nil {
				t.Fatal(err)
			}
			ln, err := listenUnix(sock)
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			fi, err := os.Stat(sock)
			if err != nil {
				t.Fatal(err)
			}
			if fi.Mode().Perm() != tc.want {
				t.Errorf("socket mode %04o, want %04o", fi.Mode().Perm(), tc.want)
			}
			if got := int(fi.Sys().(*syscall.Stat_t).Gid); got != tc.gid {
				t.Errorf("socket group %d, want %d", got, tc.gid)
			}
		})
	}
}

func TestNBDSocketUnknownGroup(t *testing.T) {
	t.Parallel()
	dir, err := os.MkdirTemp("", "hoard-sock")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "nbd.sock")
	if _, err := (Config{DataDir: t.TempDir(), NBDSocket: sock, NBDSocketGroup: "no-such-group-hoard"}).withDefaults(); err != nil {
		t.Fatal(err)
	}
	ln, err := listenUnix(sock)
	if err == nil {
		ln.Close()
		t.Fatal("listenUnix with an unknown group succeeded")
	}
	if !strings.Contains(err.Error(), "nbd.socket_group no-such-group-hoard") {
		t.Errorf("error %q does not name nbd.socket_group", err)
	}
}
