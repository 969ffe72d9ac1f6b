//! [`FilterError`]: why an expression was rejected, naming the word it is about.

use std::fmt;

/// Whether a [`FilterError`] is about syntax podtrace does not implement or a malformed
/// expression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterErrorKind {
    /// Valid tcpdump syntax (or a plausible extension) that podtrace does not implement.
    Unsupported,
    /// Not a valid expression (unbalanced parentheses, a missing value, a bad address...).
    Invalid,
}

/// Why a filter expression was rejected. The caller exits with status 2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterError {
    kind: FilterErrorKind,
    near: String,
    detail: String,
}

impl FilterError {
    pub(super) fn unsupported(near: &str, detail: impl Into<String>) -> Self {
        FilterError {
            kind: FilterErrorKind::Unsupported,
            near: near.to_string(),
            detail: detail.into(),
        }
    }

    pub(super) fn invalid(near: &str, detail: impl Into<String>) -> Self {
        FilterError {
            kind: FilterErrorKind::Invalid,
            near: near.to_string(),
            detail: detail.into(),
        }
    }

    /// Unsupported or invalid.
    pub fn kind(&self) -> FilterErrorKind {
        self.kind
    }

    /// The word of the expression the error is about (in full; the message shortens a long
    /// one).
    pub fn near(&self) -> &str {
        &self.near
    }
}

impl fmt::Display for FilterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            FilterErrorKind::Unsupported => "unsupported filter syntax",
            FilterErrorKind::Invalid => "invalid filter expression",
        };
        write!(f, "{what} near {:?}: {}", shorten(&self.near), self.detail)
    }
}

/// Words longer than this are cut in messages, so an error stays one readable line.
const MAX_SHOWN: usize = 60;

/// `word`, or its first [`MAX_SHOWN`] characters and an ellipsis.
fn shorten(word: &str) -> std::borrow::Cow<'_, str> {
    match word.char_indices().nth(MAX_SHOWN) {
        None => word.into(),
        Some((end, _)) => format!("{}…", &word[..end]).into(),
    }
}

impl std::error::Error for FilterError {}
