//! Where the member list comes from, and the one stream of updates the agent consumes.
//!
//! Sources (one is configured in `members.source`):
//! - `configmap`: one key of one ConfigMap, watched by name (so RBAC can be limited with
//!   `resourceNames`);
//! - `endpointslice`: the `default/kubernetes` EndpointSlice, the addresses the apiservers
//!   publish themselves (its `https` port);
//! - `file`: a file (a ConfigMap mounted as a volume, or written by cloud-init), read only once
//!   its content has been stable for a moment, so a half-written file is never taken;
//! - `static`: members given in the configuration or on the command line.
//!
//! `state` keeps the last good set on disk; at start it is offered as the first set (origin
//! [`Origin::Cache`]), or else the `static` list as a seed when another source is configured
//! ([`Origin::Seed`]). Either is only a starting point: any set from the live source replaces
//! it, even an older-looking one.
//!
//! # The interface
//!
//! [`run`] drives the configured source until `shutdown` fires and sends [`Update`]s on `tx`:
//! - [`Update::Accepted`]: a new set passed every check (each entry valid, not empty unless
//!   `allowEmpty`, at most `maxMembers`). Counted in `member_updates_accepted{source}` (live
//!   sets only); `members` is set to its size; a live set is written to the state file.
//! - [`Update::Rejected`]: an update that failed a check. The last good set stays. Logged and
//!   counted in `member_updates_rejected{source}`.
//! - [`Update::Problem`]: the source has nothing usable now (ConfigMap deleted, key missing,
//!   file gone: [`ProblemKind::Missing`]; API unreachable, credentials not there yet or refused:
//!   [`ProblemKind::Unavailable`]). The last good set stays.
//!
//! An update equal to the one sent just before it is not sent again (a relist after a dropped
//! watch, an unrelated change to the ConfigMap). The API client talks to the known members
//! directly (see [`crate::kube`]): the last set accepted here, or the last one the caller
//! published on the `known` channel it passes to [`run`].

mod configmap;
mod endpointslice;
mod file;
mod object;
pub mod settings;
pub mod state;
#[path = "static.rs"]
mod static_list;

use std::fmt;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

pub use self::settings::{MembersConfig, MembersConfigError, MembersSettings, SourceKind, SourceSettings};
use crate::kube::KubeSettings;
use crate::members::{Member, MemberSet, MembersError, ParseOptions, MAX_ENTRY_LEN};
use crate::metrics::Metrics;

/// Where an accepted set came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Origin {
    /// The state file, at start.
    Cache,
    /// The `static` list, at start, when the state file held no set.
    Seed,
    /// The configured source (its name: `configmap`, `endpointslice`, `file`, `static`).
    Live(&'static str),
}

impl Origin {
    pub fn is_live(self) -> bool {
        matches!(self, Origin::Live(_))
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Cache => f.write_str("cache"),
            Origin::Seed => f.write_str("seed"),
            Origin::Live(source) => f.write_str(source),
        }
    }
}

/// What kind of trouble a [`Update::Problem`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProblemKind {
    /// The source exists but holds no list: object deleted, key missing, file gone.
    Missing,
    /// The source cannot be read now and is retried: API unreachable, credentials missing or
    /// refused, a watch error.
    Unavailable,
}

impl ProblemKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProblemKind::Missing => "missing",
            ProblemKind::Unavailable => "unavailable",
        }
    }
}

/// One event of the member stream; see the module documentation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Update {
    Accepted { set: MemberSet, origin: Origin },
    Rejected { source: &'static str, reason: String },
    Problem { source: &'static str, kind: ProblemKind, message: String },
}

/// What a source reports to the pipeline.
#[derive(Debug, Clone, PartialEq, Eq)]
enum SourceEvent {
    /// A list read and parsed (or refused) by the source.
    Parsed(Result<MemberSet, MembersError>),
    Problem(ProblemKind, String),
}

/// Runs the configured source until `shutdown` fires; see the module documentation.
///
/// `known` is the caller's view of the members (the agent publishes each set it applies); the
/// API client tries those members directly, together with every set accepted here (the cache
/// and the seed included), so it can reach the API before the caller has published anything.
///
/// Returns `Ok(())` on shutdown or when `tx`'s receiver is gone, and an error when the source
/// cannot run at all (credentials missing with `waitForCredentials: false`).
pub async fn run(
    settings: MembersSettings,
    kube: KubeSettings,
    metrics: Arc<Metrics>,
    tx: mpsc::Sender<Update>,
    mut known: watch::Receiver<MemberSet>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let source_name = settings.source_name();
    let (known_tx, known_rx) = watch::channel(known.borrow_and_update().clone());
    let mut pipeline = Pipeline::new(source_name, metrics, tx, known_tx, settings.state_file.clone());

    let start = match &settings.state_file {
        Some(path) => match state::load(path, &settings.parse).await {
            Ok(Some(set)) => Some((set, Origin::Cache)),
            Ok(None) => None,
            Err(e) => {
                tracing::warn!("ignoring the state file: {e:#}");
                None
            }
        },
        None => None,
    };
    let start = start.or_else(|| settings.seed.clone().map(|s| (s, Origin::Seed)));
    if let Some((set, origin)) = start {
        tracing::info!(%origin, members = %set, "starting from the last known members");
        if pipeline.accept(set, origin).await.is_err() {
            return Ok(());
        }
    }

    let (events_tx, mut events_rx) = mpsc::channel::<SourceEvent>(16);
    let source_token = shutdown.child_token();
    let source = run_source(&settings, &kube, known_rx, events_tx, source_token.clone())
        .instrument(tracing::info_span!("members", source = source_name));
    tokio::pin!(source);
    let mut source_done = false;
    let mut caller_publishes = true;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            changed = known.changed(), if caller_publishes => match changed {
                Ok(()) => {
                    let set = known.borrow_and_update().clone();
                    pipeline.known.send_replace(set);
                }
                // The caller keeps no view of its own: the accepted sets are enough.
                Err(_) => caller_publishes = false,
            },
            result = &mut source, if !source_done => {
                source_done = true;
                result?;
                if shutdown.is_cancelled() {
                    break;
                }
                // Only the static source ends by itself; its set is queued already.
            }
            event = events_rx.recv() => {
                let Some(event) = event else {
                    // Every sender is gone, so the source ended (only the static one does) and
                    // all it said was handled: take its result, then wait for shutdown.
                    if !source_done {
                        (&mut source).await?;
                    }
                    shutdown.cancelled().await;
                    break;
                };
                if pipeline.handle(event).await.is_err() {
                    break;
                }
            }
        }
    }
    source_token.cancel();
    Ok(())
}

async fn run_source(
    settings: &MembersSettings,
    kube: &KubeSettings,
    known: watch::Receiver<MemberSet>,
    events: mpsc::Sender<SourceEvent>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let opts = &settings.parse;
    match &settings.source {
        SourceSettings::ConfigMap { namespace, name, key } => {
            configmap::run(namespace, name, key, opts, kube, known, events, shutdown).await
        }
        SourceSettings::EndpointSlice { namespace, name, port_name } => {
            endpointslice::run(namespace, name, port_name, opts, kube, known, events, shutdown).await
        }
        SourceSettings::File { path, poll_interval, settle } => {
            file::run(path, *poll_interval, *settle, opts, events, shutdown).await
        }
        SourceSettings::Static(set) => static_list::run(set, events).await,
    }
}

/// The receiver of updates is gone.
struct Closed;

/// Turns source events into updates: dedup, metrics, logs, the state file.
struct Pipeline {
    source: &'static str,
    metrics: Arc<Metrics>,
    tx: mpsc::Sender<Update>,
    known: watch::Sender<MemberSet>,
    state_file: Option<std::path::PathBuf>,
    last_sent: Option<Update>,
    /// What the state file holds (as far as this process knows).
    saved: Option<MemberSet>,
}

impl Pipeline {
    fn new(
        source: &'static str,
        metrics: Arc<Metrics>,
        tx: mpsc::Sender<Update>,
        known: watch::Sender<MemberSet>,
        state_file: Option<std::path::PathBuf>,
    ) -> Self {
        Pipeline { source, metrics, tx, known, state_file, last_sent: None, saved: None }
    }

    async fn handle(&mut self, event: SourceEvent) -> Result<(), Closed> {
        match event {
            SourceEvent::Parsed(Ok(set)) => self.accept(set, Origin::Live(self.source)).await,
            SourceEvent::Parsed(Err(e)) => {
                let reason = e.to_string();
                tracing::warn!(source = self.source, "member update rejected, keeping the last good set: {reason}");
                self.metrics.member_update(self.source, false);
                self.send(Update::Rejected { source: self.source, reason }).await
            }
            SourceEvent::Problem(kind, message) => {
                let update = Update::Problem { source: self.source, kind, message };
                if self.last_sent.as_ref() == Some(&update) {
                    return Ok(());
                }
                if let Update::Problem { message, .. } = &update {
                    tracing::warn!(source = self.source, "{message}; keeping the last good set");
                }
                self.send(update).await
            }
        }
    }

    async fn accept(&mut self, set: MemberSet, origin: Origin) -> Result<(), Closed> {
        let update = Update::Accepted { set: set.clone(), origin };
        if self.last_sent.as_ref() == Some(&update) {
            return Ok(());
        }
        tracing::info!(%origin, count = set.len(), members = %set, "member set accepted");
        self.metrics.members.set(i64::try_from(set.len()).unwrap_or(i64::MAX));
        if origin.is_live() {
            self.metrics.member_update(self.source, true);
        }
        self.known.send_replace(set.clone());
        if origin == Origin::Cache {
            self.saved = Some(set.clone());
        }
        // NOTE: sent before it is saved: the state file is a cache (fsync'd, so it can take a
        // while on a busy disk), and the agent applies the set without waiting for it.
        self.send(update).await?;
        if origin.is_live() && self.saved.as_ref() != Some(&set) {
            if let Some(path) = &self.state_file {
                match state::save(path, &set, self.source).await {
                    Ok(()) => self.saved = Some(set),
                    // NOTE: a set that cannot be saved still applies.
                    Err(e) => tracing::warn!("could not save the member set: {e:#}"),
                }
            }
        }
        Ok(())
    }

    async fn send(&mut self, update: Update) -> Result<(), Closed> {
        self.last_sent = Some(update.clone());
        self.tx.send(update).await.map_err(|_| Closed)
    }
}

/// Parses entries that arrive one by one (the `static` list, EndpointSlice addresses) with the
/// same rules as a written list: every entry valid, the count cap, empty only when allowed, and,
/// as between commas, the spaces and tabs around an entry dropped (`CPHA_MEMBERS_STATIC="a, b"`)
/// while one inside it makes it invalid.
pub fn parse_entries<'a, I>(entries: I, opts: &ParseOptions) -> Result<MemberSet, MembersError>
where
    I: IntoIterator<Item = &'a str>,
{
    let entries: Vec<&str> = entries.into_iter().collect();
    if entries.len() > opts.max_members {
        return Err(MembersError::TooMany { count: entries.len(), max: opts.max_members });
    }
    if entries.is_empty() && !opts.allow_empty {
        return Err(MembersError::Empty);
    }
    let mut members = Vec::with_capacity(entries.len());
    for (i, entry) in entries.iter().map(|e| e.trim_matches([' ', '\t'])).enumerate() {
        match Member::parse(entry, opts.default_port) {
            Ok(m) => members.push(m),
            Err(reason) => {
                let entry: String =
                    if entry.len() > MAX_ENTRY_LEN { entry.chars().take(64).collect() } else { entry.to_owned() };
                return Err(MembersError::InvalidEntry { position: i + 1, entry, reason });
            }
        }
    }
    MemberSet::from_members(members)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use pretty_assertions::assert_eq;

    use super::*;

    fn set(s: &str) -> MemberSet {
        s.parse().unwrap()
    }

    fn counter(m: &Metrics, which: &str) -> u64 {
        let label = crate::metrics::SourceLabel { source: "configmap".into() };
        match which {
            "accepted" => m.member_updates_accepted.get_or_create(&label).get(),
            _ => m.member_updates_rejected.get_or_create(&label).get(),
        }
    }

    struct Harness {
        pipeline: Pipeline,
        rx: mpsc::Receiver<Update>,
        metrics: Arc<Metrics>,
        known: watch::Receiver<MemberSet>,
    }

    fn harness(state_file: Option<std::path::PathBuf>) -> Harness {
        let metrics = Arc::new(Metrics::default());
        let (tx, rx) = mpsc::channel(16);
        let (known_tx, known) = watch::channel(MemberSet::new());
        Harness { pipeline: Pipeline::new("configmap", metrics.clone(), tx, known_tx, state_file), rx, metrics, known }
    }

    #[tokio::test]
    async fn accepted_rejected_and_problems_are_sent_counted_and_deduplicated() {
        let mut h = harness(None);
        let a = set("10.0.0.1, 10.0.0.2");
        h.pipeline.handle(SourceEvent::Parsed(Ok(a.clone()))).await.ok().unwrap();
        assert_eq!(h.rx.try_recv().unwrap(), Update::Accepted { set: a.clone(), origin: Origin::Live("configmap") });
        assert_eq!(*h.known.borrow(), a);
        assert_eq!(h.metrics.members.get(), 2);
        // The same set again (a relist) is not sent again.
        h.pipeline.handle(SourceEvent::Parsed(Ok(a.clone()))).await.ok().unwrap();
        assert_eq!(h.rx.try_recv(), Err(tokio::sync::mpsc::error::TryRecvError::Empty));
        assert_eq!(counter(&h.metrics, "accepted"), 1);

        let bad = parse_entries(["10.0.0.1", "nope!"], &ParseOptions::default());
        h.pipeline.handle(SourceEvent::Parsed(bad)).await.ok().unwrap();
        let Update::Rejected { source, reason } = h.rx.try_recv().unwrap() else { panic!("not a rejection") };
        assert_eq!(source, "configmap");
        assert!(reason.contains("entry 2"), "{reason}");
        assert_eq!(counter(&h.metrics, "rejected"), 1);
        assert_eq!(*h.known.borrow(), a, "a rejection keeps the last good set");
        assert_eq!(h.metrics.members.get(), 2);

        // After a rejection the good set is sent again when the source goes back to it.
        h.pipeline.handle(SourceEvent::Parsed(Ok(a.clone()))).await.ok().unwrap();
        assert!(matches!(h.rx.try_recv().unwrap(), Update::Accepted { .. }));
        assert_eq!(counter(&h.metrics, "accepted"), 2);

        for _ in 0..3 {
            h.pipeline.handle(SourceEvent::Problem(ProblemKind::Missing, "deleted".into())).await.ok().unwrap();
        }
        assert_eq!(
            h.rx.try_recv().unwrap(),
            Update::Problem { source: "configmap", kind: ProblemKind::Missing, message: "deleted".into() }
        );
        assert_eq!(
            h.rx.try_recv(),
            Err(tokio::sync::mpsc::error::TryRecvError::Empty),
            "the same problem is sent once"
        );
        assert_eq!(*h.known.borrow(), a);
    }

    #[tokio::test]
    async fn live_sets_replace_the_cache_and_are_saved() {
        let dir = std::env::temp_dir().join(format!("cpha-pipeline-{}", std::process::id()));
        let path = dir.join("sub").join("members.json");
        let mut h = harness(Some(path.clone()));
        let cached = set("10.0.0.1");
        h.pipeline.accept(cached.clone(), Origin::Cache).await.ok().unwrap();
        assert_eq!(h.rx.try_recv().unwrap(), Update::Accepted { set: cached.clone(), origin: Origin::Cache });
        assert!(!path.exists(), "the cache is not written back");
        assert_eq!(counter(&h.metrics, "accepted"), 0, "only live sets count as updates");

        // The same members from the live source are still sent: they are confirmed now.
        h.pipeline.handle(SourceEvent::Parsed(Ok(cached.clone()))).await.ok().unwrap();
        assert_eq!(
            h.rx.try_recv().unwrap(),
            Update::Accepted { set: cached.clone(), origin: Origin::Live("configmap") }
        );

        let live = set("10.0.0.2, 10.0.0.3");
        h.pipeline.handle(SourceEvent::Parsed(Ok(live.clone()))).await.ok().unwrap();
        assert!(matches!(h.rx.try_recv().unwrap(), Update::Accepted { .. }));
        let loaded = state::load(&path, &ParseOptions::default()).await.unwrap();
        assert_eq!(loaded, Some(live));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn run_static_sends_the_set_then_waits_for_shutdown() {
        let settings: MembersConfig =
            crate::yaml::from_str("source: static\nstatic: [10.0.0.1]\nstateFile: ''\n").unwrap();
        let settings = settings.resolve().unwrap();
        let (tx, mut rx) = mpsc::channel(4);
        let shutdown = CancellationToken::new();
        let (_known_tx, known) = watch::channel(MemberSet::new());
        let metrics = Arc::new(Metrics::default());
        // Spawned as the agent does: the future is Send and 'static.
        let task = tokio::spawn(run(settings, KubeSettings::default(), metrics, tx, known, shutdown.clone()));
        let update = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.unwrap().unwrap();
        assert_eq!(update, Update::Accepted { set: set("10.0.0.1"), origin: Origin::Live("static") });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!task.is_finished(), "run keeps going until shutdown");
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), task).await.unwrap().unwrap().unwrap();
    }

    #[test]
    fn parse_entries_applies_the_list_rules() {
        let opts = ParseOptions { max_members: 2, ..ParseOptions::default() };
        assert_eq!(
            parse_entries(["10.0.0.2", "10.0.0.1:7443"], &opts).unwrap().to_string(),
            "10.0.0.1:7443, 10.0.0.2:6443"
        );
        assert!(matches!(parse_entries(["a", "b", "c"], &opts), Err(MembersError::TooMany { count: 3, max: 2 })));
        assert!(matches!(parse_entries([], &opts), Err(MembersError::Empty)));
        let allow = ParseOptions { allow_empty: true, ..opts };
        assert_eq!(parse_entries([], &allow).unwrap(), MemberSet::new());
        let e = parse_entries(["10.0.0.1", "10.0.0.2\nprogram x"], &allow).unwrap_err();
        assert!(e.to_string().contains("entry 2"), "{e}");
        assert!(!e.to_string().contains('\n'), "{e}");
        // Around an entry, white space is dropped; inside one, it is refused.
        assert_eq!(
            parse_entries([" 10.0.0.1", "\t10.0.0.2 "], &opts).unwrap().to_string(),
            "10.0.0.1:6443, 10.0.0.2:6443"
        );
        let e = parse_entries(["10.0.0.1", "server evil 10.201.66.6:6443 check"], &opts).unwrap_err();
        assert!(
            e.to_string().starts_with("entry 2 of the member list, \"server evil 10.201.66.6:6443 check\", is invalid"),
            "{e}"
        );
    }
}
