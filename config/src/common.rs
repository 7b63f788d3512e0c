//! Shared pieces of both config files: the SQLite `synchronous` level and the validation helpers
//! that turn raw optional values into checked ones with uniform error messages. It owns the
//! formatting of values and limits in errors and the rule for resolving relative paths. It must
//! not know any particular key or default: those live in `agent` and `aggregator`.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;

/// SQLite `PRAGMA synchronous` level for a database the binary writes (agent buffer, aggregator
/// WAL). The databases run in WAL journal mode, where this decides what survives power loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    /// No fsync at all: a power loss or OS crash can lose or corrupt recent commits. Only for
    /// tests and throwaway data.
    Off,
    /// fsync at WAL checkpoints only: a power loss can roll back the most recent commits, which
    /// breaks "no acknowledged event is lost"; the database stays consistent.
    Normal,
    /// fsync the WAL on every commit: an acknowledged commit survives power loss. The default.
    Full,
    /// As `Full`, and also fsync the directory after unlinking a journal.
    Extra,
}

impl Synchronous {
    /// Every level, in the order of increasing durability.
    pub const ALL: [Synchronous; 4] = [
        Synchronous::Off,
        Synchronous::Normal,
        Synchronous::Full,
        Synchronous::Extra,
    ];

    /// The value for `PRAGMA synchronous = ...`.
    pub fn as_pragma(self) -> &'static str {
        match self {
            Synchronous::Off => "OFF",
            Synchronous::Normal => "NORMAL",
            Synchronous::Full => "FULL",
            Synchronous::Extra => "EXTRA",
        }
    }

    /// The spelling in config files.
    pub fn as_str(self) -> &'static str {
        match self {
            Synchronous::Off => "off",
            Synchronous::Normal => "normal",
            Synchronous::Full => "full",
            Synchronous::Extra => "extra",
        }
    }
}

impl fmt::Display for Synchronous {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// 1 KiB in bytes.
pub(crate) const KIB: u64 = 1024;
/// 1 MiB in bytes.
pub(crate) const MIB: u64 = 1024 * KIB;
/// 1 GiB in bytes.
pub(crate) const GIB: u64 = 1024 * MIB;

/// How a limit is shown in an error message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unit {
    /// Byte sizes: whole KiB/MiB/GiB are named, with the exact number in parentheses.
    Bytes,
    /// Plain numbers (counts, milliseconds: the key name carries the unit).
    Plain,
}

impl Unit {
    /// `1048576` -> `1 MiB (1048576)` for bytes, `1048576` otherwise.
    pub(crate) fn show(self, n: u64) -> String {
        if self == Unit::Plain || n == 0 {
            return n.to_string();
        }
        for (size, name) in [(GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB")] {
            if n >= size && n.is_multiple_of(size) {
                return format!("{} {name} ({n})", n / size);
            }
        }
        n.to_string()
    }
}

/// A string as written in TOML (a basic string with escapes).
pub(crate) fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Parses TOML text into a raw config, mapping the toml crate's error to `ConfigError::Parse`.
pub(crate) fn parse_toml<T: serde::de::DeserializeOwned>(
    text: &str,
    origin: &Path,
) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|error| ConfigError::Parse {
        file: origin.to_path_buf(),
        message: error.to_string().trim_end().to_owned(),
    })
}

/// Reads a config file, mapping failure to `ConfigError::Read`.
pub(crate) fn read_file(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Validation context of one file: names the file in errors and resolves relative paths.
#[derive(Debug)]
pub(crate) struct Checker<'a> {
    /// The file name as given, shown in every error.
    file: &'a Path,
    /// The directory that relative paths are resolved against, made absolute on first use (the
    /// current directory is only consulted when the file's own path is relative).
    base_dir: Option<PathBuf>,
}

impl<'a> Checker<'a> {
    pub(crate) fn new(file: &'a Path) -> Checker<'a> {
        Checker {
            file,
            base_dir: None,
        }
    }

    /// An `Invalid` error for `key`; `value` is already formatted as TOML.
    pub(crate) fn invalid(
        &self,
        key: &str,
        value: impl Into<String>,
        problem: impl Into<String>,
    ) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_path_buf(),
            key: key.to_owned(),
            value: value.into(),
            problem: problem.into(),
        }
    }

    /// A `Missing` error for `key`.
    pub(crate) fn missing(&self, key: &str, hint: &str) -> ConfigError {
        ConfigError::Missing {
            file: self.file.to_path_buf(),
            key: key.to_owned(),
            hint: hint.to_owned(),
        }
    }

    /// An integer with an optional default and inclusive bounds.
    pub(crate) fn int(
        &self,
        key: &str,
        raw: Option<u64>,
        default: u64,
        min: u64,
        max: Option<u64>,
        unit: Unit,
    ) -> Result<u64, ConfigError> {
        let value = raw.unwrap_or(default);
        let in_range = value >= min && max.is_none_or(|max| value <= max);
        if in_range {
            return Ok(value);
        }
        let problem = match max {
            Some(max) if min == 0 => format!("must be at most {}", unit.show(max)),
            Some(max) => format!("must be between {} and {}", unit.show(min), unit.show(max)),
            None => format!("must be at least {}", unit.show(min)),
        };
        Err(self.invalid(key, value.to_string(), problem))
    }

    /// As `int`, for values held in memory as `usize`.
    pub(crate) fn int_usize(
        &self,
        key: &str,
        raw: Option<u64>,
        default: u64,
        min: u64,
        max: Option<u64>,
        unit: Unit,
    ) -> Result<usize, ConfigError> {
        let value = self.int(key, raw, default, min, max, unit)?;
        usize::try_from(value).map_err(|_| {
            self.invalid(
                key,
                value.to_string(),
                format!("must be at most {} on this platform", usize::MAX),
            )
        })
    }

    /// Checks `low < high` (or `low <= high` when `!strict`) for two keys that are each already
    /// valid on their own. The error blames the key the operator wrote: `high`, unless `high`
    /// came from its default and `low` was written.
    pub(crate) fn ordered(
        &self,
        low: (&str, u64, bool),
        high: (&str, u64, bool),
        strict: bool,
    ) -> Result<(), ConfigError> {
        let (low_key, low_value, low_written) = low;
        let (high_key, high_value, high_written) = high;
        let holds = if strict {
            low_value < high_value
        } else {
            low_value <= high_value
        };
        if holds {
            return Ok(());
        }
        if low_written && !high_written {
            let relation = if strict { "less than" } else { "at most" };
            return Err(self.invalid(
                low_key,
                low_value.to_string(),
                format!("must be {relation} {high_key} ({high_value})"),
            ));
        }
        let relation = if strict { "greater than" } else { "at least" };
        Err(self.invalid(
            high_key,
            high_value.to_string(),
            format!("must be {relation} {low_key} ({low_value})"),
        ))
    }

    /// A socket address such as `127.0.0.1:9470` or `[::1]:9470`.
    pub(crate) fn socket_addr(
        &self,
        key: &str,
        raw: Option<&str>,
        default: SocketAddr,
    ) -> Result<SocketAddr, ConfigError> {
        let Some(text) = raw else {
            return Ok(default);
        };
        text.parse().map_err(|_| {
            self.invalid(
                key,
                quote(text),
                "must be an IP address and port, such as \"127.0.0.1:9470\" or \"[::1]:9470\" \
                 (host names are not resolved here)",
            )
        })
    }

    /// A path, resolved against the config file's directory if relative; `default` when absent
    /// (defaults are built from already resolved paths and are absolute).
    pub(crate) fn path(
        &mut self,
        key: &str,
        raw: Option<&Path>,
        default: impl FnOnce() -> PathBuf,
    ) -> Result<PathBuf, ConfigError> {
        match raw {
            Some(path) => self.resolve(key, path),
            None => Ok(default()),
        }
    }

    /// A required path, resolved against the config file's directory if relative.
    pub(crate) fn required_path(
        &mut self,
        key: &str,
        raw: Option<&Path>,
        hint: &str,
    ) -> Result<PathBuf, ConfigError> {
        match raw {
            Some(path) => self.resolve(key, path),
            None => Err(self.missing(key, hint)),
        }
    }

    /// Makes `path` absolute: unchanged if already absolute, else joined to the directory of the
    /// config file (the current directory if the file name has no directory part). `.`
    /// components are removed; `..` is kept, since symlinks make it meaningful.
    fn resolve(&mut self, key: &str, path: &Path) -> Result<PathBuf, ConfigError> {
        if path.as_os_str().is_empty() {
            return Err(self.invalid(key, "\"\"", "must not be empty"));
        }
        if path.is_absolute() {
            return self.absolute(path);
        }
        let base_dir = match &self.base_dir {
            Some(base_dir) => base_dir.clone(),
            None => {
                let parent = self
                    .file
                    .parent()
                    .filter(|parent| !parent.as_os_str().is_empty())
                    .unwrap_or(Path::new("."));
                let base_dir = self.absolute(parent)?;
                self.base_dir = Some(base_dir.clone());
                base_dir
            }
        };
        self.absolute(&base_dir.join(path))
    }

    fn absolute(&self, path: &Path) -> Result<PathBuf, ConfigError> {
        std::path::absolute(path).map_err(|source| ConfigError::CurrentDir {
            file: self.file.to_path_buf(),
            source,
        })
    }

    /// A `Synchronous` level from its config spelling.
    pub(crate) fn synchronous(
        &self,
        key: &str,
        raw: Option<&str>,
        default: Synchronous,
    ) -> Result<Synchronous, ConfigError> {
        let Some(text) = raw else {
            return Ok(default);
        };
        Synchronous::ALL
            .into_iter()
            .find(|level| level.as_str() == text)
            .ok_or_else(|| {
                self.invalid(
                    key,
                    quote(text),
                    "must be one of \"off\", \"normal\", \"full\", \"extra\" \
                     (\"full\" keeps every acknowledged commit across power loss)",
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes_are_named_when_whole() {
        assert_eq!(Unit::Bytes.show(MIB), "1 MiB (1048576)");
        assert_eq!(Unit::Bytes.show(64 * KIB), "64 KiB (65536)");
        assert_eq!(Unit::Bytes.show(GIB), "1 GiB (1073741824)");
        assert_eq!(Unit::Bytes.show(256), "256");
        assert_eq!(Unit::Bytes.show(0), "0");
        assert_eq!(Unit::Plain.show(MIB), "1048576");
    }

    #[test]
    fn strings_are_quoted_as_toml() {
        assert_eq!(quote("a\"b\\c\n"), r#""a\"b\\c\n""#);
    }

    #[test]
    fn synchronous_pragmas() {
        let pragmas: Vec<_> = Synchronous::ALL.iter().map(|s| s.as_pragma()).collect();
        assert_eq!(pragmas, ["OFF", "NORMAL", "FULL", "EXTRA"]);
    }

    #[test]
    fn relative_paths_without_directory_use_the_current_directory() {
        let mut checker = Checker::new(Path::new("agent.toml"));
        let path = checker
            .path("buffer.path", Some(Path::new("./b.sqlite")), PathBuf::new)
            .unwrap();
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(path, cwd.join("b.sqlite"));
    }
}
