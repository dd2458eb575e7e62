//! A stateful worker, version 1: keeps its message count across live upgrades.
const VERSION: &str = "v1";
include!("../shared.rs");
