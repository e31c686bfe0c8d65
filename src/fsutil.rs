//! Files cpha writes (haproxy.cfg, the member state file) are replaced atomically: a temporary
//! file in the same directory, fsync, an optional validation of the candidate, rename over the
//! live file, fsync of the directory. The live file is never truncated or half-written.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;

/// A candidate file written next to its destination, removed on drop unless committed.
pub struct Candidate {
    path: PathBuf,
    dest: PathBuf,
    committed: bool,
}

impl Candidate {
    /// Writes `contents` to a temporary file beside `dest` with `mode`, and fsyncs it.
    pub fn write(dest: &Path, contents: &[u8], mode: u32) -> anyhow::Result<Candidate> {
        let dir = parent(dest);
        let name = dest.file_name().context("destination has no file name")?.to_string_lossy();
        let path = dir.join(format!(".{name}.cpha-{}.tmp", std::process::id()));
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        let candidate = Candidate { path, dest: dest.to_path_buf(), committed: false };
        file.write_all(contents).with_context(|| format!("writing {}", candidate.path.display()))?;
        // The mode given to open() is masked by the umask; set it exactly.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.sync_all().with_context(|| format!("syncing {}", candidate.path.display()))?;
        Ok(candidate)
    }

    /// Where the candidate is, for validating it (e.g. `haproxy -c -f PATH`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Renames the candidate over the destination and syncs the directory.
    pub fn commit(mut self) -> anyhow::Result<()> {
        fs::rename(&self.path, &self.dest)
            .with_context(|| format!("renaming {} to {}", self.path.display(), self.dest.display()))?;
        self.committed = true;
        File::open(parent(&self.dest))
            .and_then(|d| d.sync_all())
            .with_context(|| format!("syncing directory of {}", self.dest.display()))?;
        Ok(())
    }
}

impl Drop for Candidate {
    fn drop(&mut self) {
        if !self.committed {
            // A candidate that failed validation is not worth keeping; a missing one is fine.
            let _ = fs::remove_file(&self.path);
        }
    }
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Writes `contents` to `dest` atomically.
pub fn write_atomic(dest: &Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    Candidate::write(dest, contents, mode)?.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_atomically_and_cleans_up_rejected_candidates() {
        let dir = std::env::temp_dir().join(format!("cpha-fsutil-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let dest = dir.join("haproxy.cfg");
        write_atomic(&dest, b"one\n", 0o640).unwrap();
        assert_eq!(fs::read_to_string(&dest).unwrap(), "one\n");
        assert_eq!(fs::metadata(&dest).unwrap().permissions().mode() & 0o777, 0o640);
        let rejected = Candidate::write(&dest, b"two\n", 0o640).unwrap();
        let tmp = rejected.path().to_path_buf();
        assert!(tmp.exists());
        drop(rejected);
        assert!(!tmp.exists(), "a dropped candidate is removed");
        assert_eq!(fs::read_to_string(&dest).unwrap(), "one\n", "the live file is untouched");
        fs::remove_dir_all(&dir).unwrap();
    }
}
