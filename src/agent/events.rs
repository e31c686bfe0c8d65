//! Kubernetes Events on the agent's state changes (handover, fallback, rejected member lists),
//! posted where the credentials allow it. They are attached to the object the members come
//! from (the ConfigMap, or the `default/kubernetes` EndpointSlice), so
//! `kubectl describe configmap -n kube-system cpha-members` shows what the agents did.
//!
//! Events are best effort and never hold up the agent: notes go through a bounded queue, and
//! when the API refuses them (no RBAC rule, no Events API) the agent says so once and stops
//! posting.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::kube::{CredentialSource, KubeSettings};
use crate::members::source::SourceSettings;
use crate::members::MemberSet;

pub use super::controller::Note;

/// Where notes go; a full queue drops the note rather than wait.
#[derive(Clone)]
pub struct Events(Option<mpsc::Sender<Note>>);

impl Events {
    pub fn disabled() -> Self {
        Events(None)
    }

    pub fn note(&self, note: Note) {
        if let Some(tx) = &self.0 {
            if tx.try_send(note).is_err() {
                tracing::debug!("event queue full or closed; event dropped");
            }
        }
    }
}

/// The object Events are about, for sources that live in the API.
pub fn regarding(source: &SourceSettings) -> Option<ObjectReference> {
    let (api_version, kind, namespace, name) = match source {
        SourceSettings::ConfigMap { namespace, name, .. } => ("v1", "ConfigMap", namespace, name),
        SourceSettings::EndpointSlice { namespace, name, .. } => {
            ("discovery.k8s.io/v1", "EndpointSlice", namespace, name)
        }
        SourceSettings::File { .. } | SourceSettings::Static(_) => return None,
    };
    Some(ObjectReference {
        api_version: Some(api_version.into()),
        kind: Some(kind.into()),
        namespace: Some(namespace.clone()),
        name: Some(name.clone()),
        ..ObjectReference::default()
    })
}

/// Starts the poster: it waits for credentials like the member source, then posts each note.
pub fn spawn(
    kube: KubeSettings,
    reference: ObjectReference,
    known: watch::Receiver<MemberSet>,
    shutdown: CancellationToken,
) -> Events {
    let (tx, rx) = mpsc::channel(32);
    tokio::spawn(post(kube, reference, known, rx, shutdown));
    Events(Some(tx))
}

async fn post(
    kube: KubeSettings,
    reference: ObjectReference,
    known: watch::Receiver<MemberSet>,
    mut rx: mpsc::Receiver<Note>,
    shutdown: CancellationToken,
) {
    let mut source = CredentialSource::new(&kube);
    let connected = match crate::kube::connect(&mut source, &known, &shutdown, |_| {}).await {
        Ok(Some(c)) => c,
        Ok(None) => return,
        Err(err) => {
            tracing::info!("Kubernetes Events off: {err:#}");
            return;
        }
    };
    let instance = std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|h| h.trim().to_string());
    let recorder = Recorder::new(connected.client, Reporter { controller: "cpha".into(), instance });
    loop {
        let note = tokio::select! {
            () = shutdown.cancelled() => return,
            note = rx.recv() => match note { Some(n) => n, None => return },
        };
        let event = Event {
            type_: if note.warning { EventType::Warning } else { EventType::Normal },
            reason: note.reason.into(),
            note: Some(note.message),
            action: note.action.into(),
            secondary: None,
        };
        match recorder.publish(&event, &reference).await {
            Ok(()) => tracing::debug!(reason = note.reason, "event posted"),
            Err(kube::Error::Api(status)) if matches!(status.code, 401 | 403 | 404) => {
                tracing::info!(
                    "Kubernetes Events off: the API refused to create one ({}): {}",
                    status.code,
                    status.message
                );
                return;
            }
            Err(err) => tracing::warn!(reason = note.reason, "could not post an event: {err}"),
        }
    }
}
