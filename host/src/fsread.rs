//! Reading files the host is handed (components, manifests, cache entries) without trusting
//! what they are: only regular files (a symlink to one is fine), opened so that a FIFO or a
//! device can neither block nor stream forever, and no more than a size limit, checked
//! before reading and while reading (a file may grow in between).

use std::fs::{File, Metadata};
use std::io::{self, Read};
use std::path::Path;

/// Why a file was not read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    /// A FIFO, device, socket or directory (named by [`kind`]).
    #[error("not a regular file ({0})")]
    NotRegular(&'static str),
    /// More bytes than the limit.
    #[error("larger than the {} limit", size(*.0))]
    TooLarge(u64),
    /// It could not be opened or read.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Opens `path` if it is a regular file (following symlinks), never blocking on a FIFO or a
/// device; returns the file and its metadata (of the opened handle: a path swapped for a
/// special file after the check is refused too).
pub(crate) fn open_regular(path: &Path) -> Result<(File, Metadata), ReadError> {
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        return Err(ReadError::NotRegular(kind(&meta)));
    }
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use rustix::fs::OFlags;
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags((OFlags::NONBLOCK | OFlags::NOCTTY).bits() as i32);
    }
    let file = options.open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(ReadError::NotRegular(kind(&meta)));
    }
    Ok((file, meta))
}

/// Reads an opened regular file whole, failing past `limit` bytes.
pub(crate) fn read_limited(file: File, meta: &Metadata, limit: u64) -> Result<Vec<u8>, ReadError> {
    if meta.len() > limit {
        return Err(ReadError::TooLarge(limit));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(limit.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(ReadError::TooLarge(limit));
    }
    Ok(bytes)
}

/// [`open_regular`] then [`read_limited`].
pub(crate) fn read_regular(path: &Path, limit: u64) -> Result<Vec<u8>, ReadError> {
    let (file, meta) = open_regular(path)?;
    read_limited(file, &meta, limit)
}

/// What kind of file `meta` describes, for messages: "a FIFO", "a directory", ...
pub(crate) fn kind(meta: &Metadata) -> &'static str {
    let t = meta.file_type();
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO";
        } else if t.is_char_device() {
            return "a character device";
        } else if t.is_block_device() {
            return "a block device";
        } else if t.is_socket() {
            return "a socket";
        }
    }
    if t.is_dir() {
        "a directory"
    } else if t.is_file() {
        "a regular file"
    } else {
        "a special file"
    }
}

/// `256 MiB`, `1 KiB`, `1000 bytes`: a limit as people write it.
pub(crate) fn size(bytes: u64) -> String {
    for (unit, shift) in [("GiB", 30), ("MiB", 20), ("KiB", 10)] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{} {unit}", bytes >> shift);
        }
    }
    format!("{bytes} bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_written() {
        assert_eq!(size(256 << 20), "256 MiB");
        assert_eq!(size(1 << 30), "1 GiB");
        assert_eq!(size(3 << 10), "3 KiB");
        assert_eq!(size(1000), "1000 bytes");
        assert_eq!(size(0), "0 bytes");
    }

    #[test]
    fn only_regular_files_within_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, b"12345").unwrap();
        assert_eq!(read_regular(&f, 5).unwrap(), b"12345");
        assert!(matches!(read_regular(&f, 4), Err(ReadError::TooLarge(4))));
        assert!(matches!(read_regular(dir.path(), 5), Err(ReadError::NotRegular("a directory"))));
        #[cfg(unix)]
        {
            let link = dir.path().join("zero");
            std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
            let e = read_regular(&link, 5).unwrap_err();
            assert_eq!(e.to_string(), "not a regular file (a character device)");
        }
    }
}
