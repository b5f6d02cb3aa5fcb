# Sourced by the benchmark scripts. ensure_bench_image IMG WORKDIR LABEL builds
# IMG once: a 2 GiB ext4 file system made with mkfs.ext4 -d from
# /usr/lib/x86_64-linux-gnu, /usr/lib/python3 and /usr/share (about 1.3 GB of
# real files), so every benchmark reads the same realistic image.
ensure_bench_image() {
  local img=$1 work=$2 label=$3
  [ -s "$img" ] && return 0
  command -v mkfs.ext4 >/dev/null || { echo "$label: mkfs.ext4 missing: apt-get install e2fsprogs" >&2; return 1; }
  echo "$label: building $img (2 GiB ext4 from /usr/lib/x86_64-linux-gnu, /usr/lib/python3, /usr/share)"
  local stage=$work/stage d
  rm -rf "$stage"; mkdir -p "$stage"
  for d in /usr/lib/x86_64-linux-gnu /usr/lib/python3 /usr/share; do
    [ -d "$d" ] && cp -a "$d" "$stage/$(basename "$d")" 2>/dev/null || true
  done
  truncate -s 2G "$img"
  mkfs.ext4 -q -F -d "$stage" "$img"
  rm -rf "$stage"
}
