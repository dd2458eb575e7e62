#!/usr/bin/env bash
# Builds app.js into plugins/{{name}}.wasm with componentize-js (pinned in package.json and
# package-lock.json, installed by `npm ci` into node_modules here). Needs node and npm
# (Debian: apt-get install nodejs npm). COMPONENTIZE_JS=/path/to/componentize-js uses an
# installed one instead.
set -euo pipefail
cd "$(dirname "$0")"
tool="${COMPONENTIZE_JS:-}"
if [ -z "$tool" ]; then
    [ -x node_modules/.bin/componentize-js ] || npm ci --no-audit --no-fund --loglevel=error
    tool=node_modules/.bin/componentize-js
fi
mkdir -p plugins
# http and fetch-event would import wasi:http, which gorch-host does not link.
"$tool" --wit wit --world-name worker --disable http fetch-event --out plugins/{{name}}.wasm app.js
