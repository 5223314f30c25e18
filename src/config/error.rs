//! The error every configuration mistake becomes.

use std::io;
use std::path::PathBuf;
use thiserror::Error;

/// A configuration that cannot be used; the message names the key.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The file is not valid TOML or has unknown keys or wrong types.
    #[error("invalid config file {origin}: {message}")]
    Parse {
        /// The file, or `<text>` for a string.
        origin: String,
        /// The TOML parser's explanation (with line and column).
        message: String,
    },
    /// A value is out of range or the combination is unsafe.
    #[error("{0}")]
    Invalid(String),
}

pub(super) fn invalid<T>(message: String) -> Result<T, ConfigError> {
    Err(ConfigError::Invalid(message))
}
