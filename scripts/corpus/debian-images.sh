#!/usr/bin/env bash
# debian-images.sh OUTDIR
#
# Builds a few separately built Debian images for dedup measurements:
#   OUTDIR/<name>.raw       2 GiB (IMAGE_SIZE) raw ext4 image made with mkfs.ext4 -d rootfs
#   OUTDIR/<name>.rootfs/   the debootstrap'ed tree it was made from (OUTDIR/<name>.done marks
#                           it complete). The downloaded .debs are removed from the tree
#                           (like apt-get clean) unless KEEP_DEBS=1: identical .debs in every
#                           image would inflate the dedup measured.
# Default variants (each a separate debootstrap run, so timestamps etc. differ as in real life):
#   minbase        debootstrap --variant=minbase
#   python3        minbase + --include=python3
#   ssh-curl       minbase + --include=openssh-server,curl
# Mirror and suite come from apt's configured sources (first Debian entry that is not a
# security/updates suite); override with MIRROR=... SUITE=.... Downloaded .debs are shared in
# OUTDIR/debs (debootstrap --cache-dir); that does not change the resulting trees.
#
# Idempotent: a variant whose rootfs is complete (marker file) is not bootstrapped again, and an
# image newer than its rootfs marker is not rebuilt. Prints progress and a size summary.
#
# Needs root (debootstrap) and the Debian package 'debootstrap'. If the mirror is unreachable
# (or FALLBACK=1), it builds fallback variants instead from different subsets of this host's
# /usr (usr-base, usr-python, usr-share), copied into staging dirs.
#
# Env: MIRROR, SUITE, IMAGE_SIZE (default 2G), FALLBACK=1 (skip debootstrap), KEEP_DEBS=1.
set -euo pipefail

usage() {
  echo "usage: $0 OUTDIR" >&2
  echo "  env MIRROR=URL SUITE=NAME IMAGE_SIZE=2G FALLBACK=1" >&2
  exit 2
}
[ $# -eq 1 ] || usage
case "$1" in -h|--help) usage ;; esac
mkdir -p "$1"
OUT=$(readlink -f "$1")
SIZE=${IMAGE_SIZE:-2G}

log() { echo "debian-images: $(date +%H:%M:%S) $*"; }
die() { echo "debian-images: $*" >&2; exit 1; }
command -v mkfs.ext4 >/dev/null 2>&1 || die "mkfs.ext4 not found; install the Debian package 'e2fsprogs'"

# Finds "MIRROR SUITE" in apt's sources (deb822 *.sources and one-line *.list).
apt_mirror() {
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk '
      function flush() {
        if (deb && uri ~ /debian\/?$/ && uri !~ /security/ && suite != "") { print uri, suite; found = 1; exit }
        deb = 0; uri = ""; suite = ""
      }
      /^[[:space:]]*$/ { flush(); next }
      /^Types:/ { for (i = 2; i <= NF; i++) if ($i == "deb") deb = 1 }
      /^URIs:/ { uri = $2 }
      /^Suites:/ { for (i = 2; i <= NF; i++) if ($i !~ /-/) { suite = $i; break } }
      END { if (!found) flush() }' "$f"
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    awk '$1 == "deb" { u = $2; s = $3; if ($2 ~ /^\[/) { u = $3; s = $4 }
         if (u ~ /debian\/?$/ && u !~ /security/ && s !~ /-/) { print u, s; exit } }' "$f"
  done
}

# make_image NAME TREE: TREE -> OUTDIR/NAME.raw unless the image is newer than OUTDIR/NAME.done.
make_image() {
  local name=$1 tree=$2 img=$OUT/$1.raw
  if [ "$img" -nt "$OUT/$name.done" ]; then
    log "$name: image up to date"
    return
  fi
  log "$name: mkfs.ext4 $SIZE -d $tree"
  rm -f "$img.tmp"
  truncate -s "$SIZE" "$img.tmp"
  mkfs.ext4 -q -F -d "$tree" "$img.tmp" ||
    die "$name: mkfs.ext4 failed ($(du -sh "$tree" | cut -f1) tree; too big for $SIZE? set IMAGE_SIZE)"
  mv "$img.tmp" "$img"
}

summary() {
  local name
  log "summary (rootfs du, image allocated du, image size):"
  for name in "$@"; do
    printf '  %-10s rootfs %6s  image %6s allocated of %s\n' "$name" \
      "$(du -sh "$OUT/$name.rootfs" | cut -f1)" "$(du -h "$OUT/$name.raw" | cut -f1)" \
      "$(du -h --apparent-size "$OUT/$name.raw" | cut -f1)"
  done
}

fallback() {
  log "building fallback variants from this host's /usr"
  local name dirs d
  # /usr/bin is left out: on build machines it holds large toolchains and overflows 2 GiB.
  for spec in "usr-base:/usr/sbin /usr/lib/x86_64-linux-gnu" \
              "usr-python:/usr/sbin /usr/lib/x86_64-linux-gnu /usr/lib/python3 /usr/lib/python3.11" \
              "usr-share:/usr/sbin /usr/lib/x86_64-linux-gnu /usr/share"; do
    name=${spec%%:*} dirs=${spec#*:}
    local tree=$OUT/$name.rootfs
    if [ -e "$OUT/$name.done" ]; then
      log "$name: staging tree already complete"
    else
      log "$name: copying $dirs"
      rm -rf "$tree" "$OUT/$name.raw"
      mkdir -p "$tree"
      for d in $dirs; do
        [ -d "$d" ] || continue
        mkdir -p "$tree$(dirname "$d")"
        cp -a "$d" "$tree$d"   # real copies: separate files, like separately built images
      done
      touch "$OUT/$name.done"
    fi
    make_image "$name" "$tree"
  done
  summary usr-base usr-python usr-share
}

if [ "${FALLBACK:-0}" = 1 ]; then fallback; exit 0; fi
[ "$(id -u)" -eq 0 ] || die "debootstrap needs root (or run with FALLBACK=1)"
command -v debootstrap >/dev/null 2>&1 || die "debootstrap not found; install the Debian package 'debootstrap' (or run with FALLBACK=1)"

read -r m s < <(apt_mirror; echo) || true
MIRROR=${MIRROR:-$m}
SUITE=${SUITE:-$s}
[ -n "$MIRROR" ] && [ -n "$SUITE" ] || die "cannot find a Debian mirror/suite in /etc/apt; set MIRROR= and SUITE="
log "mirror $MIRROR suite $SUITE"

if ! (command -v curl >/dev/null 2>&1 && curl -fsS -m 20 -o /dev/null "$MIRROR/dists/$SUITE/Release") &&
   ! (command -v wget >/dev/null 2>&1 && wget -q -T 20 -O /dev/null "$MIRROR/dists/$SUITE/Release"); then
  log "mirror $MIRROR unreachable (or no curl/wget): using the fallback"
  fallback
  exit 0
fi

mkdir -p "$OUT/debs"
names=()
for spec in "minbase:" "python3:python3" "ssh-curl:openssh-server,curl"; do
  name=${spec%%:*} inc=${spec#*:}
  names+=("$name")
  tree=$OUT/$name.rootfs
  if [ -e "$OUT/$name.done" ]; then
    log "$name: rootfs already bootstrapped"
  else
    log "$name: debootstrap --variant=minbase${inc:+ --include=$inc} $SUITE"
    rm -rf "$tree" "$tree.tmp" "$OUT/$name.raw"
    t0=$(date +%s)
    if ! debootstrap --variant=minbase ${inc:+--include="$inc"} --cache-dir="$OUT/debs" \
         "$SUITE" "$tree.tmp" "$MIRROR" >"$OUT/$name.debootstrap.log" 2>&1; then
      tail -n 20 "$OUT/$name.debootstrap.log" >&2
      die "$name: debootstrap failed; full log in $OUT/$name.debootstrap.log (FALLBACK=1 avoids the mirror)"
    fi
    # debootstrap may leave /proc or /sys mounted in the target in some environments.
    for mnt in proc sys; do mountpoint -q "$tree.tmp/$mnt" && umount -l "$tree.tmp/$mnt"; done
    [ "${KEEP_DEBS:-0}" = 1 ] || find "$tree.tmp/var/cache/apt/archives" -maxdepth 1 -name '*.deb' -delete
    mv "$tree.tmp" "$tree"
    touch "$OUT/$name.done"
    log "$name: debootstrap took $(( $(date +%s) - t0 )) s"
  fi
  make_image "$name" "$tree"
done
summary "${names[@]}"
