package main

import (
	"context"
	"encoding/json"
	"fmt"
	"html"
	"net/url"
	"os"
	"os/exec"
	"strings"
	"time"
)

// ReconnectDelay is how long QEMU's NBD client keeps a guest's reads waiting
// for the daemon to come back (a restart, an upgrade, a crash and a restart by
// systemd) before it fails them with EIO. It is also how long a VM that starts
// while the daemon is down waits for it at first open.
const ReconnectDelay = 30 * time.Second

// NBDURI is the export's address in NBD URI form (nbdinfo, qemu-img, qemu-io).
func NBDURI(image, socket string) string {
	return "nbd+unix:///" + url.PathEscape(image) + "?socket=" + socket
}

// OverlayBacking is the backing string of an overlay on export image: QEMU's
// json: form, because only it can carry the NBD driver's reconnect-delay and
// open-timeout (the nbd+unix URI cannot), so a guest's reads stall across a
// daemon restart instead of failing. qemu-img info/rebase and libvirt parse it.
func OverlayBacking(image, format, socket string) string {
	secs := int(ReconnectDelay / time.Second)
	b, _ := json.Marshal(map[string]any{
		"driver": format,
		"file": map[string]any{
			"driver":          "nbd",
			"server.type":     "unix",
			"server.path":     socket,
			"export":          image,
			"reconnect-delay": secs,
			"open-timeout":    secs,
		},
	})
	return "json:" + string(b)
}

// CreateOverlay runs qemu-img create for a qcow2 overlay of the export.
// format is the export's, the manifest's Format: raw for a qcow2 added with
// --format auto, whose export is its guest content (so -F raw), qcow2 for
// one added with --format raw, whose export is the qcow2 file.
func CreateOverlay(ctx context.Context, image, format, socket, path string) error {
	if _, err := exec.LookPath("qemu-img"); err != nil {
		return fmt.Errorf("qemu-img not found; install it (Debian: apt-get install qemu-utils)")
	}
	if _, err := os.Stat(path); err == nil {
		return fmt.Errorf("%s already exists; remove it or choose another path", path)
	}
	out, err := exec.CommandContext(ctx, "qemu-img", "create", "-q", "-f", "qcow2", "-F", format,
		"-b", OverlayBacking(image, format, socket), path).CombinedOutput()
	if err != nil {
		return fmt.Errorf("qemu-img create: %v: %s (is the hoard daemon running? hoard status)", err, strings.TrimSpace(string(out)))
	}
	return nil
}

// QemuCommand is a qemu command line that boots a VM on the overlay. The disk
// is attached as NVMe: the Debian and Ubuntu cloud kernels (and hoard's test
// guest, scripts/guest) have the NVMe driver built in, virtio-blk often only as
// a module.
func QemuCommand(path string) string {
	return fmt.Sprintf("qemu-system-x86_64 -machine q35,accel=kvm:tcg -m 2048 -smp 2 \\\n"+
		"  -drive file=%s,if=none,id=disk0,format=qcow2,discard=unmap \\\n"+
		"  -device nvme,drive=disk0,serial=hoard0,bootindex=0 \\\n"+
		"  -nic user,model=virtio-net-pci -nographic", shellQuote(path))
}

// LibvirtDisk is the libvirt <disk> element for the overlay. libvirt reads the
// backing chain from the qcow2 header; the backingStore element documents it.
// libvirt (9.0, Debian 12) has no NBD reconnect setting, so the disk's error
// policies pause the guest on an I/O error instead of passing it on: after the
// daemon is back, `virsh resume DOMAIN` retries the failed requests.
func LibvirtDisk(image, format, socket, path string) string {
	e := html.EscapeString
	return fmt.Sprintf(`<disk type='file' device='disk'>
  <driver name='qemu' type='qcow2' discard='unmap' error_policy='stop' rerror_policy='stop'/>
  <source file='%s'/>
  <backingStore type='network'>
    <format type='%s'/>
    <source protocol='nbd' name='%s'>
      <host transport='unix' socket='%s'/>
    </source>
    <backingStore/>
  </backingStore>
  <target dev='vda' bus='virtio'/>
</disk>
`, e(path), e(format), e(image), e(socket))
}

func shellQuote(s string) string {
	if strings.IndexFunc(s, func(r rune) bool {
		return !(r == '/' || r == '.' || r == '-' || r == '_' || r == ':' || r >= '0' && r <= '9' || r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z')
	}) < 0 {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}
