#!/usr/bin/env bash
# The local team tracking server: Debian's PostgreSQL (run as an unprivileged user, loopback only) behind
# `mlflow server --app-name basic-auth --serve-artifacts`. Usage: scripts/server.sh start|stop|status
#
# Everything lives in $SERVER_DIR (default server/ in the repository, gitignored):
#   pg/              PostgreSQL's data folder, owned by $PG_OS_USER (databases `mlflow`, `mlflow_auth` and `optuna`,
#                    the last for the studies of `search` workers on several machines)
#   pgpass           the database password, in libpq's PGPASSFILE format (mode 600): never on a command line
#   basic_auth.ini   MLflow's auth config (MLFLOW_AUTH_CONFIG_PATH): users live in database `mlflow_auth`
#   admin-password   the generated admin password (mode 600), when MLFLOW_ADMIN_PASSWORD was not given
#   flask-secret-key the UI's CSRF key (mode 600), generated once
#   artifacts/       the artifact store the server proxies (--serve-artifacts)
#   logs/            postgres.log, mlflow.log
#   server.env       the ports in use, so `stop` and `status` find the server without the environment
# Settings (environment): PG_PORT (5433), MLFLOW_PORT (5000), MLFLOW_WORKERS (2), MLFLOW_ADMIN_PASSWORD,
# SERVER_DIR, PG_BIN (newest /usr/lib/postgresql/*/bin), PG_OS_USER (textclf-pg, created when run as root),
# MLFLOW_BIN (.venv/bin/mlflow), MLFLOW_SERVER_ENABLE_JOB_EXECUTION (false: MLflow's GenAI job runner, about
# 1 GB of worker processes that textclf never uses), MLFLOW_AUTH_CACHE_TTL (60 s: see basic_auth.ini below).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SERVER_DIR=$(mkdir -p "${SERVER_DIR:-$REPO/server}" && cd "${SERVER_DIR:-$REPO/server}" && pwd)
MLFLOW_BIN=${MLFLOW_BIN:-$REPO/.venv/bin/mlflow}
MLFLOW_WORKERS=${MLFLOW_WORKERS:-2}
PG_OS_USER=${PG_OS_USER:-textclf-pg}
DB_USER=textclf
HOST=127.0.0.1
PGDATA="$SERVER_DIR/pg"
export PGPASSFILE="$SERVER_DIR/pgpass"
MLFLOW_PID="$SERVER_DIR/mlflow.pid"
STATE="$SERVER_DIR/server.env"

die() { echo "server: $*" >&2; exit 1; }

find_pg_bin() {
  if [[ -n "${PG_BIN:-}" ]]; then echo "$PG_BIN"; return; fi
  local found
  found=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  echo "${found:-/usr/lib/postgresql/15/bin}"
}
PG_BIN=$(find_pg_bin)

# PostgreSQL refuses to run as root: as root, its commands run as $PG_OS_USER; otherwise as the caller.
as_pg() {
  if [[ $EUID -eq 0 ]]; then runuser -u "$PG_OS_USER" -- "$@"; else "$@"; fi
}

port_in_use() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

pg_running() { [[ -f "$PGDATA/postmaster.pid" ]] && as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1; }

mlflow_running() { [[ -f "$MLFLOW_PID" ]] && grep -qs mlflow "/proc/$(cat "$MLFLOW_PID")/cmdline"; }

# A part that runs keeps its port (recorded in server.env); a part to start takes the environment's.
RUNNING_PG_PORT='' RUNNING_MLFLOW_PORT=''
# shellcheck disable=SC1090
[[ -f "$STATE" ]] && source "$STATE"
if pg_running && [[ -n "$RUNNING_PG_PORT" ]]; then PG_PORT=$RUNNING_PG_PORT; else PG_PORT=${PG_PORT:-5433}; fi
if mlflow_running && [[ -n "$RUNNING_MLFLOW_PORT" ]]; then MLFLOW_PORT=$RUNNING_MLFLOW_PORT; else MLFLOW_PORT=${MLFLOW_PORT:-5000}; fi
record_ports() { printf 'RUNNING_PG_PORT=%s\nRUNNING_MLFLOW_PORT=%s\n' "$PG_PORT" "$MLFLOW_PORT" > "$STATE"; }

random_password() { head -c 24 /dev/urandom | base64 | tr '+/' '-_'; }  # 32 characters

ensure_pg_user() {
  [[ $EUID -eq 0 ]] || return 0
  if ! id -u "$PG_OS_USER" >/dev/null 2>&1; then
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$PG_OS_USER" \
      || die "cannot create the system user $PG_OS_USER that runs PostgreSQL (set PG_OS_USER to an existing one)"
  fi
  as_pg test -x "$SERVER_DIR" \
    || die "user $PG_OS_USER cannot reach $SERVER_DIR: make its parent folders traversable (chmod o+x) or set SERVER_DIR"
}

init_pg() {
  [[ -f "$PGDATA/PG_VERSION" ]] && return 0
  rm -f "$SERVER_DIR/.admin-created"  # a new cluster has no users yet
  local password pwfile
  password=$(random_password)
  umask 077
  printf '%s:*:*:%s:%s\n' "$HOST" "$DB_USER" "$password" > "$PGPASSFILE"
  mkdir -p "$PGDATA"
  pwfile="$SERVER_DIR/.initdb-password"
  printf '%s\n' "$password" > "$pwfile"
  if [[ $EUID -eq 0 ]]; then chown "$PG_OS_USER" "$PGDATA" "$pwfile"; fi
  chmod 700 "$PGDATA"
  if ! as_pg "$PG_BIN/initdb" -D "$PGDATA" -U "$DB_USER" --pwfile="$pwfile" --auth=scram-sha-256 \
      --encoding=UTF8 --locale=C.UTF-8 >"$SERVER_DIR/logs/initdb.log" 2>&1; then
    rm -rf "$PGDATA" "$pwfile"
    die "initdb failed: see $SERVER_DIR/logs/initdb.log"
  fi
  rm -f "$pwfile"
  # TCP on loopback only, no Unix socket (its default folder belongs to Debian's own cluster).
  printf "listen_addresses = '%s'\nunix_socket_directories = ''\n" "$HOST" >> "$PGDATA/postgresql.conf"
  umask 022
}

start_pg() {
  if pg_running; then return 0; fi
  init_pg
  touch "$SERVER_DIR/logs/postgres.log"
  if [[ $EUID -eq 0 ]]; then chown "$PG_OS_USER" "$SERVER_DIR/logs/postgres.log"; fi
  as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -l "$SERVER_DIR/logs/postgres.log" -o "-p $PG_PORT" -w -t 60 start >/dev/null \
    || die "PostgreSQL did not start: see $SERVER_DIR/logs/postgres.log"
  local db
  for db in mlflow mlflow_auth optuna; do
    if [[ -z $("$PG_BIN/psql" -h "$HOST" -p "$PG_PORT" -U "$DB_USER" -d postgres -tAc \
               "SELECT 1 FROM pg_database WHERE datname = '$db'") ]]; then
      "$PG_BIN/createdb" -h "$HOST" -p "$PG_PORT" -U "$DB_USER" "$db"
    fi
  done
}

admin_password() {
  if [[ -n "${MLFLOW_ADMIN_PASSWORD:-}" ]]; then
    (( ${#MLFLOW_ADMIN_PASSWORD} >= 12 )) || die "MLFLOW_ADMIN_PASSWORD must have at least 12 characters (MLflow's rule)"
    echo "$MLFLOW_ADMIN_PASSWORD"
  elif [[ -f "$SERVER_DIR/admin-password" ]]; then
    cat "$SERVER_DIR/admin-password"
  elif [[ -f "$SERVER_DIR/.admin-created" ]]; then
    return 0  # the admin exists (made with a password given at the time): MLflow needs none now
  else
    (umask 077; random_password > "$SERVER_DIR/admin-password")
    echo "server: generated the password of user admin (kept in $SERVER_DIR/admin-password, mode 600):" \
         "$(cat "$SERVER_DIR/admin-password")" >&2
    cat "$SERVER_DIR/admin-password"
  fi
}

# A secret generated once and kept in $SERVER_DIR/$1 (mode 600).
kept_secret() {
  [[ -f "$SERVER_DIR/$1" ]] || (umask 077; random_password > "$SERVER_DIR/$1")
  cat "$SERVER_DIR/$1"
}

write_auth_config() {
  # No password in this file: the database's comes from PGPASSFILE, the admin's from the environment.
  (umask 077; cat > "$SERVER_DIR/basic_auth.ini" <<EOF
[mlflow]
default_permission = READ
database_uri = postgresql+psycopg://$DB_USER@$HOST:$PG_PORT/mlflow_auth
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
# Checking a password (PBKDF2) costs about 0.5 s of CPU: on every request that made each metric batch take
# 0.5 s. Cached for a minute per worker (a changed password reaches the other worker within that minute).
auth_cache_ttl_seconds = ${MLFLOW_AUTH_CACHE_TTL:-60}
EOF
  )
}

start_mlflow() {
  if mlflow_running; then return 0; fi
  local password secret_key
  password=$(admin_password)
  secret_key=$(kept_secret flask-secret-key)  # CSRF tokens of the UI's login forms; stable across restarts
  write_auth_config
  mkdir -p "$SERVER_DIR/artifacts"
  # setsid: the server and its workers form one process group, stopped together.
  local -a settings=(MLFLOW_AUTH_CONFIG_PATH="$SERVER_DIR/basic_auth.ini" MLFLOW_FLASK_SERVER_SECRET_KEY="$secret_key")
  [[ -n "$password" ]] && settings+=(MLFLOW_AUTH_ADMIN_PASSWORD="$password")
  env "${settings[@]}" \
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}" \
    setsid "$MLFLOW_BIN" server --app-name basic-auth \
      --backend-store-uri "postgresql+psycopg://$DB_USER@$HOST:$PG_PORT/mlflow" \
      --serve-artifacts --artifacts-destination "$SERVER_DIR/artifacts" \
      --host "$HOST" --port "$MLFLOW_PORT" --workers "$MLFLOW_WORKERS" \
      >>"$SERVER_DIR/logs/mlflow.log" 2>&1 </dev/null &
  echo $! > "$MLFLOW_PID"
  local deadline=$((SECONDS + ${MLFLOW_START_TIMEOUT:-120}))
  until "$(dirname "$MLFLOW_BIN")/python" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
      "http://$HOST:$MLFLOW_PORT/health" 2>/dev/null; do
    if ! mlflow_running; then
      tail -n 5 "$SERVER_DIR/logs/mlflow.log" >&2
      rm -f "$MLFLOW_PID"
      die "mlflow server exited: see $SERVER_DIR/logs/mlflow.log"
    fi
    (( SECONDS < deadline )) || die "mlflow server not answering after ${MLFLOW_START_TIMEOUT:-120} s: see $SERVER_DIR/logs/mlflow.log"
    sleep 0.5
  done
  touch "$SERVER_DIR/.admin-created"  # MLflow created the admin user (or it existed) before answering
}

start() {
  if pg_running && mlflow_running; then
    echo "server: already running at http://$HOST:$MLFLOW_PORT (PostgreSQL on $HOST:$PG_PORT, files in $SERVER_DIR)"
    return 0
  fi
  [[ -x "$PG_BIN/initdb" && -x "$PG_BIN/pg_ctl" ]] \
    || die "PostgreSQL not found in $PG_BIN: install it (apt-get install -y postgresql) or set PG_BIN"
  [[ -x "$MLFLOW_BIN" ]] || die "$MLFLOW_BIN not found: run make install (or set MLFLOW_BIN)"
  # Both ports are checked before anything starts: no half-started server to clean up.
  if ! pg_running && port_in_use "$PG_PORT"; then
    die "port $PG_PORT (PostgreSQL) is taken by another process: set PG_PORT to a free port"
  fi
  if ! mlflow_running && port_in_use "$MLFLOW_PORT"; then
    die "port $MLFLOW_PORT (MLflow) is taken by another process: set MLFLOW_PORT to a free port"
  fi
  mkdir -p "$SERVER_DIR/logs"
  ensure_pg_user
  start_pg
  record_ports
  start_mlflow
  record_ports
  echo "server: running at http://$HOST:$MLFLOW_PORT (PostgreSQL on $HOST:$PG_PORT, files in $SERVER_DIR)"
}

stop() {
  local stopped=0
  if mlflow_running; then
    local pid waited=0
    pid=$(cat "$MLFLOW_PID")
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
    while kill -0 "$pid" 2>/dev/null && (( waited < 40 )); do sleep 0.5; waited=$((waited + 1)); done
    kill -KILL -- "-$pid" 2>/dev/null || true
    stopped=1
  fi
  rm -f "$MLFLOW_PID"
  if pg_running; then
    as_pg "$PG_BIN/pg_ctl" -D "$PGDATA" -m fast -w -t 60 stop >/dev/null
    stopped=1
  fi
  rm -f "$STATE"
  if (( stopped )); then echo "server: stopped"; else echo "server: not running"; fi
}

status() {
  local code=0
  if pg_running; then echo "postgresql: running on $HOST:$PG_PORT ($PGDATA)"; else echo "postgresql: stopped"; code=3; fi
  if mlflow_running; then echo "mlflow: running at http://$HOST:$MLFLOW_PORT (pid $(cat "$MLFLOW_PID"))"
  else echo "mlflow: stopped"; code=3; fi
  return $code
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
