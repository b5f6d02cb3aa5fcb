#!/usr/bin/env bash
# The docker-compose testbed: three hoard nodes in containers built FROM scratch
# (no registry needed), one swarm key, bootstrap through compose DNS.
#   scripts/testbed.sh up      build the static binary and image, start the nodes, list node2's peers
#   scripts/testbed.sh down    stop and remove them
set -euo pipefail
cd "$(dirname "$0")/.."
command -v docker-compose >/dev/null || { echo "testbed: docker-compose missing: apt-get install docker-compose" >&2; exit 1; }
case "${1:-}" in
up)
  CGO_ENABLED=0 go build -trimpath -o bin/hoard ./cmd/hoard
  mkdir -p testbed
  [ -s testbed/swarm.key ] || bin/hoard cluster keygen testbed/swarm.key
  docker-compose build
  docker-compose up -d
  for i in $(seq 30); do
    if HOARD_API=127.0.0.1:7482 bin/hoard peers 2>/dev/null | grep -q yes; then break; fi
    sleep 1
  done
  HOARD_API=127.0.0.1:7482 bin/hoard peers
  echo "testbed up: APIs on 127.0.0.1:7481-7483 (HOARD_API=127.0.0.1:7481 bin/hoard status)"
  ;;
down)
  docker-compose down
  ;;
*)
  echo "usage: $0 up|down" >&2; exit 2
  ;;
esac
