#!/usr/bin/env bash
# Lint proto/ with buf (rules in buf.yaml). buf is the dev dependency buf-bin, a wheel in the
# .venv (no npm). Extra arguments go to `buf lint`. make buf-lint.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

BUF=${BUF:-.venv/bin/buf}
if [[ ! -x "$BUF" ]]; then
    echo "buf_lint: $BUF is missing; run 'make venv' (buf-bin is a dev dependency)" >&2
    exit 2
fi

"$BUF" lint "$@"
echo "buf_lint: clean ($("$BUF" --version))"
