//! A stateful worker, version 2 of `counter`: the same body, another version tag.
const VERSION: &str = "v2";
include!("../../counter/shared.rs");
