//! The one-line JSON results of the `cpha-lab` clients, as typed values that tests can parse back.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How many error messages a report keeps verbatim; the rest are only counted.
pub const MAX_ERRORS: usize = 10;

/// `cpha-lab probe`: sequential connections that each read the greeting.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProbeReport {
    pub ok: u64,
    pub failed: u64,
    /// Greeting (server id) to number of connections that saw it.
    pub ids: BTreeMap<String, u64>,
    /// The first few errors, in order.
    pub errors: Vec<String>,
}

/// `cpha-lab stream` (one long-lived echoed connection) and `cpha-lab https-stream` (one
/// long-lived HTTPS connection with keep-alive).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StreamReport {
    /// True when every round trip came back intact and the connection closed cleanly.
    pub ok: bool,
    /// `stream`: bytes sent and verified in the echo. `https-stream`: bytes of the responses
    /// (heads and bodies) read on the connection.
    pub bytes: u64,
    pub roundtrips: u64,
    pub error: Option<String>,
    /// `https-stream` only (absent otherwise): what broke, for tests to match on. `connect`,
    /// `tls`, `timeout`, `closed` (the server closed the connection, or announced it would with
    /// `Connection: close`), `reset`, `status` (an answer other than 200), `protocol` (a
    /// malformed response or stray bytes), `io`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_kind: Option<String>,
    /// The greeting of the server the stream reached.
    pub id: Option<String>,
    pub duration_s: f64,
}

/// `cpha-lab connect-loop`, `cpha-lab connrate` and `cpha-lab https-loop`: many short
/// connections.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    pub ok: u64,
    pub failed: u64,
    pub concurrency: usize,
    pub duration_s: f64,
    /// Successful connections per second over the whole run.
    pub conns_per_sec: f64,
    /// Latency of a successful connection, in ms: connect, greeting (and request/response);
    /// for `https-loop` connect, handshake, request, response and close.
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Greeting to count (empty for `https-loop`).
    pub ids: BTreeMap<String, u64>,
    /// Error kind to count, over all failures: `STEP: KIND` (e.g. `connect: refused`,
    /// `tls: certificate`, `read: timeout`), `unexpected id` or `status`.
    pub error_kinds: BTreeMap<String, u64>,
    /// The first few errors, each with the time since the start of the run.
    pub errors: Vec<String>,
    /// When the first and the last failure happened, in seconds since the start of the run:
    /// with a steady load, the window in which the endpoint did not answer.
    #[serde(default)]
    pub first_failure_s: Option<f64>,
    #[serde(default)]
    pub last_failure_s: Option<f64>,
    /// Every connection, by start time, when asked for (`--timeline`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub timeline: Vec<ConnRecord>,
}

/// One connection of a load run: when it started and ended (seconds since the start of the
/// run), and whether it succeeded.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConnRecord {
    pub start_s: f64,
    pub end_s: f64,
    pub ok: bool,
}

/// `cpha-lab http`: one request and its answer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HttpReport {
    /// The response status; 0 when there was no response.
    pub status: u16,
    /// The response body (invalid UTF-8 replaced).
    pub body: String,
    /// Why there was no response (connect, TLS, timeout, a malformed answer); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `cpha-lab throughput`: one stream in one direction.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ThroughputReport {
    /// `write` (client to server) or `read` (server to client).
    pub mode: String,
    pub bytes: u64,
    pub duration_s: f64,
    pub gbit_per_sec: f64,
}

/// Keeps the first [`MAX_ERRORS`] messages (by time since the start of a run) and counts every
/// error by kind.
#[derive(Clone, Debug, Default)]
pub struct Errors {
    first: Vec<(f64, String)>,
    pub kinds: BTreeMap<String, u64>,
    /// The earliest and the latest error, in seconds since the start.
    pub span: Option<(f64, f64)>,
}

impl Errors {
    /// Records an error that happened `at_s` seconds into the run.
    pub fn record(&mut self, kind: &str, at_s: f64, message: impl Display) {
        *self.kinds.entry(kind.to_string()).or_default() += 1;
        self.span = Some(match self.span {
            Some((a, b)) => (a.min(at_s), b.max(at_s)),
            None => (at_s, at_s),
        });
        if self.first.len() < MAX_ERRORS {
            self.first.push((at_s, message.to_string()));
        }
    }

    pub fn merge(&mut self, other: Errors) {
        for (kind, n) in other.kinds {
            *self.kinds.entry(kind).or_default() += n;
        }
        self.span = match (self.span, other.span) {
            (Some((a, b)), Some((c, d))) => Some((a.min(c), b.max(d))),
            (s, None) | (None, s) => s,
        };
        self.first.extend(other.first);
        self.first.sort_by(|a, b| a.0.total_cmp(&b.0));
        self.first.truncate(MAX_ERRORS);
    }

    /// The kept messages, earliest first.
    pub fn first(&self) -> Vec<String> {
        self.first.iter().map(|(_, m)| m.clone()).collect()
    }
}

/// Nearest-rank percentile of sorted latencies in microseconds, in milliseconds; 0 when empty.
pub fn percentile_ms(sorted_us: &[u32], p: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted_us.len() as f64).ceil() as usize;
    let index = rank.clamp(1, sorted_us.len()) - 1;
    f64::from(sorted_us[index]) / 1000.0
}

/// Bits per second in Gbit/s for `bytes` moved in `elapsed`.
pub fn gbit_per_sec(bytes: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs <= 0.0 {
        return 0.0;
    }
    bytes as f64 * 8.0 / secs / 1e9
}

/// Median of a list of measurements (the mean of the middle two for an even count).
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 { v[mid] } else { (v[mid - 1] + v[mid]) / 2.0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<u32> = (1..=100).map(|ms| ms * 1000).collect();
        assert_eq!(percentile_ms(&v, 50.0), 50.0);
        assert_eq!(percentile_ms(&v, 99.0), 99.0);
        assert_eq!(percentile_ms(&v, 100.0), 100.0);
        assert_eq!(percentile_ms(&[1500], 99.0), 1.5);
        assert_eq!(percentile_ms(&[], 99.0), 0.0);
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[f64::NAN, 5.0]), Some(5.0));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn gbit_per_sec_counts_bits() {
        assert_eq!(gbit_per_sec(1_250_000_000, Duration::from_secs(1)), 10.0);
        assert_eq!(gbit_per_sec(1, Duration::ZERO), 0.0);
    }

    #[test]
    fn errors_keep_the_first_and_count_all() {
        let mut a = Errors::default();
        for i in 0..15 {
            a.record("refused", 1.0 + f64::from(i), format!("conn {i}"));
        }
        let mut b = Errors::default();
        b.record("timeout", 0.5, "early");
        a.merge(b);
        let first = a.first();
        assert_eq!(first.len(), MAX_ERRORS);
        assert_eq!(first[0], "early");
        assert_eq!(first[1], "conn 0");
        assert_eq!(a.kinds["refused"], 15);
        assert_eq!(a.kinds["timeout"], 1);
    }

    #[test]
    fn reports_round_trip_through_json() {
        let r = ProbeReport {
            ok: 3,
            failed: 1,
            ids: [("a".to_string(), 3)].into_iter().collect(),
            errors: vec!["boom".into()],
        };
        let line = serde_json::to_string(&r).unwrap();
        assert_eq!(line, r#"{"ok":3,"failed":1,"ids":{"a":3},"errors":["boom"]}"#);
        assert_eq!(serde_json::from_str::<ProbeReport>(&line).unwrap(), r);

        let h = HttpReport { status: 200, body: "ok".into(), error: None };
        assert_eq!(serde_json::to_string(&h).unwrap(), r#"{"status":200,"body":"ok"}"#);
        let h: HttpReport = serde_json::from_str(r#"{"status":0,"body":"","error":"refused"}"#).unwrap();
        assert_eq!(h.error.as_deref(), Some("refused"));

        // The TCP stream's line has no error_kind, and parses back without one.
        let s = StreamReport { ok: true, roundtrips: 2, bytes: 512, ..StreamReport::default() };
        let line = serde_json::to_string(&s).unwrap();
        assert!(!line.contains("error_kind"), "{line}");
        assert_eq!(serde_json::from_str::<StreamReport>(&line).unwrap(), s);
    }
}
