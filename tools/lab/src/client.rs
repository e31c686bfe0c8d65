//! The lab's clients: `probe`, `stream`, `connect-loop`/`connrate` and `throughput`.
//!
//! All of them use blocking sockets with timeouts on every step, so each run is bounded in time,
//! and stop at a clean point on SIGTERM/SIGINT ([`crate::stop`]) to still print their report.
//! The greeting protocol is the one of [`crate::server::serve`]: `ID\n`, then an echo.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::report::{gbit_per_sec, percentile_ms, Errors, LoadReport, ProbeReport, StreamReport, ThroughputReport};
use crate::{http, stop, tls};

/// The request `connrate` sends after the greeting; the echo must bring it back unchanged.
const PING: &[u8] = b"ping\n";

/// Longest greeting line accepted.
const MAX_LINE: usize = 128;

/// Why one short connection did not complete.
#[derive(Debug)]
pub(crate) enum Failure {
    /// A step failed: `connect`, `greeting`, `request` or `response` here; `connect`, `tls`,
    /// `write` or `read` for HTTPS.
    Step(&'static str, io::Error),
    /// The exchange completed with the wrong answer (`unexpected id`, `status`): counted under
    /// `kind`, with the greeting among the ids when there is one.
    Rejected { kind: &'static str, id: Option<String>, message: String },
    /// SIGTERM/SIGINT arrived in the middle: neither a success nor a failure.
    Stopped,
}

pub(crate) fn step(name: &'static str) -> impl Fn(io::Error) -> Failure {
    move |err| {
        if err.kind() == ErrorKind::Interrupted || http::is_stopped(&err) {
            Failure::Stopped
        } else {
            Failure::Step(name, err)
        }
    }
}

/// A short name for an I/O error, to count failures by kind.
fn kind_name(err: &io::Error) -> String {
    if let Some(tls) = tls::error_kind(err) {
        return tls.into();
    }
    match err.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => "timeout".into(),
        ErrorKind::UnexpectedEof => "closed".into(),
        ErrorKind::ConnectionRefused => "refused".into(),
        ErrorKind::ConnectionReset => "reset".into(),
        ErrorKind::InvalidData => "protocol".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// Connects with a timeout and sets the same timeout on reads and writes.
pub fn connect(to: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&to, timeout)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    Ok(s)
}

/// Whether to give up on EINTR: the short-connection clients do once a stop was asked for.
#[derive(Clone, Copy, PartialEq)]
enum OnSignal {
    Retry,
    GiveUp,
}

fn read_some(s: &mut TcpStream, buf: &mut [u8], on_signal: OnSignal) -> io::Result<usize> {
    loop {
        match s.read(buf) {
            Err(err) if err.kind() == ErrorKind::Interrupted => {
                if on_signal == OnSignal::GiveUp && stop::requested() {
                    return Err(err);
                }
            }
            other => return other,
        }
    }
}

fn read_full(s: &mut TcpStream, buf: &mut [u8], on_signal: OnSignal) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match read_some(s, &mut buf[done..], on_signal)? {
            0 => {
                return Err(io::Error::new(
                    ErrorKind::UnexpectedEof,
                    format!("closed after {done} of {} bytes", buf.len()),
                ))
            }
            n => done += n,
        }
    }
    Ok(())
}

/// Reads the greeting line (without its newline). Nothing may follow it before a request.
fn read_greeting(s: &mut TcpStream, on_signal: OnSignal) -> io::Result<String> {
    let mut buf = [0u8; MAX_LINE];
    let mut len = 0;
    loop {
        let n = read_some(s, &mut buf[len..], on_signal)?;
        if n == 0 {
            return Err(io::Error::new(
                ErrorKind::UnexpectedEof,
                format!("closed after {len} bytes, before a greeting line"),
            ));
        }
        len += n;
        if let Some(pos) = buf[..len].iter().position(|&b| b == b'\n') {
            if pos + 1 != len {
                return Err(io::Error::new(ErrorKind::InvalidData, "bytes after the greeting line"));
            }
            return String::from_utf8(buf[..pos].to_vec())
                .map_err(|_| io::Error::new(ErrorKind::InvalidData, "greeting is not UTF-8"));
        }
        if len == buf.len() {
            return Err(io::Error::new(ErrorKind::InvalidData, format!("no newline in the first {MAX_LINE} bytes")));
        }
    }
}

/// One short connection: connect, read the greeting, optionally one echoed request, close.
fn short_conn(to: SocketAddr, timeout: Duration, request: bool) -> Result<String, Failure> {
    let mut s = connect(to, timeout).map_err(step("connect"))?;
    let id = read_greeting(&mut s, OnSignal::GiveUp).map_err(step("greeting"))?;
    if request {
        s.write_all(PING).map_err(step("request"))?;
        let mut back = [0u8; PING.len()];
        read_full(&mut s, &mut back, OnSignal::GiveUp).map_err(step("response"))?;
        if back != PING {
            return Err(Failure::Step(
                "response",
                io::Error::new(ErrorKind::InvalidData, format!("echo came back as {back:?}")),
            ));
        }
    }
    Ok(id)
}

/// `probe`: `count` sequential connections that each read the greeting (or, with
/// `connect_only`, only connect) and close.
pub fn probe(to: SocketAddr, count: u64, timeout: Duration, connect_only: bool) -> ProbeReport {
    let start = Instant::now();
    let mut report = ProbeReport::default();
    let mut errors = Errors::default();
    for n in 0..count {
        if stop::requested() {
            break;
        }
        let outcome = if connect_only {
            connect(to, timeout).map(drop).map_err(step("connect"))
        } else {
            short_conn(to, timeout, false).map(|id| {
                *report.ids.entry(id).or_default() += 1;
            })
        };
        match outcome {
            Ok(()) => report.ok += 1,
            Err(Failure::Stopped) => break,
            Err(Failure::Step(step, err)) => {
                report.failed += 1;
                let at = start.elapsed().as_secs_f64();
                errors.record(&kind_name(&err), at, format!("conn {n}: {step}: {err}"));
            }
            Err(Failure::Rejected { kind, message, .. }) => {
                report.failed += 1;
                errors.record(kind, start.elapsed().as_secs_f64(), format!("conn {n}: {message}"));
            }
        }
    }
    report.errors = errors.first();
    report
}

/// Options of [`load`].
#[derive(Clone, Debug)]
pub struct LoadOpts {
    pub to: SocketAddr,
    pub concurrency: usize,
    pub duration: Duration,
    /// Stop after this many connections even if `duration` has not passed.
    pub max_conns: u64,
    pub timeout: Duration,
    /// Send one request and verify its echo after the greeting (`connrate`), or only read the
    /// greeting (`connect-loop`).
    pub request: bool,
    /// A greeting other than this one counts as a failure.
    pub expect_id: Option<String>,
    /// Cap on new connections per second over all workers.
    pub rate: Option<f64>,
}

#[derive(Default)]
struct WorkerResult {
    ok: u64,
    failed: u64,
    latencies_us: Vec<u32>,
    ids: HashMap<String, u64>,
    errors: Errors,
    timeline: Vec<crate::report::ConnRecord>,
}

/// `connect-loop` and `connrate`: `concurrency` workers open connection after connection until
/// the duration passes, `max_conns` are opened, or a stop is asked for.
pub fn load(opts: &LoadOpts) -> LoadReport {
    let pace = Pace {
        concurrency: opts.concurrency,
        duration: opts.duration,
        max_conns: opts.max_conns,
        rate: opts.rate,
        timeline: false,
    };
    run_load(&pace, &|_n| {
        let id = short_conn(opts.to, opts.timeout, opts.request)?;
        match &opts.expect_id {
            Some(want) if *want != id => {
                let message = format!("greeting {id:?}, expected {want:?}");
                Err(Failure::Rejected { kind: "unexpected id", id: Some(id), message })
            }
            _ => Ok(Some(id)),
        }
    })
}

/// How many short connections a load run opens, and how fast.
#[derive(Clone, Debug)]
pub(crate) struct Pace {
    pub concurrency: usize,
    pub duration: Duration,
    /// Stop after this many connections even if `duration` has not passed.
    pub max_conns: u64,
    /// Cap on new connections per second over all workers.
    pub rate: Option<f64>,
    /// Record every connection's start, end and outcome in the report.
    pub timeline: bool,
}

/// One short connection of a load run, given its number: the server's id, if it sends one.
pub(crate) type ConnFn<'a> = dyn Fn(u64) -> Result<Option<String>, Failure> + Sync + 'a;

/// `concurrency` workers run `conn` again and again until the duration passes, `max_conns` were
/// started, or a stop is asked for; the report counts them, their latency, ids and errors.
pub(crate) fn run_load(pace: &Pace, conn: &ConnFn<'_>) -> LoadReport {
    let concurrency = pace.concurrency.max(1);
    let start = Instant::now();
    let deadline = start + pace.duration;
    let issued = AtomicU64::new(0);
    let period = pace.rate.filter(|r| *r > 0.0).map(|r| Duration::from_secs_f64(concurrency as f64 / r));
    let results: Vec<WorkerResult> = thread::scope(|scope| {
        let workers: Vec<_> = (0..concurrency)
            .map(|w| {
                let issued = &issued;
                // Spread the paced workers over one period instead of starting them together.
                let first = period.map(|p| start + p.mul_f64(w as f64 / concurrency as f64));
                thread::Builder::new()
                    .name(format!("load-{w}"))
                    .stack_size(256 * 1024)
                    .spawn_scoped(scope, move || worker(pace, conn, start, deadline, issued, period, first))
                    .expect("starting a load worker thread")
            })
            .collect();
        workers.into_iter().map(|w| w.join().expect("a load worker panicked")).collect()
    });
    let elapsed = start.elapsed();

    let mut latencies = Vec::new();
    let mut timeline = Vec::new();
    let mut ids: BTreeMap<String, u64> = BTreeMap::new();
    let mut errors = Errors::default();
    let (mut ok, mut failed) = (0, 0);
    for r in results {
        ok += r.ok;
        failed += r.failed;
        latencies.extend(r.latencies_us);
        timeline.extend(r.timeline);
        for (id, n) in r.ids {
            *ids.entry(id).or_default() += n;
        }
        errors.merge(r.errors);
    }
    latencies.sort_unstable();
    LoadReport {
        ok,
        failed,
        concurrency,
        duration_s: elapsed.as_secs_f64(),
        conns_per_sec: ok as f64 / elapsed.as_secs_f64().max(1e-9),
        p50_ms: percentile_ms(&latencies, 50.0),
        p99_ms: percentile_ms(&latencies, 99.0),
        max_ms: percentile_ms(&latencies, 100.0),
        ids,
        error_kinds: errors.kinds.clone(),
        errors: errors.first(),
        first_failure_s: errors.span.map(|s| s.0),
        last_failure_s: errors.span.map(|s| s.1),
        timeline: {
            timeline.sort_by(|a, b| a.start_s.total_cmp(&b.start_s));
            timeline
        },
    }
}

fn worker(
    pace: &Pace,
    conn: &ConnFn<'_>,
    start: Instant,
    deadline: Instant,
    issued: &AtomicU64,
    period: Option<Duration>,
    mut next_at: Option<Instant>,
) -> WorkerResult {
    let mut r = WorkerResult::default();
    loop {
        if stop::requested() || Instant::now() >= deadline {
            break;
        }
        if let (Some(at), Some(p)) = (next_at, period) {
            if at >= deadline {
                break;
            }
            sleep_until(at, deadline);
            if stop::requested() {
                break;
            }
            next_at = Some(at + p);
        }
        let n = issued.fetch_add(1, Ordering::Relaxed);
        if n >= pace.max_conns {
            break;
        }
        let t0 = Instant::now();
        let failed_before = r.failed;
        let result = conn(n);
        let stopped = matches!(result, Err(Failure::Stopped));
        match result {
            Ok(id) => {
                r.ok += 1;
                let us = t0.elapsed().as_micros();
                r.latencies_us.push(u32::try_from(us).unwrap_or(u32::MAX));
                if let Some(id) = id {
                    *r.ids.entry(id).or_default() += 1;
                }
            }
            Err(Failure::Rejected { kind, id, message }) => {
                r.failed += 1;
                let at = t0.duration_since(start).as_secs_f64();
                r.errors.record(kind, at, format!("conn {n} at {at:.3}s: {message}"));
                if let Some(id) = id {
                    *r.ids.entry(id).or_default() += 1;
                }
            }
            Err(Failure::Stopped) => break,
            Err(Failure::Step(step, err)) => {
                r.failed += 1;
                let at = t0.duration_since(start).as_secs_f64();
                let kind = format!("{step}: {}", kind_name(&err));
                r.errors.record(&kind, at, format!("conn {n} at {at:.3}s: {step}: {err}"));
            }
        }
        if pace.timeline && !stopped {
            r.timeline.push(crate::report::ConnRecord {
                start_s: t0.duration_since(start).as_secs_f64(),
                end_s: start.elapsed().as_secs_f64(),
                ok: r.failed == failed_before,
            });
        }
    }
    r
}

/// Sleeps until `at` (never past `deadline`), in short steps so a stop is noticed.
pub(crate) fn sleep_until(at: Instant, deadline: Instant) {
    let until = at.min(deadline);
    loop {
        let now = Instant::now();
        if now >= until || stop::requested() {
            return;
        }
        thread::sleep((until - now).min(Duration::from_millis(10)));
    }
}

/// Options of [`stream`].
#[derive(Clone, Debug)]
pub struct StreamOpts {
    pub to: SocketAddr,
    pub interval: Duration,
    pub max_duration: Duration,
    /// Longest wait for the connection, the greeting or one echo.
    pub timeout: Duration,
    pub chunk_size: usize,
    /// Written (with the server id) after the first verified round trip.
    pub ready_file: Option<PathBuf>,
}

/// `stream`: one long-lived connection through an echo server; a counter-stamped chunk every
/// interval, each echo verified byte for byte, until a stop is asked for or the maximum duration
/// passes. At the end the connection must close cleanly.
pub fn stream(opts: &StreamOpts) -> StreamReport {
    let start = Instant::now();
    let mut report = StreamReport::default();
    let result = run_stream(opts, start, &mut report);
    report.duration_s = start.elapsed().as_secs_f64();
    match result {
        Ok(()) => report.ok = true,
        Err(err) => report.error = Some(format!("{err:#}")),
    }
    report
}

fn run_stream(opts: &StreamOpts, start: Instant, report: &mut StreamReport) -> Result<()> {
    if !(32..=1 << 20).contains(&opts.chunk_size) {
        bail!("chunk size {} is not within 32 B..1 MiB", opts.chunk_size);
    }
    let deadline = start + opts.max_duration;
    let mut s = connect(opts.to, opts.timeout).with_context(|| format!("connecting to {}", opts.to))?;
    let id = read_greeting(&mut s, OnSignal::Retry).context("reading the greeting")?;
    report.id = Some(id.clone());
    let mut chunk = vec![0u8; opts.chunk_size];
    let mut back = vec![0u8; opts.chunk_size];
    for seq in 0u64.. {
        if stop::requested() || Instant::now() >= deadline {
            break;
        }
        fill_chunk(&mut chunk, seq);
        s.write_all(&chunk).with_context(|| format!("round trip {seq}: sending"))?;
        read_full(&mut s, &mut back, OnSignal::Retry).with_context(|| format!("round trip {seq}: reading the echo"))?;
        if let Some(at) = chunk.iter().zip(&back).position(|(a, b)| a != b) {
            bail!(
                "round trip {seq}: echo differs at byte {at} (sent {:?}, got {:?})",
                chunk[at] as char,
                back[at] as char
            );
        }
        report.roundtrips += 1;
        report.bytes += chunk.len() as u64;
        if report.roundtrips == 1 {
            if let Some(path) = &opts.ready_file {
                write_ready_file(path, &id)?;
            }
        }
        sleep_until(Instant::now() + opts.interval, deadline);
    }
    // Our FIN must travel the whole path and the server's FIN come back, with nothing else.
    s.shutdown(Shutdown::Write).context("closing the write side")?;
    let mut extra = [0u8; 64];
    match read_some(&mut s, &mut extra, OnSignal::Retry) {
        Ok(0) => Ok(()),
        Ok(n) => bail!("{n} unexpected bytes after the last round trip"),
        Err(err) => Err(anyhow!(err).context("waiting for the server to close")),
    }
}

/// A chunk stamped with its sequence number; the rest is a pattern that shifts with it, so a
/// chunk that is lost, repeated or reordered does not verify.
pub fn fill_chunk(chunk: &mut [u8], seq: u64) {
    let header = format!("seq={seq:020} ");
    let n = header.len().min(chunk.len());
    chunk[..n].copy_from_slice(&header.as_bytes()[..n]);
    let len = chunk.len();
    for (i, b) in chunk.iter_mut().enumerate().skip(n) {
        *b = b'a' + ((seq as usize).wrapping_add(i) % 26) as u8;
    }
    chunk[len - 1] = b'\n';
}

pub(crate) fn write_ready_file(path: &Path, id: &str) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, format!("{id}\n")).with_context(|| format!("writing {}", Path::new(&tmp).display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

/// Direction of a throughput run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Client to server (against `sink`).
    Write,
    /// Server to client (against `source`).
    Read,
}

impl FromStr for Direction {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "write" => Ok(Direction::Write),
            "read" => Ok(Direction::Read),
            other => Err(format!("{other:?}: expected read or write")),
        }
    }
}

/// `throughput`: one stream for `duration` with blocking I/O and a large buffer.
///
/// In `write` mode the clock stops when the sink has closed after our FIN, so the count covers
/// bytes that arrived, not bytes still queued in socket buffers.
pub fn throughput(
    to: SocketAddr,
    duration: Duration,
    direction: Direction,
    buf_size: usize,
    timeout: Duration,
) -> Result<ThroughputReport> {
    let mut s = connect(to, timeout).with_context(|| format!("connecting to {to}"))?;
    let mut buf = vec![0x5au8; buf_size.max(1)];
    let start = Instant::now();
    let deadline = start + duration;
    let mut bytes = 0u64;
    while !stop::requested() && Instant::now() < deadline {
        let moved = match direction {
            Direction::Write => s.write(&buf),
            Direction::Read => s.read(&mut buf),
        };
        match moved {
            Ok(0) => bail!("the server closed the stream after {bytes} bytes"),
            Ok(n) => bytes += n as u64,
            Err(err) if err.kind() == ErrorKind::Interrupted => {}
            Err(err) => return Err(err).context(format!("stream broke after {bytes} bytes")),
        }
    }
    if direction == Direction::Write {
        s.shutdown(Shutdown::Write).context("closing the write side")?;
        s.set_read_timeout(Some(timeout.max(Duration::from_secs(10))))?;
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(err) if err.kind() == ErrorKind::Interrupted => {}
                Err(err) => return Err(err).context("waiting for the sink to close"),
            }
        }
    }
    let elapsed = start.elapsed();
    Ok(ThroughputReport {
        mode: match direction {
            Direction::Write => "write".into(),
            Direction::Read => "read".into(),
        },
        bytes,
        duration_s: elapsed.as_secs_f64(),
        gbit_per_sec: gbit_per_sec(bytes, elapsed),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_differ_by_sequence_and_end_with_newline() {
        let mut a = vec![0u8; 64];
        let mut b = vec![0u8; 64];
        fill_chunk(&mut a, 1);
        fill_chunk(&mut b, 2);
        assert_ne!(a, b);
        assert!(a.starts_with(b"seq=00000000000000000001 "));
        assert_eq!(a[63], b'\n');
        // The pattern part differs too, not only the header.
        assert_ne!(a[30..60], b[30..60]);
    }

    #[test]
    fn direction_parses() {
        assert_eq!("read".parse::<Direction>(), Ok(Direction::Read));
        assert_eq!("write".parse::<Direction>(), Ok(Direction::Write));
        assert!("both".parse::<Direction>().unwrap_err().contains("expected read or write"));
    }
}
