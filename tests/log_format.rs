//! `--log-format` / `CPHA_LOG_FORMAT`: plain text lines by default (and under the journal
//! without timestamps), one JSON object per line on request, read back from the real binary.

use std::process::{Command, Stdio};

/// stderr of `cpha check-config` on a file that does not exist: one error line, logged by
/// main through tracing like every other message.
fn failing_check(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_cpha"))
        .args(args)
        .args(["check-config", "--config", "/nonexistent/cpha-log-format.yaml"])
        .env_remove("CPHA_LOG_FORMAT")
        .env_remove("JOURNAL_STREAM")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "a missing configuration fails");
    String::from_utf8(out.stderr).unwrap()
}

fn json_lines(stderr: &str) -> Vec<serde_json::Value> {
    stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l:?}\n{stderr}")))
        .collect()
}

fn assert_json_error(stderr: &str) {
    let lines = json_lines(stderr);
    assert_eq!(lines.len(), 1, "{stderr}");
    let line = &lines[0];
    assert_eq!(line["level"], "ERROR", "{line}");
    let message = line["fields"]["message"].as_str().unwrap_or_else(|| panic!("no fields.message: {line}"));
    assert!(message.contains("/nonexistent/cpha-log-format.yaml"), "{line}");
    assert!(line["timestamp"].as_str().is_some_and(|t| t.contains('T')), "an RFC 3339 timestamp: {line}");
}

#[test]
fn log_format_json_writes_one_object_per_line() {
    assert_json_error(&failing_check(&["--log-format", "json"], &[]));
    // After the subcommand too (a global flag), and from the environment, as a unit sets it.
    let out = Command::new(env!("CARGO_BIN_EXE_cpha"))
        .args(["check-config", "--log-format", "json", "--config", "/nonexistent/cpha-log-format.yaml"])
        .env_remove("CPHA_LOG_FORMAT")
        .output()
        .unwrap();
    assert_json_error(&String::from_utf8(out.stderr).unwrap());
    assert_json_error(&failing_check(&[], &[("CPHA_LOG_FORMAT", "json")]));
    // The journal does not change an explicit request for JSON.
    assert_json_error(&failing_check(&[], &[("CPHA_LOG_FORMAT", "json"), ("JOURNAL_STREAM", "8:1234")]));
}

#[test]
fn log_format_text_is_the_default_and_plain_under_the_journal() {
    for stderr in [failing_check(&[], &[]), failing_check(&["--log-format", "text"], &[])] {
        let line = stderr.lines().next().unwrap_or_default();
        assert!(!line.starts_with('{'), "text by default: {stderr}");
        assert!(line.contains("ERROR") && line.contains("/nonexistent/cpha-log-format.yaml"), "{stderr}");
    }
    // Under systemd: no timestamp (journald adds its own) and no colour codes.
    let stderr = failing_check(&[], &[("JOURNAL_STREAM", "8:1234")]);
    assert!(stderr.starts_with("ERROR "), "level first, no timestamp: {stderr:?}");
    assert!(!stderr.contains('\u{1b}'), "no ANSI escapes: {stderr:?}");
    // An unknown format is a usage error (64), naming the choices.
    let out = Command::new(env!("CARGO_BIN_EXE_cpha")).args(["--log-format", "yaml", "status"]).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("text") && stderr.contains("json"), "{stderr}");
}
