#!/usr/bin/env bash
# boot.sh KERNELDIR DISK [extra qemu args...]
#
# Boots the test guest built by scripts/guest/build-guest.sh (KERNELDIR/vmlinuz,
# KERNELDIR/initrd.gz) under qemu TCG with DISK attached as NVMe (/dev/nvme0n1), prints the
# guest's HOARD-GUEST-* marker lines and the wall time, and exits 0 only if the guest printed
# HOARD-GUEST-OK (HOARD-GUEST-START <uptime> <nfiles> marks the guest starting to read;
# HOARD-GUEST-TIME <uptime> the end). No NIC is attached (-nic none; saves the iPXE ROM).
# With EXPECT_SHA256 set, also requires the guest's sha256 to equal it.
#
# Env:
#   BOOT_TIMEOUT   seconds before qemu is killed (default 120)
#   DISK_FORMAT    qemu format of DISK (default qcow2)
#   BOOT_APPEND    extra kernel command line, e.g. "hoard.files=usr/a,usr/b"
#   BOOT_LOG       keep the full serial console log in this file (default: temp, removed)
#   EXPECT_SHA256  the sha256 make-base-image.sh printed; checked against the guest's
#   QEMU           qemu binary (default qemu-system-x86_64)
set -euo pipefail

usage() {
  echo "usage: $0 KERNELDIR DISK.qcow2 [extra qemu args...]" >&2
  echo "  env BOOT_TIMEOUT=120 DISK_FORMAT=qcow2 BOOT_APPEND= BOOT_LOG= EXPECT_SHA256=" >&2
  exit 2
}
[ $# -ge 2 ] || usage
case "$1" in -h|--help) usage ;; esac
KDIR=$1 DISK=$2
shift 2
QEMU=${QEMU:-qemu-system-x86_64}
T=${BOOT_TIMEOUT:-120}
FMT=${DISK_FORMAT:-qcow2}
command -v "$QEMU" >/dev/null 2>&1 || { echo "boot: $QEMU not found; install the Debian package 'qemu-system-x86'" >&2; exit 1; }
command -v timeout >/dev/null 2>&1 || { echo "boot: timeout not found; install 'coreutils'" >&2; exit 1; }
for f in "$KDIR/vmlinuz" "$KDIR/initrd.gz"; do
  [ -f "$f" ] || { echo "boot: missing $f; run scripts/guest/build-guest.sh $KDIR" >&2; exit 1; }
done
# DISK may be a URI qemu understands (nbd+unix://...), so only check plain paths that look local.
case "$DISK" in *://*) ;; *) [ -e "$DISK" ] || { echo "boot: no such disk: $DISK" >&2; exit 1; } ;; esac

if [ -n "${BOOT_LOG:-}" ]; then
  LOG=$BOOT_LOG
else
  LOG=$(mktemp "${TMPDIR:-/tmp}/boot.XXXXXX.log")
  trap 'rm -f "$LOG"' EXIT
fi

start=$(date +%s.%N)
rc=0
timeout -k 5 "$T" "$QEMU" -accel tcg -nographic -m 512 \
  -kernel "$KDIR/vmlinuz" -initrd "$KDIR/initrd.gz" \
  -append "console=ttyS0 panic=-1 quiet${BOOT_APPEND:+ $BOOT_APPEND}" -no-reboot -nic none \
  -drive "file=$DISK,if=none,id=d0,format=$FMT" -device nvme,drive=d0,serial=hoard \
  "$@" </dev/null >"$LOG" 2>&1 || rc=$?
end=$(date +%s.%N)
wall=$(awk -v a="$start" -v b="$end" 'BEGIN {printf "%.2f", b - a}')

# Console lines may carry terminal escapes before the marker: match anywhere in the line.
markers=$(tr -d '\r' <"$LOG" | grep -ao 'HOARD-GUEST-[A-Z]* .*' || true)
[ -z "$markers" ] || echo "$markers"
echo "boot: wall ${wall}s (qemu exit $rc)"
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
  echo "boot: FAIL: timed out after ${T}s; last console lines:" >&2
  tr -d '\r' <"$LOG" | tail -n 20 >&2
  exit 1
fi
ok=$(echo "$markers" | grep '^HOARD-GUEST-OK ' | tail -n1 || true)
if [ -z "$ok" ]; then
  echo "boot: FAIL: no HOARD-GUEST-OK; last console lines:" >&2
  tr -d '\r' <"$LOG" | tail -n 20 >&2
  exit 1
fi
if [ -n "${EXPECT_SHA256:-}" ]; then
  got=$(echo "$ok" | cut -d' ' -f2)
  if [ "$got" != "$EXPECT_SHA256" ]; then
    echo "boot: FAIL: guest sha256 $got != expected $EXPECT_SHA256" >&2
    exit 1
  fi
  echo "boot: sha256 matches"
fi
echo "boot: OK"
