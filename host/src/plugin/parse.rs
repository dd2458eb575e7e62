//! Reading and parsing the TOML of manifests and `gorch.toml`: a bounded read of a regular
//! file, and errors that name the file, line and column and quote at most a short piece of
//! the offending value.

use std::path::Path;

use super::manifest::{MAX_ECHO_CHARS, ManifestError};

/// Reads and parses a TOML file into `T`.
pub(super) fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ManifestError> {
    let error =
        |message: String| ManifestError { path: path.to_path_buf(), location: None, message };
    // Only a regular file, and only so much of it: a FIFO or `/dev/zero` is refused.
    let bytes = crate::fsread::read_regular(path, super::dir::MAX_MANIFEST_BYTES)
        .map_err(|e| error(e.to_string()))?;
    let text = String::from_utf8(bytes).map_err(|_| error("not UTF-8 text".into()))?;
    parse_toml(path, &text)
}

/// Parses TOML into `T`; errors name the file, line and column.
pub(super) fn parse_toml<T: serde::de::DeserializeOwned>(
    path: &Path,
    text: &str,
) -> Result<T, ManifestError> {
    toml::from_str(text).map_err(|e| {
        let location = e.span().map(|s| line_col(text, s.start));
        ManifestError { path: path.to_path_buf(), location, message: shorten(e.message()) }
    })
}

/// The longest message a manifest error carries, in characters, after [`shorten_quoted`].
const MAX_MESSAGE_CHARS: usize = 1000;

/// `msg` with every quoted value (`"…"` with escapes, or `` `…` ``) longer than
/// [`MAX_ECHO_CHARS`] cut (serde and toml quote values whole), and the whole capped at
/// [`MAX_MESSAGE_CHARS`].
fn shorten(msg: &str) -> String {
    let mut s = shorten_quoted(msg);
    if let Some((cut, _)) = s.char_indices().nth(MAX_MESSAGE_CHARS) {
        s.truncate(cut);
        s.push('…');
    }
    s
}

fn shorten_quoted(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len().min(4 * MAX_MESSAGE_CHARS));
    let mut chars = msg.chars();
    while let Some(c) = chars.next() {
        out.push(c);
        if c == '"' || c == '`' {
            copy_quoted(&mut chars, c, &mut out);
        }
    }
    out
}

/// Copies a quoted value from `chars` to `out`, up to and including its closing `quote`,
/// keeping [`MAX_ECHO_CHARS`] characters of it. An escape (`\"`, `\u{202e}`) counts as one.
fn copy_quoted(chars: &mut std::str::Chars<'_>, quote: char, out: &mut String) {
    let (mut kept, mut dropped, mut closed) = (0usize, 0usize, false);
    while let Some(t) = chars.next() {
        if t == quote {
            closed = true;
            break;
        }
        let mut token = String::from(t);
        if t == '\\' && quote == '"' {
            escape_rest(chars, &mut token);
        }
        if kept < MAX_ECHO_CHARS {
            out.push_str(&token);
            kept += 1;
        } else {
            dropped += 1;
        }
    }
    if closed {
        out.push(quote);
    }
    if dropped > 0 {
        out.push_str(&format!("… ({dropped} more characters)"));
    }
}

/// The rest of an escape after its backslash: one character, or `u{…}`.
fn escape_rest(chars: &mut std::str::Chars<'_>, token: &mut String) {
    let Some(n) = chars.next() else { return };
    token.push(n);
    if n == 'u' {
        for n in chars.by_ref() {
            token.push(n);
            if n == '}' {
                break;
            }
        }
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map(|l| l.chars().count()).unwrap_or(0) + 1;
    (line, col)
}
