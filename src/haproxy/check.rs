//! `haproxy -c`: a candidate file is validated by HAProxy itself before it replaces the live one.

use std::path::{Path, PathBuf};

use super::settings::HaproxySettings;
use crate::exec::{self, ExecError};
use crate::fsutil::Candidate;

/// Mode of haproxy.cfg: it may hold the stats password (and whatever a custom template puts
/// there), and only HAProxy's master, which runs as root, reads it. `cpha render` prints it.
pub const CONFIG_MODE: u32 = 0o600;

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("HAProxy refuses the configuration {}: {output}", path.display())]
    Refused { path: PathBuf, output: String },
    #[error("cannot write the candidate configuration for {}: {message}", path.display())]
    Write { path: PathBuf, message: String },
    #[error("cannot run haproxy -c: {0}")]
    Exec(ExecError),
}

/// Runs `haproxy -c -f path` (blocking).
pub fn check(settings: &HaproxySettings, path: &Path) -> Result<(), CheckError> {
    let program = settings.binary.to_string_lossy().into_owned();
    let args = [std::ffi::OsStr::new("-c"), std::ffi::OsStr::new("-f"), path.as_os_str()];
    match exec::run(&program, &args, None) {
        Ok(_) => Ok(()),
        Err(ExecError::Failed { stderr, status, .. }) => {
            // Exit status 2 ("no listener") prints its reason on stdout, so keep the status too.
            let output = format!("{} ({status})", super::runtime::printable(&stderr, 2000));
            Err(CheckError::Refused { path: path.to_path_buf(), output: output.trim_start().to_string() })
        }
        Err(e) => Err(CheckError::Exec(e)),
    }
}

/// Writes `text` as a candidate beside `dest` and validates it; the caller commits it.
pub fn candidate(settings: &HaproxySettings, dest: &Path, text: &str) -> Result<Candidate, CheckError> {
    if let Some(dir) = dest.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| CheckError::Write {
            path: dest.to_path_buf(),
            message: format!("creating {}: {e}", dir.display()),
        })?;
    }
    let candidate = Candidate::write(dest, text.as_bytes(), CONFIG_MODE)
        .map_err(|e| CheckError::Write { path: dest.to_path_buf(), message: format!("{e:#}") })?;
    check(settings, candidate.path())?;
    Ok(candidate)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Removes the test's directory even when an assertion fails.
    struct TempDir(PathBuf);

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn a_refused_candidate_is_reported_and_removed() {
        let guard = TempDir(std::env::temp_dir().join(format!("cpha-check-{}", std::process::id())));
        let dir = guard.0.clone();
        std::fs::create_dir_all(&dir).unwrap();
        let dest = dir.join("haproxy.cfg");
        std::fs::write(&dest, "live\n").unwrap();
        let settings = HaproxySettings::default();
        let Err(e) = candidate(&settings, &dest, "global\n    bogus_keyword 1\n") else { panic!("accepted") };
        match &e {
            CheckError::Refused { output, .. } => assert!(output.contains("bogus_keyword"), "{output}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(std::fs::read_to_string(&dest).unwrap(), "live\n");
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, [std::ffi::OsString::from("haproxy.cfg")], "the candidate is gone");

        let valid = "defaults\n    mode tcp\nfrontend fe\n    bind 127.0.0.1:17999\n";
        let Ok(ok) = candidate(&settings, &dest, valid) else { panic!("refused") };
        ok.commit().unwrap();
        assert_eq!(std::fs::read_to_string(&dest).unwrap(), valid);
    }

    #[test]
    fn a_missing_binary_is_an_exec_error() {
        let settings = HaproxySettings { binary: "/nonexistent/haproxy".into(), ..HaproxySettings::default() };
        let e = check(&settings, Path::new("/dev/null")).unwrap_err();
        assert!(matches!(e, CheckError::Exec(ExecError::NotFound { .. })), "{e:?}");
    }
}
