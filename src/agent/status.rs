//! The running agent's state as `/status` serves it and `cpha status` prints it.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// A snapshot the agent loop keeps current.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AgentStatus {
    /// forwarding, handing-over, balanced or fallback.
    pub phase: String,
    /// Unix seconds of the last phase change.
    pub phase_since: u64,
    /// Whether a request through the endpoint itself reached a ready apiserver (what
    /// `/readyz` answers); READY=1 only needs the forward or HAProxy in place.
    pub endpoint_carried: bool,
    /// The last check through the endpoint: "ok" or what failed.
    pub endpoint_check: Option<String>,
    pub endpoint: String,
    pub topology: String,
    /// nftables, iptables or userspace.
    pub forward_backend: String,
    /// Where new connections go: "haproxy" or the forward's targets.
    pub carrier: String,
    pub members: Vec<String>,
    /// cache, or the live source that gave the current set.
    pub members_origin: String,
    /// DNS members that did not resolve at the last update.
    pub unresolved: Vec<String>,
    /// Members that answered `/readyz` at the last probe.
    pub ready_members: Vec<String>,
    pub last_rejected_update: Option<String>,
    pub source_problem: Option<String>,
    pub haproxy_answers: bool,
    /// HAProxy's master or admin socket accepts connections.
    pub haproxy_alive: bool,
    pub haproxy_servers_up: usize,
    pub haproxy_servers_total: usize,
    /// Desired servers an operator put in maintenance (`set server ... state maint`), which
    /// cpha leaves so.
    #[serde(default)]
    pub haproxy_servers_maint: usize,
    pub last_apply: Option<String>,
    pub last_error: Option<String>,
    /// The reported drift between the member list and the apiservers' registrations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift: Option<String>,
    /// Unix seconds since when the two disagree.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift_since: Option<u64>,
    /// The virtual IP, on a host that runs one.
    #[serde(default)]
    pub vip: Option<VipStatus>,
    /// Another table's rule that translates the endpoint before cpha's forward can (reported,
    /// not fought).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outranked_by: Option<String>,
    /// The last repair of something cpha owns that someone else changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_repair: Option<RepairStatus>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RepairStatus {
    /// What was put back: `forward`.
    pub object: String,
    /// What had changed.
    pub why: String,
    /// Unix seconds of the repair.
    pub at: u64,
    /// Milliseconds from the change seen to the repair done.
    pub took_ms: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct VipStatus {
    pub address: String,
    pub interface: String,
    /// Whether this host holds the address now.
    pub held: bool,
    /// Unix seconds of the last change of `held`.
    pub held_since: u64,
    /// keepalived's VRRP state: master, backup, fault, stop; unknown (running, not told yet) or
    /// gone (not running).
    pub vrrp_state: String,
    /// The health cpha advertises to keepalived: healthy, degraded, withdrawn (none yet).
    pub advertised: String,
    /// The last keepalived.conf change.
    pub last_config: Option<String>,
}

impl AgentStatus {
    pub fn render_text(&self) -> String {
        let mut s = format!(
            "phase       {}\nendpoint    {} ({} topology, {} forward; {})\ncarrier     {}\nmembers     {} ({})\nhaproxy     {}\n",
            self.phase,
            self.endpoint,
            self.topology,
            self.forward_backend,
            match (&self.endpoint_check, self.endpoint_carried) {
                (_, true) => "answers".to_string(),
                (Some(why), false) => format!("not answering: {why}"),
                (None, false) => "not checked yet".to_string(),
            },
            self.carrier,
            if self.members.is_empty() { "none".to_string() } else { self.members.join(", ") },
            self.members_origin,
            if self.haproxy_answers {
                let maint = match self.haproxy_servers_maint {
                    0 => String::new(),
                    n => format!(", {n} in maintenance by an operator"),
                };
                format!("answers, {}/{} servers UP{maint}", self.haproxy_servers_up, self.haproxy_servers_total)
            } else {
                "not answering".to_string()
            },
        );
        if let Some(vip) = &self.vip {
            s.push_str(&format!(
                "vip         {} on {}: {} (VRRP {}, advertised {})\n",
                vip.address,
                vip.interface,
                if vip.held { "held by this host" } else { "not held here" },
                vip.vrrp_state,
                vip.advertised,
            ));
        }
        if let Some(r) = &self.last_repair {
            let at = humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(r.at));
            s.push_str(&format!("repaired    {} at {at} in {} ms: {}\n", r.object, r.took_ms, r.why));
        }
        for (label, value) in [
            ("last apply", &self.last_apply),
            ("rejected", &self.last_rejected_update),
            ("source", &self.source_problem),
            ("drift", &self.drift),
            ("outranked", &self.outranked_by),
            ("last error", &self.last_error),
        ] {
            if let Some(v) = value {
                s.push_str(&format!("{label:<11} {v}\n"));
            }
        }
        s
    }
}

/// Reads `/status` from a running agent's local port.
pub fn fetch(addr: SocketAddr, timeout: Duration) -> anyhow::Result<AgentStatus> {
    use std::io::{Read, Write};
    // NOTE: whatever answers on the port is read as untrusted (any local user can bind it when
    // no agent runs): at most MAX_STATUS bytes within `timeout` in all, and nothing of it is
    // printed unescaped.
    const MAX_STATUS: u64 = 4 << 20;
    let deadline = std::time::Instant::now() + timeout;
    let mut stream =
        std::net::TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("no agent answers on {addr}"))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(format!("GET /status HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut raw = Vec::new();
    let mut limited = (&stream).take(MAX_STATUS + 1);
    let mut buf = [0u8; 16 * 1024];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        anyhow::ensure!(!left.is_zero(), "the agent on {addr} did not answer within {timeout:?}");
        stream.set_read_timeout(Some(left))?;
        match limited.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).with_context(|| format!("reading the answer of {addr}")),
        }
    }
    anyhow::ensure!(raw.len() as u64 <= MAX_STATUS, "the answer on {addr} is larger than {MAX_STATUS} bytes");
    let response = String::from_utf8(raw).context("the answer of the status port is not UTF-8")?;
    let (head, body) = response.split_once("\r\n\r\n").context("malformed HTTP response from the agent")?;
    anyhow::ensure!(
        head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200"),
        "the agent answered: {}",
        crate::haproxy::runtime::printable(head.lines().next().unwrap_or(""), 200)
    );
    serde_json::from_str(body).context("the agent's /status is not the expected JSON")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_repair_is_one_line_of_the_text() {
        let status = AgentStatus {
            last_repair: Some(RepairStatus {
                object: "forward".into(),
                why: "table inet cpha deleted".into(),
                at: 1_796_590_800,
                took_ms: 31,
            }),
            ..AgentStatus::default()
        };
        let text = status.render_text();
        assert!(
            text.lines().any(|l| l == "repaired    forward at 2026-12-06T21:00:00Z in 31 ms: table inet cpha deleted"),
            "{text}"
        );
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["last_repair"]["why"], "table inet cpha deleted");
        assert!(serde_json::to_value(AgentStatus::default()).unwrap().get("last_repair").is_none());
    }
}
