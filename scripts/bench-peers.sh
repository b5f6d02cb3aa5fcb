#!/usr/bin/env bash
# Cluster-wide origin coalescing: N hoard daemons on loopback cold-read the same
# lazy image at once from a bandwidth-capped HTTP origin, with and without peers.
#
#   scripts/bench-peers.sh [WORKDIR]    (default /var/tmp/hoard-bench-peers)
#
# For each N in NS: N daemons register the image lazily (with peers: one adds
# it, the others `hoard image pull` it through the cluster; without: each adds
# it from the origin), the origin's byte counter is reset, and all N read the
# whole export at once (nbdcopy ... null:). Prints the wall time until the last
# reader finished and the bytes the origin served, also as a multiple of the
# image's non-zero bytes (1.0 = every needed byte fetched once).
#
# Env: SIZE_MIB (image size, default 64), ORIGIN_MIBPS (origin bandwidth cap
# shared by all connections, default 32), NS (default "1 2 4 8").
set -euo pipefail
work=${1:-/var/tmp/hoard-bench-peers}
mkdir -p "$work"
work=$(readlink -f "$work")
cd "$(dirname "$0")/.."
for t in nbdcopy python3; do
  command -v "$t" >/dev/null || { echo "bench-peers: $t missing: apt-get install libnbd-bin python3" >&2; exit 1; }
done
CGO_ENABLED=0 go build -o "$work/hoard" ./cmd/hoard
hoard="$work/hoard"
size_mib=${SIZE_MIB:-64}
rate=${ORIGIN_MIBPS:-32}
ns=${NS:-"1 2 4 8"}

# The image: random 1 MiB blocks, every fourth one zero.
img="$work/img.raw"
python3 - "$img" "$size_mib" <<'EOF'
import os, sys
path, mib = sys.argv[1], int(sys.argv[2])
with open(path, "wb") as f:
    for i in range(mib):
        f.write(bytes(1 << 20) if i % 4 == 3 else os.urandom(1 << 20))
EOF
nonzero=0 # the bytes of the manifest's non-zero chunks: what a reader needs

# The origin: HTTP with Range, one token bucket for all connections, and
# /stats (bytes served) and /reset.
cat >"$work/origin.py" <<'EOF'
import http.server, os, sys, threading, time
path, rate, portfile = sys.argv[1], float(sys.argv[2]) * (1 << 20), sys.argv[3]
data = open(path, "rb").read()
lock = threading.Lock()
state = {"sent": 0, "t": time.monotonic(), "tokens": 0.0}
def take(n):
    while True:
        with lock:
            now = time.monotonic()
            state["tokens"] = min(rate / 10, state["tokens"] + (now - state["t"]) * rate)
            state["t"] = now
            if state["tokens"] >= n:
                state["tokens"] -= n; state["sent"] += n
                return
            wait = (n - state["tokens"]) / rate
        time.sleep(wait)
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def do_HEAD(self): self.serve(False)
    def do_GET(self):
        if self.path == "/stats":
            b = str(state["sent"]).encode()
        elif self.path == "/reset":
            with lock: state["sent"] = 0
            b = b"0"
        else:
            return self.serve(True)
        self.send_response(200); self.send_header("Content-Length", str(len(b))); self.end_headers(); self.wfile.write(b)
    def serve(self, body):
        start, end, code = 0, len(data) - 1, 200
        rg = self.headers.get("Range")
        if rg and rg.startswith("bytes="):
            a, _, b = rg[6:].partition("-")
            start, end, code = int(a), min(int(b) if b else len(data) - 1, len(data) - 1), 206
        self.send_response(code)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start + 1))
        if code == 206:
            self.send_header("Content-Range", "bytes %d-%d/%d" % (start, end, len(data)))
        self.end_headers()
        if not body: return
        off = start
        while off <= end:
            n = min(64 << 10, end + 1 - off)
            take(n)
            self.wfile.write(data[off:off + n]); off += n
srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
open(portfile, "w").write(str(srv.server_address[1]))
srv.serve_forever()
EOF
rm -f "$work/origin.port"
python3 "$work/origin.py" "$img" "$rate" "$work/origin.port" &
origin_pid=$!
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -INT "$p" 2>/dev/null || true; done
  wait "${pids[@]}" 2>/dev/null || true
  kill "$origin_pid" 2>/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 100); do [ -s "$work/origin.port" ] && break; sleep 0.1; done
origin="http://127.0.0.1:$(cat "$work/origin.port")"
get() { python3 -c "import urllib.request,sys; print(urllib.request.urlopen(sys.argv[1]).read().decode())" "$1"; }

start_daemon() { # DIR [ARGS...]
  local d=$1; shift
  rm -f "$d/api.addr"
  "$hoard" --data-dir "$d" daemon --api-listen 127.0.0.1:0 --nbd-socket "$d/nbd.sock" "$@" >"$d/daemon.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 200); do [ -s "$d/api.addr" ] && return; sleep 0.05; done
  echo "bench-peers: daemon on $d did not start:" >&2; cat "$d/daemon.log" >&2; exit 1
}

add_image() { # DIR
  "$hoard" --data-dir "$1" image add "$origin/img.raw" --name img --lazy >/dev/null 2>"$1/add.err" || { cat "$1/add.err" >&2; exit 1; }
  nonzero=$("$hoard" --data-dir "$1" image inspect img --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["non_zero_bytes"])')
}

run_case() { # MODE N
  local mode=$1 n=$2 dirs=() i
  for i in $(seq "$n"); do
    dirs+=("$work/$mode-$n-$i"); rm -rf "$work/$mode-$n-$i"; mkdir -p "$work/$mode-$n-$i"
  done
  if [ "$mode" = peers ]; then
    "$hoard" --data-dir "${dirs[0]}" cluster keygen >/dev/null
    for d in "${dirs[@]:1}"; do cp "${dirs[0]}/swarm.key" "$d/"; done
    start_daemon "${dirs[0]}" --p2p-listen /ip4/127.0.0.1/tcp/0
    boot=$("$hoard" --data-dir "${dirs[0]}" status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["cluster"]["addrs"][0])')
    for d in "${dirs[@]:1}"; do start_daemon "$d" --p2p-listen /ip4/127.0.0.1/tcp/0 --p2p-bootstrap "$boot"; done
    add_image "${dirs[0]}"
    for d in "${dirs[@]:1}"; do
      for _ in $(seq 60); do "$hoard" --data-dir "$d" image pull img >/dev/null 2>&1 && break; sleep 0.5; done
      "$hoard" --data-dir "$d" image inspect img >/dev/null
    done
  else
    for d in "${dirs[@]}"; do
      start_daemon "$d"
      add_image "$d"
    done
  fi
  get "$origin/reset" >/dev/null
  local t0 t1 rpids=()
  t0=$(date +%s.%N)
  for d in "${dirs[@]}"; do nbdcopy "nbd+unix:///img?socket=$d/nbd.sock" null: & rpids+=($!); done
  for p in "${rpids[@]}"; do wait "$p"; done
  t1=$(date +%s.%N)
  local sent; sent=$(get "$origin/stats")
  python3 -c "import sys; m,n,t,s,nz=sys.argv[1],int(sys.argv[2]),float(sys.argv[3]),int(sys.argv[4]),int(sys.argv[5]); print(f'{m:<9}{n:>3}{t:>10.2f}{s/2**20:>13.1f}{s/nz:>10.2f}')" \
    "$mode" "$n" "$(echo "$t1 - $t0" | bc)" "$sent" "$nonzero"
  for p in "${pids[@]}"; do kill -INT "$p" 2>/dev/null || true; done
  wait "${pids[@]}" 2>/dev/null || true
  pids=()
}

echo "image: $size_mib MiB (every fourth MiB zero); origin capped at $rate MiB/s; x_needed = origin bytes / non-zero chunk bytes"
printf '%-9s%3s%10s%13s%10s\n' mode N seconds origin_MiB x_needed
for n in $ns; do
  run_case standalone "$n"
  run_case peers "$n"
done
