#!/usr/bin/env bash
# start-glance.sh DIR PORT — run a throwaway Glance API (Image API v2) without keystone.
#
# Writes DIR/glance-api.conf (sqlite database and file store under DIR), creates the schema
# with glance-manage db_sync, then execs glance-api in the foreground (so the caller's PID is
# glance-api's). Requests need the headers "X-Roles: admin" and "X-Tenant-Id: <any>" because
# there is no keystone; leave images private (visibility public is refused by policy).
# Needs Debian's glance-api package (scripts/install-test-deps.sh installs it).
#
# With HOARD_GLANCE_ENFORCE=1 Glance enforces projects the way a keystone-fronted Glance does:
# a pipeline with Glance's "context" middleware (no authtoken) trusts the identity headers
# keystonemiddleware would set from a validated token (X-Identity-Status: Confirmed,
# X-Project-Id, X-User-Id, X-Roles): a private image is then visible to its project (and
# admin) only, and a request without identity gets 401.
set -euo pipefail

if [ $# -ne 2 ]; then
  echo "usage: $0 DIR PORT" >&2
  exit 2
fi
command -v glance-api >/dev/null 2>&1 || { echo "start-glance: glance-api not found; run scripts/install-test-deps.sh" >&2; exit 1; }
command -v glance-manage >/dev/null 2>&1 || { echo "start-glance: glance-manage not found; run scripts/install-test-deps.sh" >&2; exit 1; }

mkdir -p "$1"
dir=$(cd "$1" && pwd)
port=$2
conf="$dir/glance-api.conf"
flavor=
paste=/etc/glance/glance-api-paste.ini
if [ "${HOARD_GLANCE_ENFORCE:-}" = 1 ]; then
  paste="$dir/glance-api-paste.ini"
  cp /etc/glance/glance-api-paste.ini "$paste"
  cat >>"$paste" <<'PASTE'

[pipeline:glance-api-enforce]
pipeline = cors healthcheck http_proxy_to_wsgi versionnegotiation osprofiler context rootapp
PASTE
  flavor=enforce
fi
mkdir -p "$dir/images" "$dir/tasks" "$dir/staging" "$dir/lock"

cat >"$conf" <<CONF
[DEFAULT]
bind_host = 127.0.0.1
bind_port = $port
enabled_backends = fs:file
workers = 1
use_stderr = true
log_file =
log_dir =
lock_path = $dir/lock

[database]
connection = sqlite:///$dir/glance.sqlite

[paste_deploy]
flavor = $flavor
config_file = $paste

[glance_store]
default_backend = fs

[fs]
filesystem_store_datadir = $dir/images/

# Glance's reserved stores (task and staging areas) default to /var/lib/glance; keep them in DIR.
[os_glance_tasks_store]
filesystem_store_datadir = $dir/tasks/

[os_glance_staging_store]
filesystem_store_datadir = $dir/staging/

[oslo_concurrency]
lock_path = $dir/lock
CONF

glance-manage --config-file "$conf" db_sync >"$dir/db_sync.log" 2>&1 || {
  echo "start-glance: glance-manage db_sync failed; log tail:" >&2
  tail -n 30 "$dir/db_sync.log" >&2
  exit 1
}
exec glance-api --config-file "$conf"
