//! The one error type of this crate. It owns the wording of configuration errors: every error names
//! the file, and validation errors name the dotted key, the value as written and what is allowed,
//! so an operator can fix the file without reading code. It must not carry expected outcomes
//! (defaults, warnings): only reasons a config cannot be used.

use std::io;
use std::path::PathBuf;

/// Why a configuration file could not be turned into a validated config.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("read {}: {source}", path.display())]
    Read {
        /// The path as given to `load_*`.
        path: PathBuf,
        /// What the operating system said.
        source: io::Error,
    },
    /// The text is not valid TOML or does not have the expected shape (unknown key, wrong type).
    #[error("{}: {message}", file.display())]
    Parse {
        /// The file name as given (the `origin`).
        file: PathBuf,
        /// The toml crate's message: line, column, a snippet and, for unknown keys, the expected
        /// keys.
        message: String,
    },
    /// A key has a value that is not allowed.
    #[error("{}: {key} = {value}: {problem}", file.display())]
    Invalid {
        /// The file name as given (the `origin`).
        file: PathBuf,
        /// Dotted key path, such as `buffer.max_bytes`.
        key: String,
        /// The value as written in TOML: strings quoted, numbers plain.
        value: String,
        /// What is allowed, such as `must be at least 1 MiB (1048576)`.
        problem: String,
    },
    /// A required key is absent.
    #[error("{}: {key} is required: {hint}", file.display())]
    Missing {
        /// The file name as given (the `origin`).
        file: PathBuf,
        /// Dotted key path, such as `uplink.ca_cert`.
        key: String,
        /// What to put there and where to get it.
        hint: String,
    },
    /// A relative path in the file could not be made absolute because the current directory is
    /// unknown (only happens when the file's own path has no directory part).
    #[error("{}: resolve relative paths against the current directory: {source}", file.display())]
    CurrentDir {
        /// The file name as given (the `origin`).
        file: PathBuf,
        /// What the operating system said.
        source: io::Error,
    },
}
