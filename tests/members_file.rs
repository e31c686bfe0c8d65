//! The `file` and `static` member sources through the real `cpha members` binary: a
//! kubelet-style `..data` symlink swap, a file rewritten in place in several steps (never read
//! half-written), a file that disappears, and the one-shot form's output and exit codes.

#[path = "support/standin.rs"]
mod standin;

use std::io::Write as _;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};

use standin::{cpha_command, Scratch, Watch};

const T: Duration = Duration::from_secs(20);

fn file_config(dir: &Scratch, path: &Path) -> Result<String> {
    let cfg = dir.join("cpha.yaml");
    std::fs::write(
        &cfg,
        format!(
            "members:\n  source: file\n  file:\n    path: {}\n  stateFile: {}\n",
            path.display(),
            dir.join("state.json").display()
        ),
    )?;
    Ok(cfg.display().to_string())
}

/// The layout the kubelet gives a ConfigMap volume: `members -> ..data/members`,
/// `..data -> ..<timestamp>/`, swapped by renaming a new `..data` symlink over the old one.
struct KubeletVolume {
    dir: PathBuf,
    generation: u32,
}

impl KubeletVolume {
    fn new(dir: PathBuf, content: &str) -> Result<KubeletVolume> {
        std::fs::create_dir_all(&dir)?;
        let mut v = KubeletVolume { dir, generation: 0 };
        v.swap(content)?;
        symlink("..data/members", v.dir.join("members"))?;
        Ok(v)
    }

    fn swap(&mut self, content: &str) -> Result<()> {
        self.generation += 1;
        let old = format!("..2024_01_01_00_00_{:02}.{:09}", self.generation - 1, self.generation - 1);
        let ts = format!("..2024_01_01_00_00_{:02}.{:09}", self.generation, self.generation);
        std::fs::create_dir(self.dir.join(&ts))?;
        std::fs::write(self.dir.join(&ts).join("members"), content)?;
        symlink(&ts, self.dir.join("..data_tmp"))?;
        std::fs::rename(self.dir.join("..data_tmp"), self.dir.join("..data"))?;
        if self.generation > 1 {
            std::fs::remove_dir_all(self.dir.join(old))?;
        }
        Ok(())
    }

    fn path(&self) -> PathBuf {
        self.dir.join("members")
    }
}

/// The swap is seen by the next polls: within `pollInterval + settle` (50 ms + 50 ms here), which
/// the test checks with ten times that as its bound, so a loaded machine does not fail it while a
/// swap that is missed (seen only after the 5 s wait, or never) still does.
#[test]
fn kubelet_symlink_swap_is_seen_at_the_next_polls() -> Result<()> {
    let dir = Scratch::new("kubelet");
    let mut volume = KubeletVolume::new(dir.join("volume"), "- 127.0.0.11\n- 127.0.0.12\n")?;
    let config = file_config(&dir, &volume.path())?;
    let text =
        std::fs::read_to_string(&config)?.replace("  file:\n", "  file:\n    pollInterval: 50ms\n    settle: 50ms\n");
    std::fs::write(&config, text)?;
    let mut w = Watch::start(&["--config", &config])?;
    w.accepted("file", &["127.0.0.11:6443", "127.0.0.12:6443"], T)?;

    for (text, want) in [
        ("- 127.0.0.11\n- 127.0.0.13\n", vec!["127.0.0.11:6443", "127.0.0.13:6443"]),
        ("127.0.0.14:7443", vec!["127.0.0.14:7443"]),
    ] {
        let start = Instant::now();
        volume.swap(text)?;
        w.accepted("file", &want, Duration::from_secs(5))?;
        ensure!(start.elapsed() < Duration::from_secs(1), "the swap was seen after {:?}", start.elapsed());
    }
    standin::state_becomes(&dir.join("state.json"), &["127.0.0.14:7443"])?;
    w.stop()
}

#[test]
fn a_file_rewritten_in_place_is_never_read_half_written() -> Result<()> {
    let dir = Scratch::new("partial");
    let path = dir.join("members");
    std::fs::write(&path, "127.0.0.11\n127.0.0.12\n")?;
    let mut w = Watch::start(&["--config", &file_config(&dir, &path)?])?;
    w.accepted("file", &["127.0.0.11:6443", "127.0.0.12:6443"], T)?;

    // Each rewrite truncates the file, writes a first part, pauses, then writes the rest. The
    // first parts are traps: a valid shorter list, and a cut in the middle of an entry.
    let rounds: [(&str, &str, [&str; 3]); 4] = [
        ("127.0.0.21\n127.0.0.22\n", "127.0.0.23\n", ["127.0.0.21:6443", "127.0.0.22:6443", "127.0.0.23:6443"]),
        ("127.0.0.31\n127.0", ".0.32\n127.0.0.33\n", ["127.0.0.31:6443", "127.0.0.32:6443", "127.0.0.33:6443"]),
        ("- 127.0.0.41\n", "- 127.0.0.42\n- 127.0.0.43\n", ["127.0.0.41:6443", "127.0.0.42:6443", "127.0.0.43:6443"]),
        ("127.0.0.51, 127.0.0.", "52, 127.0.0.53", ["127.0.0.51:6443", "127.0.0.52:6443", "127.0.0.53:6443"]),
    ];
    for (first, rest, want) in rounds {
        let mut f = std::fs::OpenOptions::new().write(true).truncate(true).open(&path)?;
        f.write_all(first.as_bytes())?;
        f.flush()?;
        // Longer than the poll interval (100 ms), so a reader without a settle time sees it.
        std::thread::sleep(Duration::from_millis(150));
        f.write_all(rest.as_bytes())?;
        drop(f);
        w.accepted("file", &want, Duration::from_secs(5))?;
    }
    let accepted: Vec<usize> = w.accepted_sets().iter().map(|(_, m)| m.len()).collect();
    assert_eq!(accepted, [2, 3, 3, 3, 3], "only complete files were accepted: {:#?}", w.seen);
    assert!(w.seen.iter().all(|v| v["event"] == "accepted"), "nothing half-written was even reported: {:#?}", w.seen);

    // A file that goes away keeps the last good set and says so; its return is seen.
    std::fs::remove_file(&path)?;
    let v = w.problem("does not exist", Duration::from_secs(5))?;
    assert_eq!(v["kind"], "missing");
    std::fs::write(&path, "127.0.0.51\n127.0.0.52\n127.0.0.53\n")?;
    w.accepted("file", &["127.0.0.51:6443", "127.0.0.52:6443", "127.0.0.53:6443"], Duration::from_secs(5))?;
    // A bad complete file is rejected with its reason: the second line is one entry, words and all.
    std::fs::write(&path, "127.0.0.51\n127.0.0.52 extra!\n")?;
    let (v, _) = w.until("the rejection", Duration::from_secs(5), |_| true)?;
    assert_eq!(v["event"], "rejected", "{v}");
    assert!(v["reason"].as_str().unwrap().contains(r#"entry 2 of the member list, "127.0.0.52 extra!""#), "{v}");
    w.stop()
}

#[test]
fn one_shot_output_and_exit_codes() -> Result<()> {
    let dir = Scratch::new("oneshot");
    let run = |args: &[&str], env: &[(&str, &str)]| -> Result<(Option<i32>, String, String)> {
        let mut all = vec!["members"];
        all.extend_from_slice(args);
        let out = cpha_command(&all, env).output()?;
        Ok((out.status.code(), String::from_utf8(out.stdout)?, String::from_utf8(out.stderr)?))
    };

    // Static members from flags or the environment (the cloud-init seed), no state file.
    let (code, out, err) =
        run(&["--source", "static", "--static", "127.0.0.12,cp1=127.0.0.11", "--state-file", ""], &[])?;
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, "cp1=127.0.0.11:6443\n127.0.0.12:6443\n");
    let (code, out, _) = run(
        &["--output", "json"],
        &[("CPHA_MEMBERS_SOURCE", "static"), ("CPHA_MEMBERS_STATIC", "127.0.0.13"), ("CPHA_MEMBERS_STATE_FILE", "")],
    )?;
    assert_eq!(code, Some(0));
    let v: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(v, serde_json::json!({"event": "accepted", "origin": "static", "members": ["127.0.0.13:6443"]}));

    // A bad static list is a configuration error (78), before anything runs.
    let (code, _, err) = run(&["--source", "static", "--static", "127.0.0.1,bad!", "--state-file", ""], &[])?;
    assert_eq!(code, Some(78), "{err}");
    assert!(err.contains("members.static: entry 2"), "{err}");

    // A file source whose file is missing or refused exits 1 with the reason.
    let path = dir.join("members");
    let cfg = file_config(&dir, &path)?;
    let (code, _, err) = run(&["--config", &cfg], &[])?;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("does not exist"), "{err}");
    std::fs::write(&path, "")?;
    let (code, _, err) = run(&["--config", &cfg], &[])?;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("the member list is empty"), "{err}");
    std::fs::write(&path, "127.0.0.11")?;
    let (code, out, err) = run(&["--config", &cfg], &[])?;
    assert_eq!((code, out.as_str()), (Some(0), "127.0.0.11:6443\n"), "{err}");

    // A static source in --watch mode prints its set once and stops cleanly on SIGTERM.
    let mut w = Watch::start(&["--source", "static", "--static", "127.0.0.11", "--state-file", ""])?;
    w.accepted("static", &["127.0.0.11:6443"], T)?;
    w.quiet_for(Duration::from_millis(500))?;
    w.stop()
}
