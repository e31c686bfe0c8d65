//! `cpha-lab`: the servers, clients and benchmark of cpha's test kit.
//!
//! Clients print one JSON line on stdout and exit 0 only when nothing failed; servers print
//! `listening ADDR` once bound and nothing else on stdout. Exit codes: 0 success, 1 a measured
//! failure or a runtime error (on stderr), 2 bad usage.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser, Subcommand};
use serde::Serialize;

use cpha_lab::client::{self, Direction, LoadOpts, StreamOpts};
use cpha_lab::dur::Dur;
use cpha_lab::http::{check_target, check_token, Url};
use cpha_lab::https::{self, HttpOpts, HttpsLoopOpts, HttpsStreamOpts, Target};
use cpha_lab::{bench, server, stop};

#[derive(Parser)]
#[command(name = "cpha-lab", version, about = "cpha's test and benchmark kit")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// TCP server: greets each connection with `ID\n`, then echoes until EOF.
    Serve {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        id: String,
        /// Worker threads.
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Exit after this long even if nobody stopped the server.
        #[arg(long, default_value = "1h")]
        max_duration: Dur,
    },
    /// Throughput server that reads and discards.
    Sink {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long, default_value = "1h")]
        max_duration: Dur,
    },
    /// Throughput server that writes as fast as it can.
    Source {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long, default_value = "1h")]
        max_duration: Dur,
    },
    /// Sequential connections that each read the greeting; exit 0 only if all succeeded.
    Probe {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
        count: u64,
        /// Per connection: connect, then the greeting.
        #[arg(long, default_value = "2s")]
        timeout: Dur,
        /// Only connect (for servers that send no greeting).
        #[arg(long)]
        connect_only: bool,
    },
    /// One long-lived echoed connection, verified byte for byte until SIGTERM/SIGINT.
    Stream {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value = "50ms")]
        interval: Dur,
        #[arg(long, default_value = "600s")]
        max_duration: Dur,
        /// Written after the first verified round trip.
        #[arg(long)]
        ready_file: Option<PathBuf>,
        /// Longest wait for the connection, the greeting or one echo.
        #[arg(long, default_value = "2s")]
        timeout: Dur,
        #[arg(long, default_value_t = 256)]
        chunk_size: usize,
    },
    /// A steady stream of new connections (connect, greeting, close).
    ConnectLoop {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=1024))]
        concurrency: u64,
        #[arg(long)]
        duration: Dur,
        #[arg(long, default_value_t = 2_000_000)]
        max_conns: u64,
        /// A greeting other than this counts as a failed connection.
        #[arg(long)]
        expect_id: Option<String>,
        /// Cap on new connections per second, over all workers.
        #[arg(long)]
        rate: Option<f64>,
        #[arg(long, default_value = "2s")]
        timeout: Dur,
    },
    /// One stream for a while; reports Gbit/s.
    Throughput {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        duration: Dur,
        /// write: client to a sink; read: from a source.
        #[arg(long, default_value = "write")]
        mode: Direction,
        #[arg(long, default_value_t = server::BULK_BUF)]
        buffer: usize,
        #[arg(long, default_value = "5s")]
        timeout: Dur,
    },
    /// New connections per second with one echoed request each (against serve).
    Connrate {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=1024))]
        concurrency: u64,
        #[arg(long)]
        duration: Dur,
        #[arg(long, default_value_t = 2_000_000)]
        max_conns: u64,
        #[arg(long, default_value = "2s")]
        timeout: Dur,
    },
    /// A steady stream of new HTTPS connections: connect, TLS handshake, one GET with
    /// `Connection: close`, the whole response, close.
    HttpsLoop {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value = "/readyz", value_parser = check_target)]
        path: String,
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=1024))]
        concurrency: u64,
        #[arg(long)]
        duration: Dur,
        #[arg(long, default_value_t = 2_000_000)]
        max_conns: u64,
        /// Any other status counts as a failed connection.
        #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u16).range(100..=599))]
        expect_status: u16,
        /// Bound on one whole connection, from connect to close.
        #[arg(long, default_value = "2s")]
        timeout: Dur,
        /// Cap on new connections per second, over all workers.
        #[arg(long)]
        rate: Option<f64>,
        /// Verify the server certificate against this PEM CA file (otherwise any certificate
        /// is accepted; handshake signatures are still verified).
        #[arg(long)]
        ca: Option<PathBuf>,
        /// Name to verify, send as SNI and as Host (default: the IP of --to).
        #[arg(long)]
        server_name: Option<String>,
        /// Report every connection (start, end, outcome) in `timeline`.
        #[arg(long)]
        timeline: bool,
    },
    /// One long-lived HTTPS connection with keep-alive: a GET every interval, each answer 200,
    /// until SIGTERM/SIGINT or --max-duration.
    HttpsStream {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value = "/readyz", value_parser = check_target)]
        path: String,
        #[arg(long, default_value = "50ms")]
        interval: Dur,
        #[arg(long, default_value = "600s")]
        max_duration: Dur,
        /// Written after the first good round trip.
        #[arg(long)]
        ready_file: Option<PathBuf>,
        /// Bound on connect + handshake, and on each round trip.
        #[arg(long, default_value = "2s")]
        timeout: Dur,
        #[arg(long)]
        ca: Option<PathBuf>,
        #[arg(long)]
        server_name: Option<String>,
    },
    /// One HTTP request (http:// or https://): prints the status and the body; exit 0 for 2xx.
    Http {
        #[arg(long, default_value = "GET", value_parser = ["GET", "POST", "DELETE"])]
        method: String,
        #[arg(long)]
        url: Url,
        /// JSON request body.
        #[arg(long)]
        data: Option<String>,
        /// Bearer token.
        #[arg(long, value_parser = check_token)]
        token: Option<String>,
        /// https://: verify the server certificate against this PEM CA file.
        #[arg(long, conflicts_with = "insecure")]
        ca: Option<PathBuf>,
        /// https://: accept any server certificate (handshake signatures are still verified).
        #[arg(long)]
        insecure: bool,
        /// https://: name to verify instead of the URL's host.
        #[arg(long)]
        server_name: Option<String>,
        /// Bound on the request, from the connect to the end of the response.
        #[arg(long, default_value = "5s")]
        timeout: Dur,
    },
    /// The benchmark behind tools/bench (run as root; creates network namespaces).
    Bench {
        /// The cpha binary; without it cpha's rows are not measured.
        #[arg(long)]
        cpha: Option<PathBuf>,
        /// Why there is no cpha binary, for the write-up.
        #[arg(long)]
        cpha_missing: Option<String>,
        #[arg(long, default_value_t = 3)]
        runs: usize,
        #[arg(long, default_value = "3s")]
        duration: Dur,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// Only these paths (comma-separated keys: direct, nftables, iptables, userspace,
        /// userspace-1m, socat, haproxy, haproxy-splice).
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Where client, forwarder and server run (comma-separated: routed, same-host).
        #[arg(long, value_delimiter = ',', default_value = "routed,same-host")]
        layout: Vec<String>,
        /// Where to write the Markdown write-up (the last one given wins).
        #[arg(long, overrides_with = "out")]
        out: Option<PathBuf>,
        /// TCP congestion control for the benchmark's namespaces (e.g. cubic, bbr); by default
        /// they inherit the host's net.ipv4.tcp_congestion_control.
        #[arg(long)]
        congestion_control: Option<String>,
    },
    /// The virtual IP's failover benchmark: three hosts with keepalived and cpha, a worker
    /// under load, each failure of the holder `--runs` times, then an idle run under CPU load.
    BenchFailover {
        #[arg(long)]
        cpha: PathBuf,
        #[arg(long)]
        standin: PathBuf,
        #[arg(long, default_value_t = 10)]
        runs: usize,
        /// The idle stability run (0s to skip).
        #[arg(long, default_value = "10m")]
        idle: Dur,
        #[arg(long, default_value_t = 100)]
        rate: u32,
        /// The Markdown file whose failover section is (re)written.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(err) => {
            eprintln!("cpha-lab: {err:#}");
            ExitCode::from(1)
        }
    }
}

/// Prints the one JSON line of a client.
fn emit(report: &impl Serialize) -> Result<()> {
    let line = serde_json::to_string(report)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

/// Runs a subcommand; `Ok(false)` is a measured failure.
fn run(cmd: Cmd) -> Result<bool> {
    match cmd {
        Cmd::Serve { listen, id, threads, max_duration } => {
            server::check_id(&id)?;
            let listener = server::bind(listen)?;
            server::announce(&listener)?;
            server::exit_after(max_duration.get());
            server::serve(listener, &id, threads)?;
            Ok(true)
        }
        Cmd::Sink { listen, max_duration } => {
            let listener = server::bind(listen)?;
            server::announce(&listener)?;
            server::exit_after(max_duration.get());
            server::sink(listener)?;
            Ok(true)
        }
        Cmd::Source { listen, max_duration } => {
            let listener = server::bind(listen)?;
            server::announce(&listener)?;
            server::exit_after(max_duration.get());
            server::source(listener)?;
            Ok(true)
        }
        Cmd::Probe { to, count, timeout, connect_only } => {
            stop::install()?;
            let report = client::probe(to, count, timeout.get(), connect_only);
            emit(&report)?;
            Ok(report.failed == 0 && report.ok == count)
        }
        Cmd::Stream { to, interval, max_duration, ready_file, timeout, chunk_size } => {
            stop::install()?;
            let report = client::stream(&StreamOpts {
                to,
                interval: interval.get(),
                max_duration: max_duration.get(),
                timeout: timeout.get(),
                chunk_size,
                ready_file,
            });
            emit(&report)?;
            Ok(report.ok)
        }
        Cmd::ConnectLoop { to, concurrency, duration, max_conns, expect_id, rate, timeout } => {
            stop::install()?;
            let report = client::load(&LoadOpts {
                to,
                concurrency: usize::try_from(concurrency).context("concurrency")?,
                duration: duration.get(),
                max_conns,
                timeout: timeout.get(),
                request: false,
                expect_id,
                rate,
            });
            emit(&report)?;
            Ok(report.failed == 0 && report.ok > 0)
        }
        Cmd::Throughput { to, duration, mode, buffer, timeout } => {
            stop::install()?;
            let report = client::throughput(to, duration.get(), mode, buffer, timeout.get())?;
            emit(&report)?;
            Ok(true)
        }
        Cmd::Connrate { to, concurrency, duration, max_conns, timeout } => {
            stop::install()?;
            let report = client::load(&LoadOpts {
                to,
                concurrency: usize::try_from(concurrency).context("concurrency")?,
                duration: duration.get(),
                max_conns,
                timeout: timeout.get(),
                request: true,
                expect_id: None,
                rate: None,
            });
            emit(&report)?;
            Ok(report.failed == 0 && report.ok > 0)
        }
        Cmd::HttpsLoop {
            to,
            path,
            concurrency,
            duration,
            max_conns,
            expect_status,
            timeout,
            rate,
            ca,
            server_name,
            timeline,
        } => {
            stop::install()?;
            let report = https::https_loop(&HttpsLoopOpts {
                target: Target { to, path, ca, server_name, timeout: timeout.get() },
                concurrency: usize::try_from(concurrency).context("concurrency")?,
                duration: duration.get(),
                max_conns,
                rate,
                expect_status,
                timeline,
            })?;
            emit(&report)?;
            Ok(report.failed == 0 && report.ok > 0)
        }
        Cmd::HttpsStream { to, path, interval, max_duration, ready_file, timeout, ca, server_name } => {
            stop::install()?;
            let report = https::https_stream(&HttpsStreamOpts {
                target: Target { to, path, ca, server_name, timeout: timeout.get() },
                interval: interval.get(),
                max_duration: max_duration.get(),
                ready_file,
            })?;
            emit(&report)?;
            Ok(report.ok)
        }
        Cmd::Http { method, url, data, token, ca, insecure, server_name, timeout } => {
            if url.tls && ca.is_none() && !insecure {
                Cli::command()
                    .error(
                        clap::error::ErrorKind::MissingRequiredArgument,
                        "an https:// URL needs --ca FILE (verify) or --insecure (accept any certificate)",
                    )
                    .exit();
            }
            stop::install()?;
            let report =
                https::request(&HttpOpts { method, url, data, token, ca, server_name, timeout: timeout.get() })?;
            emit(&report)?;
            Ok(report.error.is_none() && (200..300).contains(&report.status))
        }
        Cmd::BenchFailover { cpha, standin, runs, idle, rate, out } => {
            stop::install()?;
            let lab = std::env::current_exe().context("locating the cpha-lab binary")?;
            let section = cpha_lab::failover::run(&cpha_lab::failover::FailoverOpts {
                programs: cpha_lab::vrrp::Programs { cpha, standin, lab },
                runs,
                idle: idle.get(),
                rate,
                out,
            })?;
            print!("{section}");
            Ok(true)
        }
        Cmd::Bench { cpha, cpha_missing, runs, duration, concurrency, only, layout, out, congestion_control } => {
            let layouts = layout
                .iter()
                .filter(|k| !k.is_empty())
                .map(|k| bench::Layout::parse(k))
                .collect::<anyhow::Result<Vec<_>>>()?;
            stop::install()?;
            let lab = std::env::current_exe().context("locating the cpha-lab binary")?;
            let doc = bench::run(&bench::BenchOpts {
                cpha,
                cpha_missing,
                lab,
                runs,
                duration: duration.get(),
                concurrency,
                only: only.into_iter().filter(|k| !k.is_empty()).collect(),
                layouts,
                out,
                congestion_control,
            })?;
            print!("{doc}");
            Ok(true)
        }
    }
}
