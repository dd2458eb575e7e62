//! Names of routines and topics: what is valid, checked in one place (spawning, the bus,
//! manifests and the WIT imports all call these).

/// The longest valid topic or routine name, in bytes.
pub const MAX_NAME_BYTES: usize = 255;

/// What is wrong with a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name is empty.
    #[error("empty")]
    Empty,
    /// Longer than [`MAX_NAME_BYTES`].
    #[error("longer than 255 bytes")]
    TooLong,
    /// A topic name with whitespace or control characters.
    #[error("contains whitespace or control characters")]
    Whitespace,
    /// A routine name with control characters.
    #[error("contains control characters")]
    Control,
    /// A bidirectional control character (U+202A–U+202E, U+2066–U+2069, U+200E, U+200F,
    /// U+061C): it reorders what follows, so that `evil\u{202E}gnp.exe` shows as
    /// `evilexe.png`.
    #[error(
        "contains the bidirectional control character U+{:04X} (it makes a name display as another)",
        u32::from(*.0)
    )]
    Bidi(char),
    /// An invisible formatting character (Unicode category Cf: zero-width space and joiners,
    /// word joiner, byte order mark, soft hyphen, tags…): two names that look the same would
    /// differ.
    #[error(
        "contains the invisible formatting character U+{:04X} (it makes names look alike)",
        u32::from(*.0)
    )]
    Invisible(char),
    /// A `/`: reserved for `node/name` in a cluster.
    #[error("contains '/' (reserved for node/name)")]
    Slash,
}

/// Checks a topic name: non-empty, at most 255 bytes, printable, no whitespace, no bidi
/// controls or invisible formatting characters, no `/`.
pub fn validate_topic_name(name: &str) -> Result<(), NameError> {
    check_length(name)?;
    if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(NameError::Whitespace);
    }
    check_format(name)
}

/// Checks a routine name: non-empty, at most 255 bytes, no control characters, no bidi
/// controls or invisible formatting characters, no `/` (spaces and any other printable text
/// are allowed: names are escaped wherever they are shown).
pub fn validate_routine_name(name: &str) -> Result<(), NameError> {
    check_length(name)?;
    if name.chars().any(char::is_control) {
        return Err(NameError::Control);
    }
    check_format(name)
}

fn check_length(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(NameError::TooLong);
    }
    Ok(())
}

/// Rejects bidi controls, the other invisible formatting characters, and `/`.
fn check_format(name: &str) -> Result<(), NameError> {
    for c in name.chars() {
        if c == '/' {
            return Err(NameError::Slash);
        }
        if is_bidi_control(c) {
            return Err(NameError::Bidi(c));
        }
        if is_format(c) {
            return Err(NameError::Invisible(c));
        }
    }
    Ok(())
}

/// The bidirectional controls: embeddings and overrides, isolates, and the implicit marks.
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{200E}' | '\u{200F}' | '\u{061C}')
}

/// Unicode general category Cf (format characters), as of Unicode 16, plus the Hangul
/// fillers (letters by category, but blank: a favourite for invisible names).
fn is_format(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{0600}'..='\u{0605}'
            | '\u{061C}'
            | '\u{06DD}'
            | '\u{070F}'
            | '\u{0890}'..='\u{0891}'
            | '\u{08E2}'
            | '\u{115F}'..='\u{1160}'
            | '\u{180E}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{206F}'
            | '\u{3164}'
            | '\u{FEFF}'
            | '\u{FFA0}'
            | '\u{FFF9}'..='\u{FFFB}'
            | '\u{110BD}'
            | '\u{110CD}'
            | '\u{13430}'..='\u{1343F}'
            | '\u{1BCA0}'..='\u{1BCA3}'
            | '\u{1D173}'..='\u{1D17A}'
            | '\u{E0001}'
            | '\u{E0020}'..='\u{E007F}'
    )
}
