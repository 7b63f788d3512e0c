//! Window state on disk: one file in `data_dir` holding every window's open panes, watermark and
//! closing progress, written whole and atomically (a temp file, fsync, rename, fsync of the
//! directory), so a crash leaves either the previous file or the new one, never a mix. It owns
//! the file format; it must not decide what state means (that is [`super::state`]).
//!
//! Format: the 8 bytes `RNLWIN\0\0`, a little-endian `u32` format version, then postcard of
//! [`SavedFile`]. Postcard is not self-describing, so any change to the saved types bumps
//! [`FORMAT_VERSION`]; a file of another version is discarded with a log line, never guessed at.
//! Each window's entry carries its definition ([`WindowConfig::definition`]); state is restored
//! only into a window of the same name and definition.
//!
//! [`WindowConfig::definition`]: runnel_config::WindowConfig::definition

use std::io::Write as _;
use std::path::Path;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use super::Window;
use super::state::SavedState;

const MAGIC: &[u8; 8] = b"RNLWIN\0\0";
/// Version of the saved types; bump on any change to [`SavedFile`] or what it contains.
pub const FORMAT_VERSION: u32 = 1;
/// Largest state file read back: far above what `max_keys` and the distinct bound allow, so
/// only a foreign file hits it.
const MAX_FILE_BYTES: u64 = 2 * 1024 * 1024 * 1024;

#[derive(Debug, Serialize, Deserialize)]
struct SavedFile {
    windows: Vec<SavedWindow>,
}

#[derive(Debug, Serialize, Deserialize)]
struct SavedWindow {
    name: String,
    definition: String,
    state: SavedState,
}

/// Writes the state of every window when any of it changed since the last save.
pub(super) fn save(path: &Path, windows: &[Window]) -> anyhow::Result<()> {
    if path.exists() && !windows.iter().any(|window| window.lock().is_dirty()) {
        return Ok(());
    }
    let mut file = SavedFile {
        windows: Vec::with_capacity(windows.len()),
    };
    for window in windows {
        let mut state = window.lock();
        state.take_dirty();
        file.windows.push(SavedWindow {
            name: window.config.name.clone(),
            definition: window.config.definition(),
            state: state.save(),
        });
    }
    let result = write_atomically(path, &file);
    if result.is_err() {
        // Try again at the next save.
        for window in windows {
            window.lock().mark_dirty();
        }
    }
    result
}

fn write_atomically(path: &Path, file: &SavedFile) -> anyhow::Result<()> {
    let mut bytes = Vec::with_capacity(4096);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    let bytes = postcard::to_extend(file, bytes).context("encode window state")?;
    let temp = path.with_extension("state.tmp");
    let mut out =
        std::fs::File::create(&temp).with_context(|| format!("create {}", temp.display()))?;
    out.write_all(&bytes)
        .and_then(|()| out.sync_all())
        .with_context(|| format!("write {}", temp.display()))?;
    drop(out);
    std::fs::rename(&temp, path)
        .with_context(|| format!("rename {} to {}", temp.display(), path.display()))?;
    if let Some(dir) = path.parent() {
        // The rename is durable once the directory is.
        std::fs::File::open(dir)
            .and_then(|dir| dir.sync_all())
            .with_context(|| format!("sync directory {}", dir.display()))?;
    }
    Ok(())
}

/// Reads the saved file into the matching windows. Never fails: a missing file is a first
/// start, and a file that cannot be used is logged and ignored (the windows start empty).
pub(super) fn restore(path: &Path, windows: &[Window]) {
    let file = match read(path) {
        Ok(Some(file)) => file,
        Ok(None) => return,
        Err(error) => {
            tracing::warn!(
                path = %path.display(),
                error = format!("{error:#}"),
                "window state not restored; windows start empty"
            );
            return;
        }
    };
    for saved in file.windows {
        let Some(window) = windows.iter().find(|w| w.config.name == saved.name) else {
            tracing::info!(window = %saved.name, "saved state of a window no longer configured discarded");
            continue;
        };
        let definition = window.config.definition();
        if saved.definition != definition {
            tracing::warn!(
                window = %saved.name,
                saved = %saved.definition,
                now = %definition,
                "window definition changed since its state was saved; saved state discarded"
            );
            continue;
        }
        let mut state = window.lock();
        match state.restore(saved.state) {
            Ok(n_evicted) => {
                window.metrics.evictions.increment(n_evicted as u64);
                tracing::info!(
                    window = %saved.name,
                    n_keys = state.n_keys(),
                    n_evicted,
                    "window state restored"
                );
            }
            Err(problem) => tracing::warn!(
                window = %saved.name,
                %problem,
                "saved window state does not fit; discarded"
            ),
        }
    }
}

fn read(path: &Path) -> anyhow::Result<Option<SavedFile>> {
    let bytes = match std::fs::metadata(path) {
        Ok(metadata) if metadata.len() > MAX_FILE_BYTES => {
            anyhow::bail!(
                "{} is {} bytes, more than any state file",
                path.display(),
                metadata.len()
            )
        }
        Ok(_) => std::fs::read(path).with_context(|| format!("read {}", path.display()))?,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error).with_context(|| format!("stat {}", path.display())),
    };
    let Some(rest) = bytes.strip_prefix(MAGIC) else {
        anyhow::bail!("{} is not a window state file", path.display());
    };
    let (version, payload) = rest.split_at_checked(4).context("truncated header")?;
    let version = u32::from_le_bytes(version.try_into().expect("4 bytes"));
    anyhow::ensure!(
        version == FORMAT_VERSION,
        "format version {version}, this agent reads version {FORMAT_VERSION}"
    );
    let file = postcard::from_bytes(payload).context("decode window state")?;
    Ok(Some(file))
}
