//! A small lab of network namespaces for cpha's integration tests: a `host` that runs cpha, a
//! `client` on another host, and a `server` host playing the apiservers.
//!
//! ```text
//!  client 10.1.0.2 / fd01::2  ── veth ──  host 10.1.0.1 / fd01::1   (listen: host:8443)
//!                                          host 10.2.0.1 / fd02::1  ── veth ──  server 10.2.0.2 / fd02::2
//!                                                                               "a" on :6443, "b" on :6444
//! ```
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use cpha_lab::netns::{self, Child, Netns};
use cpha_lab::report::{ProbeReport, StreamReport};

pub struct Lab {
    pub host: Netns,
    pub client: Netns,
    pub server: Netns,
    pub v6: bool,
    pub servers: Vec<Child>,
    pub tmp: PathBuf,
}

pub fn cpha() -> &'static str {
    env!("CARGO_BIN_EXE_cpha")
}

pub fn lab_bin() -> String {
    netns::require_bin("cpha-lab").expect("cpha-lab binary").display().to_string()
}

impl Lab {
    pub fn new(v6: bool) -> Result<Lab> {
        cpha_lab::require_root!();
        let host = Netns::new("cpha-host")?;
        let client = Netns::new("cpha-cli")?;
        let server = Netns::new("cpha-srv")?;
        netns::veth(&host, &["10.1.0.1/24", "fd01::1/64"], &client, &["10.1.0.2/24", "fd01::2/64"])?;
        netns::veth(&host, &["10.2.0.1/24", "fd02::1/64"], &server, &["10.2.0.2/24", "fd02::2/64"])?;
        netns::route(&client, &["default", "via", "10.1.0.1"])?;
        netns::route(&client, &["default", "via", "fd01::1"])?;
        let tmp = std::env::temp_dir().join(format!("cpha-test-{}-{}", std::process::id(), host.name()));
        std::fs::create_dir_all(&tmp)?;
        let mut lab = Lab { host, client, server, v6, servers: Vec::new(), tmp };
        let a = lab.server_addr(6443);
        let b = lab.server_addr(6444);
        lab.serve_in_server(&a, "a")?;
        lab.serve_in_server(&b, "b")?;
        Ok(lab)
    }

    pub fn serve_in_server(&mut self, addr: &str, id: &str) -> Result<()> {
        let mut child = self.server.spawn(lab_bin(), &["serve", "--listen", addr, "--id", id])?;
        child.listening_addr(Duration::from_secs(10))?;
        self.servers.push(child);
        Ok(())
    }

    /// Starts a `serve` server with `id` inside the host namespace itself (a local apiserver).
    pub fn serve_on_host(&mut self, addr: &str, id: &str) -> Result<()> {
        let mut child = self.host.spawn(lab_bin(), &["serve", "--listen", addr, "--id", id])?;
        child.listening_addr(Duration::from_secs(10))?;
        self.servers.push(child);
        Ok(())
    }

    pub fn enable_forwarding(&self) -> Result<()> {
        self.host.sysctl("net.ipv4.ip_forward", "1")?;
        self.host.sysctl("net.ipv6.conf.all.forwarding", "1")
    }

    pub fn server_addr(&self, port: u16) -> String {
        if self.v6 {
            format!("[fd02::2]:{port}")
        } else {
            format!("10.2.0.2:{port}")
        }
    }

    /// The host's own address on the server-side link.
    pub fn host_inner_addr(&self, port: u16) -> String {
        if self.v6 {
            format!("[fd02::1]:{port}")
        } else {
            format!("10.2.0.1:{port}")
        }
    }

    /// The load-balancer endpoint: the host's client-facing address.
    pub fn listen_addr(&self, port: u16) -> String {
        if self.v6 {
            format!("[fd01::1]:{port}")
        } else {
            format!("10.1.0.1:{port}")
        }
    }

    pub fn wildcard(&self, port: u16) -> String {
        if self.v6 {
            format!("[::]:{port}")
        } else {
            format!("0.0.0.0:{port}")
        }
    }

    /// Runs cpha in the host namespace; returns (success, stdout, stderr).
    pub fn cpha(&self, args: &[&str]) -> Result<(bool, String, String)> {
        let out = self.host.command(cpha()).args(args).output().context("running cpha")?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into(),
            String::from_utf8_lossy(&out.stderr).into(),
        ))
    }

    /// Runs cpha in the host namespace and requires success.
    pub fn cpha_ok(&self, args: &[&str]) -> Result<String> {
        let (ok, stdout, stderr) = self.cpha(args)?;
        ensure!(ok, "cpha {args:?} failed: {stderr}");
        Ok(stdout)
    }

    pub fn probe(&self, from: &Netns, to: &str, count: u32) -> Result<ProbeReport> {
        let out = from
            .command(lab_bin())
            .args(["probe", "--to", to, "--count", &count.to_string(), "--timeout", "2s"])
            .output()?;
        let line = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(line.trim()).with_context(|| format!("probe printed {line:?}"))
    }

    /// Starts a long-lived echo stream from `from` to `to` and waits until it is verified.
    pub fn stream(&self, from: &Netns, to: &str) -> Result<Child> {
        let ready = self.tmp.join(format!("stream-{}-ready", rand_suffix()));
        let ready_s = ready.display().to_string();
        let child = from.spawn(
            lab_bin(),
            &["stream", "--to", to, "--interval", "20ms", "--max-duration", "120s", "--ready-file", &ready_s],
        )?;
        netns::wait_for("the stream's first round trip", Duration::from_secs(10), || Ok(ready.exists().then_some(())))?;
        Ok(child)
    }

    /// Ruleset snapshot for "left as it was" comparisons: counters and dates removed.
    pub fn ruleset(&self) -> Result<String> {
        let nft = self.host.run("nft", &["list", "ruleset"])?;
        let v4 = self.host.run("iptables-save", &[])?;
        let v6 = self.host.run("ip6tables-save", &[])?;
        let clean = |s: &str| -> String {
            s.lines()
                .filter(|l| !l.starts_with('#'))
                .map(|l| {
                    let l = strip_between(l, "counter packets ", " bytes ");
                    strip_brackets(&l)
                })
                .collect::<Vec<_>>()
                .join("\n")
        };
        Ok(format!("{}\n--- iptables\n{}\n--- ip6tables\n{}", clean(&nft), clean(&v4), clean(&v6)))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.tmp);
    }
}

/// Stops a stream and returns its report.
pub fn finish_stream(mut child: Child) -> Result<StreamReport> {
    child.signal(libc_sigterm())?;
    let (_status, lines) = child.finish(Duration::from_secs(10))?;
    let line = lines.last().context("stream printed nothing")?;
    serde_json::from_str(line).with_context(|| format!("stream printed {line:?}"))
}

pub fn libc_sigterm() -> i32 {
    15
}

fn rand_suffix() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

fn strip_between(line: &str, start: &str, end: &str) -> String {
    match line.find(start) {
        Some(i) => {
            let rest = &line[i + start.len()..];
            let after_bytes = rest.find(end).map(|j| &rest[j + end.len()..]).unwrap_or("");
            let tail = after_bytes.split_once(' ').map(|(_, t)| t).unwrap_or("");
            format!("{}counter {}", &line[..i], tail)
        }
        None => line.to_string(),
    }
}

fn strip_brackets(line: &str) -> String {
    // iptables-save chain lines end with [packets:bytes].
    match (line.starts_with(':'), line.rfind(" [")) {
        (true, Some(i)) => line[..i].to_string(),
        _ => line.to_string(),
    }
}
