//! Files cpha writes as root (haproxy.cfg, keepalived.conf, the health file, the member state
//! file, the token) are replaced atomically, and never through a path another user prepared.
//!
//! - The directory is checked first ([`check_dir`]): it and every directory above it must be
//!   owned by root (or cpha's own user) and writable by no one else, except sticky directories
//!   above it (`/tmp`). A directory that fails is refused with its path, owner and mode, unless
//!   the operator listed it on purpose ([`trust_shared_dirs`], `agent.trustSharedDirectories`).
//! - The candidate is created in that directory, through the directory's descriptor, under an
//!   unpredictable name with `O_CREAT|O_EXCL|O_NOFOLLOW` and its final mode: nothing that
//!   existed before (a symlink, a hard link, a file) is ever opened, and a file holding a secret
//!   is never readable by others, not even for a moment.
//! - fsync, an optional validation of the candidate (`haproxy -c`), rename over the live file,
//!   fsync of the directory. The live file is never truncated or half-written.
//! - A candidate left behind by a killed cpha (its pid is in the name) is removed the next time
//!   the same file is written.

pub mod owned;

use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use anyhow::Context;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

/// Directories the operator declared shared on purpose (the DaemonSet's emptyDir volumes, 0777
/// and shared only by the pod's own containers): their own owner and mode are not checked.
static TRUSTED: RwLock<Vec<PathBuf>> = RwLock::new(Vec::new());

/// Declares `dirs` as shared on purpose; replaces any earlier declaration.
pub fn trust_shared_dirs(dirs: &[PathBuf]) {
    let canonical = dirs.iter().map(|d| fs::canonicalize(d).unwrap_or_else(|_| d.clone())).collect();
    *TRUSTED.write().expect("trusted directories lock") = canonical;
}

/// Why a directory is not a safe place for cpha's files.
#[derive(Debug, thiserror::Error)]
#[error(
    "{} is {reason} (owner uid {uid}, group gid {gid}, mode {mode:04o}): another user could replace what cpha \
     writes there. Make it root-owned and not group- or world-writable, or, if it is shared on purpose, list it \
     under agent.trustSharedDirectories",
    path.display()
)]
pub struct UnsafeDir {
    pub path: PathBuf,
    pub reason: &'static str,
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
}

/// Checks that no one but root (or cpha's own user) can change `dir` or any directory above it.
/// Returns the canonical path, which contains no symlink.
pub fn check_dir(dir: &Path) -> anyhow::Result<PathBuf> {
    check_tree(dir, false)
}

/// [`check_dir`]; with `sticky_ok`, `dir` itself may be a sticky directory (`/tmp`), for
/// creating a private directory in it.
fn check_tree(dir: &Path, sticky_ok: bool) -> anyhow::Result<PathBuf> {
    let canonical = fs::canonicalize(dir).with_context(|| format!("resolving {}", dir.display()))?;
    let trusted = TRUSTED.read().expect("trusted directories lock").contains(&canonical);
    let euid = nix::unistd::geteuid().as_raw();
    for (depth, ancestor) in canonical.ancestors().enumerate() {
        let meta = fs::symlink_metadata(ancestor).with_context(|| format!("reading {}", ancestor.display()))?;
        let last = depth == 0 && !sticky_ok;
        if depth == 0 && trusted {
            continue;
        }
        let mode = meta.mode() & 0o7777;
        let unsafe_dir =
            |reason| UnsafeDir { path: ancestor.to_path_buf(), reason, uid: meta.uid(), gid: meta.gid(), mode };
        if !meta.is_dir() {
            return Err(unsafe_dir("not a directory").into());
        }
        if meta.uid() != 0 && meta.uid() != euid {
            return Err(unsafe_dir("owned by another user").into());
        }
        // NOTE: a sticky directory (`/tmp`) lets others add entries but not rename or remove
        // ours, so it is fine above the directory cpha writes in, never as that directory.
        let sticky = mode & 0o1000 != 0;
        if mode & 0o002 != 0 && (last || !sticky) {
            return Err(unsafe_dir("world-writable").into());
        }
        if mode & 0o020 != 0 && meta.gid() != 0 && (last || !sticky) {
            return Err(unsafe_dir("writable by a group other than root").into());
        }
    }
    Ok(canonical)
}

/// A directory checked by [`check_dir`], held open so every later step happens in the same one.
struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

impl Dir {
    fn open(dir: &Path) -> anyhow::Result<Dir> {
        let path = check_dir(dir)?;
        let raw = nix::fcntl::open(
            &path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: open returned a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(Dir { fd, path })
    }

    fn sync(&self) -> std::io::Result<()> {
        nix::unistd::fsync(self.raw()).map_err(std::io::Error::from)
    }

    fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// A candidate file written next to its destination, removed on drop unless committed.
pub struct Candidate {
    dir: Dir,
    name: OsString,
    dest_name: OsString,
    dest: PathBuf,
    path: PathBuf,
    committed: bool,
    /// The content and mode, kept for [`crate::fsutil::owned`] when `dest` is a file cpha watches.
    record: Option<(Vec<u8>, u32)>,
}

impl Candidate {
    /// Writes `contents` to a new temporary file beside `dest` with exactly `mode`, and fsyncs it.
    pub fn write(dest: &Path, contents: &[u8], mode: u32) -> anyhow::Result<Candidate> {
        let record = crate::fsutil::owned::is_owned(dest).then(|| (contents.to_vec(), mode));
        Candidate::write_recording(dest, contents, mode, record)
    }

    /// [`Candidate::write`] of a candidate whose commit records nothing ([`crate::fsutil::owned`] puts
    /// back the content it recorded, holding its lock).
    pub(crate) fn write_unrecorded(dest: &Path, contents: &[u8], mode: u32) -> anyhow::Result<Candidate> {
        Candidate::write_recording(dest, contents, mode, None)
    }

    fn write_recording(
        dest: &Path,
        contents: &[u8],
        mode: u32,
        record: Option<(Vec<u8>, u32)>,
    ) -> anyhow::Result<Candidate> {
        let dest_name = dest.file_name().context("destination has no file name")?.to_os_string();
        let dir = Dir::open(parent(dest)).with_context(|| format!("refusing to write {}", dest.display()))?;
        remove_stale(&dir, &dest_name);
        let (file, name) = create_exclusive(&dir, &dest_name, mode)?;
        let path = dir.path.join(&name);
        let candidate = Candidate { dir, name, dest_name, dest: dest.to_path_buf(), path, committed: false, record };
        let mut file = file;
        file.write_all(contents).with_context(|| format!("writing {}", candidate.path.display()))?;
        // The mode given to open() is masked by the umask (so never wider than `mode`); set it
        // exactly, through the descriptor of the file this call created.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.sync_all().with_context(|| format!("syncing {}", candidate.path.display()))?;
        Ok(candidate)
    }

    /// Where the candidate is, for validating it (e.g. `haproxy -c -f PATH`). Its directory is
    /// one no one else can write, so the file checked is the file committed.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Renames the candidate over the destination and syncs the directory. For a file cpha
    /// watches, its content becomes what is expected there ([`crate::fsutil::owned`]).
    pub fn commit(mut self) -> anyhow::Result<()> {
        match self.record.take() {
            Some((contents, mode)) => {
                let dest = self.dest.clone();
                crate::fsutil::owned::committed(&dest, &contents, mode, || self.commit_unrecorded())
            }
            None => self.commit_unrecorded(),
        }
    }

    fn commit_unrecorded(mut self) -> anyhow::Result<()> {
        let fd = self.dir.raw();
        nix::fcntl::renameat(Some(fd), self.name.as_os_str(), Some(fd), self.dest_name.as_os_str())
            .with_context(|| format!("renaming {} to {}", self.path.display(), self.dest.display()))?;
        self.committed = true;
        self.dir.sync().with_context(|| format!("syncing directory of {}", self.dest.display()))?;
        Ok(())
    }
}

impl Drop for Candidate {
    fn drop(&mut self) {
        if !self.committed {
            // A candidate that failed validation is not worth keeping; a missing one is fine.
            let _ = nix::unistd::unlinkat(
                Some(self.dir.raw()),
                self.name.as_os_str(),
                nix::unistd::UnlinkatFlags::NoRemoveDir,
            );
        }
    }
}

/// The prefix of every candidate for `dest_name`: `.NAME.cpha-PID-RANDOM.tmp`.
fn candidate_prefix(dest_name: &OsStr) -> Vec<u8> {
    let mut prefix = b".".to_vec();
    prefix.extend_from_slice(dest_name.as_bytes());
    prefix.extend_from_slice(b".cpha-");
    prefix
}

/// Creates a new file under an unpredictable name in `dir`; never opens anything that existed.
fn create_exclusive(dir: &Dir, dest_name: &OsStr, mode: u32) -> anyhow::Result<(File, OsString)> {
    let prefix = candidate_prefix(dest_name);
    for _ in 0..8 {
        let mut random = [0u8; 8];
        getrandom::getrandom(&mut random).context("reading random bytes for a temporary name")?;
        let mut name = prefix.clone();
        name.extend_from_slice(format!("{}-{:016x}.tmp", std::process::id(), u64::from_ne_bytes(random)).as_bytes());
        let name = OsString::from(std::ffi::OsStr::from_bytes(&name));
        let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        match nix::fcntl::openat(Some(dir.raw()), name.as_os_str(), flags, Mode::from_bits_truncate(mode)) {
            // SAFETY: openat returned a new descriptor that nothing else owns.
            Ok(raw) => return Ok((unsafe { File::from_raw_fd(raw) }, name)),
            Err(nix::errno::Errno::EEXIST) => continue,
            Err(e) => return Err(e).with_context(|| format!("creating a temporary file in {}", dir.path.display())),
        }
    }
    anyhow::bail!("creating a temporary file in {}: every name tried exists", dir.path.display())
}

/// Removes candidates for `dest_name` that a cpha process which no longer runs left behind.
fn remove_stale(dir: &Dir, dest_name: &OsStr) {
    let prefix = candidate_prefix(dest_name);
    let Ok(entries) = fs::read_dir(&dir.path) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let bytes = name.as_bytes();
        let Some(rest) = bytes.strip_prefix(prefix.as_slice()) else { continue };
        if !rest.ends_with(b".tmp") {
            continue;
        }
        let digits: Vec<u8> = rest.iter().copied().take_while(u8::is_ascii_digit).collect();
        let Some(pid) = std::str::from_utf8(&digits).ok().and_then(|d| d.parse::<u32>().ok()) else { continue };
        if pid == std::process::id() || Path::new("/proc").join(pid.to_string()).exists() {
            continue;
        }
        match nix::unistd::unlinkat(Some(dir.raw()), name.as_os_str(), nix::unistd::UnlinkatFlags::NoRemoveDir) {
            Ok(()) => tracing::info!(
                "removed {}, left by an interrupted write of cpha process {pid}",
                dir.path.join(&name).display()
            ),
            Err(e) => tracing::warn!("cannot remove {}: {e}", dir.path.join(&name).display()),
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

/// A new private directory (mode 0700, a random name) under the system's temporary directory,
/// removed with everything in it on drop. `haproxy -c` and `keepalived --config-test` of
/// `cpha check-config` run on files in it, which no other user can read, replace or swap.
pub struct PrivateDir {
    path: PathBuf,
}

impl PrivateDir {
    pub fn new(prefix: &str) -> anyhow::Result<PrivateDir> {
        let base = std::env::temp_dir();
        let base = check_tree(&base, true)
            .with_context(|| format!("refusing {} as the temporary directory", base.display()))?;
        let path = nix::unistd::mkdtemp(&base.join(format!("{prefix}XXXXXXXX")))
            .with_context(|| format!("creating a private directory in {}", base.display()))?;
        Ok(PrivateDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes a new file in the directory (`O_EXCL|O_NOFOLLOW`, mode 0600) and returns its path.
    pub fn write(&self, name: &str, contents: &[u8]) -> anyhow::Result<PathBuf> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.path.join(name);
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        file.write_all(contents).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.path) {
            tracing::warn!("cannot remove {}: {e}", self.path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn scratch(tag: &str) -> crate::testutil::TempDir {
        crate::testutil::TempDir::new(&format!("fsutil-{tag}"))
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> =
            fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }

    #[test]
    fn replaces_atomically_and_cleans_up_rejected_candidates() {
        let dir = scratch("atomic");
        let dest = dir.path().join("haproxy.cfg");
        write_atomic(&dest, b"one\n", 0o640).unwrap();
        assert_eq!(fs::read_to_string(&dest).unwrap(), "one\n");
        assert_eq!(fs::metadata(&dest).unwrap().permissions().mode() & 0o777, 0o640);
        let rejected = Candidate::write(&dest, b"two\n", 0o640).unwrap();
        let tmp = rejected.path().to_path_buf();
        assert!(tmp.exists());
        drop(rejected);
        assert!(!tmp.exists(), "a dropped candidate is removed");
        assert_eq!(fs::read_to_string(&dest).unwrap(), "one\n", "the live file is untouched");
        assert_eq!(names(dir.path()), ["haproxy.cfg"]);
    }

    #[test]
    fn candidate_names_are_new_and_unpredictable() {
        let dir = scratch("names");
        let dest = dir.path().join("f");
        let a = Candidate::write(&dest, b"a", 0o600).unwrap();
        let b = Candidate::write(&dest, b"b", 0o600).unwrap();
        assert_ne!(a.path(), b.path());
        let name = a.path().file_name().unwrap().to_string_lossy().into_owned();
        let pid = std::process::id().to_string();
        assert!(name.starts_with(&format!(".f.cpha-{pid}-")) && name.ends_with(".tmp"), "{name}");
        assert_eq!(name.len(), format!(".f.cpha-{pid}-").len() + 16 + 4, "{name}");
    }

    #[test]
    fn a_symlink_in_place_of_the_live_file_is_replaced_not_followed() {
        let dir = scratch("symlink");
        let victim = dir.path().join("victim");
        fs::write(&victim, "root only\n").unwrap();
        fs::set_permissions(&victim, fs::Permissions::from_mode(0o600)).unwrap();
        let dest = dir.path().join("haproxy.cfg");
        symlink(&victim, &dest).unwrap();
        write_atomic(&dest, b"new\n", 0o644).unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "root only\n");
        assert_eq!(fs::metadata(&victim).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(!fs::symlink_metadata(&dest).unwrap().file_type().is_symlink());
        assert_eq!(fs::read_to_string(&dest).unwrap(), "new\n");
    }

    #[test]
    fn a_secret_is_never_wider_than_its_mode() {
        let dir = scratch("secret");
        let dest = dir.path().join("token");
        let candidate = Candidate::write(&dest, b"secret\n", 0o600).unwrap();
        assert_eq!(fs::metadata(candidate.path()).unwrap().permissions().mode() & 0o777, 0o600);
        candidate.commit().unwrap();
        assert_eq!(fs::metadata(&dest).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn shared_directories_are_refused_with_their_mode() {
        let dir = scratch("shared");
        let shared = dir.path().join("shared");
        fs::create_dir(&shared).unwrap();
        fs::set_permissions(&shared, fs::Permissions::from_mode(0o777)).unwrap();
        let err = write_atomic(&shared.join("haproxy.cfg"), b"x", 0o644).unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("world-writable") && text.contains("mode 0777"), "{text}");
        assert!(text.contains(&shared.display().to_string()), "{text}");
        assert!(names(&shared).is_empty(), "nothing was written: {:?}", names(&shared));

        // Group-writable by a group other than root, and owned by someone else.
        fs::set_permissions(&shared, fs::Permissions::from_mode(0o775)).unwrap();
        nix::unistd::chown(&shared, None, Some(nix::unistd::Gid::from_raw(65534))).unwrap();
        let text = format!("{:#}", check_dir(&shared).unwrap_err());
        assert!(text.contains("writable by a group other than root"), "{text}");
        fs::set_permissions(&shared, fs::Permissions::from_mode(0o755)).unwrap();
        nix::unistd::chown(&shared, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
        let text = format!("{:#}", check_dir(&shared).unwrap_err());
        assert!(text.contains("owned by another user") && text.contains("uid 65534"), "{text}");

        // A world-writable directory above, without the sticky bit, is refused too.
        let inner = shared.join("inner");
        nix::unistd::chown(&shared, Some(nix::unistd::Uid::from_raw(0)), None).unwrap();
        fs::create_dir(&inner).unwrap();
        fs::set_permissions(&shared, fs::Permissions::from_mode(0o777)).unwrap();
        let text = format!("{:#}", check_dir(&inner).unwrap_err());
        assert!(text.contains(&format!("{} is world-writable", shared.display())), "{text}");
        // With the sticky bit (as /tmp), others cannot move what is inside: allowed above.
        fs::set_permissions(&shared, fs::Permissions::from_mode(0o1777)).unwrap();
        check_dir(&inner).unwrap();
        let text = format!("{:#}", check_dir(&shared).unwrap_err());
        assert!(text.contains("world-writable"), "never as the directory written in: {text}");
    }

    #[test]
    fn a_directory_shared_on_purpose_is_accepted() {
        let dir = scratch("trusted");
        let shared = dir.path().join("emptydir");
        fs::create_dir(&shared).unwrap();
        fs::set_permissions(&shared, fs::Permissions::from_mode(0o777)).unwrap();
        let err = check_dir(&shared).unwrap_err();
        assert!(format!("{err:#}").contains("agent.trustSharedDirectories"), "{err:#}");
        trust_shared_dirs(std::slice::from_ref(&shared));
        let written = write_atomic(&shared.join("keepalived.conf"), b"x", 0o644);
        trust_shared_dirs(&[]);
        written.unwrap();
        let text = format!("{:#}", check_dir(&shared).unwrap_err());
        assert!(text.contains("world-writable"), "no longer trusted: {text}");
    }

    #[test]
    fn leftovers_of_a_killed_writer_are_removed() {
        let dir = scratch("stale");
        let dest = dir.path().join("haproxy.cfg");
        // pid 2^22 + 1 is above the kernel's pid_max limit: no process has it.
        let dead = dir.path().join(".haproxy.cfg.cpha-4194305-0123456789abcdef.tmp");
        let old_format = dir.path().join(".haproxy.cfg.cpha-4194305.tmp");
        let live = dir.path().join(format!(".haproxy.cfg.cpha-{}-0000000000000000.tmp", std::process::id()));
        let other = dir.path().join(".keepalived.conf.cpha-4194305-0123456789abcdef.tmp");
        for p in [&dead, &old_format, &live, &other] {
            fs::write(p, "x").unwrap();
        }
        write_atomic(&dest, b"cfg\n", 0o644).unwrap();
        assert!(!dead.exists() && !old_format.exists(), "{:?}", names(dir.path()));
        assert!(live.exists(), "a running process's candidate is left alone");
        assert!(other.exists(), "only this file's candidates are looked at");
    }

    #[test]
    fn private_directories_are_fresh_and_private() {
        let a = PrivateDir::new("cpha-test-").unwrap();
        let b = PrivateDir::new("cpha-test-").unwrap();
        assert_ne!(a.path(), b.path());
        let meta = fs::metadata(a.path()).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o700);
        let f = a.write("haproxy.cfg", b"x").unwrap();
        assert_eq!(fs::metadata(&f).unwrap().permissions().mode() & 0o777, 0o600);
        let again = a.write("haproxy.cfg", b"y").unwrap_err();
        assert!(format!("{again:#}").contains("File exists"), "{again:#}");
        let path = a.path().to_path_buf();
        drop(a);
        assert!(!path.exists());
    }
}
