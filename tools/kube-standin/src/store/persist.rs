//! `--state FILE`: the objects and the revision counter, written atomically (temp file in the
//! same directory, fsync, rename, fsync of the directory) after every committed change, and
//! read back at start so that a restarted stand-in continues at the same revision.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::resources::Kind;

#[derive(Debug, Serialize, Deserialize)]
pub struct StateFile {
    #[serde(rename = "resourceVersion")]
    pub resource_version: u64,
    pub objects: Vec<Value>,
}

/// The state taken under the store lock.
pub struct Snapshot {
    rv: u64,
    body: Vec<u8>,
}

pub(super) fn snapshot(inner: &super::Inner) -> Snapshot {
    let state =
        StateFile { resource_version: inner.rv, objects: inner.objects.values().map(|v| v.as_ref().clone()).collect() };
    Snapshot { rv: inner.rv, body: serde_json::to_vec_pretty(&state).unwrap_or_default() }
}

pub fn kind_of(obj: &Value) -> anyhow::Result<Kind> {
    let av = obj["apiVersion"].as_str().unwrap_or_default();
    let k = obj["kind"].as_str().unwrap_or_default();
    Kind::ALL
        .into_iter()
        .find(|x| x.api_version() == av && x.name() == k)
        .with_context(|| format!("object of unknown kind {av}/{k}"))
}

pub struct Persister {
    path: PathBuf,
    /// The newest revision written, so that a slower writer never replaces newer state.
    written: Arc<tokio::sync::Mutex<u64>>,
}

impl Persister {
    pub fn new(path: PathBuf) -> Self {
        Self { path, written: Arc::new(tokio::sync::Mutex::new(0)) }
    }

    pub async fn save(&self, snap: Snapshot) -> anyhow::Result<()> {
        let mut written = self.written.lock().await;
        if snap.rv <= *written {
            return Ok(());
        }
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || write_atomic(&path, &snap.body))
            .await
            .context("state writer panicked")??;
        *written = snap.rv;
        Ok(())
    }
}

pub fn load(path: &Path) -> anyhow::Result<Option<StateFile>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let state: StateFile = serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))?;
    for o in &state.objects {
        kind_of(o)?;
        let rv = super::object_rv(o);
        if rv == 0 || rv > state.resource_version {
            bail!(
                "{}: object {:?} has resourceVersion {rv} outside 1..={}",
                path.display(),
                o["metadata"]["name"],
                state.resource_version
            );
        }
    }
    Ok(Some(state))
}

pub fn write_atomic(path: &Path, body: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().context("state path has no file name")?.to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        let mut f = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(body).and_then(|()| f.sync_all()).with_context(|| format!("writing {}", tmp.display()))?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("syncing {}", dir.display()))?;
    Ok(())
}
