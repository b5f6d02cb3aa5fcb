#!/usr/bin/env bash
# Boot storm: 4 real hoard daemons on loopback, fresh for each run, open an
# image the moment it was added lazily on one of them and read all of it at
# once, from an HTTP origin capped at 50 MB/s. Two modes, RUNS runs each:
# meshed (all connected before the add) and joining (the image is added on
# the first daemon alone; the others start and the storm begins before the
# cluster settled). Prints, per run, the bytes the origin served as a
# multiple of the image's non-zero bytes (1.0 = each needed chunk fetched
# once); fails when a run is above 1.1x. HOARD_STORM_MODE=meshed (or
# joining) runs one mode only.
#
#   scripts/bootstorm.sh [RUNS]    (default 20)
#
# It runs cmd/hoard's TestBootStorm (needs qemu-img: apt-get install
# qemu-utils) with HOARD_STORM_RUNS=RUNS; the full log of a failed run is in
# the go test output saved to ${TMPDIR:-/tmp}/hoard-bootstorm.log.
set -euo pipefail
runs=${1:-20}
cd "$(dirname "$0")/.."
log=${TMPDIR:-/tmp}/hoard-bootstorm.log
set +e
HOARD_STORM_MODE=${HOARD_STORM_MODE:-meshed,joining} HOARD_STORM_RUNS=$runs go test -count=1 -timeout $((runs * 60 + 120))s -run '^TestBootStorm$' -v ./cmd/hoard/ >"$log" 2>&1
rc=$?
set -e
grep "^bootstorm " "$log" || true
grep -E 'origin/non-zero per run' "$log" || true
if [ $rc -ne 0 ]; then
  echo "bootstorm: FAILED (exit $rc); see $log" >&2
  grep -E -- '--- FAIL|bootstorm_test.go' "$log" | head -40 >&2
fi
exit $rc
