package node

import (
	"context"
	"fmt"
	"html"
	"net/url"
	"os"
	"os/exec"
	"strings"
)

// OverlayBacking is the backing-file URI of an overlay on export image.
func OverlayBacking(image, socket string) string {
	return "nbd+unix:///" + url.PathEscape(image) + "?socket=" + socket
}

// CreateOverlay runs qemu-img create for a qcow2 overlay of the export.
func CreateOverlay(ctx context.Context, image, format, socket, path string) error {
	if _, err := exec.LookPath("qemu-img"); err != nil {
		return fmt.Errorf("qemu-img not found; install it (Debian: apt-get install qemu-utils)")
	}
	if _, err := os.Stat(path); err == nil {
		return fmt.Errorf("%s already exists; remove it or choose another path", path)
	}
	out, err := exec.CommandContext(ctx, "qemu-img", "create", "-q", "-f", "qcow2", "-F", format,
		"-b", OverlayBacking(image, socket), path).CombinedOutput()
	if err != nil {
		return fmt.Errorf("qemu-img create: %v: %s (is the hoard daemon running? hoard status)", err, strings.TrimSpace(string(out)))
	}
	return nil
}

// QemuCommand is a qemu command line that boots a VM on the overlay.
func QemuCommand(path string) string {
	return fmt.Sprintf("qemu-system-x86_64 -machine q35,accel=kvm:tcg -m 2048 -smp 2 \\\n"+
		"  -drive file=%s,if=none,id=disk0,format=qcow2,discard=unmap \\\n"+
		"  -device virtio-blk-pci,drive=disk0,bootindex=0 \\\n"+
		"  -nic user,model=virtio-net-pci -nographic", shellQuote(path))
}

// LibvirtDisk is the libvirt <disk> element for the overlay. libvirt reads the
// backing chain from the qcow2 header; the backingStore element documents it.
func LibvirtDisk(image, format, socket, path string) string {
	e := html.EscapeString
	return fmt.Sprintf(`<disk type='file' device='disk'>
  <driver name='qemu' type='qcow2' discard='unmap'/>
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
