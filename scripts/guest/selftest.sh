#!/usr/bin/env bash
# selftest.sh WORKDIR
#
# End-to-end check of the real-guest tooling without hoard: builds the kernel/initrd
# (build-guest.sh), a ~512 MiB base image (make-base-image.sh; sources: SRCDIRS, default
# /usr/lib/python3 /usr/lib/python3.11), then boots the guest (boot.sh) twice:
#   1. from a qcow2 overlay whose backing file is the local raw image (-b base.raw);
#   2. from a qcow2 overlay whose backing file is qemu-nbd serving base.raw over a unix socket
#      (nbd+unix:///base?socket=...).
# Both must print HOARD-GUEST-OK with the sha256 the host computed. Prints the boot times.
# Also boots once with hoard.files= on the kernel command line (first 3 MANIFEST entries).
#
# qemu-nbd details: without -x the export name is "" (URI nbd+unix:///?socket=...); without
# -t (--persistent) qemu-nbd exits when its first client disconnects, and `qemu-img create`
# is such a client (it opens the backing file to learn its size), so -t is required.
#
# Env: SRCDIRS, IMAGE_SIZE (default 512M), MANIFEST_FILES (default 400), RUNS (default 1).
set -euo pipefail

usage() { echo "usage: $0 WORKDIR" >&2; exit 2; }
[ $# -eq 1 ] || usage
case "$1" in -h|--help) usage ;; esac
command -v qemu-nbd >/dev/null 2>&1 && command -v qemu-img >/dev/null 2>&1 ||
  { echo "selftest: qemu-nbd/qemu-img not found; install the Debian package 'qemu-utils'" >&2; exit 1; }

HERE=$(dirname "$(readlink -f "$0")")
mkdir -p "$1"
W=$(readlink -f "$1")
RUNS=${RUNS:-1}
read -r -a SRC <<<"${SRCDIRS:-/usr/lib/python3 /usr/lib/python3.11}"

"$HERE/build-guest.sh" "$W/kernel"
if [ -f "$W/base.raw.sha256" ] && [ "$W/base.raw" -nt "$HERE/make-base-image.sh" ]; then
  echo "selftest: reusing $W/base.raw"
else
  "$HERE/make-base-image.sh" "$W/base.raw" "${IMAGE_SIZE:-512M}" "${SRC[@]}" >/dev/null
fi
read -r sum n <"$W/base.raw.sha256"
echo "selftest: expected sha256 $sum over $n files"

SOCK=$W/nbd.sock
NBD_PID=
cleanup() { [ -z "$NBD_PID" ] || kill "$NBD_PID" 2>/dev/null || true; rm -f "$SOCK"; }
trap cleanup EXIT

boot_times() { # boot_times LABEL OVERLAY [BOOT_APPEND]
  local i out
  for ((i = 1; i <= RUNS; i++)); do
    if ! out=$(EXPECT_SHA256=$sum BOOT_APPEND=${3:-} "$HERE/boot.sh" "$W/kernel" "$2" 2>&1); then
      echo "$out" >&2
      echo "selftest: FAIL: $1 run $i" >&2
      exit 1
    fi
    echo "$out" >&2
    echo "selftest: $1 run $i: init at $(echo "$out" | grep -a '^HOARD-GUEST-INIT' | cut -d' ' -f2) s," \
      "reading from $(echo "$out" | grep -a '^HOARD-GUEST-START' | cut -d' ' -f2) s," \
      "$(echo "$out" | grep -a '^HOARD-GUEST-TIME' | cut -d' ' -f2) s done (guest uptime), $(echo "$out" | grep '^boot: wall')"
  done
}

rm -f "$W/ov-local.qcow2"
qemu-img create -q -f qcow2 -F raw -b "$W/base.raw" "$W/ov-local.qcow2"
boot_times "local raw overlay" "$W/ov-local.qcow2"

rm -f "$SOCK" "$W/ov-nbd.qcow2"
qemu-nbd -r -t -f raw -x base -k "$SOCK" "$W/base.raw" &
NBD_PID=$!
for _ in $(seq 50); do [ -S "$SOCK" ] && break; sleep 0.1; done
[ -S "$SOCK" ] || { echo "selftest: qemu-nbd did not create $SOCK" >&2; exit 1; }
qemu-img create -q -f qcow2 -F raw -b "nbd+unix:///base?socket=$SOCK" "$W/ov-nbd.qcow2"
boot_times "qemu-nbd overlay" "$W/ov-nbd.qcow2"

# hoard.files=: the guest hashes just these files. The image holds copies of this host's
# files at the same paths, so the host hashes its own copies.
files=$(head -n 3 "$W/base.raw.manifest" | paste -sd,)
sum3=$(head -n 3 "$W/base.raw.manifest" | sed 's|^|/|' | xargs -d '\n' cat | sha256sum | cut -d' ' -f1)
EXPECT_SHA256=$sum3 BOOT_APPEND="hoard.files=$files" "$HERE/boot.sh" "$W/kernel" "$W/ov-nbd.qcow2"
echo "selftest: OK"
