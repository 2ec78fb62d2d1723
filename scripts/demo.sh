#!/usr/bin/env bash
# A tour of Workernator on this machine (`make demo`, as root, once the .venv exists).
#
# 1. Makes a directory of its own, /var/tmp/workernator-demo.XXXXXX (0755), and installs the
#    project there the way a host gets it: scripts/build_wheels.sh, then
#    `deploy/install.sh --code-only` (a virtualenv of the system Python). So it works from any
#    checkout, a clone under /root (0700) or in a `mktemp -d` directory included: the api's user
#    reads the installed copy, never the checkout. Certificates (`workernator certs init`: a
#    server CA and a client CA, their keys in certs/ca/, which the api cannot enter), configs,
#    logs and the runner's state go there too.
# 2. Creates the unprivileged system users workernator-demo (for the api) and workernator-job
#    (the runner's job_user) if they do not exist (they stay).
# 3. Starts workernator-runner as root, with an egress bridge of its own (wndemo, on a free /24
#    of 10.93.0.0/16), and workernator-api as workernator-demo on 127.0.0.1, both from the
#    installed copy.
# 4. Makes a test host for the wait job to POST to: a network namespace (wndemo-host) whose veth
#    is attached to the bridge, with the subnet's last address, running a tiny HTTP server as
#    workernator-demo on port 8080. Jobs cannot reach the host itself (127.0.0.1 included), but
#    they reach a host on their bridge.
# 5. Runs the CLI as alice (role user) through every job type, status, tail, stop, list, types,
#    then two errors (a bad argument; carol, a viewer, starting a job); each command is printed
#    first, like `# workernator jobs start fib 3`.
# 6. On exit, even after an error or Ctrl-C: stops the jobs still running, kills only the
#    processes it started, deletes the test host, and once the runner has stopped, the bridge
#    and its nftables table (inet workernator_wndemo); restores net.ipv4.ip_forward if the
#    runner changed it; removes its directory, the installed copy included (keep it with
#    WORKERNATOR_DEMO_KEEP=1).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD_PY=${VENV:-$ROOT/.venv}/bin/python  # builds the wheels; runs nothing of the demo
DEMO_USER=workernator-demo
JOB_USER=workernator-job
BRIDGE=wndemo           # the runner's egress_bridge; its nftables table is inet workernator_wndemo
TABLE=workernator_$BRIDGE
NETNS=wndemo-host       # the test host's network namespace
HOST_LINK=wndemoh       # its veth's end on the bridge (not wndemo-*: the runner owns those names)
HTTP_PORT=8080          # the test host's HTTP server
IP_FORWARD=/proc/sys/net/ipv4/ip_forward

die() { echo "demo: $*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "run me as root (the runner needs root): sudo make demo"
[[ -x $BUILD_PY ]] || die "no virtualenv at ${BUILD_PY%/bin/python}; run 'make venv' first"
command -v setpriv >/dev/null || die "setpriv (util-linux) is needed to start the api unprivileged"
command -v ip >/dev/null || die "ip (iproute2) is needed; 'make demo' installs it"
command -v nft >/dev/null || die "nft (nftables) is needed; 'make demo' installs it"

# --- the unprivileged user -------------------------------------------------------------------
if ! id -u "$DEMO_USER" >/dev/null 2>&1; then
    echo "demo: creating system user $DEMO_USER"
    useradd --system --user-group --no-create-home --home-dir / \
        --shell /usr/sbin/nologin "$DEMO_USER"
fi
DEMO_GROUP=$(id -gn "$DEMO_USER")
if ! id -u "$JOB_USER" >/dev/null 2>&1; then
    echo "demo: creating system user $JOB_USER"
    useradd --system --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin "$JOB_USER"
fi

# Run a command as the demo user, from /, in a clean environment, replacing the current
# (sub)shell: the command's PID is the subshell's. AS_PREFIX is run first, as root
# (`ip netns exec NAME`, which also execs).
AS_PREFIX=()
exec_as_demo_user() {
    cd /
    exec "${AS_PREFIX[@]}" \
        setpriv --reuid="$DEMO_USER" --regid="$DEMO_GROUP" --init-groups --inh-caps=-all -- \
        env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/ LANG="${LANG:-C.UTF-8}" "$@"
}

# --- cleanup ---------------------------------------------------------------------------------
DEMO=
PIDS=()
RUNNER_PID=
API_PID=
API_READY=
CLI=()
RUNNER_STARTED=
NETNS_MADE=
IP_FORWARD_BEFORE=

# Run the CLI as one of the users of the demo (by their certificate).
as_user() {
    local user=$1
    shift
    WORKERNATOR_CERT=$DEMO/certs/$user.pem WORKERNATOR_KEY=$DEMO/certs/$user-key.pem \
        "${CLI[@]}" "$@"
}
admin() { as_user admin "$@"; }

link_exists() { ip link show dev "$1" >/dev/null 2>&1; }
netns_exists() { grep -q "^$1\( \|\$\)" <<<"$(ip netns list)"; }

# The test host, the bridge and the nftables table (left by a run that was killed, or this one's).
remove_network() {
    if netns_exists "$NETNS"; then ip netns del "$NETNS"; fi
    if link_exists "$HOST_LINK"; then ip link del "$HOST_LINK"; fi
    if link_exists "$BRIDGE"; then ip link del "$BRIDGE"; fi
    if nft list table inet "$TABLE" >/dev/null 2>&1; then nft delete table inet "$TABLE"; fi
}

cleanup() {
    local status=$?
    set +e
    trap - EXIT
    trap '' INT TERM  # the cleanup is bounded; a second Ctrl-C would leave things behind
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
    # The runner has stopped (or never started): its network goes, and the test host with it.
    if [[ -n $RUNNER_STARTED || -n $NETNS_MADE ]]; then
        remove_network
    fi
    if [[ -n $IP_FORWARD_BEFORE && $(<"$IP_FORWARD") != "$IP_FORWARD_BEFORE" ]]; then
        echo "$IP_FORWARD_BEFORE" >"$IP_FORWARD"
    fi
    if [[ $status -ne 0 ]]; then
        for log in "$DEMO/runner.log" "$DEMO/api.log"; do
            [[ -s $log ]] && { echo "--- last lines of $log:"; tail -n 20 "$log"; } >&2
        done
    fi
    if [[ -z $DEMO ]]; then
        :
    elif [[ ${WORKERNATOR_DEMO_KEEP:-} == 1 ]]; then
        echo "demo: kept $DEMO" >&2
    else
        rm -rf "$DEMO"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- the demo's directory and the installed copy ---------------------------------------------
DEMO=$(mktemp -d /var/tmp/workernator-demo.XXXXXX)
chmod 0755 "$DEMO"
mkdir -m 0700 "$DEMO/state"
mkdir -m 0755 "$DEMO/run"
echo "demo: installing Workernator into $DEMO/venv (scripts/build_wheels.sh, then deploy/install.sh --code-only)"
PYTHON=$BUILD_PY bash "$ROOT/scripts/build_wheels.sh" "$DEMO/wheels" >/dev/null
bash "$ROOT/deploy/install.sh" --code-only --prefix "$DEMO/venv" --wheels "$DEMO/wheels" >/dev/null
rm -rf "$DEMO/wheels"
PY=$DEMO/venv/bin/python
CLI=("$DEMO/venv/bin/workernator")
if ! (exec_as_demo_user "$PY" -c 'import workernator_api.server') >/dev/null 2>&1; then
    die "$DEMO_USER cannot run the api installed in $DEMO/venv (is /var/tmp closed to other users?)"
fi

if netns_exists "$NETNS" || link_exists "$HOST_LINK" || link_exists "$BRIDGE" ||
    nft list table inet "$TABLE" >/dev/null 2>&1; then
    echo "demo: removing the network ($BRIDGE, $NETNS) left by an earlier run"
    remove_network
fi

# The jobs' subnet: the first /24 of 10.93.0.0/16 that overlaps no route of this host and holds
# none of its name servers. The bridge takes the first address, the test host the last.
SUBNET=$("$PY" - "$(ip -j -4 route show table all)" <<'EOF'
import ipaddress, json, re, sys
used = []
for route in json.loads(sys.argv[1] or "[]"):
    dst = route.get("dst", "")
    if dst and dst != "default":
        try:
            used.append(ipaddress.IPv4Network(dst, strict=False))
        except ValueError:
            pass
try:
    with open("/etc/resolv.conf") as f:
        for m in re.finditer(r"^\s*nameserver\s+([0-9.]+)\s*$", f.read(), re.M):
            used.append(ipaddress.IPv4Network(m.group(1)))
except (OSError, ValueError):
    pass
for third in range(256):
    subnet = ipaddress.IPv4Network(f"10.93.{third}.0/24")
    if not any(subnet.overlaps(net) for net in used):
        print(subnet)
        break
EOF
)
[[ -n $SUBNET ]] || die "no free /24 in 10.93.0.0/16 for the jobs' network"
TEST_HOST=${SUBNET%.0/24}.254

SOCKET=$DEMO/run/runner.sock

echo "demo: certificates for the api (localhost, 127.0.0.1), alice (user), carol (viewer), admin"
"${CLI[@]}" certs init "$DEMO/certs" --server-name localhost --server-name 127.0.0.1 \
    --user alice:user --user carol:viewer --user admin:admin >/dev/null
# The api reads its own key and the client CA's certificate; it can traverse the directory but
# not list it, every other key stays root's (0600), and the CA keys are in ca/ (0700, root's).
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
job_user = "$JOB_USER"
egress_bridge = "$BRIDGE"
egress_subnet = "$SUBNET"
resolv_conf = "/etc/resolv.conf"
EOF
cat >"$DEMO/api.toml" <<EOF
[api]
listen = "127.0.0.1:$PORT"
cert = "$DEMO/certs/server.pem"
key = "$DEMO/certs/server-key.pem"
client_ca = "$DEMO/certs/client-ca.pem"
runner_socket = "$SOCKET"
log_level = "info"
EOF
chmod 0644 "$DEMO/runner.toml" "$DEMO/api.toml"

# --- processes -------------------------------------------------------------------------------
# The runner, the api and the HTTP server run in sessions of their own (setsid, which does not
# fork here: a background subshell of a script leads no process group), so that Ctrl-C reaches
# only this script and the command in the foreground; the cleanup then stops the jobs, then them.
echo "demo: starting workernator-runner (root), socket $SOCKET, jobs' network $SUBNET on $BRIDGE"
IP_FORWARD_BEFORE=$(<"$IP_FORWARD")  # the runner turns forwarding on for the jobs' network
RUNNER_STARTED=1
(cd / && exec setsid "$DEMO/venv/bin/workernator-runner" --config "$DEMO/runner.toml") \
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
(AS_PREFIX=(setsid) &&
    exec_as_demo_user "$DEMO/venv/bin/workernator-api" --config "$DEMO/api.toml") \
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
export WORKERNATOR_CA=$DEMO/certs/server-ca.pem  # the CLI trusts the server CA for the api
export WORKERNATOR_CONFIG=/dev/null  # nothing from ~/.config
API_READY=1

# The test host for the wait job, on the jobs' bridge once the runner has set it up (the
# nftables table comes last).
network_ready() { link_exists "$BRIDGE" && nft list table inet "$TABLE" >/dev/null 2>&1; }
for _ in $(seq 200); do
    network_ready && break
    kill -0 "$RUNNER_PID" 2>/dev/null || die "the runner exited (see above)"
    sleep 0.05
done
network_ready || die "the runner did not set up the jobs' network ($BRIDGE, table inet $TABLE)"
echo "demo: making a test host $TEST_HOST on $BRIDGE (network namespace $NETNS)"
NETNS_MADE=1
ip netns add "$NETNS"
ip -n "$NETNS" link set lo up
ip link add "$HOST_LINK" type veth peer name eth0 netns "$NETNS"
ip link set "$HOST_LINK" master "$BRIDGE" up
ip -n "$NETNS" addr add "$TEST_HOST/${SUBNET#*/}" dev eth0
ip -n "$NETNS" link set eth0 up

# A tiny HTTP server on the test host: answers every POST with 200, prints its port first.
echo "demo: starting a tiny HTTP server on $TEST_HOST:$HTTP_PORT (as $DEMO_USER) for the wait job"
(AS_PREFIX=(setsid ip netns exec "$NETNS") && exec_as_demo_user "$PY" -c '
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.send_response(200); self.send_header("Content-Length", "0"); self.end_headers()
    def log_message(self, *args): pass
s = http.server.HTTPServer(("0.0.0.0", int(sys.argv[1])), H)
print(s.server_address[1], flush=True)
s.serve_forever()' "$HTTP_PORT") >"$DEMO/http.port" 2>/dev/null &
PIDS+=("$!")
for _ in $(seq 100); do [[ -s $DEMO/http.port ]] && break; sleep 0.05; done
[[ $(head -n 1 "$DEMO/http.port") == "$HTTP_PORT" ]] || die "the HTTP server did not start"

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

show_start jobs start wait 2 "http://$TEST_HOST:$HTTP_PORT/hook"
show jobs tail "$JOB"

show_start jobs start wait 30 "http://$TEST_HOST:$HTTP_PORT/never"
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
