#!/usr/bin/env bash
# Builds the Python guest (examples/guests-py) into target/guests-py/echo-py.wasm with
# componentize-py, pinned in examples/guests-py/requirements.txt and installed into a venv
# under target/ (nothing is installed system-wide, nothing is written into the source tree).
# Needs python3 with venv (Debian: `apt-get install python3-venv`). Skips the compile when
# the component is newer than every source. Usage: scripts/build-guests-py.sh [--force]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
src="$root/examples/guests-py"
out="$root/target/guests-py"
venv="$out/venv"
wasm="$out/echo-py.wasm"
python="${PYTHON:-python3}"

command -v "$python" > /dev/null || {
    echo "error: $python not found; install it (Debian: apt-get install python3 python3-venv)" >&2
    exit 1
}
mkdir -p "$out"
if [ ! -x "$venv/bin/pip" ]; then
    "$python" -m venv "$venv" || {
        echo "error: cannot create a venv; install it (Debian: apt-get install python3-venv)" >&2
        exit 1
    }
fi
# Install (again) when requirements.txt changed since the last install.
stamp="$venv/.requirements.txt"
if ! cmp -s "$src/requirements.txt" "$stamp"; then
    "$venv/bin/pip" install -q --disable-pip-version-check -r "$src/requirements.txt"
    cp "$src/requirements.txt" "$stamp"
fi

newer="$(find "$src" "$root/wit" "$stamp" -newer "$wasm" \( -name '*.py' -o -name '*.wit' -o -name '*.txt' \) 2> /dev/null | head -n 1 || true)"
if [ "${1:-}" != "--force" ] && [ -f "$wasm" ] && [ -z "$newer" ]; then
    echo "$wasm is up to date"
    exit 0
fi
echo "componentize-py: examples/guests-py/app.py -> $wasm"
# -p: the app and its `gorch` helper package; no VIRTUAL_ENV, so that the build tool's own
# site-packages are not bundled into the component.
(cd "$src" && env -u VIRTUAL_ENV PYTHONDONTWRITEBYTECODE=1 "$venv/bin/componentize-py" \
    -d "$root/wit" -w worker componentize -p . app -o "$wasm.tmp")
mv "$wasm.tmp" "$wasm"
ls -l "$wasm"
