//! The `file` source: a member list in a file, such as a ConfigMap mounted as a volume (the
//! kubelet swaps a `..data` symlink to a new directory) or a file written by cloud-init.
//!
//! The file is read every `pollInterval` (following symlinks, so a `..data` swap is seen like
//! any other change). New content is only parsed once it has been read identical for
//! `settle`: a writer that truncates the file and writes it in several steps is never caught
//! half-way, even when the half would parse as a valid, shorter list. A rename into place
//! (kubelet, `install`, editors) is complete at once and simply waits out the same moment.
//!
//! NOTE: polling instead of inotify: a watch on a path whose parent symlinks are swapped must be
//! re-armed on every swap, and a stat plus a read of a few kilobytes every 100 ms costs less
//! than getting that right. Changes are picked up within `pollInterval + settle` (600 ms by
//! default).

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{ProblemKind, SourceEvent};
use crate::members::{parse, MembersError, ParseOptions, MAX_INPUT_BYTES};

/// What one look at the file found.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Read {
    Content(Vec<u8>),
    NotFound,
    Failed(String),
}

/// The state between two looks: content waiting to settle and content already handled.
#[derive(Debug, Default)]
struct Tracker {
    candidate: Option<(Read, Instant)>,
    handled: Option<Read>,
}

impl Tracker {
    /// Feeds one read; returns the read to handle once it stayed the same for `settle`.
    fn observe(&mut self, read: Read, now: Instant, settle: Duration) -> Option<Read> {
        match &self.candidate {
            Some((c, _)) if *c == read => {}
            _ => self.candidate = Some((read.clone(), now)),
        }
        let (candidate, since) = self.candidate.as_ref().expect("set above");
        if now.duration_since(*since) < settle || self.handled.as_ref() == Some(candidate) {
            return None;
        }
        self.handled = Some(candidate.clone());
        Some(candidate.clone())
    }
}

pub(super) async fn run(
    path: &Path,
    poll_interval: Duration,
    settle: Duration,
    opts: &ParseOptions,
    events: mpsc::Sender<SourceEvent>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    tracing::info!(path = %path.display(), "reading members from the file");
    let mut tracker = Tracker::default();
    let mut ticker = tokio::time::interval(poll_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            _ = ticker.tick() => {}
        }
        let read = read_file(path.to_path_buf()).await;
        let Some(read) = tracker.observe(read, Instant::now(), settle) else { continue };
        let event = match read {
            Read::Content(bytes) => SourceEvent::Parsed(parse_bytes(&bytes, opts)),
            Read::NotFound => SourceEvent::Problem(ProblemKind::Missing, format!("{} does not exist", path.display())),
            Read::Failed(why) => SourceEvent::Problem(ProblemKind::Unavailable, why),
        };
        if events.send(event).await.is_err() {
            return Ok(());
        }
    }
}

fn parse_bytes(bytes: &[u8], opts: &ParseOptions) -> Result<crate::members::MemberSet, MembersError> {
    if bytes.len() > MAX_INPUT_BYTES {
        return Err(MembersError::InputTooLarge { len: bytes.len(), max: MAX_INPUT_BYTES });
    }
    // NOTE: invalid UTF-8 becomes U+FFFD, which the grammar refuses with the entry's position.
    parse(&String::from_utf8_lossy(bytes), opts)
}

async fn read_file(path: PathBuf) -> Read {
    let result = tokio::task::spawn_blocking(move || {
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Read::NotFound,
            Err(e) => return Read::Failed(format!("{} cannot be opened: {e}", path.display())),
        };
        let mut bytes = Vec::new();
        // One byte more than the limit is enough to refuse the file for its size.
        match file.take(MAX_INPUT_BYTES as u64 + 1).read_to_end(&mut bytes) {
            Ok(_) => Read::Content(bytes),
            Err(e) => Read::Failed(format!("{} cannot be read: {e}", path.display())),
        }
    })
    .await;
    result.unwrap_or_else(|e| Read::Failed(format!("reading the member file: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_is_handled_once_after_it_settled() {
        let settle = Duration::from_millis(500);
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let full = Read::Content(b"10.0.0.1\n10.0.0.2\n".to_vec());
        let half = Read::Content(b"10.0.0.1\n".to_vec());
        let mut t = Tracker::default();
        assert_eq!(t.observe(full.clone(), at(0), settle), None);
        assert_eq!(t.observe(full.clone(), at(400), settle), None);
        assert_eq!(t.observe(full.clone(), at(500), settle), Some(full.clone()));
        assert_eq!(t.observe(full.clone(), at(600), settle), None, "handled once");
        // A rewrite in two steps: the half is seen but replaced before it settled.
        assert_eq!(t.observe(Read::Content(Vec::new()), at(700), settle), None);
        assert_eq!(t.observe(half.clone(), at(800), settle), None);
        assert_eq!(t.observe(half.clone(), at(1200), settle), None);
        let next = Read::Content(b"10.0.0.1\n10.0.0.3\n".to_vec());
        assert_eq!(t.observe(next.clone(), at(1250), settle), None);
        assert_eq!(t.observe(next.clone(), at(1750), settle), Some(next));
        // Removal settles like content does, and coming back to handled content counts again.
        assert_eq!(t.observe(Read::NotFound, at(1800), settle), None);
        assert_eq!(t.observe(Read::NotFound, at(2300), settle), Some(Read::NotFound));
        assert_eq!(t.observe(full.clone(), at(2400), settle), None);
        assert_eq!(t.observe(full.clone(), at(2900), settle), Some(full));
    }

    #[test]
    fn bytes_are_checked_before_parsing() {
        let opts = ParseOptions::default();
        assert_eq!(parse_bytes(b"10.0.0.1, 10.0.0.2", &opts).unwrap().len(), 2);
        let e = parse_bytes(b"10.0.0.1\n10.0.0.\xff", &opts).unwrap_err();
        assert!(e.to_string().contains("entry 2"), "{e}");
        let big = vec![b'1'; MAX_INPUT_BYTES + 1];
        assert!(matches!(parse_bytes(&big, &opts), Err(MembersError::InputTooLarge { .. })));
    }
}
