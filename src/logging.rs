//! Logging: `tracing` to stderr, filtered by `--log-level` or `CPHA_LOG` (EnvFilter syntax).
//! Text by default; under systemd (JOURNAL_STREAM set) without colours and timestamps, which
//! journald adds itself. `--log-format json` writes one JSON object per line, with its timestamp,
//! for log pipelines.

use tracing_subscriber::EnvFilter;

/// The log line format (`--log-format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

pub fn init(level: Option<&str>, format: LogFormat) {
    let filter = level
        .map(EnvFilter::new)
        .or_else(|| EnvFilter::try_from_env("CPHA_LOG").ok())
        // NOTE: kube-rs logs every failed request at error level even when cpha retries at once
        // and reports the failure itself; keep that out of the default log.
        .unwrap_or_else(|| EnvFilter::new("info,kube_client::client::builder=off"));
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false);
    // try_init: tests may initialise logging more than once in one process.
    let _ = if format == LogFormat::Json {
        // NOTE: the timestamp stays even under the journal: a pipeline reading the JSON may not
        // see journald's. Span fields are flattened into each line so it stands on its own.
        builder.json().flatten_event(false).with_current_span(true).with_span_list(false).try_init()
    } else if journal {
        builder.with_ansi(false).without_time().try_init()
    } else {
        builder.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).try_init()
    };
}

/// Keeps printable ASCII as it is and escapes everything else (newlines, control characters,
/// non-ASCII), so text that came from outside cannot start a new log line or hide itself.
pub fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c == ' ' || c.is_ascii_graphic() {
            out.push(c);
        } else {
            out.extend(c.escape_default());
        }
    }
    out
}
