//! The guest SDK carries the WIT contract (`guest-sdk/wit`, the one source of truth, so the
//! crate builds outside this repository); the root `wit/` that the host, the example guests
//! and the Python and JavaScript builds read is the same files.

use std::collections::BTreeMap;
use std::path::Path;

use crate::common::fs::repo_root;

fn wit_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()))
        .collect()
}

#[test]
fn root_wit_is_a_byte_equal_copy_of_the_sdks() {
    let sdk = wit_files(&repo_root().join("guest-sdk/wit"));
    let root = wit_files(&repo_root().join("wit"));
    assert!(sdk.contains_key("worker.wit"), "guest-sdk/wit/worker.wit is missing");
    assert_eq!(
        sdk.keys().collect::<Vec<_>>(),
        root.keys().collect::<Vec<_>>(),
        "wit/ and guest-sdk/wit/ hold different files"
    );
    for (name, bytes) in &sdk {
        assert!(
            root[name] == *bytes,
            "wit/{name} differs from guest-sdk/wit/{name} (the source of truth): \
             cp guest-sdk/wit/{name} wit/{name}"
        );
    }
}
