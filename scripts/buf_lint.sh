#!/usr/bin/env bash
# Lint proto/ with buf (rules in buf.yaml). Installs buf from npm into .buf/ (git-ignored) when
# it is missing. Extra arguments go to `buf lint`. make buf-lint.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

BUF_VERSION=${BUF_VERSION:-1.75.0}
BUF=.buf/node_modules/.bin/buf

if [[ ! -x "$BUF" ]]; then
    if ! command -v npm >/dev/null; then
        echo "buf_lint: npm is needed to install buf (apt-get install npm)" >&2
        exit 2
    fi
    echo "buf_lint: installing @bufbuild/buf@$BUF_VERSION into .buf/" >&2
    npm install --prefix .buf --no-audit --no-fund --loglevel=error "@bufbuild/buf@$BUF_VERSION" >&2
fi

"$BUF" lint "$@"
echo "buf_lint: clean ($("$BUF" --version))"
