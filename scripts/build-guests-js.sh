#!/usr/bin/env bash
# Builds the JavaScript guest (examples/guests-js) into target/guests-js/echo-js.wasm with
# componentize-js; the tools are pinned in examples/guests-js/package.json and
# package-lock.json and installed with `npm ci` into examples/guests-js/node_modules
# (gitignored). Needs node and npm (Debian: `apt-get install nodejs npm`). Skips the compile
# when the component is newer than every source. Usage: scripts/build-guests-js.sh [--force]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
src="$root/examples/guests-js"
out="$root/target/guests-js"
wasm="$out/echo-js.wasm"

for tool in node npm; do
    command -v "$tool" > /dev/null || {
        echo "error: $tool not found; install it (Debian: apt-get install nodejs npm)" >&2
        exit 1
    }
done
mkdir -p "$out"
# Install (again) when the lock file changed since the last install.
stamp="$src/node_modules/.package-lock.stamp"
if ! cmp -s "$src/package-lock.json" "$stamp"; then
    (cd "$src" && npm ci --no-audit --no-fund --loglevel=error)
    cp "$src/package-lock.json" "$stamp"
fi

newer="$(find "$src" "$root/wit" -path "$src/node_modules" -prune -o -newer "$wasm" \( -name '*.js' -o -name '*.wit' -o -name 'package*.json' \) -print 2> /dev/null | head -n 1 || true)"
if [ "${1:-}" != "--force" ] && [ -f "$wasm" ] && [ -z "$newer" ]; then
    echo "$wasm is up to date"
    exit 0
fi
echo "componentize-js: examples/guests-js/app.js -> $wasm"
# http and fetch-event would import wasi:http, which the host does not link.
(cd "$src" && ./node_modules/.bin/componentize-js --wit "$root/wit" --world-name worker \
    --disable http fetch-event --out "$wasm.tmp" app.js)
mv "$wasm.tmp" "$wasm"
ls -l "$wasm"
