#!/usr/bin/env bash
# Import throughput: `hoard image add` of a 2 GiB ext4 image vs `zstd -1 -T0` on
# the same file, both reading from the page cache and both writing their output
# durably to the same disk. Prints MiB/s each and the ratio.
#
#   scripts/bench-import.sh [WORKDIR]    (default /var/tmp/hoard-bench)
#
# The image is built once with mkfs.ext4 -d from directories under /usr/lib and
# /usr/share (about 1.3 GB of files in a 2 GiB file system).
set -euo pipefail
work=${1:-/var/tmp/hoard-bench}
mkdir -p "$work"
cd "$(dirname "$0")/.."
command -v zstd >/dev/null || { echo "bench-import: zstd missing: apt-get install zstd" >&2; exit 1; }
command -v mkfs.ext4 >/dev/null || { echo "bench-import: mkfs.ext4 missing: apt-get install e2fsprogs" >&2; exit 1; }
CGO_ENABLED=0 go build -o "$work/hoard" ./cmd/hoard

img=$work/usrlib.raw
# shellcheck source=scripts/lib/bench-image.sh
. scripts/lib/bench-image.sh   # the cwd is the repo root (cd above)
ensure_bench_image "$img" "$work" bench-import
size=$(stat -c %s "$img")
cat "$img" > /dev/null   # page cache

now() { date +%s.%N; }
mibs() { awk -v s="$size" -v t="$1" 'BEGIN { printf "%.0f", s / 1048576 / t }'; }

runs=${RUNS:-3}
# timed CMD...: runs CMD (its output already redirected by the caller) and
# prints "wall user+sys" seconds. CPU seconds are steadier than wall time on
# a shared machine, so both are reported.
timed() {
  local TIMEFORMAT='%R %U %S' t
  t=$( { time "$@" ; } 2>&1 >/dev/null ) || { echo "bench-import: $* failed" >&2; return 1; }
  awk -v t="$t" 'BEGIN { split(t, a, " "); printf "%s %.2f\n", a[1], a[2] + a[3] }'
}
best_z=999999; best_h=999999; best_s=999999; cpu_z=999999; cpu_h=999999; cpu_s=999999
for i in $(seq "$runs"); do
  rm -f "$work/out.zst"
  read -r tz cz < <(timed sh -c "zstd -q -1 -T0 -f '$img' -o '$work/out.zst' && sync -f '$work/out.zst'")
  rm -rf "$work/data"
  read -r th ch < <(timed sh -c "'$work/hoard' --data-dir '$work/data' --store-quota 0 image add '$img' --name bench > '$work/hoard.out' 2>/dev/null")
  rm -rf "$work/data-s2"
  read -r ts cs < <(timed sh -c "'$work/hoard' --data-dir '$work/data-s2' --store-quota 0 --store-compression s2 image add '$img' --name bench > '$work/hoard-s2.out' 2>/dev/null")
  [ -n "$tz" ] && [ -n "$th" ] && [ -n "$ts" ] || { echo "bench-import: run $i failed" >&2; exit 1; }
  echo "run $i: zstd -1 -T0 $(mibs "$tz") MiB/s ($tz s, $cz CPU-s), hoard image add $(mibs "$th") MiB/s ($th s, $ch CPU-s), hoard with s2 $(mibs "$ts") MiB/s ($ts s, $cs CPU-s)"
  best_s=$(awk -v a="$best_s" -v b="$ts" 'BEGIN { print (b < a) ? b : a }')
  best_z=$(awk -v a="$best_z" -v b="$tz" 'BEGIN { print (b < a) ? b : a }')
  best_h=$(awk -v a="$best_h" -v b="$th" 'BEGIN { print (b < a) ? b : a }')
  cpu_z=$(awk -v a="$cpu_z" -v b="$cz" 'BEGIN { print (b < a) ? b : a }')
  cpu_h=$(awk -v a="$cpu_h" -v b="$ch" 'BEGIN { print (b < a) ? b : a }')
  cpu_s=$(awk -v a="$cpu_s" -v b="$cs" 'BEGIN { print (b < a) ? b : a }')
done
zs=$(stat -c %s "$work/out.zst")
echo
cat "$work/hoard.out"
echo
grep -E "stored bytes|compression" "$work/hoard-s2.out" | sed 's/^/  s2: /'
echo "image: $(numfmt --to=iec "$size"), zstd -1 output $(numfmt --to=iec "$zs")"
echo "best of $runs: zstd -1 -T0 $(mibs "$best_z") MiB/s, hoard (zstd) $(mibs "$best_h") MiB/s = $(awk -v z="$best_z" -v h="$best_h" 'BEGIN { printf "%.2f", z / h }')x, hoard (s2) $(mibs "$best_s") MiB/s = $(awk -v z="$best_z" -v h="$best_s" 'BEGIN { printf "%.2f", z / h }')x"
echo "least CPU of $runs: zstd -1 -T0 $cpu_z CPU-s, hoard (zstd) $cpu_h CPU-s, hoard (s2) $cpu_s CPU-s"
