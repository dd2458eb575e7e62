#!/usr/bin/env bash
# Builds the worker for wasm32-wasip2 and puts it beside its manifest, plugins/{{name}}.toml.
# Needs rustup's wasm32-wasip2 target once: `rustup target add wasm32-wasip2`.
set -euo pipefail
cd "$(dirname "$0")"
cargo build --release --target wasm32-wasip2 "$@"
mkdir -p plugins
# cargo names the library file after the crate, with '-' as '_'.
cp "${CARGO_TARGET_DIR:-target}/wasm32-wasip2/release/{{crate}}.wasm" plugins/{{name}}.wasm
echo "plugins/{{name}}.wasm"
