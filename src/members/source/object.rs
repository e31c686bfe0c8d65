//! Watching one named Kubernetes object (the ConfigMap or the EndpointSlice) with kube-rs's
//! watcher, shared by both API sources.
//!
//! The watch selects the object with a `metadata.name` field selector, so RBAC can grant
//! `get`/`list`/`watch` on that one name (`resourceNames`). Watch requests carry a short
//! server-side timeout (`kubernetes.watchTimeout`, 30 s) and the watcher gives a silent
//! connection up 5 s after it, so a dead connection is noticed in about 35 s instead of about
//! 295 s; errors back off with kube-rs's `default_backoff()`.
//!
//! 410 Gone reaches this loop as an error although the watcher handles it by listing again:
//! it is logged, never unwrapped, and never reported as a problem. A 410 answered as the HTTP
//! status of the watch request (instead of as an event inside the stream) would make the
//! watcher retry the same expired resourceVersion forever, so that one restarts the watcher.

use std::fmt::Debug;
use std::time::Duration;

use ::kube::api::Api;
use ::kube::core::NamespaceResourceScope;
use ::kube::runtime::watcher::{self, Event};
use ::kube::runtime::WatchStreamExt as _;
use ::kube::{Resource, ResourceExt as _};
use futures::StreamExt as _;
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::{ProblemKind, SourceEvent};
use crate::kube::client::error_chain;
use crate::kube::{self as kubeapi, CredentialSource, KubeSettings};
use crate::members::{MemberSet, MembersError};

/// Pause before a new watcher replaces one that cannot go on, so a server that keeps refusing
/// is not asked in a tight loop.
const RESTART_DELAY: Duration = Duration::from_millis(200);

/// The object watched, for messages: `ConfigMap kube-system/cpha-members`.
pub(super) struct Target<'a> {
    pub kind: &'static str,
    pub namespace: &'a str,
    pub name: &'a str,
}

impl Target<'_> {
    fn describe(&self) -> String {
        format!("{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// What an object holds for the member list.
pub(super) enum Extracted {
    /// The list as the source wrote it (compared with the last one, so an unrelated change to
    /// the object sends nothing) and its parse.
    List { input: String, parsed: Result<MemberSet, MembersError> },
    /// The object holds no list.
    Missing(String),
}

/// How an error from the watcher is handled.
#[derive(Debug, PartialEq, Eq)]
enum ErrorClass {
    /// 410 inside the stream: the watcher lists again by itself.
    Expired,
    /// 410 answered to the watch request: the watcher must be rebuilt.
    ExpiredAtStart,
    /// 401 or 403: the credentials are refused (or not yet granted).
    Refused(u16),
    /// An established watch stream failed; the watcher watches again by itself.
    Broken,
    Other,
}

fn classify(e: &watcher::Error) -> ErrorClass {
    let api_code = |e: &::kube::Error| match e {
        ::kube::Error::Api(status) => Some(status.code),
        _ => None,
    };
    match e {
        watcher::Error::WatchError(status) if status.code == 410 => ErrorClass::Expired,
        // kube-rs reports an HTTP error answered to a watch request inside the stream it
        // returns, so an HTTP 410 arrives as a failed watch.
        watcher::Error::WatchStartFailed(inner) | watcher::Error::WatchFailed(inner)
            if api_code(inner) == Some(410) =>
        {
            ErrorClass::ExpiredAtStart
        }
        watcher::Error::WatchError(status) if matches!(status.code, 401 | 403) => ErrorClass::Refused(status.code),
        watcher::Error::InitialListFailed(inner)
        | watcher::Error::WatchStartFailed(inner)
        | watcher::Error::WatchFailed(inner) => match (api_code(inner), e) {
            (Some(code @ (401 | 403)), _) => ErrorClass::Refused(code),
            (_, watcher::Error::WatchFailed(_)) => ErrorClass::Broken,
            _ => ErrorClass::Other,
        },
        _ => ErrorClass::Other,
    }
}

/// A watcher error in a sentence: an API status as `CODE REASON: message` rather than kube-rs's
/// debug dump, a transport error with its causes.
fn describe_error(e: &watcher::Error) -> String {
    let client = |e: &::kube::Error| match e {
        ::kube::Error::Api(status) => format!("{} {}: {}", status.code, status.reason, status.message),
        other => error_chain(other),
    };
    match e {
        watcher::Error::InitialListFailed(inner) => format!("listing failed: {}", client(inner)),
        watcher::Error::WatchStartFailed(inner) => format!("starting the watch failed: {}", client(inner)),
        watcher::Error::WatchFailed(inner) => format!("the watch failed: {}", client(inner)),
        watcher::Error::WatchError(status) => {
            format!("the watch ended with {} {}: {}", status.code, status.reason, status.message)
        }
        other => other.to_string(),
    }
}

/// Escapes everything but printable ASCII: API messages and errors go into log lines.
pub(super) fn one_line(text: &str) -> String {
    crate::logging::printable(text)
}

/// Watches `target` until `shutdown` fires, sending what `extract` finds in it.
pub(super) async fn watch_named<K>(
    target: Target<'_>,
    kube: &KubeSettings,
    known: watch::Receiver<MemberSet>,
    events: mpsc::Sender<SourceEvent>,
    shutdown: CancellationToken,
    extract: impl Fn(&K) -> Extracted,
) -> anyhow::Result<()>
where
    K: Resource<Scope = NamespaceResourceScope> + Clone + DeserializeOwned + Debug + Send + 'static,
    K::DynamicType: Default,
{
    let describe = target.describe();
    let mut sender = Sender { events, last_input: None };
    let mut credentials = CredentialSource::new(kube);
    let timeout_secs = u32::try_from(kube.watch_timeout.as_secs()).unwrap_or(u32::MAX);
    loop {
        let waiting = sender.events.clone();
        let connected = kubeapi::connect(&mut credentials, &known, &shutdown, |missing| {
            let message = format!("waiting for Kubernetes credentials: {missing}");
            if waiting.try_send(SourceEvent::Problem(ProblemKind::Unavailable, message)).is_err() {
                tracing::debug!("the member pipeline is busy or stopped; the wait is only logged");
            }
        })
        .await?;
        let Some(connected) = connected else { return Ok(()) };
        tracing::info!(credentials = %connected.credentials, "watching {describe}");
        let api: Api<K> = Api::namespaced(connected.client, target.namespace);
        let config = watcher::Config::default().fields(&format!("metadata.name={}", target.name)).timeout(timeout_secs);
        let mut stream = watcher::watcher(api, config).default_backoff().boxed();
        let mut listed: Option<K> = None;
        let reconnect = loop {
            let item = tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                item = stream.next() => item,
            };
            let sent = match item {
                // A watcher stream does not end; if it does, start a new one.
                None => break RESTART_DELAY,
                Some(Ok(Event::Init)) => {
                    listed = None;
                    Ok(())
                }
                Some(Ok(Event::InitApply(obj))) => {
                    if obj.name_any() == target.name {
                        listed = Some(obj);
                    }
                    Ok(())
                }
                Some(Ok(Event::InitDone)) => match listed.take() {
                    Some(obj) => sender.extracted(extract(&obj)).await,
                    None => sender.problem(ProblemKind::Missing, format!("{describe} does not exist")).await,
                },
                Some(Ok(Event::Apply(obj))) if obj.name_any() == target.name => sender.extracted(extract(&obj)).await,
                Some(Ok(Event::Delete(obj))) if obj.name_any() == target.name => {
                    sender.problem(ProblemKind::Missing, format!("{describe} was deleted")).await
                }
                Some(Ok(Event::Apply(_) | Event::Delete(_))) => Ok(()),
                Some(Err(e)) => {
                    let chain = one_line(&describe_error(&e));
                    match classify(&e) {
                        ErrorClass::Expired => {
                            tracing::info!("watch of {describe} expired (410 Gone); listing again");
                            Ok(())
                        }
                        ErrorClass::ExpiredAtStart => {
                            tracing::info!("watch of {describe} refused as expired (410 Gone); listing again");
                            break RESTART_DELAY;
                        }
                        ErrorClass::Refused(_) => {
                            let message =
                                format!("the API refused to let {} read {describe}: {chain}", connected.credentials);
                            let sent = sender.problem(ProblemKind::Unavailable, message).await;
                            if sent.is_err() {
                                return Ok(());
                            }
                            // A kubeconfig may have been rewritten, or the next one may have the
                            // rights; token files are read again at each request anyway.
                            if matches!(kube.credentials, crate::kube::Credentials::Kubeconfig(_)) {
                                credentials.refused();
                                break kube.poll_interval;
                            }
                            Ok(())
                        }
                        // A watch that broke is watched again at once (from its
                        // resourceVersion); only failing to start one is a problem.
                        ErrorClass::Broken => {
                            tracing::info!("watch of {describe} broke ({chain}); watching again");
                            Ok(())
                        }
                        ErrorClass::Other => {
                            sender.problem(ProblemKind::Unavailable, format!("cannot read {describe}: {chain}")).await
                        }
                    }
                }
            };
            if sent.is_err() {
                return Ok(());
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(reconnect) => {}
        }
    }
}

/// Sends source events, skipping a list identical to the last one sent.
struct Sender {
    events: mpsc::Sender<SourceEvent>,
    last_input: Option<String>,
}

/// The pipeline is gone.
struct Stopped;

impl Sender {
    async fn extracted(&mut self, extracted: Extracted) -> Result<(), Stopped> {
        match extracted {
            Extracted::List { input, parsed } => {
                if self.last_input.as_ref() == Some(&input) {
                    return Ok(());
                }
                self.last_input = Some(input);
                self.events.send(SourceEvent::Parsed(parsed)).await.map_err(|_| Stopped)
            }
            Extracted::Missing(message) => self.problem(ProblemKind::Missing, message).await,
        }
    }

    async fn problem(&mut self, kind: ProblemKind, message: String) -> Result<(), Stopped> {
        // After a problem the same list is news again: the source is back.
        self.last_input = None;
        self.events.send(SourceEvent::Problem(kind, message)).await.map_err(|_| Stopped)
    }
}

#[cfg(test)]
mod tests {
    use ::kube::core::Status;

    use super::*;

    fn status(code: u16) -> Box<Status> {
        Box::new(Status { code, ..Status::failure("x", "y") })
    }

    #[test]
    fn errors_are_classified_without_unwrapping() {
        assert_eq!(classify(&watcher::Error::WatchError(status(410))), ErrorClass::Expired);
        assert_eq!(
            classify(&watcher::Error::WatchStartFailed(::kube::Error::Api(status(410)))),
            ErrorClass::ExpiredAtStart
        );
        assert_eq!(
            classify(&watcher::Error::InitialListFailed(::kube::Error::Api(status(403)))),
            ErrorClass::Refused(403)
        );
        assert_eq!(classify(&watcher::Error::WatchFailed(::kube::Error::Api(status(401)))), ErrorClass::Refused(401));
        assert_eq!(classify(&watcher::Error::WatchFailed(::kube::Error::Api(status(500)))), ErrorClass::Broken);
        assert_eq!(classify(&watcher::Error::WatchFailed(::kube::Error::Api(status(410)))), ErrorClass::ExpiredAtStart);
        assert_eq!(classify(&watcher::Error::InitialListFailed(::kube::Error::Api(status(500)))), ErrorClass::Other);
        assert_eq!(classify(&watcher::Error::NoResourceVersion), ErrorClass::Other);
    }

    #[test]
    fn errors_are_described_in_one_sentence() {
        let forbidden =
            Status { code: 403, reason: "Forbidden".into(), message: "no\nway".into(), ..Status::failure("", "") };
        let e = watcher::Error::InitialListFailed(::kube::Error::Api(Box::new(forbidden)));
        assert_eq!(one_line(&describe_error(&e)), "listing failed: 403 Forbidden: no\\nway");
        let e = watcher::Error::WatchError(status(410));
        assert!(describe_error(&e).starts_with("the watch ended with 410"), "{}", describe_error(&e));
    }

    #[test]
    fn one_line_escapes_control_characters() {
        assert_eq!(one_line("a\nlevel=error b\u{1b}[31m"), "a\\nlevel=error b\\u{1b}[31m");
    }
}
