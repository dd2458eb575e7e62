//! The integration tests: one binary (one link) made of modules, as in wasmtime's
//! `tests/all`. Every test that starts routines ends with no tokio task left alive.

mod cache;
mod channel;
mod cli;
mod common;
mod manifest;
mod messaging;
mod native;
mod obs;
mod supervision;
mod wasm;
