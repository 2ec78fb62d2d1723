#!/usr/bin/env bash
# Install or upgrade Workernator on this host, as root. Run it again to upgrade: the result is
# the same every time, and existing configs are never overwritten.
#
#   deploy/install.sh [--prefix /opt/workernator] [--wheels DIR] [--root DIR] [--code-only]
#
# 1. A virtualenv at PREFIX made from the system Python (3.11+), with the newest workernator
#    wheel of DIR and its dependencies, installed offline from DIR only (pip --no-index):
#    `make wheels` (or `make install`) fills dist/ with all of them.
# 2. The units of deploy/systemd/ into /etc/systemd/system/ (their /opt/workernator paths
#    changed to PREFIX), deploy/sysusers.d/ and deploy/tmpfiles.d/ into /etc/.
# 3. The users (systemd-sysusers, or useradd when it is missing or fails) and the directories
#    (systemd-tmpfiles --create, or by itself likewise).
# 4. /etc/workernator/runner.toml and api.toml from deploy/config/, only where none exists.
# 5. systemctl daemon-reload when systemd is PID 1. Nothing is enabled, started or restarted.
#
# --code-only does step 1 alone (the demo and the tests use it). --root DIR installs into the
# tree under DIR instead of / and writes nothing outside it (for tests: the venv is made at
# DIR/PREFIX, so its scripts name that path); users go to DIR/etc/passwd.
set -euo pipefail
umask 022  # everything here is read by the api's unprivileged user or the job user

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PREFIX=/opt/workernator
WHEELS=
ROOT=
CODE_ONLY=
PYTHON=${PYTHON:-/usr/bin/python3}
# The systemd tools, by name; a test points them at `false` to take the fallbacks.
SYSUSERS=${WORKERNATOR_SYSUSERS-systemd-sysusers}
TMPFILES=${WORKERNATOR_TMPFILES-systemd-tmpfiles}
UNIT_PREFIX=/opt/workernator  # the code's path as the shipped units name it

say() { echo "install: $*"; }
die() {
    echo "install: error: $*" >&2
    exit 1
}
usage() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
}

while (($#)); do
    case $1 in
    --prefix) PREFIX=${2:?--prefix needs a directory}; shift 2 ;;
    --wheels) WHEELS=${2:?--wheels needs a directory}; shift 2 ;;
    --root) ROOT=${2:?--root needs a directory}; shift 2 ;;
    --code-only) CODE_ONLY=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
    esac
done

[[ $PREFIX == /* && $PREFIX != / ]] || die "--prefix must be an absolute path other than /, not '$PREFIX'"
PREFIX=${PREFIX%/}
if [[ -n $ROOT ]]; then
    [[ $ROOT == /* && -d $ROOT && $ROOT != / ]] || die "--root must be an existing directory (absolute path), not '$ROOT'"
    ROOT=${ROOT%/}
fi
[[ $(id -u) -eq 0 || -n $CODE_ONLY ]] || die "run me as root (it creates users and writes /etc)"
if [[ -z $WHEELS && -d $HERE/../dist ]]; then
    WHEELS=$HERE/../dist
fi
[[ -n $WHEELS ]] || die "no wheels: give --wheels DIR (make wheels builds them into dist/)"
[[ -d $WHEELS ]] || die "--wheels: no directory '$WHEELS'"
WHEELS=$(cd "$WHEELS" && pwd)

# The newest workernator wheel in WHEELS (by version, not by name).
WHEEL=$(find "$WHEELS" -maxdepth 1 -name 'workernator-*-py3-none-any.whl' -printf '%f\n' |
    sort -V | tail -n 1)
[[ -n $WHEEL ]] || die "no workernator-*.whl in $WHEELS (make wheels builds it)"
WHEEL=$WHEELS/$WHEEL

# --- 1. the code -------------------------------------------------------------------------------
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null ||
    die "$PYTHON is missing or older than 3.11 (apt-get install --no-install-recommends python3 python3-venv)"
"$PYTHON" -c 'import ensurepip, venv' 2>/dev/null ||
    die "$PYTHON cannot make a virtualenv (apt-get install --no-install-recommends python3-venv)"

VENV=$ROOT$PREFIX
MADE_VENV=
# A failure before the code is in place leaves no half-made virtualenv of this run behind.
remove_new_venv() {
    local status=$?
    if [[ $status -ne 0 && -n $MADE_VENV ]]; then
        rm -rf "$VENV"
        echo "install: error: nothing installed; removed the new $VENV" >&2
    fi
    exit "$status"
}
trap remove_new_venv EXIT
version_of() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null; }
if [[ ! -f $VENV/pyvenv.cfg ]]; then
    if [[ -e $VENV && -n $(ls -A "$VENV") ]]; then
        die "$VENV exists and is not a virtualenv; remove it or choose another --prefix"
    fi
    say "making a virtualenv at $VENV ($PYTHON $(version_of "$PYTHON"))"
    [[ -e $VENV ]] || MADE_VENV=1
    "$PYTHON" -m venv "$VENV"
elif [[ $(version_of "$VENV/bin/python") != "$(version_of "$PYTHON")" ]]; then
    # The system Python moved on (a release upgrade): the old venv cannot run any more.
    say "remaking the virtualenv at $VENV for $PYTHON $(version_of "$PYTHON")"
    "$PYTHON" -m venv --clear "$VENV"
fi
# The wheel's digest, kept in the venv: the same version rebuilt from a changed checkout is new
# code too, and the very same wheel needs no pip at all.
STAMP=$VENV/.workernator-wheel
DIGEST="$(sha256sum <"$WHEEL" | cut -d' ' -f1) $(basename "$WHEEL")"
if [[ -f $STAMP && $(<"$STAMP") == "$DIGEST" ]]; then
    say "$(basename "$WHEEL") is already installed in $VENV"
else
    say "installing $(basename "$WHEEL") into $VENV (offline, from $WHEELS)"
    rm -f "$STAMP"
    PIP=("$VENV/bin/python" -m pip -q --disable-pip-version-check --no-input)
    "${PIP[@]}" install --no-index --find-links "$WHEELS" --no-warn-script-location "$WHEEL"
    if [[ -z $MADE_VENV ]]; then  # the same version may already be there, from other code
        "${PIP[@]}" install --no-index --no-deps --force-reinstall --no-warn-script-location "$WHEEL"
    fi
    echo "$DIGEST" >"$STAMP"
fi
for command in workernator workernator-api workernator-runner; do
    "$VENV/bin/$command" --help >/dev/null || die "$VENV/bin/$command does not run"
done
MADE_VENV=  # the code is in place: from here on, a failure keeps it
if [[ -n $CODE_ONLY ]]; then
    say "done: $VENV/bin/workernator-runner, workernator-api, workernator"
    exit 0
fi

# What the runner needs from the system, said once (apt-get install --no-install-recommends ...).
if [[ -z $ROOT ]]; then
    export PATH=$PATH:/usr/sbin:/sbin
    ldconfig -p 2>/dev/null | grep 'libseccomp\.so\.2 ' >/dev/null ||
        say "warning: libseccomp2 is missing: the runner cannot filter jobs' system calls and will not start"
    command -v nft >/dev/null || say "warning: nft (nftables) is missing: wait jobs will be refused"
fi

# --- 2. units, sysusers.d, tmpfiles.d --------------------------------------------------------
copy_dir() { # copy_dir SRC_DIR GLOB DEST_DIR: the shipped files, 0644, paths fixed for PREFIX
    local src=$1 glob=$2 dest=$ROOT$3 file
    install -d -m 0755 "$dest"
    for file in "$HERE/$src"/$glob; do
        [[ -f $file ]] || continue
        sed -E "s#$UNIT_PREFIX(/|\$|[[:space:]\"'])#$PREFIX\1#g" "$file" >"$dest/.$(basename "$file").tmp"
        chmod 0644 "$dest/.$(basename "$file").tmp"
        mv -f "$dest/.$(basename "$file").tmp" "$dest/$(basename "$file")"
        say "installed $dest/$(basename "$file")"
    done
}
shopt -s nullglob
UNITS=("$HERE"/systemd/*.service)
SYSUSERS_FILES=("$HERE"/sysusers.d/*.conf)
TMPFILES_FILES=("$HERE"/tmpfiles.d/*.conf)
shopt -u nullglob
((${#UNITS[@]})) || say "warning: no units in $HERE/systemd/ to install"
copy_dir systemd '*.service' /etc/systemd/system
copy_dir sysusers.d '*.conf' /etc/sysusers.d
copy_dir tmpfiles.d '*.conf' /etc/tmpfiles.d

# --- 3. users and directories ----------------------------------------------------------------
# Shadow's tools write into --root's tree with --prefix (no chroot); names resolve there too.
SHADOW_ROOT=()
[[ -n $ROOT ]] && SHADOW_ROOT=(--prefix "$ROOT")
entry() { # entry passwd|group NAME: the line for NAME, in ROOT's files or through NSS
    if [[ -n $ROOT ]]; then
        awk -F: -v n="$2" '$1 == n { print; found = 1; exit } END { exit !found }' "$ROOT/etc/$1"
    else
        getent "$1" "$2"
    fi
}
id_of() { # id_of passwd|group NAME: its uid or gid; root and - are 0
    [[ $2 == - || $2 == root ]] && { echo 0; return; }
    local line
    line=$(entry "$1" "$2") || die "no $([[ $1 == passwd ]] && echo user || echo group) named '$2'"
    cut -d: -f3 <<<"$line"
}
fields() { # fields LINE: its words, quotes honoured (as sysusers.d and tmpfiles.d write them)
    xargs printf '%s\n' <<<"$1"
}

# The users of the sysusers.d files, one by one, with shadow's tools (u, g and m lines).
add_users_with_shadow() {
    local file line f
    for file in "${SYSUSERS_FILES[@]}"; do
        while IFS= read -r line; do
            [[ $line =~ ^[[:space:]]*(#|$) ]] && continue
            mapfile -t f < <(fields "$line")
            local type=${f[0]} name=${f[1]} id=${f[2]:--} gecos=${f[3]:--} home=${f[4]:--} shell=${f[5]:--}
            case $type in
            g)
                entry group "$name" >/dev/null && continue
                local opts=(--system)
                [[ $id =~ ^[0-9]+$ ]] && opts+=(--gid "$id")
                groupadd "${SHADOW_ROOT[@]}" "${opts[@]}" "$name"
                say "created group $name"
                ;;
            u)
                entry passwd "$name" >/dev/null && continue
                local opts=(--system --no-create-home)
                [[ $gecos != - ]] && opts+=(--comment "$gecos")
                opts+=(--home-dir "$([[ $home == - ]] && echo / || echo "$home")")
                opts+=(--shell "$([[ $shell == - ]] && echo /usr/sbin/nologin || echo "$shell")")
                [[ $id =~ ^[0-9]+$ ]] && opts+=(--uid "$id")
                if entry group "$name" >/dev/null; then opts+=(--gid "$name"); else opts+=(--user-group); fi
                useradd "${SHADOW_ROOT[@]}" "${opts[@]}" "$name"
                say "created user $name"
                ;;
            m)
                usermod "${SHADOW_ROOT[@]}" --append --groups "$id" "$name"
                ;;
            *) say "warning: $file: cannot apply '$type' lines without systemd-sysusers: $line" ;;
            esac
        done <"$file"
    done
}

# The d, D and z lines of the tmpfiles.d files: directories with their modes and owners.
make_dirs_by_hand() {
    local file line f
    for file in "${TMPFILES_FILES[@]}"; do
        while IFS= read -r line; do
            [[ $line =~ ^[[:space:]]*(#|$) ]] && continue
            mapfile -t f < <(fields "$line")
            local type=${f[0]} path=$ROOT${f[1]} mode=${f[2]:--} user=${f[3]:--} group=${f[4]:--}
            case $type in
            d | D | z)
                [[ $type == z ]] || mkdir -p "$path"
                [[ -e $path ]] || continue
                [[ $mode == - ]] || chmod "${mode#\~}" "$path"
                chown "$(id_of passwd "$user"):$(id_of group "$group")" "$path"
                ;;
            *) say "warning: $file: cannot apply '$type' lines without systemd-tmpfiles: $line" ;;
            esac
        done <"$file"
    done
}

installed_files() { # installed_files DIR FILES...: their paths once installed under DIR
    local dir=$1 file
    shift
    for file in "$@"; do echo "$dir/$(basename "$file")"; done
}

if ((${#SYSUSERS_FILES[@]})); then
    mapfile -t files < <(installed_files "$ROOT/etc/sysusers.d" "${SYSUSERS_FILES[@]}")
    if [[ -n $SYSUSERS ]] && command -v "$SYSUSERS" >/dev/null &&
        "$SYSUSERS" ${ROOT:+--root="$ROOT"} "${files[@]}"; then
        say "users in place ($SYSUSERS)"
    else
        say "no working systemd-sysusers here: creating the users with useradd"
        add_users_with_shadow
    fi
fi
if ((${#TMPFILES_FILES[@]})); then
    mapfile -t files < <(installed_files "$ROOT/etc/tmpfiles.d" "${TMPFILES_FILES[@]}")
    if [[ -n $TMPFILES ]] && command -v "$TMPFILES" >/dev/null &&
        "$TMPFILES" ${ROOT:+--root="$ROOT"} --create "${files[@]}"; then
        say "directories in place ($TMPFILES)"
    else
        say "no working systemd-tmpfiles here: making the directories by hand"
        make_dirs_by_hand
    fi
fi

# --- 4. example configs, never over an existing one ------------------------------------------
install -d -m 0755 "$ROOT/etc/workernator"
API_GROUP=workernator-api
for config in runner.toml:root api.toml:$API_GROUP; do
    name=${config%%:*}
    group=${config#*:}
    target=$ROOT/etc/workernator/$name
    if [[ -e $target ]]; then
        say "kept $target (configs are never overwritten; the example is $HERE/config/$name)"
        continue
    fi
    install -m 0640 -o 0 -g "$(id_of group "$group")" "$HERE/config/$name" "$target"
    say "wrote $target (from $HERE/config/$name)"
done

# --- 5. tell systemd -------------------------------------------------------------------------
if [[ -z $ROOT && -d /run/systemd/system ]]; then
    systemctl daemon-reload
    say "systemd reloaded its units"
    for unit in workernator-runner workernator-api; do
        if systemctl is-active --quiet "$unit"; then
            say "$unit is running the old code: systemctl restart $unit (running jobs go on)"
        fi
    done
else
    say "systemd is not running here${ROOT:+ (or this is --root $ROOT)}: no daemon-reload"
fi
say "done. Next: certificates and configs (docs/operations.md), then"
say "  systemctl enable --now workernator-runner workernator-api"
