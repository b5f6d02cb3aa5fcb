#!/usr/bin/env bash
# make-base-image.sh OUT.raw SIZE SRCDIR...
#
# Builds a raw ext4 image (no root mount needed: mkfs.ext4 -d) whose tree holds copies of the
# given source dirs at their own paths (e.g. /usr/lib/python3 -> /usr/lib/python3 in the image)
# plus /MANIFEST: the first MANIFEST_FILES (default 400; 0 = all) regular files of the image,
# in C-locale sorted order, one path per line relative to the image root. Paths containing
# whitespace or commas are never listed (the guest also accepts lists as hoard.files=a,b).
#
# Prints on stdout only the sha256 the guest (scripts/guest/build-guest.sh's /init) must print
# in `HOARD-GUEST-OK <sha256> <nfiles>`: sha256 of the concatenation of the listed files'
# contents in MANIFEST order. Also writes OUT.raw.sha256 ("<sha256> <nfiles>") and
# OUT.raw.manifest (a copy of MANIFEST). Progress goes to stderr.
#
# SIZE is anything truncate(1) accepts (512M, 2G). The image is rebuilt on every call.
# Env: MANIFEST_FILES (default 400), TMPDIR (staging dir parent; default: OUT.raw's directory,
# so the staging copy can be hard links when the sources are on the same filesystem).
set -euo pipefail

usage() {
  echo "usage: $0 OUT.raw SIZE SRCDIR..." >&2
  echo "  e.g. $0 /tmp/base.raw 512M /usr/lib/python3 /usr/lib/python3.11" >&2
  echo "  env MANIFEST_FILES=N (default 400, 0 = all files)" >&2
  exit 2
}
[ $# -ge 3 ] || usage
case "$1" in -h|--help) usage ;; esac

OUT=$1 SIZE=$2
shift 2
N=${MANIFEST_FILES:-400}
case "$N" in ''|*[!0-9]*) echo "make-base-image: MANIFEST_FILES must be a number" >&2; exit 2 ;; esac
command -v mkfs.ext4 >/dev/null 2>&1 || { echo "make-base-image: mkfs.ext4 not found; install the Debian package 'e2fsprogs'" >&2; exit 1; }
for s in "$@"; do
  [ -d "$s" ] || { echo "make-base-image: not a directory: $s" >&2; exit 2; }
done

outdir=$(dirname "$(readlink -f "$OUT")")
mkdir -p "$outdir"
STAGE=$(mktemp -d "${TMPDIR:-$outdir}/make-base-image.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT

for s in "$@"; do
  src=$(readlink -f "$s")
  dst=$STAGE/root${src}
  mkdir -p "$(dirname "$dst")"
  echo "make-base-image: copying $src" >&2
  # Hard links when possible (same filesystem): fast and no extra space.
  cp -al "$src" "$dst" 2>/dev/null || { rm -rf "$dst"; cp -a "$src" "$dst"; }
done

(cd "$STAGE/root" && find . -type f -printf '%P\n') | grep -v '[[:space:],]' | LC_ALL=C sort >"$STAGE/all"
if [ "$N" -eq 0 ]; then cp "$STAGE/all" "$STAGE/MANIFEST"; else head -n "$N" "$STAGE/all" >"$STAGE/MANIFEST"; fi
n=$(wc -l <"$STAGE/MANIFEST")
[ "$n" -gt 0 ] || { echo "make-base-image: no regular files to list" >&2; exit 1; }
cp "$STAGE/MANIFEST" "$STAGE/root/MANIFEST"

bytes=$(cd "$STAGE/root" && xargs -d '\n' stat -c %s <MANIFEST | awk '{s+=$1} END {print s+0}')
sum=$(cd "$STAGE/root" && xargs -d '\n' cat <MANIFEST | sha256sum | cut -d' ' -f1)

echo "make-base-image: mkfs.ext4 $SIZE -> $OUT ($n files, $bytes bytes in MANIFEST)" >&2
rm -f "$OUT"
truncate -s "$SIZE" "$OUT"
mkfs.ext4 -q -F -d "$STAGE/root" "$OUT" >&2
cp "$STAGE/MANIFEST" "$OUT.manifest"
echo "$sum $n" >"$OUT.sha256"
echo "$sum"
