//! Errors of the spec layer: every one names where the bad value came from, what it was, why it is wrong and
//! how to fix it, so that the CLI can print one clear line and exit non-zero.

use std::fmt;

/// Where a spec was read from: a file path, a preset name, or an in-memory value built by code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A JSON file on disk.
    File(String),
    /// A built-in preset.
    Preset(String),
    /// Built in code (tests, the Rust API).
    Inline,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::File(p) => write!(f, "{p}"),
            Source::Preset(n) => write!(f, "preset '{n}'"),
            Source::Inline => write!(f, "<inline spec>"),
        }
    }
}

/// A spec that could not be read or is not valid.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SpecError {
    /// The file could not be read at all.
    #[error("{origin}: cannot read: {reason}")]
    Io {
        /// The file.
        origin: Source,
        /// The operating system's reason.
        reason: String,
    },
    /// The text is not valid JSON or does not have the expected shape (unknown or missing field, wrong type).
    #[error("{origin}: {reason}; fix: {fix}")]
    Parse {
        /// The file.
        origin: Source,
        /// What serde said.
        reason: String,
        /// 1-based line of the error.
        line: usize,
        /// 1-based column of the error.
        column: usize,
        /// How to fix it.
        fix: String,
    },
    /// A field has a value that is not allowed.
    #[error("{origin}: field `{field}` = {value}: {reason}; fix: {fix}")]
    Invalid {
        /// The file or preset.
        origin: Source,
        /// Dotted path of the field, e.g. `moe.top_k`.
        field: String,
        /// The offending value, as written.
        value: String,
        /// Why it is wrong.
        reason: String,
        /// How to fix it.
        fix: String,
    },
}

impl SpecError {
    /// Builds an [`SpecError::Invalid`].
    pub fn invalid(
        source: &Source,
        field: impl Into<String>,
        value: impl fmt::Display,
        reason: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        SpecError::Invalid {
            origin: source.clone(),
            field: field.into(),
            value: value.to_string(),
            reason: reason.into(),
            fix: fix.into(),
        }
    }

    /// Replaces the source of the error (used when a spec built inline is attributed to a file afterwards).
    pub fn with_source(self, new: Source) -> Self {
        match self {
            SpecError::Io { reason, .. } => SpecError::Io { origin: new, reason },
            SpecError::Parse { reason, line, column, fix, .. } => {
                SpecError::Parse { origin: new, reason, line, column, fix }
            }
            SpecError::Invalid { field, value, reason, fix, .. } => {
                SpecError::Invalid { origin: new, field, value, reason, fix }
            }
        }
    }
}

/// Reads a JSON file into `T`, turning every failure into a [`SpecError`] that names the file.
pub fn read_json_file<T: serde::de::DeserializeOwned>(path: &std::path::Path, what: &str) -> Result<T, SpecError> {
    let source = Source::File(path.display().to_string());
    let text =
        std::fs::read_to_string(path).map_err(|e| SpecError::Io { origin: source.clone(), reason: e.to_string() })?;
    parse_json_str(&text, &source, what)
}

/// Parses JSON text into `T`; errors name the source, line and column and say what a valid file looks like.
pub fn parse_json_str<T: serde::de::DeserializeOwned>(text: &str, source: &Source, what: &str) -> Result<T, SpecError> {
    serde_json::from_str(text).map_err(|e| {
        let fix = match e.classify() {
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                "the file must be one valid JSON object; check brackets, commas and quotes".to_string()
            }
            serde_json::error::Category::Data => format!(
                "compare with a {what} in examples/ (`switchyard presets --json` prints every built-in one); field names carry their units"
            ),
            serde_json::error::Category::Io => "check that the file is readable".to_string(),
        };
        SpecError::Parse { origin: source.clone(), reason: e.to_string(), line: e.line(), column: e.column(), fix }
    })
}
