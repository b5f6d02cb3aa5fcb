#!/usr/bin/env bash
# The docker-compose testbed: three hoard nodes in containers built FROM scratch
# (no registry needed), one swarm key, bootstrap through compose DNS.
#   scripts/testbed.sh up      build the static binary and image, start the nodes, list node2's peers
#   scripts/testbed.sh check   the data path across containers: an image added on node1 only
#                              (its origin is a file inside node1's container) is pulled by
#                              name and read over NBD on node2 and node3, byte for byte,
#                              with every chunk from peers and none from an origin
#   scripts/testbed.sh down    stop and remove them (keeps ./testbed; rm -rf it to start afresh)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v docker-compose >/dev/null || { echo "testbed: docker-compose missing: apt-get install docker-compose" >&2; exit 1; }
hoard=bin/hoard
api() { echo "127.0.0.1:748$1"; }
# Each node's API needs its token (the daemon wrote it into its data dir, here on the host).
on() { local n=$1; shift; HOARD_API=$(api "$n") HOARD_API_TOKEN=$(cat "testbed/node$n/api.token" 2>/dev/null) "$hoard" "$@"; }
wait_peers() { # wait_peers NODE N
  for _ in $(seq 60); do
    local c
    c=$(on "$1" status --json 2>/dev/null | sed -n 's/.*"connected_peers": *\([0-9]*\).*/\1/p')
    [ "${c:-0}" -ge "$2" ] && return 0
    sleep 1
  done
  echo "testbed: node$1 has fewer than $2 connected peers after 60 s; see docker-compose logs node$1" >&2
  return 1
}
counter() { # counter NODE KEY -> the number after "KEY": in status --json
  on "$1" status --json | tr -d ' \n' | grep -o "\"$2\":[0-9]*" | head -n1 | cut -d: -f2
}
case "${1:-}" in
up)
  CGO_ENABLED=0 go build -trimpath -o "$hoard" ./cmd/hoard
  mkdir -p testbed/node1 testbed/node2 testbed/node3 testbed/images
  [ -s testbed/swarm.key ] || "$hoard" cluster keygen testbed/swarm.key
  docker-compose build
  docker-compose up -d
  wait_peers 2 1
  wait_peers 3 1
  on 2 peers
  echo "testbed up: APIs on 127.0.0.1:7481-7483 (HOARD_API=127.0.0.1:7481 HOARD_API_TOKEN=\$(cat testbed/node1/api.token) bin/hoard status)"
  ;;
check)
  command -v qemu-img >/dev/null || { echo "testbed: qemu-img missing: apt-get install qemu-utils" >&2; exit 1; }
  [ -S testbed/node1/nbd.sock ] || { echo "testbed: not running; run scripts/testbed.sh up first" >&2; exit 1; }
  img=testbed/images/check.raw
  # 48 MiB: random data with zero holes, in node1's image dir (/images in the container; not
  # its data dir, which the daemon never imports from).
  mkdir -p testbed/images
  head -c $((32 << 20)) /dev/urandom >"$img"
  truncate -s 48M "$img"
  dd if=/dev/urandom of="$img" bs=1M count=8 seek=40 conv=notrunc status=none
  name=check-$(date +%s)
  on 1 image add /images/check.raw --name "$name" >/dev/null
  echo "testbed: added $name (48 MiB) on node1"
  for n in 2 3; do
    wait_peers "$n" 1
    t0=$(date +%s.%N)
    on "$n" image pull "$name" >/dev/null
    qemu-img compare -q -f raw -F raw "$img" "nbd+unix:///$name?socket=testbed/node$n/nbd.sock" ||
      { echo "testbed: node$n's export of $name differs from the source" >&2; exit 1; }
    t=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')
    peer=$(on "$n" status --json | tr -d ' \n' | grep -o '"read_bytes":{[^}]*}' | grep -o '"peer":[0-9]*' | cut -d: -f2)
    origin=$(counter "$n" origin_bytes)
    echo "testbed: node$n read $name identical in ${t}s: ${peer:-0} bytes from peers, ${origin:-0} from an origin"
    [ "${peer:-0}" -gt 0 ] && [ "${origin:-0}" -eq 0 ] ||
      { echo "testbed: node$n should have read from peers only" >&2; exit 1; }
  done
  echo "testbed: check passed"
  ;;
down)
  docker-compose down
  ;;
*)
  echo "usage: $0 up|check|down" >&2; exit 2
  ;;
esac
