#!/usr/bin/env bash
# Regenerate the Python code for the public API (proto/) into workernator_api/_proto/.
#
#   scripts/gen_proto.sh              # replace workernator_api/_proto/ (make proto)
#   scripts/gen_proto.sh OUTPUT_DIR   # write to OUTPUT_DIR, which must not exist yet (used by
#                                     # scripts/check_proto.sh)
#
# Uses the protoc bundled with grpcio-tools (pinned in pyproject.toml), so the output depends
# only on the .proto files and that version: the same input always gives the same bytes.
#
# Imports: protoc names modules after the proto package, so cross-file imports come out as
# `from workernator.v1 import workernator_pb2` (today only workernator_pb2_grpc.py has one).
# The generated package lives at workernator_api._proto.workernator.v1 instead, so one sed below
# rewrites every line starting `from workernator.` / `from workernator import` to
# `from workernator_api._proto.workernator...`. We do not move the .proto under
# workernator_api/_proto/ for this: that would change the file name registered in the
# descriptor pool (and seen through server reflection) from workernator/v1/workernator.proto.
# The only other change is a `# mypy: ignore-errors` first line in the .pyi and *_pb2_grpc.py
# files (see below).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-.venv/bin/python}
DEFAULT_OUT=workernator_api/_proto
OUT=${1:-$DEFAULT_OUT}
OUT=${OUT%/}

if [[ "$OUT" != "$DEFAULT_OUT" && -e "$OUT" ]]; then
    echo "gen_proto: $OUT already exists; give a path that does not exist yet" >&2
    exit 2
fi
if [[ ! -x "$PYTHON" ]] && ! command -v "$PYTHON" >/dev/null; then
    echo "gen_proto: $PYTHON not found (create the venv, or set PYTHON)" >&2
    exit 2
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/gen_proto.XXXXXX")
trap 'rm -rf "$work"' EXIT
gen="$work/_proto"
mkdir "$gen"

include=$("$PYTHON" -c 'import os, grpc_tools; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))')

# Every .proto under proto/, by path relative to it, in a fixed order.
mapfile -t protos < <(cd proto && find . -name '*.proto' -type f | sed 's|^\./||' | LC_ALL=C sort)
if [[ ${#protos[@]} -eq 0 ]]; then
    echo "gen_proto: no .proto files under proto/" >&2
    exit 2
fi

"$PYTHON" -m grpc_tools.protoc \
    -Iproto -I"$include" \
    --python_out="$gen" --pyi_out="$gen" --grpc_python_out="$gen" \
    "${protos[@]}"

# Absolute imports of our own proto packages -> the package the code lives in (see the top).
find "$gen" -type f \( -name '*.py' -o -name '*.pyi' \) -print0 | LC_ALL=C sort -z |
    xargs -0 sed -i -E 's/^from workernator(\.| import )/from workernator_api._proto.workernator\1/'

# mypy: protoc's .pyi stubs use bare generics (`_Mapping`) that `mypy --strict` reports, and the
# *_pb2_grpc.py modules are untyped. pyproject's mypy `exclude` only skips files it would
# discover, not modules that typed code imports, so mark those files to have their own errors
# ignored (their types are still used). Nothing else is changed.
while IFS= read -r -d '' file; do
    sed -i '1i # mypy: ignore-errors' "$file"
done < <(find "$gen" -type f \( -name '*.pyi' -o -name '*_pb2_grpc.py' \) -print0 | LC_ALL=C sort -z)

# Make every directory a package.
while IFS= read -r -d '' dir; do
    if [[ "$dir" == "$gen" ]]; then
        printf '"""Generated from proto/ by scripts/gen_proto.sh (make proto). DO NOT EDIT."""\n' \
            >"$dir/__init__.py"
    else
        : >"$dir/__init__.py"
    fi
done < <(find "$gen" -type d -print0)

chmod -R u=rwX,go=rX "$gen"

if [[ "$OUT" == "$DEFAULT_OUT" ]]; then
    rm -rf "$OUT"
fi
mkdir -p "$(dirname "$OUT")"
mv "$gen" "$OUT"
echo "gen_proto: wrote $OUT (${protos[*]})"
