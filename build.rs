//! Names the commit the binary is built from, for `cpha --version` and `cpha_build_info`.
//!
//! `CPHA_COMMIT` (set by a build without a git checkout, such as the container image's) wins;
//! otherwise `git rev-parse` in the source tree; otherwise `unknown`. A failed git never fails
//! the build: a source tarball builds as well as a clone.

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CPHA_COMMIT");
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let commit = match std::env::var("CPHA_COMMIT") {
        Ok(c) if !c.trim().is_empty() => sanitize(&c),
        _ => git_commit(Path::new(&dir)).unwrap_or_else(|| "unknown".to_string()),
    };
    println!("cargo:rustc-env=CPHA_COMMIT={commit}");
}

/// The short hash of HEAD, and the files whose change means another commit (HEAD itself, the
/// branch it points at, packed refs), so cargo reruns this script after a commit or checkout.
fn git_commit(dir: &Path) -> Option<String> {
    // Only this source tree's own repository: a tarball unpacked inside another checkout must
    // not take that checkout's commit.
    let top = git(dir, &["rev-parse", "--show-toplevel"])?;
    if Path::new(&top).canonicalize().ok()? != dir.canonicalize().ok()? {
        return None;
    }
    let commit = git(dir, &["rev-parse", "--short=12", "HEAD"])?;
    for path in ["HEAD", "packed-refs"] {
        watch(dir, path);
    }
    if let Some(branch) = git(dir, &["symbolic-ref", "-q", "HEAD"]) {
        watch(dir, &branch);
    }
    Some(sanitize(&commit))
}

fn watch(dir: &Path, git_path: &str) {
    // NOTE: only files that exist: cargo reruns a script every build for a missing one, which
    // would rebuild the crate every time.
    if let Some(path) = git(dir, &["rev-parse", "--path-format=absolute", "--git-path", git_path]) {
        if Path::new(&path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
}

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git").arg("-C").arg(dir).args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let text = text.trim();
    (out.status.success() && !text.is_empty()).then(|| text.to_string())
}

/// Only what a commit name can hold: the value ends up in a metric label and a version line.
fn sanitize(text: &str) -> String {
    text.trim().chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '+')).take(64).collect()
}
