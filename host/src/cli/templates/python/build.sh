#!/usr/bin/env bash
# Builds app.py into plugins/{{name}}.wasm with componentize-py (pinned in requirements.txt,
# installed into .venv here). Needs python3 with venv (Debian: apt-get install python3-venv).
# COMPONENTIZE_PY=/path/to/componentize-py uses an installed one instead.
set -euo pipefail
cd "$(dirname "$0")"
tool="${COMPONENTIZE_PY:-}"
if [ -z "$tool" ]; then
    if [ ! -x .venv/bin/componentize-py ]; then
        python3 -m venv .venv || {
            echo "error: cannot create a venv; install it (Debian: apt-get install python3-venv)" >&2
            exit 1
        }
        .venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
    fi
    tool=.venv/bin/componentize-py
fi
mkdir -p plugins
env -u VIRTUAL_ENV PYTHONDONTWRITEBYTECODE=1 "$tool" -d wit -w worker componentize -p . app \
    -o plugins/{{name}}.wasm
