#!/usr/bin/env bash
# tour.sh [README.md]
#
# Runs README.md's five-minute tour exactly as written: the ```sh blocks between
# <!-- tour --> and <!-- /tour -->, in order, in a fresh copy of the repository's tracked
# files (so on a fresh data dir), with `set -e`: any failing command fails the tour. A block
# right after <!-- tour:background --> is the "terminal of its own" step: it runs in the
# background, its output in terminal1.log. Everything the tour started is stopped at the
# end, and the whole run is bounded (TOUR_TIMEOUT seconds, default 900).
#
# make test runs it, so the README cannot rot. Needs what the tour needs: root, Go, and the
# tools of scripts/install-test-deps.sh. Env: TOUR_KEEP=1 keeps the work dir.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
readme=${1:-$here/README.md}
timeout_s=${TOUR_TIMEOUT:-900}
work=$(mktemp -d "${TMPDIR:-/tmp}/hoard-tour.XXXXXX")

# The tour, as a script: blocks in order; the background block wrapped.
python3 - "$readme" > "$work/tour-steps.sh" <<'EOF'
import re, sys
text = open(sys.argv[1]).read()
m = re.search(r"<!-- tour -->(.*?)<!-- /tour -->", text, re.S)
if not m:
    sys.exit("tour.sh: no <!-- tour --> ... <!-- /tour --> section in " + sys.argv[1])
body = m.group(1)
out, background, n = [], False, 0
for part in re.split(r"(<!-- tour:background -->|```sh\n.*?```)", body, flags=re.S):
    if part == "<!-- tour:background -->":
        background = True
    elif part.startswith("```sh\n"):
        code = part[len("```sh\n"):-3]
        n += 1
        if background:
            out.append("# block %d (its own terminal)\n( set -x\n%s) > terminal1.log 2>&1 &\n" % (n, code))
            background = False
        else:
            out.append("# block %d\n%s" % (n, code))
if n == 0:
    sys.exit("tour.sh: the tour section has no ```sh blocks")
print("set -euxo pipefail")
print("\n".join(out))
EOF

mkdir -p "$work/hoard"
(cd "$here" && git ls-files -z | xargs -0 cp --parents -t "$work/hoard")
cp "$work/tour-steps.sh" "$work/hoard/.tour-steps.sh"
echo "tour: running $(grep -c '^# block' "$work/tour-steps.sh") blocks of $readme in $work/hoard" >&2

cleanup() {
  rc=$?
  # Stop everything the tour started (its own process group), daemons first.
  if [ -n "${pgid:-}" ]; then
    kill -TERM -- "-$pgid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 -- "-$pgid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL -- "-$pgid" 2>/dev/null || true
  fi
  if [ $rc -ne 0 ]; then
    for f in "$work"/hoard/terminal1.log; do
      [ -f "$f" ] && { echo "---- $f (last 40 lines)" >&2; tail -40 "$f" >&2; }
    done
  fi
  if [ "${TOUR_KEEP:-}" = 1 ]; then echo "tour: kept $work" >&2; else rm -rf "$work"; fi
  exit $rc
}
trap cleanup EXIT

cd "$work/hoard"
# A process group of its own, so that cleanup reaches the daemons it starts.
setsid timeout --kill-after=10 "$timeout_s" bash .tour-steps.sh &
pgid=$!
if wait $pgid; then
  echo "tour: README tour passed" >&2
else
  rc=$?
  echo "tour: README tour FAILED (exit $rc; 124 = timed out after ${timeout_s}s)" >&2
  exit $rc
fi
