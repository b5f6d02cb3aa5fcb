#!/usr/bin/env bash
# Stored bytes for several separately built images: content-defined vs fixed
# chunking, each into a fresh store.
#
#   scripts/bench-dedup.sh IMAGE.raw...   (e.g. the images of scripts/corpus/debian-images.sh)
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 IMAGE.raw..." >&2; exit 2; }
cd "$(dirname "$0")/.."
work=$(mktemp -d /var/tmp/hoard-dedup.XXXXXX)
trap 'rm -rf "$work"' EXIT
CGO_ENABLED=0 go build -o "$work/hoard" ./cmd/hoard
for ck in cdc fixed; do
  d=$work/data-$ck
  for img in "$@"; do
    "$work/hoard" --data-dir "$d" --store-quota 0 image add "$img" --name "$(basename "$img" .raw)" --chunking "$ck" --json >/dev/null
  done
  "$work/hoard" --data-dir "$d" store stats --json > "$work/stats-$ck.json"
  python3 - "$ck" "$work/stats-$ck.json" <<'PY'
import json, sys
ck, f = sys.argv[1], sys.argv[2]
s = json.load(open(f))
mib = lambda n: n / 2**20
print(f"{ck:5s}: {s['images']} images, logical {mib(s['logical_bytes']):.0f} MiB, non-zero {mib(s['non_zero_bytes']):.0f} MiB, "
      f"unique chunks {s['chunks']}, unique raw {mib(s['raw_bytes']):.0f} MiB (dedup {s['dedup_ratio']:.2f}x), "
      f"stored {mib(s['stored_bytes']):.0f} MiB (compression {s['compression_ratio']:.2f}x), disk {mib(s['disk_bytes']):.0f} MiB")
PY
done
