//! A disk that fills up: [`SmallDisk`], a tmpfs of a fixed size for the agent's buffer, filled
//! with a ballast file on the test's command and freed by removing it.
//!
//! It needs root and the capability to mount; [`SmallDisk::can_mount`] says whether this process
//! has them, so a scenario can say that it skips instead of failing.

use anyhow::Context;

/// A tmpfs of a fixed size mounted on a directory of the test (root only), unmounted (lazily,
/// in case a killed process still holds a file) when dropped.
pub struct SmallDisk {
    path: std::path::PathBuf,
}

impl SmallDisk {
    /// Whether this process may mount a tmpfs (root with the capability to mount: not every
    /// container grants it); the error says why not. Tries it on a temporary directory.
    pub fn can_mount() -> Result<(), String> {
        let is_root = std::process::Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|output| String::from_utf8_lossy(&output.stdout).trim() == "0");
        if !is_root {
            return Err("not root".to_owned());
        }
        let dir = tempfile::Builder::new()
            .prefix("runnel-mount-check-")
            .tempdir()
            .map_err(|error| format!("create a temp dir: {error}"))?;
        let disk = SmallDisk::mount(dir.path(), 1 << 20).map_err(|error| format!("{error:#}"))?;
        drop(disk);
        Ok(())
    }

    /// Mounts a tmpfs of `size_bytes` on `path` (created).
    pub fn mount(path: &std::path::Path, size_bytes: u64) -> anyhow::Result<SmallDisk> {
        std::fs::create_dir_all(path).with_context(|| format!("create {}", path.display()))?;
        let output = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_bytes}"), "tmpfs"])
            .arg(path)
            .output()
            .context("run mount")?;
        anyhow::ensure!(
            output.status.success(),
            "mount -t tmpfs on {}: {} {}",
            path.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(SmallDisk {
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Writes a ballast file until the filesystem is full, then shrinks it so `headroom_bytes`
    /// remain free. Returns the ballast's path and size.
    pub fn fill(&self, headroom_bytes: u64) -> anyhow::Result<(std::path::PathBuf, u64)> {
        use std::io::Write as _;
        let path = self.path.join("ballast");
        let mut file =
            std::fs::File::create(&path).with_context(|| format!("create {}", path.display()))?;
        let chunk = vec![0xA5u8; 64 * 1024];
        let mut n_bytes = 0u64;
        loop {
            match file.write(&chunk) {
                Ok(0) => break,
                Ok(n) => n_bytes += n as u64,
                Err(error) if error.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(error) => {
                    return Err(error).with_context(|| format!("write {}", path.display()));
                }
            }
        }
        let size = n_bytes.saturating_sub(headroom_bytes);
        file.set_len(size)
            .with_context(|| format!("shrink {}", path.display()))?;
        file.sync_all().ok();
        Ok((path, size))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}
