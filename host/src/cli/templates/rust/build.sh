#!/usr/bin/env bash
# Builds the worker for wasm32-wasip2 and puts it beside its manifest, plugins/{{name}}.toml.
set -euo pipefail
cd "$(dirname "$0")"
# rustup's wasm32-wasip2 target, once (its standard library is a download).
if command -v rustup > /dev/null && ! rustup target list --installed | grep -qx wasm32-wasip2; then
    echo "adding rustup's wasm32-wasip2 target (once)"
    rustup target add wasm32-wasip2
fi
cargo build --release --target wasm32-wasip2 "$@"
mkdir -p plugins
# cargo names the library file after the crate, with '-' as '_'.
cp "${CARGO_TARGET_DIR:-target}/wasm32-wasip2/release/{{crate}}.wasm" plugins/{{name}}.wasm
echo "plugins/{{name}}.wasm"
