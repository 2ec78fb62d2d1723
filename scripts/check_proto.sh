#!/usr/bin/env bash
# Fail if workernator_api/_proto/ is not exactly what scripts/gen_proto.sh makes from proto/
# (make proto-check; run in CI). Regenerates into a temporary directory and diffs.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

COMMITTED=workernator_api/_proto

work=$(mktemp -d "${TMPDIR:-/tmp}/check_proto.XXXXXX")
trap 'rm -rf "$work"' EXIT

bash scripts/gen_proto.sh "$work/_proto" >/dev/null

if [[ ! -d "$COMMITTED" ]]; then
    echo "generated code is stale: $COMMITTED is missing; run make proto" >&2
    exit 1
fi
if ! diff -r -u --exclude=__pycache__ "$work/_proto" "$COMMITTED" >"$work/diff"; then
    head -n 60 "$work/diff" >&2
    echo >&2
    echo "generated code is stale: run make proto" >&2
    exit 1
fi
echo "check_proto: $COMMITTED is up to date"
