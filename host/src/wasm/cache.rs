//! An on-disk cache of compiled components, so that a second start skips Cranelift.
//!
//! An entry is named by the SHA-256 of the engine's compatibility hash (wasmtime version,
//! target, and every setting that changes generated code, such as fuel and epochs) and of the
//! component's bytes: a new wasmtime, another configuration or a changed file all look up
//! another name, so an entry is never stale. The file holds a magic tag, the SHA-256 of the
//! compiled artifact, and the artifact; it is checked before wasmtime sees it, so a truncated
//! or corrupt entry (a crash mid-write, a bad disk) is reported, removed and recompiled, never
//! loaded. Entries are written to a temporary file and renamed into place, so readers never
//! see half an entry, and concurrent hosts sharing the directory are safe.
//!
//! The cache is best effort: a directory that cannot be written only costs a recompile, with
//! a warning in the log. Whoever can write the directory can make the host run code of their
//! choosing, so it is created private (mode 0700), and a directory owned by another user or
//! that others may write (group- or world-writable) is refused with a warning: components are
//! then compiled. An entry is read only if it is a regular file owned by the current user and
//! of a plausible size (else it is replaced); a FIFO or a device is never opened for reading.
//! Temporary files left by a writer that was killed (named `.tmp*`) are removed when the
//! cache is first used, once they are an hour old (a younger one may be another host's
//! write in progress).

use std::hash::Hasher;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Once};
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

use crate::fsread::{self, ReadError};

const MAGIC: &[u8; 8] = b"GORCHCC1";
const HEADER: usize = MAGIC.len() + 32;
/// Name prefix of the temporary files entries are written to before the rename.
const TMP_PREFIX: &str = ".tmp";
/// Age past which a temporary file is a killed writer's leftover, not a write in progress.
const STALE_TMP: Duration = Duration::from_secs(3600);
/// Largest entry read for a component of `n` bytes: compiled code is a few times the size of
/// the component (about 4x for the example guests), with room to spare.
fn max_entry_bytes(n: usize) -> u64 {
    (n as u64).saturating_mul(16).saturating_add(64 << 20)
}

/// Where a component came from when it was loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    /// Compiled; the engine has no cache, or its directory is refused (owned by another
    /// user, or writable by others).
    Off,
    /// Deserialized from a valid cache entry.
    Hit,
    /// Compiled, and stored for the next start (or not, if the directory is not writable).
    Miss,
    /// The entry was unusable (corrupt, truncated, refused by wasmtime, not a regular file,
    /// owned by another user, too large): compiled again and replaced.
    Replaced,
}

/// A directory of compiled components. See the module documentation.
#[derive(Debug, Clone)]
pub struct CompileCache {
    dir: PathBuf,
    /// Leftover temporary files are removed once, on first use.
    swept: Arc<Once>,
}

impl CompileCache {
    /// A cache in `dir` (created on the first store).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        CompileCache { dir: dir.into(), swept: Arc::new(Once::new()) }
    }

    /// The per-user default: `$XDG_CACHE_HOME/gorch-host`, else `$HOME/.cache/gorch-host`.
    pub fn default_dir() -> Option<PathBuf> {
        let base = match std::env::var_os("XDG_CACHE_HOME") {
            Some(d) if !d.is_empty() => PathBuf::from(d),
            _ => PathBuf::from(std::env::var_os("HOME").filter(|h| !h.is_empty())?).join(".cache"),
        };
        Some(base.join("gorch-host"))
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The entry file for `bytes` compiled by `engine`.
    pub fn entry_path(&self, engine: &Engine, bytes: &[u8]) -> PathBuf {
        let mut key = ShaHasher(Sha256::new());
        std::hash::Hash::hash(&engine.precompile_compatibility_hash(), &mut key);
        key.0.update((bytes.len() as u64).to_le_bytes());
        key.0.update(bytes);
        self.dir.join(format!("{}.cwasm", hex(&key.0.finalize())))
    }

    /// The compiled form of `bytes`: from the cache if a valid entry exists, else compiled
    /// (and stored). Compile errors are wasmtime's; cache trouble is only logged.
    pub(crate) fn load(
        &self,
        engine: &Engine,
        bytes: &[u8],
        what: &Path,
    ) -> wasmtime::Result<(Component, CacheStatus)> {
        if let Err(why) = self.trusted() {
            tracing::warn!(
                "compile cache {} not used for {}: {why}",
                self.dir.display(),
                what.display()
            );
            return Ok((Component::new(engine, bytes)?, CacheStatus::Off));
        }
        self.swept.call_once(|| self.sweep());
        let entry = self.entry_path(engine, bytes);
        let mut status = CacheStatus::Miss;
        match read_entry(&entry, max_entry_bytes(bytes.len())) {
            Ok(file) => match verified(&file) {
                Ok(artifact) => {
                    // SAFETY: `artifact` was produced by `Component::serialize` of an engine
                    // with this compatibility hash (the entry's name) and is intact (its
                    // SHA-256 matches the one written with it); wasmtime checks the version
                    // and settings again. Only a deliberate forgery by someone who can write
                    // the cache directory could get past this, and `trusted()` refuses a
                    // directory that is not the current user's or that others can write,
                    // and `read_entry` an entry owned by anyone else.
                    #[allow(unsafe_code)]
                    match unsafe { Component::deserialize(engine, artifact) } {
                        Ok(c) => return Ok((c, CacheStatus::Hit)),
                        Err(e) => self.discard(&entry, what, &format!("{e:#}")),
                    }
                    status = CacheStatus::Replaced;
                }
                Err(why) => {
                    self.discard(&entry, what, why);
                    status = CacheStatus::Replaced;
                }
            },
            Err(EntryError::Missing) => {}
            Err(EntryError::Unusable(why)) => {
                self.discard(&entry, what, &why);
                status = CacheStatus::Replaced;
            }
            Err(EntryError::Io(e)) => {
                tracing::warn!("compile cache: cannot read {}: {e}", entry.display())
            }
        }
        let component = Component::new(engine, bytes)?;
        match component.serialize() {
            Ok(artifact) => {
                if let Err(e) = self.store(&entry, &artifact) {
                    tracing::warn!(
                        "compile cache: cannot store {} for {}: {e}",
                        entry.display(),
                        what.display()
                    );
                }
            }
            Err(e) => tracing::warn!("compile cache: cannot serialize {}: {e:#}", what.display()),
        }
        Ok((component, status))
    }

    /// Whether the directory belongs to the current user and only they can write it (true if
    /// it does not exist yet: it will be created private).
    fn trusted(&self) -> Result<(), String> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            if let Ok(m) = std::fs::metadata(&self.dir) {
                let me = euid();
                if m.uid() != me {
                    return Err(format!(
                        "it is owned by another user (uid {}, not uid {me}); use a directory \
                         of your own",
                        m.uid()
                    ));
                }
                if m.mode() & 0o022 != 0 {
                    return Err(format!(
                        "it is writable by others (mode {:o}); make it private with chmod 700",
                        m.mode() & 0o777
                    ));
                }
            }
        }
        Ok(())
    }

    /// Removes the temporary files of writers that were killed mid-write: ours, and old
    /// enough that no live writer can still be using them.
    fn sweep(&self) {
        let Ok(files) = std::fs::read_dir(&self.dir) else { return };
        for file in files.flatten() {
            if !file.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                continue;
            }
            let Ok(m) = file.metadata() else { continue };
            #[cfg(unix)]
            if std::os::unix::fs::MetadataExt::uid(&m) != euid() {
                continue;
            }
            let age = m.modified().ok().and_then(|t| t.elapsed().ok());
            if m.is_file() && age.is_some_and(|a| a >= STALE_TMP) {
                match std::fs::remove_file(file.path()) {
                    Ok(()) => tracing::info!(
                        "compile cache: removed {}, left by an interrupted write",
                        file.path().display()
                    ),
                    Err(e) => tracing::warn!(
                        "compile cache: cannot remove {}: {e}",
                        file.path().display()
                    ),
                }
            }
        }
    }

    fn discard(&self, entry: &Path, what: &Path, why: &str) {
        tracing::warn!(
            "compile cache: entry {} for {} is unusable ({why}); recompiling",
            entry.display(),
            what.display()
        );
        let _ = std::fs::remove_file(entry);
    }

    fn store(&self, entry: &Path, artifact: &[u8]) -> std::io::Result<()> {
        let mut dir = std::fs::DirBuilder::new();
        dir.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut dir, 0o700);
        dir.create(&self.dir)?;
        // Created by someone else between the check and here: do not write into it.
        self.trusted().map_err(std::io::Error::other)?;
        let mut tmp = tempfile::Builder::new().prefix(TMP_PREFIX).tempfile_in(&self.dir)?;
        tmp.write_all(MAGIC)?;
        tmp.write_all(&Sha256::digest(artifact))?;
        tmp.write_all(artifact)?;
        tmp.as_file().sync_data()?;
        tmp.persist(entry).map_err(|e| e.error)?;
        Ok(())
    }
}

/// Why an entry was not read.
enum EntryError {
    /// There is none.
    Missing,
    /// There is one, but it must not be used (and is replaced).
    Unusable(String),
    /// It could not be read.
    Io(std::io::Error),
}

/// The bytes of an entry file: a regular file, owned by the current user, at most `limit`
/// bytes.
fn read_entry(entry: &Path, limit: u64) -> Result<Vec<u8>, EntryError> {
    let (file, meta) = fsread::open_regular(entry).map_err(|e| match e {
        ReadError::Io(e) if e.kind() == std::io::ErrorKind::NotFound => EntryError::Missing,
        ReadError::Io(e) => EntryError::Io(e),
        e => EntryError::Unusable(e.to_string()),
    })?;
    #[cfg(unix)]
    {
        let (owner, me) = (std::os::unix::fs::MetadataExt::uid(&meta), euid());
        if owner != me {
            return Err(EntryError::Unusable(format!(
                "owned by another user (uid {owner}, not uid {me})"
            )));
        }
    }
    fsread::read_limited(file, &meta, limit).map_err(|e| match e {
        ReadError::Io(e) => EntryError::Io(e),
        e => EntryError::Unusable(e.to_string()),
    })
}

/// The effective user id of the process.
#[cfg(unix)]
fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// The artifact of an entry file, if its header and checksum hold.
fn verified(file: &[u8]) -> Result<&[u8], &'static str> {
    if file.len() < HEADER || &file[..MAGIC.len()] != MAGIC {
        return Err("bad header");
    }
    let artifact = &file[HEADER..];
    if Sha256::digest(artifact).as_slice() != &file[MAGIC.len()..HEADER] {
        return Err("checksum mismatch");
    }
    Ok(artifact)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Feeds `Hash` output into SHA-256 (the engine hash is only exposed as `impl Hash`).
struct ShaHasher(Sha256);

impl Hasher for ShaHasher {
    fn finish(&self) -> u64 {
        0
    }
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verified_rejects_truncation_and_flips() {
        let artifact = b"compiled code".to_vec();
        let mut file = MAGIC.to_vec();
        file.extend_from_slice(&Sha256::digest(&artifact));
        file.extend_from_slice(&artifact);
        assert_eq!(verified(&file), Ok(&artifact[..]));
        assert_eq!(verified(&file[..file.len() - 1]), Err("checksum mismatch"));
        assert_eq!(verified(&file[..10]), Err("bad header"));
        let mut flipped = file.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert_eq!(verified(&flipped), Err("checksum mismatch"));
    }
}
