//! WATCH: newline-delimited JSON events on a chunked response, started from a resourceVersion
//! (or with synthetic ADDED events for the current state), with BOOKMARK events, the
//! `sendInitialEvents` streaming list, `timeoutSeconds`, an in-stream 410 for a resourceVersion
//! older than the window, and the fault hooks (hang, drop, reset).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::Response;
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc, watch};
use tokio::time::{sleep_until, Instant};

use super::read::{matches, wait_for_rv};
use super::{invalid_list_options, parse_rv, Req};
use crate::app::App;
use crate::faults::DropMode;
use crate::http::body::{self, Body};
use crate::http::negotiate::{self, Form};
use crate::resources::Kind;
use crate::selectors::{FieldSelector, LabelSelector};
use crate::status::{ApiError, Cause};
use crate::store::{Event, EventType, WatchFrom};

/// Frames a stream may queue before the writer waits for the client.
const STREAM_BUFFER: usize = 64;

pub const INITIAL_EVENTS_END: &str = "k8s.io/initial-events-end";

fn frame(etype: &str, object: Value) -> Bytes {
    let mut b = serde_json::to_vec(&json!({"type": etype, "object": object})).unwrap_or_default();
    b.push(b'\n');
    Bytes::from(b)
}

pub fn error_frame(e: &ApiError) -> Bytes {
    frame("ERROR", e.to_status())
}

fn bookmark_object(kind: Kind, form: Form, rv: u64, initial_end: bool) -> Value {
    let mut meta = json!({"resourceVersion": rv.to_string(), "creationTimestamp": null});
    if initial_end {
        meta["annotations"] = json!({ INITIAL_EVENTS_END: "true" });
    }
    match form {
        Form::Partial(v) => json!({"kind": "PartialObjectMetadata", "apiVersion": v, "metadata": meta}),
        _ => json!({"kind": kind.name(), "apiVersion": kind.api_version(), "metadata": meta}),
    }
}

/// Where to start, from the request's options.
enum Start {
    Current { initial_end: bool },
    After(u64),
}

pub async fn watch(req: &Req<'_>, app: Arc<App>) -> Result<Response<Body>, ApiError> {
    let kind = req.kind;
    let form = req.form()?;
    let (ls, mut fs) = req.selectors()?;
    if req.info.legacy_watch && !req.info.name.is_empty() {
        fs = fs.and_name(&req.info.name);
    }
    let rv = req.q("resourceVersion").unwrap_or_default().to_string();
    let rv_match = req.q("resourceVersionMatch").unwrap_or_default();
    let send_initial = req.bool_param("sendInitialEvents")?;
    let bookmarks = req.bool_param("allowWatchBookmarks")?.unwrap_or(false);
    let timeout = match req.u64_param("timeoutSeconds")? {
        Some(s) => Duration::from_secs(s),
        None => app.cfg.random_request_timeout(),
    };

    let mut causes = Vec::new();
    if send_initial.is_some() {
        if rv_match != "NotOlderThan" {
            causes.push(Cause::forbidden(
                "resourceVersionMatch",
                "sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
            ));
        }
        if !app.cfg.watch_list {
            causes.push(Cause::forbidden(
                "sendInitialEvents",
                "sendInitialEvents is forbidden for watch unless the WatchList feature gate is enabled",
            ));
        }
    }
    if !rv_match.is_empty() {
        if send_initial.is_none() {
            causes.push(Cause::forbidden(
                "resourceVersionMatch",
                "resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided",
            ));
        }
        if rv_match != "NotOlderThan" {
            causes.push(Cause::not_supported("resourceVersionMatch", rv_match, &["NotOlderThan"]));
        }
        if req.q("continue").is_some_and(|c| !c.is_empty()) {
            causes.push(Cause::forbidden(
                "resourceVersionMatch",
                "resourceVersionMatch is forbidden when continue is provided",
            ));
        }
    }
    if !causes.is_empty() {
        return Err(invalid_list_options(causes));
    }
    let numeric = if rv.is_empty() || rv == "0" { None } else { Some(parse_rv(&rv)?) };

    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    let mut pump = Pump {
        app: app.clone(),
        kind,
        form,
        ls,
        fs,
        namespace: req.info.namespace.clone(),
        tx,
        hang: app.faults.hang(),
        drops: app.faults.drops(),
        last: 0,
    };
    // A hung server sends no headers either.
    if !pump.wait_unhung().await {
        return Err(ApiError::server_error(503, "watch dropped while hung"));
    }

    // A resourceVersion ahead of the store is waited for, then refused in the stream.
    if let Some(n) = numeric {
        if let Err(e) = wait_for_rv(&app.store, n).await {
            return Ok(error_stream(&e));
        }
    }
    let start = match (send_initial, numeric) {
        (Some(true), _) => Start::Current { initial_end: bookmarks },
        (Some(false), None) => Start::After(app.store.current_rv()),
        (_, Some(n)) => Start::After(n),
        (None, None) => Start::Current { initial_end: false },
    };
    let from = match start {
        Start::Current { .. } => WatchFrom::Current,
        Start::After(n) => WatchFrom::After(n),
    };
    let started = match app.store.watch(kind, from) {
        Ok(s) => s,
        Err(oldest) => {
            let e = ApiError::expired(format!("too old resource version: {} ({oldest})", numeric.unwrap_or(0)));
            if app.faults.watch_expired_as_http() {
                return Err(e);
            }
            return Ok(error_stream(&e));
        }
    };
    let initial_end = matches!(start, Start::Current { initial_end: true });
    let span = tracing::info_span!("watch", kind = kind.plural(), ns = %req.info.namespace);
    tokio::spawn(tracing::Instrument::instrument(
        async move {
            pump.run(started.initial, started.rx, started.rv, initial_end, bookmarks, timeout).await;
        },
        span,
    ));
    Ok(body::stream(rx))
}

struct Pump {
    app: Arc<App>,
    kind: Kind,
    form: Form,
    ls: LabelSelector,
    fs: FieldSelector,
    namespace: String,
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
    hang: watch::Receiver<bool>,
    drops: broadcast::Receiver<DropMode>,
    /// Newest resourceVersion delivered (or filtered out).
    last: u64,
}

enum Stop {
    /// End the response cleanly.
    End,
    /// Abort the connection.
    Reset,
    /// Client gone or server stopping: nothing more to write.
    Gone,
}

/// A watch response holding one ERROR event, as the API server answers a watch it cannot
/// start after the request was accepted.
fn error_stream(e: &ApiError) -> Response<Body> {
    let (tx, rx) = mpsc::channel(1);
    // Capacity 1 and a fresh channel: this send cannot fail.
    let _queued = tx.try_send(Ok(error_frame(e)));
    body::stream(rx)
}

impl Pump {
    fn shutdown(&self) -> &tokio_util::sync::CancellationToken {
        &self.app.shutdown
    }

    /// Waits while watches are hung. False when the stream must stop instead.
    async fn wait_unhung(&mut self) -> bool {
        if !*self.hang.borrow() {
            return true;
        }
        let shutdown = self.app.shutdown.clone();
        let hang = &mut self.hang;
        let unhung = async move { hang.wait_for(|h| !*h).await.is_ok() };
        tokio::select! {
            ok = unhung => ok,
            _ = self.tx.closed() => false,
            _ = shutdown.cancelled() => false,
            d = self.drops.recv() => {
                if let Ok(DropMode::Reset) = d {
                    let _aborting = self.tx.send(Err(reset_error())).await;
                }
                false
            }
        }
    }

    async fn send(&mut self, b: Bytes) -> bool {
        self.wait_unhung().await && self.tx.send(Ok(b)).await.is_ok()
    }

    fn passes(&self, o: &Value) -> bool {
        (self.namespace.is_empty() || o["metadata"]["namespace"] == self.namespace.as_str())
            && matches(o, &self.ls, &self.fs)
    }

    /// The event this watcher sees for a store event, if any: an object entering the selection
    /// is ADDED, one leaving it is DELETED (its previous state at the new resourceVersion).
    fn translate(&self, ev: &Event) -> Option<(EventType, Value)> {
        if ev.kind != self.kind {
            return None;
        }
        let now = self.passes(&ev.object);
        match ev.etype {
            EventType::Added | EventType::Deleted => now.then(|| (ev.etype, (*ev.object).clone())),
            EventType::Modified => {
                let before = ev.prev.as_deref().is_some_and(|p| self.passes(p));
                match (before, now) {
                    (true, true) => Some((EventType::Modified, (*ev.object).clone())),
                    (false, true) => Some((EventType::Added, (*ev.object).clone())),
                    (true, false) => {
                        let mut old = ev.prev.as_deref().cloned().unwrap_or(Value::Null);
                        old["metadata"]["resourceVersion"] = ev.rv.to_string().into();
                        Some((EventType::Deleted, old))
                    }
                    (false, false) => None,
                }
            }
        }
    }

    async fn deliver(&mut self, ev: &Event) -> bool {
        if ev.rv <= self.last {
            return true;
        }
        self.last = self.last.max(ev.rv);
        match self.translate(ev) {
            Some((t, obj)) => {
                let o = negotiate::render_one(self.kind, self.form, &obj);
                self.send(frame(t.as_str(), o)).await
            }
            None => true,
        }
    }

    async fn bookmark(&mut self, rv: u64, initial_end: bool) -> bool {
        let o = bookmark_object(self.kind, self.form, rv, initial_end);
        self.send(frame("BOOKMARK", o)).await
    }

    async fn run(
        mut self,
        initial: Vec<Arc<Event>>,
        mut rx: broadcast::Receiver<Arc<Event>>,
        start_rv: u64,
        initial_end: bool,
        bookmarks: bool,
        timeout: Duration,
    ) {
        let deadline = Instant::now() + timeout;
        for ev in &initial {
            // Initial events may be older than `last` (synthetic ADDED of the current state).
            if let Some((t, obj)) = self.translate(ev) {
                let o = negotiate::render_one(self.kind, self.form, &obj);
                if !self.send(frame(t.as_str(), o)).await {
                    return;
                }
            }
        }
        self.last = start_rv;
        if initial_end && !self.bookmark(start_rv, true).await {
            return;
        }
        let every = self.app.cfg.bookmark_interval;
        let mut ticker = tokio::time::interval_at(Instant::now() + every, every);
        let stop = loop {
            let shutdown = self.shutdown().clone();
            tokio::select! {
                _ = shutdown.cancelled() => break Stop::End,
                _ = self.tx.closed() => break Stop::Gone,
                _ = sleep_until(deadline) => break Stop::End,
                d = self.drops.recv() => match d {
                    Ok(DropMode::Close) => break Stop::End,
                    Ok(DropMode::Reset) => break Stop::Reset,
                    Ok(DropMode::Gone) => {
                        let e = ApiError::expired(format!(
                            "too old resource version: {} ({})",
                            self.last,
                            self.app.store.current_rv()
                        ));
                        if !self.send(error_frame(&e)).await {
                            break Stop::Gone;
                        }
                        break Stop::End;
                    }
                    Err(_) => {}
                },
                _ = ticker.tick(), if bookmarks => {
                    match self.app.store.drain_at_current(&mut rx) {
                        Ok((rv, pending)) => {
                            for ev in &pending {
                                if !self.deliver(ev).await {
                                    return;
                                }
                            }
                            let at = rv.max(self.last);
                            self.last = at;
                            if !self.bookmark(at, false).await {
                                return;
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "closing a watcher that fell behind");
                            break Stop::End;
                        }
                    }
                }
                r = rx.recv() => match r {
                    Ok(ev) => {
                        if !self.deliver(&ev).await {
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "closing a watcher that fell behind");
                        break Stop::End;
                    }
                },
            }
        };
        match stop {
            Stop::End => {
                // Ending the response writes bytes too: a hung watch stays silent.
                let _still_open = self.wait_unhung().await;
            }
            Stop::Reset => {
                let _aborting = self.tx.send(Err(reset_error())).await;
            }
            Stop::Gone => {}
        }
    }
}

fn reset_error() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::ConnectionReset, "watch reset by fault injection")
}
