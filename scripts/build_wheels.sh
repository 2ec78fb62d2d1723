#!/usr/bin/env bash
# Build this checkout's wheel and the wheels of all its dependencies into DIR (`make wheels`:
# dist/), what deploy/install.sh installs from, offline. The checkout's .venv runs pip (network
# for the dependencies, or pip's cache). The source is built from a copy: nothing is written
# into the checkout, and no stale build/ can slip old files into the wheel.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${1:?usage: build_wheels.sh DIR}
PY=${PYTHON:-$ROOT/.venv/bin/python}

SRC=$(mktemp -d)
trap 'rm -rf "$SRC"' EXIT
tar -C "$ROOT" --exclude=__pycache__ -cf - pyproject.toml shared workernator_api workernator_runner |
    tar -C "$SRC" -xf -
mkdir -p "$OUT"
rm -f "$OUT"/workernator-*.whl  # one version of ours: install.sh takes the newest anyway
"$PY" -m pip wheel -q --disable-pip-version-check --wheel-dir "$OUT" "$SRC"
echo "build_wheels: $(cd "$OUT" && ls workernator-*.whl) and its dependencies in $OUT"
