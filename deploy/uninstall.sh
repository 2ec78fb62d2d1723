#!/usr/bin/env bash
# Remove what deploy/install.sh put in place, as root:
#
#   deploy/uninstall.sh [--prefix /opt/workernator] [--root DIR] [--purge]
#
# Stops and disables both units (when systemd runs), removes them, the sysusers.d and
# tmpfiles.d files and the virtualenv at PREFIX. Configs, certificates (/etc/workernator), the
# jobs and their output (/var/lib/workernator) and the users stay, for a later install.
# --purge removes those too. Stopping the runner does not end running jobs (they outlive a
# runner restart): stop them first (`workernator jobs list --state running`, `jobs stop`);
# --purge refuses while any job process or mount is left under /var/lib/workernator.
set -euo pipefail

PREFIX=/opt/workernator
ROOT=
PURGE=
UNITS=(workernator-api.service workernator-runner.service)
USERS=(workernator-api workernator-job)
STATE=/var/lib/workernator
CONFIG=/etc/workernator

say() { echo "uninstall: $*"; }
die() {
    echo "uninstall: error: $*" >&2
    exit 1
}

while (($#)); do
    case $1 in
    --prefix) PREFIX=${2:?--prefix needs a directory}; shift 2 ;;
    --root) ROOT=${2:?--root needs a directory}; shift 2 ;;
    --purge) PURGE=1; shift ;;
    -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
    esac
done
[[ $PREFIX == /* && $PREFIX != / ]] || die "--prefix must be an absolute path other than /, not '$PREFIX'"
PREFIX=${PREFIX%/}
if [[ -n $ROOT ]]; then
    [[ $ROOT == /* && -d $ROOT && $ROOT != / ]] || die "--root must be an existing directory (absolute path), not '$ROOT'"
    ROOT=${ROOT%/}
fi
[[ $(id -u) -eq 0 ]] || die "run me as root"

SYSTEMD=
[[ -z $ROOT && -d /run/systemd/system ]] && SYSTEMD=1
if [[ -n $SYSTEMD ]]; then
    for unit in "${UNITS[@]}"; do
        if systemctl cat "$unit" >/dev/null 2>&1; then
            systemctl disable --now "$unit" >/dev/null 2>&1 || true
            say "stopped and disabled $unit"
        fi
    done
fi

for file in "${UNITS[@]/#//etc/systemd/system/}" /etc/sysusers.d/workernator.conf \
    /etc/tmpfiles.d/workernator.conf; do
    if [[ -e $ROOT$file ]]; then
        rm -f "$ROOT$file"
        say "removed $ROOT$file"
    fi
done
[[ -n $SYSTEMD ]] && systemctl daemon-reload

VENV=$ROOT$PREFIX
if [[ -e $VENV ]]; then
    # Only a virtualenv with Workernator in it: never an arbitrary directory named by mistake.
    [[ -f $VENV/pyvenv.cfg && -e $VENV/bin/workernator-runner ]] ||
        die "$VENV is not a Workernator virtualenv; not removing it"
    rm -rf "$VENV"
    say "removed $VENV"
fi

if [[ -z $PURGE ]]; then
    say "kept $ROOT$CONFIG, $ROOT$STATE and the users ${USERS[*]} (--purge removes them)"
    exit 0
fi

# --- --purge -----------------------------------------------------------------------------------
if [[ -z $ROOT ]]; then
    if grep -q " $STATE/" /proc/self/mountinfo; then
        die "something is still mounted under $STATE (a job or the runner is running): stop them first"
    fi
    for user in "${USERS[@]}"; do
        if id -u "$user" >/dev/null 2>&1 && pgrep -u "$user" >/dev/null; then
            die "processes of $user are still running (jobs or the api): stop them first"
        fi
    done
fi
for dir in "$CONFIG" "$STATE"; do
    if [[ -e $ROOT$dir ]]; then
        rm -rf "$ROOT$dir"
        say "removed $ROOT$dir"
    fi
done
SHADOW_ROOT=()
[[ -n $ROOT ]] && SHADOW_ROOT=(--prefix "$ROOT")
for user in "${USERS[@]}"; do
    if grep -q "^$user:" "$ROOT/etc/passwd"; then
        userdel "${SHADOW_ROOT[@]}" "$user"
        say "removed user $user"
    fi
    if grep -q "^$user:" "$ROOT/etc/group"; then
        groupdel "${SHADOW_ROOT[@]}" "$user"
        say "removed group $user"
    fi
done
