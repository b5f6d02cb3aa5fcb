#!/usr/bin/env bash
# Installs the real tools hoard's tests drive: QEMU and libnbd clients, a Glance API
# server (Debian's glance-api, run without keystone), and what a guest boot needs.
# Safe to run again: it installs only what is missing. Needs root (apt-get).
set -euo pipefail

need=()
have() { command -v "$1" >/dev/null 2>&1; }
pkg_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

have qemu-img            || need+=(qemu-utils)
have nbdinfo             || need+=(libnbd-bin)
have qemu-system-x86_64  || need+=(qemu-system-x86)
have glance-api          || need+=(glance-api)
have cpio                || need+=(cpio)
have zstd                || need+=(zstd)
have mkfs.ext4           || need+=(e2fsprogs)
pkg_installed busybox-static || need+=(busybox-static)
# The Nova weigher's test (contrib/nova) runs Nova's own weigher handler (Zed), with /usr/bin/python3.
pkg_installed python3-nova   || need+=(python3-nova)

if [ ${#need[@]} -eq 0 ]; then
  echo "install-test-deps: all test tools present"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install-test-deps: missing ${need[*]}; run as root (or: sudo $0)" >&2
  exit 1
fi
echo "install-test-deps: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# glance-api's postinst may try to start a service; there is no init system in CI containers,
# so tolerate that and check the binary afterwards.
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null || true
for b in qemu-img nbdinfo qemu-system-x86_64 glance-api cpio zstd; do
  have "$b" || { echo "install-test-deps: $b still missing after apt-get; check apt sources" >&2; exit 1; }
done
/usr/bin/python3 -c 'import nova.scheduler.weights' 2>/dev/null ||
  { echo "install-test-deps: python3-nova installed but nova does not import with /usr/bin/python3; check apt sources" >&2; exit 1; }
echo "install-test-deps: done"
