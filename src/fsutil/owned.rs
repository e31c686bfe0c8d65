//! The files cpha owns beside the kernel forward (haproxy.cfg, keepalived.conf, the health file
//! keepalived tracks), watched and put back when someone else rewrites or removes them
//! (configuration management, an editor, a package's postinst).
//!
//! - **What is expected** is what cpha last wrote, or last found already in step: every commit
//!   of an owned path through [`crate::fsutil`] records its content and mode here
//!   ([`committed`]), under the same lock a repair holds, so a repair never puts back content
//!   older than cpha's own latest write. Paths become owned with [`own`] when the agent starts.
//! - **Noticing** ([`watch`]): one inotify descriptor on the directories holding them (a
//!   rename into place, a write closed, a removal), the changed file compared with what is
//!   expected 20 ms later (one read per burst of events). Nothing is polled but a read-back
//!   every 30 s (a full inotify queue, a directory replaced). cpha's own commits end in a rename
//!   of the expected content: compared, they are no drift.
//! - **Putting back** ([`repair`]): compared again under the lock, and when it still differs the
//!   expected content is written atomically with its mode. What follows (HAProxy back onto the
//!   file, only when the running worker loaded other content) is the agent's decision.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// One owned file: its `object` name (the `object` label of `cpha_repairs_total`) and what
/// cpha last wrote to it.
#[derive(Debug, Clone)]
struct Entry {
    object: &'static str,
    expected: Option<(Vec<u8>, u32)>,
}

static OWNED: Mutex<BTreeMap<PathBuf, Entry>> = Mutex::new(BTreeMap::new());

fn owned() -> std::sync::MutexGuard<'static, BTreeMap<PathBuf, Entry>> {
    OWNED.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Makes `path` an owned file named `object`; what cpha writes to it from now on is expected.
pub fn own(path: &Path, object: &'static str) {
    owned().entry(path.to_path_buf()).or_insert(Entry { object, expected: None }).object = object;
}

/// Whether `path` is owned (its commits are recorded).
pub fn is_owned(path: &Path) -> bool {
    owned().contains_key(path)
}

/// Runs `rename` (the commit of `contents` to `path`) under the lock and records the content
/// when it succeeded. Used by [`crate::fsutil::Candidate::commit`].
pub(crate) fn committed<T>(
    path: &Path,
    contents: &[u8],
    mode: u32,
    rename: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let mut map = owned();
    let result = rename()?;
    if let Some(entry) = map.get_mut(path) {
        entry.expected = Some((contents.to_vec(), mode));
    }
    Ok(result)
}

/// The file was found already saying `contents` (no write was needed): that is what is
/// expected from now on.
pub fn in_step(path: &Path, contents: &[u8], mode: u32) {
    if let Some(entry) = owned().get_mut(path) {
        entry.expected = Some((contents.to_vec(), mode));
    }
}

/// How the file at `path` differs from `expected`, in words; `None` when it does not.
fn differs(path: &Path, expected: &[u8]) -> Option<String> {
    match std::fs::read(path) {
        Ok(live) if live == expected => None,
        Ok(_) => Some(format!("{} was rewritten by someone else", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(format!("{} was removed", path.display())),
        Err(e) => Some(format!("{} cannot be read: {e}", path.display())),
    }
}

/// The owned files that differ from what cpha last wrote: `(object, why)`.
pub fn drifted() -> Vec<(&'static str, String)> {
    let map = owned().clone();
    map.iter()
        .filter_map(|(path, e)| {
            let (expected, _) = e.expected.as_ref()?;
            differs(path, expected).map(|why| (e.object, why))
        })
        .collect()
}

/// Puts `object`'s expected content back if it still differs; what differed (`None`: it was in
/// step by then, or nothing is expected yet).
pub fn repair(object: &str) -> Result<Option<String>, String> {
    let mut found = None;
    let map = owned();
    for (path, entry) in map.iter().filter(|(_, e)| e.object == object) {
        let Some((expected, mode)) = &entry.expected else { continue };
        let Some(why) = differs(path, expected) else { continue };
        // NOTE: written without recording (the content is the recorded one) and with the lock
        // held, so no commit of newer content can come in between the comparison and the write.
        crate::fsutil::Candidate::write_unrecorded(path, expected, *mode)
            .and_then(crate::fsutil::Candidate::commit)
            .map_err(|e| format!("{e:#}"))?;
        found = Some(why);
    }
    Ok(found)
}

/// What the watcher reports: an owned file differs from what cpha last wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileDrift {
    pub object: &'static str,
    pub why: String,
}

/// How long after an event the file is compared: an editor's save or a configuration tool's
/// write is a burst of events, read once.
const SETTLE: Duration = Duration::from_millis(20);

/// The read-back every owned file gets anyway.
const RESYNC: Duration = Duration::from_secs(30);

struct Fd(Inotify);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// Starts the watcher of the owned files' directories; it reports each drift on `reports`
/// (again at each new event or read-back while it lasts) until `stop`.
pub fn watch(reports: mpsc::Sender<FileDrift>, stop: CancellationToken) -> anyhow::Result<()> {
    let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
    let dirs: std::collections::BTreeSet<PathBuf> =
        owned().keys().filter_map(|p| p.parent().map(Path::to_path_buf)).collect();
    let flags = AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_ATTRIB;
    for dir in &dirs {
        if let Err(e) = inotify.add_watch(dir, flags) {
            tracing::warn!("not watching {} for changes by others ({e}): read back every 30 s only", dir.display());
        }
    }
    // NOTE: as in `forward::watch`: `AsyncFd::new` is deprecated for descriptors that may change
    // or close behind it; the inotify descriptor it owns cannot.
    #[allow(deprecated)]
    let fd = AsyncFd::new(Fd(inotify))?;
    tokio::spawn(run(fd, reports, stop));
    Ok(())
}

async fn run(fd: AsyncFd<Fd>, reports: mpsc::Sender<FileDrift>, stop: CancellationToken) {
    let mut resync = tokio::time::interval(RESYNC);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = resync.tick() => {}
            ready = fd.readable() => {
                let Ok(mut guard) = ready else { return };
                let names = owned().keys().filter_map(|p| p.file_name().map(ToOwned::to_owned)).collect::<Vec<_>>();
                let mut relevant = false;
                loop {
                    match guard.get_inner().0.read_events() {
                        Ok(events) => {
                            relevant |= events.iter().any(|e| {
                                e.mask.contains(AddWatchFlags::IN_Q_OVERFLOW)
                                    || e.name.as_ref().is_some_and(|n| names.contains(n))
                            })
                        }
                        Err(nix::errno::Errno::EAGAIN) => break,
                        Err(e) => {
                            tracing::warn!("reading inotify events: {e}");
                            break;
                        }
                    }
                }
                guard.clear_ready();
                if !relevant {
                    continue;
                }
                tokio::time::sleep(SETTLE).await;
            }
        }
        let found = tokio::task::spawn_blocking(drifted).await.unwrap_or_default();
        for (object, why) in found {
            if reports.send(FileDrift { object, why }).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_rewritten_or_removed_owned_file_is_reported_and_put_back_and_own_writes_are_not() {
        let dir = crate::fsutil::PrivateDir::new("cpha-owned-test").unwrap();
        let path = dir.path().join("haproxy.cfg");
        let other = dir.path().join("other.cfg");
        own(&path, "haproxy.cfg");
        crate::fsutil::write_atomic(&path, b"cpha's\n", 0o640).unwrap();
        let (tx, mut rx) = mpsc::channel(8);
        let stop = CancellationToken::new();
        watch(tx, stop.clone()).unwrap();
        // cpha's own write and a file that is not owned: nothing to report.
        crate::fsutil::write_atomic(&path, b"cpha's, newer\n", 0o640).unwrap();
        std::fs::write(&other, "not cpha's\n").unwrap();
        let quiet = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await;
        assert!(quiet.is_err(), "{quiet:?}");
        std::fs::write(&path, "someone else's\n").unwrap();
        let drift = tokio::time::timeout(Duration::from_secs(2), rx.recv()).await.unwrap().unwrap();
        assert_eq!(drift.object, "haproxy.cfg");
        assert!(drift.why.contains("rewritten"), "{drift:?}");
        assert_eq!(repair("haproxy.cfg").unwrap(), Some(drift.why));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "cpha's, newer\n");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o640);
        assert_eq!(repair("haproxy.cfg").unwrap(), None, "in step again");
        while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(100), rx.recv()).await {}
        std::fs::remove_file(&path).unwrap();
        let drift = tokio::time::timeout(Duration::from_secs(2), rx.recv()).await.unwrap().unwrap();
        assert!(drift.why.contains("removed"), "{drift:?}");
        assert!(repair("haproxy.cfg").unwrap().is_some());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "cpha's, newer\n");
        assert_eq!(std::fs::read_to_string(&other).unwrap(), "not cpha's\n", "not owned, left alone");
        stop.cancel();
        owned().remove(&path);
    }
}
