/// Compares `actual` with `tests/golden/NAME`; `CPHA_UPDATE_GOLDEN=1` rewrites the file instead.
///
/// Any other value of `CPHA_UPDATE_GOLDEN` (`0`, `true`, empty) panics rather than guess, and so
/// does `CPHA_UPDATE_GOLDEN=1` under `CI`: a CI run that rewrote its golden files would pass
/// against whatever the code renders now.
pub fn golden(name: &str, actual: &str) {
    let path = format!("{}/tests/golden/{name}", env!("CARGO_MANIFEST_DIR"));
    let update = std::env::var_os("CPHA_UPDATE_GOLDEN");
    let ci = std::env::var_os("CI");
    match update_requested(update.as_deref(), ci.as_deref()) {
        Ok(true) => std::fs::write(&path, actual).unwrap_or_else(|e| panic!("{path}: {e}")),
        Ok(false) => {}
        Err(why) => panic!("golden file {name}: {why}"),
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e} (set CPHA_UPDATE_GOLDEN=1)"));
    pretty_assertions::assert_eq!(expected, actual, "golden file {name}");
}

/// Whether the golden files are to be rewritten, from `CPHA_UPDATE_GOLDEN` and `CI`.
fn update_requested(update: Option<&std::ffi::OsStr>, ci: Option<&std::ffi::OsStr>) -> Result<bool, String> {
    let Some(update) = update else { return Ok(false) };
    if update != "1" {
        return Err(format!("CPHA_UPDATE_GOLDEN={update:?}: set it to 1 to rewrite the golden files, or unset it"));
    }
    match ci {
        Some(ci) if !ci.is_empty() => Err(format!(
            "CPHA_UPDATE_GOLDEN=1 is refused under CI (CI={ci:?}): rewrite golden files locally and commit them"
        )),
        _ => Ok(true),
    }
}

/// A directory under the system's temporary directory, removed with everything in it on drop.
pub struct TempDir(std::path::PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("cpha-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("creating a temporary directory");
        TempDir(path)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::update_requested;
    use std::ffi::OsStr;

    #[test]
    fn golden_files_are_rewritten_only_for_exactly_1_and_never_under_ci() {
        let os = |s: &'static str| Some(OsStr::new(s));
        assert_eq!(update_requested(None, None), Ok(false));
        assert_eq!(update_requested(None, os("true")), Ok(false));
        assert_eq!(update_requested(os("1"), None), Ok(true));
        assert_eq!(update_requested(os("1"), os("")), Ok(true));
        for other in ["0", "", "true", "yes", " 1"] {
            let err = update_requested(os(other), None).unwrap_err();
            assert!(err.contains("set it to 1"), "{other:?}: {err}");
        }
        let err = update_requested(os("1"), os("true")).unwrap_err();
        assert!(err.contains("refused under CI"), "{err}");
    }
}
