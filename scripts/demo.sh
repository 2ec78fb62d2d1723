#!/usr/bin/env bash
# A tour of Workernator on this machine (`make demo`, as root, once the .venv exists).
#
# 1. Creates .demo/ in the checkout: certificates (`workernator certs init`), configs, logs, and
#    the runner's state.
# 2. Creates the unprivileged system user workernator-demo if it does not exist (it stays).
# 3. Starts workernator-runner as root and workernator-api as workernator-demo on 127.0.0.1,
#    plus a tiny HTTP server (also as workernator-demo) for the wait job to POST to.
# 4. Runs the CLI as alice (role user) through every job type, status, tail, stop, list, types,
#    then two errors (a bad argument; carol, a viewer, starting a job); each command is printed
#    first, like `# workernator jobs start fib 3`.
# 5. On exit, even after an error: stops the jobs still running, kills only the processes it
#    started, and removes .demo/ (keep it with WORKERNATOR_DEMO_KEEP=1).
#
# The api runs unprivileged, so workernator-demo must be able to read the code and the venv. When
# only the venv's interpreter is out of its reach (a pyenv under /root), the api runs on the
# system Python of the same version with the venv's packages; when the checkout itself is out of
# reach (a clone under /root, mode 0700), the script explains and stops: it never opens up a
# home directory.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
PY=$VENV/bin/python
DEMO=$ROOT/.demo
DEMO_USER=workernator-demo

die() { echo "demo: $*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "run me as root (the runner needs root): sudo make demo"
[[ -x $PY ]] || die "no virtualenv at $VENV; run 'make venv' first"
command -v setpriv >/dev/null || die "setpriv (util-linux) is needed to start the api unprivileged"

# --- the unprivileged user -------------------------------------------------------------------
if ! id -u "$DEMO_USER" >/dev/null 2>&1; then
    echo "demo: creating system user $DEMO_USER"
    useradd --system --user-group --no-create-home --home-dir / \
        --shell /usr/sbin/nologin "$DEMO_USER"
fi
DEMO_GROUP=$(id -gn "$DEMO_USER")

# Run a command as the demo user, from /, in a clean environment (plus the NAME=VALUE words of
# API_ENV), replacing the current (sub)shell: the command's PID is the subshell's.
API_ENV=()
exec_as_demo_user() {
    cd /
    exec setpriv --reuid="$DEMO_USER" --regid="$DEMO_GROUP" --init-groups --inh-caps=-all -- \
        env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/ LANG="${LANG:-C.UTF-8}" \
        "${API_ENV[@]}" "$@"
}
can_run_api() { (exec_as_demo_user "$1" -c 'import workernator_api.server') >/dev/null 2>&1; }

# Which Python can the api's user run? The venv's, normally. When the venv's interpreter lives
# where that user cannot go (a pyenv under /root, say) but the checkout itself is readable, the
# system Python of the same version runs the venv's packages: nothing is opened up for it.
API_PY=$PY
if ! can_run_api "$API_PY"; then
    VERSION=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    API_PY=
    for candidate in "/usr/bin/python$VERSION" "/usr/local/bin/python$VERSION"; do
        [[ -x $candidate ]] || continue
        API_ENV=("PYTHONPATH=$ROOT:$VENV/lib/python$VERSION/site-packages")
        if can_run_api "$candidate"; then
            API_PY=$candidate
            echo "demo: $DEMO_USER cannot run $PY; the api runs on $API_PY with the venv's packages"
            break
        fi
        API_ENV=()
    done
fi
if [[ -z $API_PY ]]; then
    cat >&2 <<EOF
demo: user $DEMO_USER cannot run $PY or read the code in $ROOT.
      The api runs unprivileged (that is the point), so the checkout, its .venv and the
      Python the venv was made from must be readable by other users, and every directory
      above them searchable. Here they are not (a checkout or a pyenv under /root, mode 0700,
      is the usual cause). Clone Workernator somewhere like /opt or /srv and make its venv
      with the system python3; this script will not open up your home directory.
EOF
    exit 1
fi

# --- cleanup ---------------------------------------------------------------------------------
PIDS=()
RUNNER_PID=
API_PID=
API_READY=
CLI=()

# Run the CLI as one of the users of the demo (by their certificate).
as_user() {
    local user=$1
    shift
    WORKERNATOR_CERT=$DEMO/certs/$user.pem WORKERNATOR_KEY=$DEMO/certs/$user-key.pem \
        "${CLI[@]}" "$@"
}
admin() { as_user admin "$@"; }

cleanup() {
    local status=$?
    set +e
    trap - EXIT INT TERM
    if [[ -n $API_READY ]] && kill -0 "$API_PID" 2>/dev/null; then
        # Stop whatever still runs (after an error midway), as admin.
        local ids
        ids=$(admin jobs list --state running --output json 2>/dev/null |
            "$PY" -c 'import json, sys; print(" ".join(j["id"] for j in json.load(sys.stdin)["jobs"]))' \
                2>/dev/null)
        for id in $ids; do admin jobs stop "$id" >/dev/null 2>&1; done
    fi
    # Newest first: the http server and the api, then the runner.
    local pid
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        pid=${PIDS[i]}
        kill -TERM "$pid" 2>/dev/null || continue
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    if [[ $status -ne 0 ]]; then
        for log in "$DEMO/runner.log" "$DEMO/api.log"; do
            [[ -s $log ]] && { echo "--- last lines of $log:"; tail -n 20 "$log"; } >&2
        done
    fi
    if [[ ${WORKERNATOR_DEMO_KEEP:-} == 1 ]]; then
        echo "demo: kept $DEMO" >&2
    else
        rm -rf "$DEMO" "${RUN_DIR_TMP:-}"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- files -----------------------------------------------------------------------------------
if [[ -e $DEMO ]]; then
    echo "demo: removing $DEMO left by an earlier run"
    rm -rf "$DEMO"
fi
mkdir -m 0755 "$DEMO"
mkdir -m 0700 "$DEMO/state"

# A Unix socket path must fit in 108 bytes; a deep checkout gets its run directory in /tmp.
RUN_DIR=$DEMO/run
if (( ${#RUN_DIR} > 80 )); then
    RUN_DIR_TMP=$(mktemp -d /tmp/workernator-demo.XXXXXX)
    RUN_DIR=$RUN_DIR_TMP
else
    mkdir "$RUN_DIR"
fi
chmod 0755 "$RUN_DIR"
SOCKET=$RUN_DIR/runner.sock

if [[ -x $VENV/bin/workernator ]]; then
    CLI=("$VENV/bin/workernator")
else
    CLI=("$PY" -m workernator_api.cli)
fi

echo "demo: certificates for the api (localhost, 127.0.0.1), alice (user), carol (viewer), admin"
"${CLI[@]}" certs init "$DEMO/certs" --server-name localhost --server-name 127.0.0.1 \
    --user alice:user --user carol:viewer --user admin:admin >/dev/null
# The api reads its own key and the CA; it can traverse the directory but not list it, and
# every other key stays root's (0600).
chmod 0711 "$DEMO/certs"
chown "$DEMO_USER" "$DEMO/certs/server-key.pem"

PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

cat >"$DEMO/runner.toml" <<EOF
[runner]
socket = "$SOCKET"
socket_group = "$DEMO_GROUP"
allowed_users = ["$DEMO_USER"]
state_dir = "$DEMO/state"
stop_grace_seconds = 2.0
EOF
cat >"$DEMO/api.toml" <<EOF
[api]
listen = "127.0.0.1:$PORT"
cert = "$DEMO/certs/server.pem"
key = "$DEMO/certs/server-key.pem"
client_ca = "$DEMO/certs/ca.pem"
runner_socket = "$SOCKET"
log_level = "info"
EOF
chmod 0644 "$DEMO/runner.toml" "$DEMO/api.toml"

# --- processes -------------------------------------------------------------------------------
echo "demo: starting workernator-runner (root), socket $SOCKET"
(cd / && exec "$PY" -m workernator_runner.daemon --config "$DEMO/runner.toml") \
    >"$DEMO/runner.log" 2>&1 &
RUNNER_PID=$!
PIDS+=("$RUNNER_PID")
for _ in $(seq 200); do
    [[ -S $SOCKET ]] && break
    kill -0 "$RUNNER_PID" 2>/dev/null || die "the runner exited (see above)"
    sleep 0.05
done
[[ -S $SOCKET ]] || die "the runner did not create $SOCKET"

echo "demo: starting workernator-api as $DEMO_USER on 127.0.0.1:$PORT"
touch "$DEMO/api.log" && chown "$DEMO_USER" "$DEMO/api.log"
(exec_as_demo_user "$API_PY" -m workernator_api.server --config "$DEMO/api.toml") \
    >>"$DEMO/api.log" 2>&1 &
API_PID=$!
PIDS+=("$API_PID")
port_open() { "$PY" -c "import socket, sys; s = socket.socket(); sys.exit(s.connect_ex(('127.0.0.1', $1)))"; }
for _ in $(seq 300); do
    port_open "$PORT" && break
    kill -0 "$API_PID" 2>/dev/null || die "the api exited (see above)"
    sleep 0.1
done
port_open "$PORT" || die "the api does not listen on 127.0.0.1:$PORT"
export WORKERNATOR_HOST=127.0.0.1:$PORT
export WORKERNATOR_CA=$DEMO/certs/ca.pem
export WORKERNATOR_CONFIG=/dev/null  # nothing from ~/.config
API_READY=1

# A tiny HTTP server for the wait job: answers every POST with 200, prints its port first.
echo "demo: starting a tiny HTTP server on 127.0.0.1 for the wait job"
(API_ENV=() && exec_as_demo_user python3 -c '
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.send_response(200); self.send_header("Content-Length", "0"); self.end_headers()
    def log_message(self, *args): pass
s = http.server.HTTPServer(("127.0.0.1", 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()') >"$DEMO/http.port" 2>/dev/null &
PIDS+=("$!")
for _ in $(seq 100); do [[ -s $DEMO/http.port ]] && break; sleep 0.05; done
HTTP_PORT=$(head -n 1 "$DEMO/http.port")
[[ -n $HTTP_PORT ]] || die "the HTTP server did not start"

# --- the tour --------------------------------------------------------------------------------
# Print the command as typed, then run it as alice (or as $AS).
show() {
    local quoted=() arg
    for arg in "$@"; do
        if [[ $arg =~ ^[A-Za-z0-9_./:=@%+-]+$ ]]; then quoted+=("$arg"); else quoted+=("'$arg'"); fi
    done
    echo
    echo "# workernator ${quoted[*]}"
    as_user "${AS:-alice}" "$@"
}

# Start a job like `show`, and put its ID in $JOB.
show_start() {
    local out
    out=$(show "$@")
    echo "$out"
    JOB=$(sed -n 's/^Started .* job, ID: \([A-Z0-9]*\)$/\1/p' <<<"$out")
    [[ -n $JOB ]] || die "no job ID in the output above"
}

echo
echo "=== As alice (role user) ==="
show_start jobs start fib 3
show jobs tail "$JOB"
show jobs status "$JOB"

show_start jobs start eval '2x * 3y' --var x=2 --var y=1.5
show jobs tail "$JOB"

show_start jobs start wait 2 "http://127.0.0.1:$HTTP_PORT/hook"
show jobs tail "$JOB"

show_start jobs start wait 30 "http://127.0.0.1:$HTTP_PORT/never"
WAIT_JOB=$JOB
show jobs stop "$WAIT_JOB"
show jobs status "$WAIT_JOB"

show_start jobs start noop
show jobs list
show jobs types

echo
echo "=== Errors are one line on stderr, with a non-zero exit status ==="
show jobs start fib 0 || echo "(exit status $?)"
echo
echo "=== As carol (role viewer): reads every job, starts none ==="
AS=carol show jobs start noop || echo "(exit status $?)"
AS=carol show jobs status "$WAIT_JOB"

echo
echo "demo: done; stopping everything"
