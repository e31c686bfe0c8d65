//! The state file: the last good member set on disk, written atomically after each new live
//! set, read at start so a node that restarts while the API is down still knows its
//! apiservers.
//!
//! ```json
//! {"version":1,"source":"configmap","members":["10.0.0.11:6443","10.0.0.12:6443"]}
//! ```
//!
//! NOTE: the file is only a starting point. It carries no timestamp or resourceVersion that
//! could make it look newer than the live source: whatever the live source says next replaces
//! it (a stale list must never block fail-back).

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::members::{MemberSet, ParseOptions};

const VERSION: u32 = 1;

/// Largest state file read.
const MAX_BYTES: u64 = 1024 * 1024;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    /// The source the set came from, for people reading the file.
    source: String,
    /// Checked entry by entry again when read.
    members: MemberSet,
}

/// The saved set, if the file exists. A set that breaks today's rules (over `maxMembers`,
/// empty without `allowEmpty`) or a damaged file is an error: the caller ignores it.
pub async fn load(path: &Path, opts: &ParseOptions) -> anyhow::Result<Option<MemberSet>> {
    let (path, opts) = (path.to_path_buf(), opts.clone());
    tokio::task::spawn_blocking(move || load_blocking(&path, opts)).await.context("reading the state file")?
}

fn load_blocking(path: &Path, opts: ParseOptions) -> anyhow::Result<Option<MemberSet>> {
    use std::io::Read as _;
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
    };
    let mut text = String::new();
    file.take(MAX_BYTES + 1).read_to_string(&mut text).with_context(|| format!("reading {}", path.display()))?;
    anyhow::ensure!(text.len() as u64 <= MAX_BYTES, "{} is larger than {MAX_BYTES} bytes", path.display());
    let state: StateFile =
        serde_json::from_str(&text).with_context(|| format!("{} is not a member state file", path.display()))?;
    anyhow::ensure!(state.version == VERSION, "{} has version {}, not {VERSION}", path.display(), state.version);
    let set = state.members;
    anyhow::ensure!(
        set.len() <= opts.max_members,
        "{} holds {} members, more than maxMembers ({})",
        path.display(),
        set.len(),
        opts.max_members
    );
    anyhow::ensure!(!set.is_empty() || opts.allow_empty, "{} holds an empty set and allowEmpty is off", path.display());
    Ok(Some(set))
}

/// Writes the set atomically (temporary file, fsync, rename, fsync of the directory), creating
/// the directory when needed.
pub async fn save(path: &Path, set: &MemberSet, source: &str) -> anyhow::Result<()> {
    let state = StateFile { version: VERSION, source: source.to_owned(), members: set.clone() };
    let mut text = serde_json::to_vec(&state).context("encoding the member state")?;
    text.push(b'\n');
    let path: PathBuf = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        crate::fsutil::write_atomic(&path, &text, 0o644)
    })
    .await
    .context("writing the state file")?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("cpha-state-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[tokio::test]
    async fn round_trip_and_missing_file() {
        let d = dir("rt");
        let path = d.join("members.json");
        let opts = ParseOptions::default();
        assert_eq!(load(&path, &opts).await.unwrap(), None);
        let set: MemberSet = "cp1=10.0.0.11, [fd00::12]:7443".parse().unwrap();
        save(&path, &set, "configmap").await.unwrap();
        assert_eq!(load(&path, &opts).await.unwrap(), Some(set));
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            "{\"version\":1,\"source\":\"configmap\",\"members\":[\"cp1=10.0.0.11:6443\",\"[fd00::12]:7443\"]}\n"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[tokio::test]
    async fn refuses_damaged_or_out_of_rules_files() {
        let d = dir("bad");
        std::fs::create_dir_all(&d).unwrap();
        let path = d.join("members.json");
        let opts = ParseOptions { max_members: 1, ..ParseOptions::default() };
        let cases = [
            ("{\"version\":1,\"source\":\"x\",\"members\":[\"10.0.0.1\",\"10.0.0.2\"]}", "more than maxMembers"),
            ("{\"version\":1,\"source\":\"x\",\"members\":[]}", "empty set"),
            ("{\"version\":2,\"source\":\"x\",\"members\":[\"10.0.0.1\"]}", "version 2"),
            ("{\"version\":1,\"source\":\"x\",\"members\":[\"10.0.0.1\\nprogram\"]}", "not a member state file"),
            ("{\"version\":1,\"source\":\"x\",\"mem", "not a member state file"),
        ];
        for (text, want) in cases {
            std::fs::write(&path, text).unwrap();
            let err = format!("{:#}", load(&path, &opts).await.unwrap_err());
            assert!(err.contains(want), "{text}: {err}");
        }
        std::fs::remove_dir_all(&d).unwrap();
    }
}
