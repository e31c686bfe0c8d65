//! Injected faults: persistent ones (5xx answers, delays, failing `/readyz` or `/livez`, hung
//! watches, HTTP 410 at watch start) and one-shot actions (drop open watches, expire every
//! older resourceVersion). Set from flags at start and through the control endpoint.

use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};

/// Answer `status` to requests whose path starts with `pathPrefix`, for the next `count`
/// requests (all of them when `count` is absent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorFault {
    pub status: u16,
    #[serde(default = "root")]
    pub path_prefix: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
}

/// Hold responses for `ms` milliseconds before answering.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DelayFault {
    pub ms: u64,
    #[serde(default = "root")]
    pub path_prefix: String,
}

fn root() -> String {
    "/".into()
}

/// The persistent faults in force.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultSet {
    #[serde(default)]
    pub errors: Vec<ErrorFault>,
    #[serde(default)]
    pub delay: Option<DelayFault>,
    #[serde(default)]
    pub readyz_fail: bool,
    #[serde(default)]
    pub livez_fail: bool,
    #[serde(default)]
    pub hang_watches: bool,
    /// Answer a watch from a too-old resourceVersion with an HTTP 410 instead of the
    /// API server's 200 + `ERROR` event.
    #[serde(default)]
    pub watch_expired_as_http: bool,
}

/// How open watches are dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum DropMode {
    /// End the response cleanly (terminating chunk), as at a server-side timeout.
    Close,
    /// Abort the connection mid-stream.
    Reset,
    /// Send an `ERROR` event with a 410 `Expired` Status, then end the response.
    Gone,
}

/// A control request: every field present replaces the current one; `clear` resets everything
/// first; `dropWatches` and `expireNow` act once.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultRequest {
    #[serde(default)]
    pub clear: bool,
    pub errors: Option<Vec<ErrorFault>>,
    /// `null` removes the delay.
    #[serde(default, with = "double_option")]
    pub delay: Option<Option<DelayFault>>,
    pub readyz_fail: Option<bool>,
    pub livez_fail: Option<bool>,
    pub hang_watches: Option<bool>,
    pub watch_expired_as_http: Option<bool>,
    pub drop_watches: Option<DropMode>,
    #[serde(default)]
    pub expire_now: bool,
}

mod double_option {
    use serde::{Deserialize, Deserializer};
    pub fn deserialize<'de, T: Deserialize<'de>, D: Deserializer<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
        Option::<T>::deserialize(d).map(Some)
    }
}

pub struct Faults {
    set: Mutex<FaultSet>,
    hang_tx: watch::Sender<bool>,
    drop_tx: broadcast::Sender<DropMode>,
}

impl Faults {
    pub fn new(initial: FaultSet) -> Self {
        let (hang_tx, _) = watch::channel(initial.hang_watches);
        let (drop_tx, _) = broadcast::channel(16);
        Self { set: Mutex::new(initial), hang_tx, drop_tx }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FaultSet> {
        self.set.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn current(&self) -> FaultSet {
        self.lock().clone()
    }

    /// Applies the persistent part of a request; returns the one-shot actions to run.
    pub fn apply(&self, req: &FaultRequest) -> FaultSet {
        let mut s = self.lock();
        if req.clear {
            *s = FaultSet::default();
        }
        if let Some(e) = &req.errors {
            s.errors = e.clone();
        }
        if let Some(d) = &req.delay {
            s.delay = d.clone();
        }
        if let Some(v) = req.readyz_fail {
            s.readyz_fail = v;
        }
        if let Some(v) = req.livez_fail {
            s.livez_fail = v;
        }
        if let Some(v) = req.hang_watches {
            s.hang_watches = v;
        }
        if let Some(v) = req.watch_expired_as_http {
            s.watch_expired_as_http = v;
        }
        self.hang_tx.send_replace(s.hang_watches);
        s.clone()
    }

    /// The status to answer instead of serving `path`, consuming one use of a counted fault.
    pub fn take_error(&self, path: &str) -> Option<u16> {
        let mut s = self.lock();
        let idx = s.errors.iter().position(|e| path.starts_with(&e.path_prefix) && e.count.is_none_or_positive())?;
        let e = &mut s.errors[idx];
        let status = e.status;
        if let Some(n) = e.count.as_mut() {
            *n -= 1;
            if *n == 0 {
                s.errors.remove(idx);
            }
        }
        Some(status)
    }

    pub fn delay_for(&self, path: &str) -> Option<Duration> {
        let s = self.lock();
        s.delay.as_ref().filter(|d| path.starts_with(&d.path_prefix) && d.ms > 0).map(|d| Duration::from_millis(d.ms))
    }

    pub fn readyz_fail(&self) -> bool {
        self.lock().readyz_fail
    }
    pub fn livez_fail(&self) -> bool {
        self.lock().livez_fail
    }
    pub fn watch_expired_as_http(&self) -> bool {
        self.lock().watch_expired_as_http
    }

    /// Follows the hang flag.
    pub fn hang(&self) -> watch::Receiver<bool> {
        self.hang_tx.subscribe()
    }

    /// Tells every open watch to drop; returns how many were listening.
    pub fn drop_watches(&self, mode: DropMode) -> usize {
        self.drop_tx.send(mode).unwrap_or(0)
    }

    pub fn drops(&self) -> broadcast::Receiver<DropMode> {
        self.drop_tx.subscribe()
    }
}

trait CountLeft {
    fn is_none_or_positive(&self) -> bool;
}

impl CountLeft for Option<u64> {
    fn is_none_or_positive(&self) -> bool {
        self.map_or(true, |n| n > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counted_errors_run_out_and_prefixes_match() {
        let f = Faults::new(FaultSet::default());
        let req: FaultRequest = serde_json::from_str(
            r#"{"errors":[{"status":503,"pathPrefix":"/api/","count":2},{"status":500,"pathPrefix":"/apis"}]}"#,
        )
        .unwrap();
        f.apply(&req);
        assert_eq!(f.take_error("/version"), None);
        assert_eq!(f.take_error("/api/v1/configmaps"), Some(503));
        assert_eq!(f.take_error("/api/v1/configmaps"), Some(503));
        assert_eq!(f.take_error("/api/v1/configmaps"), None);
        assert_eq!(f.take_error("/apis/x"), Some(500));
        assert_eq!(f.take_error("/apis/x"), Some(500));
        let s = f.apply(&serde_json::from_str(r#"{"delay":{"ms":20},"readyzFail":true}"#).unwrap());
        assert!(s.readyz_fail && s.errors.len() == 1);
        assert_eq!(f.delay_for("/anything"), Some(Duration::from_millis(20)));
        f.apply(&serde_json::from_str(r#"{"delay":null}"#).unwrap());
        assert_eq!(f.delay_for("/anything"), None);
        let s = f.apply(&serde_json::from_str(r#"{"clear":true}"#).unwrap());
        assert_eq!(s, FaultSet::default());
        let err = serde_json::from_str::<FaultRequest>(r#"{"bogus":1}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `bogus`"), "{err}");
    }
}
