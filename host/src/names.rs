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
}

/// Checks a topic name: non-empty, at most 255 bytes, printable, no whitespace.
pub fn validate_topic_name(name: &str) -> Result<(), NameError> {
    check_length(name)?;
    if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(NameError::Whitespace);
    }
    Ok(())
}

/// Checks a routine name: non-empty, at most 255 bytes, no control characters (spaces and
/// any printable text are allowed: names are escaped wherever they are shown).
pub fn validate_routine_name(name: &str) -> Result<(), NameError> {
    check_length(name)?;
    if name.chars().any(char::is_control) {
        return Err(NameError::Control);
    }
    Ok(())
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
