//! The integration tests: one binary (one link) made of modules, as in wasmtime's
//! `tests/all`. Every test that starts routines ends with no tokio task left alive.

mod cache;
mod channel;
mod cli;
mod cluster;
mod cluster_faults;
mod common;
mod control;
mod corpus;
mod deploy;
mod fuzz;
mod hostile_files;
mod hostile_logs;
mod manifest;
mod manifest_props;
mod messaging;
mod native;
mod new_project;
mod obs;
mod ops_cli;
mod polyglot;
mod reload;
mod sdk;
mod startup;
mod supervision;
mod upgrade;
mod wasm;
