#!/usr/bin/env bash
# build-guest.sh OUTDIR
#
# Builds what a real-guest boot test needs: OUTDIR/vmlinuz (Debian's cloud kernel, which has
# NVMe and ext4 built in) and OUTDIR/initrd.gz (busybox-static plus an /init that reads files
# from the disk /dev/nvme0n1 and prints a marker line on the serial console).
#
# Guest protocol (what /init does):
#   - mounts /dev/nvme0n1 read-only as ext4 at /mnt (waits up to ~20 s for the device);
#   - the file list is the kernel parameter hoard.files=a/b,c/d (paths relative to the disk
#     root, comma separated); without it, every line of /mnt/MANIFEST (one path per line);
#   - hash: sha256 of the CONCATENATION of the files' contents in list order, i.e. what
#     `cd ROOT && cat f1 f2 ... | sha256sum` gives on the host;
#   - prints `HOARD-GUEST-INIT <uptime>` when /init starts, `HOARD-GUEST-START <uptime> <n>`
#     when the list is checked and reading starts (one `cat` per xargs batch, not per file);
#   - prints `HOARD-GUEST-TIME <seconds since boot, from /proc/uptime>` then exactly one of
#     `HOARD-GUEST-OK <sha256hex> <nfiles>` or `HOARD-GUEST-FAIL <reason>`, then `poweroff -f`.
#
# Idempotent: does nothing when OUTDIR/vmlinuz and OUTDIR/initrd.gz exist and are newer than
# this script. Installs nothing; names the Debian package to install when a tool is missing.
# Needs network access to the Debian mirror configured for apt (for the kernel package).
set -euo pipefail

usage() {
  echo "usage: $0 OUTDIR" >&2
  echo "  builds OUTDIR/vmlinuz and OUTDIR/initrd.gz for scripts/guest/boot.sh" >&2
  exit 2
}
[ $# -eq 1 ] || usage
case "$1" in -h|--help) usage ;; esac

OUTDIR=$1
SELF=$(readlink -f "$0")

need_tool() { # need_tool TOOL DEBIAN-PACKAGE
  command -v "$1" >/dev/null 2>&1 || {
    echo "build-guest: '$1' not found; install the Debian package '$2' (apt-get install $2)" >&2
    exit 1
  }
}
need_tool qemu-system-x86_64 qemu-system-x86
need_tool cpio cpio
need_tool gzip gzip
need_tool dpkg-deb dpkg
need_tool apt-get apt

BUSYBOX=
for b in /bin/busybox /usr/bin/busybox; do
  if [ -x "$b" ] && file -L "$b" 2>/dev/null | grep -q 'statically linked'; then BUSYBOX=$b; break; fi
done
if [ -z "$BUSYBOX" ] && dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'install ok installed'; then
  BUSYBOX=/bin/busybox  # 'file' may be missing; the package guarantees a static binary
fi
[ -n "$BUSYBOX" ] && [ -x "$BUSYBOX" ] || {
  echo "build-guest: no statically linked busybox; install the Debian package 'busybox-static'" >&2
  exit 1
}

mkdir -p "$OUTDIR"
OUTDIR=$(readlink -f "$OUTDIR")
if [ "$OUTDIR/vmlinuz" -nt "$SELF" ] && [ "$OUTDIR/initrd.gz" -nt "$SELF" ]; then
  echo "build-guest: $OUTDIR/vmlinuz and initrd.gz are up to date"
  exit 0
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/build-guest.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# --- kernel -----------------------------------------------------------------------------------
if [ "$OUTDIR/vmlinuz" -nt "$SELF" ]; then
  echo "build-guest: kernel $OUTDIR/vmlinuz is up to date"
else
  echo "build-guest: fetching Debian's cloud kernel"
  cd "$WORK"
  download() { # apt-get download, with one apt-get update if the first try fails
    apt-get download -q "$@" >/dev/null 2>"$WORK/apt.err" && return 0
    echo "build-guest: apt-get download $* failed; running apt-get update and retrying" >&2
    apt-get update -qq >/dev/null && apt-get download -q "$@" >/dev/null 2>"$WORK/apt.err" && return 0
    cat "$WORK/apt.err" >&2
    echo "build-guest: cannot download $*; check the apt sources and network" >&2
    exit 1
  }
  download linux-image-cloud-amd64
  meta=$(ls linux-image-cloud-amd64_*.deb)
  pkg=$(dpkg-deb -f "$meta" Depends | tr ',|' '\n\n' | sed 's/(.*//; s/ //g' |
        grep -E '^linux-image-.*-cloud-amd64$' | grep -v '^linux-image-cloud-amd64$' | head -n1)
  [ -n "$pkg" ] || { echo "build-guest: no versioned kernel in the Depends of $meta" >&2; exit 1; }
  echo "build-guest: kernel package $pkg"
  download "$pkg"
  dpkg -x "$(ls "${pkg}"_*.deb)" "$WORK/kernel"
  vmlinuz=$(ls "$WORK"/kernel/boot/vmlinuz-* | head -n1)
  cp "$vmlinuz" "$OUTDIR/vmlinuz.tmp"
  mv "$OUTDIR/vmlinuz.tmp" "$OUTDIR/vmlinuz"
  basename "$vmlinuz" >"$OUTDIR/kernel-version"
  echo "build-guest: wrote $OUTDIR/vmlinuz ($(basename "$vmlinuz"))"
fi

# --- initramfs --------------------------------------------------------------------------------
R=$WORK/initrd
mkdir -p "$R/bin" "$R/dev" "$R/proc" "$R/sys" "$R/mnt" "$R/tmp"
cp "$BUSYBOX" "$R/bin/busybox"
cat >"$R/init" <<'INIT'
#!/bin/busybox sh
# hoard test guest init (written by scripts/guest/build-guest.sh)
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
[ -e /dev/console ] && exec >/dev/console 2>&1 </dev/null

uptime_s() { cut -d' ' -f1 /proc/uptime; }
echo "HOARD-GUEST-INIT $(uptime_s)"
finish() { # finish LINE...
  echo "HOARD-GUEST-TIME $(uptime_s)"
  echo "$@"
  sync
  poweroff -f
  sleep 5
}
fail() { finish "HOARD-GUEST-FAIL $*"; }

i=0
while [ ! -b /dev/nvme0n1 ]; do
  i=$((i + 1))
  [ "$i" -gt 200 ] && fail "no /dev/nvme0n1 after 20 s"
  sleep 0.1
done
mount -t ext4 -o ro /dev/nvme0n1 /mnt || fail "cannot mount /dev/nvme0n1 as ext4"

files=
for arg in $(cat /proc/cmdline); do
  case "$arg" in hoard.files=*) files=${arg#hoard.files=} ;; esac
done
if [ -n "$files" ]; then
  echo "$files" | tr ',' '\n' >/tmp/list
elif [ -f /mnt/MANIFEST ]; then
  cp /mnt/MANIFEST /tmp/list
else
  fail "no hoard.files= on the kernel command line and no /MANIFEST on the disk"
fi
sed -i '/^$/d' /tmp/list
n=$(wc -l </tmp/list)
[ "$n" -gt 0 ] || fail "empty file list"
# No per-file existence check: a shell loop over 20,000 paths costs ~15 s under TCG. A missing
# file makes cat fail (its message names the file) and the marker HOARD-GUEST-FAIL.
echo "HOARD-GUEST-START $(uptime_s) $n"
# One cat per batch of files (xargs), not per file: a fork costs milliseconds under TCG.
rm -f /tmp/readerr
sum=$( { sed 's|^|/mnt/|' /tmp/list | tr '\n' '\0' | xargs -0 cat || echo "$?" >/tmp/readerr; } | sha256sum)
[ -e /tmp/readerr ] && fail "read error (missing or unreadable file; xargs cat exit $(cat /tmp/readerr))"
finish "HOARD-GUEST-OK ${sum%% *} $n"
INIT
chmod 755 "$R/init"
(cd "$R" && find . | LC_ALL=C sort | cpio -o -H newc --quiet | gzip -9) >"$OUTDIR/initrd.gz.tmp"
mv "$OUTDIR/initrd.gz.tmp" "$OUTDIR/initrd.gz"
echo "build-guest: wrote $OUTDIR/initrd.gz"
