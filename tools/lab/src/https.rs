//! The HTTPS clients: `https-loop` (a stream of new TLS connections with one request each),
//! `https-stream` (one long-lived keep-alive connection) and `http` (one request, http:// or
//! https://), for end-to-end tests through HAProxy in front of the Kubernetes API stand-in.
//!
//! Like the TCP clients they use blocking sockets with a deadline on every exchange, threads for
//! concurrency, and stop at a clean point on SIGTERM/SIGINT to still print their report.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};

use crate::client::{run_load, sleep_until, step, write_ready_file, Failure, Pace};
use crate::http::{OnStop, Request, Response, ResponseReader, Sock, Url};
use crate::report::{HttpReport, LoadReport, StreamReport};
use crate::stop;
use crate::tls::{self, Verify};

/// Longest response body of `https-loop` and `https-stream` (health checks answer a few bytes).
const MAX_BODY: usize = 1 << 20;

/// Longest response body of `http`.
const MAX_HTTP_BODY: usize = 16 << 20;

type Tls = StreamOwned<ClientConnection, Sock>;

/// Where to connect and how to check the server.
#[derive(Clone, Debug)]
pub struct Target {
    pub to: SocketAddr,
    /// Request path (and query).
    pub path: String,
    /// Verify the server certificate against this CA file; without it any certificate is
    /// accepted (handshake signatures are still checked).
    pub ca: Option<PathBuf>,
    /// Name to verify and send as SNI and Host; the IP of `to` by default.
    pub server_name: Option<String>,
    /// Bound on connect + handshake, and on each request and response.
    pub timeout: Duration,
}

impl Target {
    fn setup(&self) -> Result<(Arc<ClientConfig>, ServerName<'static>)> {
        let verify = match &self.ca {
            Some(path) => Verify::Ca(path),
            None => Verify::AnyCertificate,
        };
        Ok((tls::client_config(verify)?, tls::server_name(self.server_name.as_deref(), self.to.ip())?))
    }

    fn host(&self) -> String {
        tls::host_header(self.server_name.as_deref(), self.to)
    }
}

/// TCP connect and TLS handshake within the timeout.
fn open(
    to: SocketAddr,
    timeout: Duration,
    on_stop: OnStop,
    config: &Arc<ClientConfig>,
    name: &ServerName<'static>,
) -> Result<Tls, Failure> {
    let sock = Sock::connect(to, timeout, on_stop).map_err(step("connect"))?;
    handshake(sock, config, name)
}

/// The TLS handshake on a connected socket, within what is left of its deadline.
fn handshake(sock: Sock, config: &Arc<ClientConfig>, name: &ServerName<'static>) -> Result<Tls, Failure> {
    let conn = ClientConnection::new(config.clone(), name.clone())
        .map_err(|err| Failure::Step("tls", io::Error::new(ErrorKind::InvalidData, err)))?;
    let mut tls = StreamOwned::new(conn, sock);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock).map_err(step("tls"))?;
    }
    Ok(tls)
}

/// Sends `request` and reads one complete response.
fn exchange(
    s: &mut (impl Read + Write),
    reader: &mut ResponseReader,
    request: &[u8],
    max_body: usize,
) -> Result<Response, Failure> {
    s.write_all(request).and_then(|()| s.flush()).map_err(step("write"))?;
    reader.read_response(s, max_body).map_err(step("read"))
}

/// Ends a connection whose answer is in: close_notify and FIN, then waits (within the deadline)
/// for the server's close, so neither side is left with unread data that would turn the close
/// into a reset. Errors here no longer matter.
fn close(tls: &mut Tls) {
    tls.conn.send_close_notify();
    if tls.flush().is_err() || tls.sock.shutdown_write().is_err() {
        return;
    }
    let mut buf = [0u8; 1024];
    while matches!(tls.read(&mut buf), Ok(n) if n > 0) {}
}

/// Options of [`https_loop`].
#[derive(Clone, Debug)]
pub struct HttpsLoopOpts {
    pub target: Target,
    pub concurrency: usize,
    pub duration: Duration,
    pub max_conns: u64,
    pub rate: Option<f64>,
    /// A connection is ok only with this status.
    pub expect_status: u16,
    /// Record every connection in the report.
    pub timeline: bool,
}

/// `https-loop`: a steady stream of new connections, each a TCP connect, a full TLS handshake,
/// one `GET` with `Connection: close`, the complete response, and the close. Latencies cover all
/// of it. Fails only on a setup error (the CA file).
pub fn https_loop(opts: &HttpsLoopOpts) -> Result<LoadReport> {
    let t = &opts.target;
    let (config, name) = t.setup()?;
    let host = t.host();
    let request =
        Request { method: "GET", target: &t.path, host: &host, token: None, json: None, close: true }.encode();
    let pace = Pace {
        concurrency: opts.concurrency,
        duration: opts.duration,
        max_conns: opts.max_conns,
        rate: opts.rate,
        timeline: opts.timeline,
    };
    Ok(run_load(&pace, &|_n| {
        let mut tls = open(t.to, t.timeout, OnStop::GiveUp, &config, &name)?;
        let resp = exchange(&mut tls, &mut ResponseReader::default(), &request, MAX_BODY)?;
        close(&mut tls);
        if resp.status != opts.expect_status {
            let message = format!("status {}, expected {}: {}", resp.status, opts.expect_status, resp.body_snippet());
            return Err(Failure::Rejected { kind: "status", id: None, message });
        }
        Ok(None)
    }))
}

/// Options of [`https_stream`].
#[derive(Clone, Debug)]
pub struct HttpsStreamOpts {
    pub target: Target,
    pub interval: Duration,
    pub max_duration: Duration,
    /// Written (`200`) after the first good round trip.
    pub ready_file: Option<PathBuf>,
}

/// Why a stream ended badly: a kind for tests to match (see [`StreamReport::error_kind`]) and
/// the message.
struct Broken(&'static str, String);

fn broken_kind(err: &io::Error) -> &'static str {
    if tls::error_kind(err).is_some() {
        return "tls";
    }
    match err.kind() {
        ErrorKind::TimedOut | ErrorKind::WouldBlock => "timeout",
        ErrorKind::UnexpectedEof => "closed",
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe => "reset",
        ErrorKind::InvalidData => "protocol",
        _ => "io",
    }
}

impl From<Failure> for Broken {
    fn from(f: Failure) -> Broken {
        match f {
            Failure::Step(step @ ("connect" | "tls"), err) => Broken(step, format!("{step}: {err}")),
            Failure::Step(step, err) => Broken(broken_kind(&err), format!("{step}: {err}")),
            Failure::Rejected { kind, message, .. } => Broken(kind, message),
            Failure::Stopped => Broken("io", "stopped".into()),
        }
    }
}

/// `https-stream`: one TLS connection with HTTP/1.1 keep-alive, a `GET` every interval, each
/// answer complete and 200, until a stop is asked for or the maximum duration passes; then the
/// connection must close cleanly. The server closing the connection (or announcing it with
/// `Connection: close`, as at an HTTP server's keep-alive limit) is a failure of kind `closed`.
/// Fails only on a setup error (the CA file).
pub fn https_stream(opts: &HttpsStreamOpts) -> Result<StreamReport> {
    let (config, name) = opts.target.setup()?;
    let start = Instant::now();
    let mut report = StreamReport::default();
    let result = run_https_stream(opts, &config, &name, start, &mut report);
    report.duration_s = start.elapsed().as_secs_f64();
    match result {
        Ok(()) => report.ok = true,
        Err(Broken(kind, message)) => {
            report.error_kind = Some(kind.to_string());
            report.error = Some(message);
        }
    }
    Ok(report)
}

fn run_https_stream(
    opts: &HttpsStreamOpts,
    config: &Arc<ClientConfig>,
    name: &ServerName<'static>,
    start: Instant,
    report: &mut StreamReport,
) -> Result<(), Broken> {
    let t = &opts.target;
    let deadline = start + opts.max_duration;
    let mut tls = open(t.to, t.timeout, OnStop::Finish, config, name)
        .map_err(|f| Broken::from(f).prefixed(&format!("opening the connection to {}", t.to)))?;
    let host = t.host();
    let request =
        Request { method: "GET", target: &t.path, host: &host, token: None, json: None, close: false }.encode();
    let mut reader = ResponseReader::default();
    for seq in 0u64.. {
        if stop::requested() || Instant::now() >= deadline {
            break;
        }
        tls.sock.restart_deadline();
        let resp = exchange(&mut tls, &mut reader, &request, MAX_BODY).map_err(|f| {
            let b = Broken::from(f);
            let b = if b.0 == "closed" {
                Broken(b.0, format!("the server closed the connection after {seq} good round trips ({})", b.1))
            } else {
                b
            };
            b.prefixed(&format!("round trip {seq}"))
        })?;
        report.bytes += resp.wire_bytes;
        if resp.status != 200 {
            return Err(Broken(
                "status",
                format!("round trip {seq}: status {}, expected 200: {}", resp.status, resp.body_snippet()),
            ));
        }
        report.roundtrips += 1;
        if resp.close {
            return Err(Broken(
                "closed",
                format!(
                    "round trip {seq}: the server answered with Connection: close (or a body that ends with the \
                     connection) and closes this connection after {} round trips: a keep-alive limit?",
                    report.roundtrips
                ),
            ));
        }
        if report.roundtrips == 1 {
            if let Some(path) = &opts.ready_file {
                write_ready_file(path, "200").map_err(|err| Broken("io", format!("{err:#}")))?;
            }
        }
        sleep_until(Instant::now() + opts.interval, deadline);
    }
    if reader.pending() > 0 {
        return Err(Broken("protocol", format!("{} unexpected bytes after the last response", reader.pending())));
    }
    // Our close_notify and FIN must travel the whole path and the server's close come back,
    // with nothing else.
    tls.sock.restart_deadline();
    tls.conn.send_close_notify();
    tls.flush().map_err(|err| Broken(broken_kind(&err), format!("closing: {err}")))?;
    tls.sock.shutdown_write().map_err(|err| Broken(broken_kind(&err), format!("closing the write side: {err}")))?;
    let mut extra = [0u8; 256];
    match tls.read(&mut extra) {
        Ok(0) => Ok(()),
        // A server that closes TCP without its own close_notify still closed cleanly enough.
        Err(err) if err.kind() == ErrorKind::UnexpectedEof => Ok(()),
        Ok(n) => Err(Broken("protocol", format!("{n} unexpected bytes after the last round trip"))),
        Err(err) => Err(Broken(broken_kind(&err), format!("waiting for the server to close: {err}"))),
    }
}

impl Broken {
    fn prefixed(self, context: &str) -> Broken {
        Broken(self.0, format!("{context}: {}", self.1))
    }
}

/// Options of [`request`].
#[derive(Clone, Debug)]
pub struct HttpOpts {
    pub method: String,
    pub url: Url,
    /// A JSON body.
    pub data: Option<String>,
    /// Bearer token.
    pub token: Option<String>,
    /// For https://: verify against this CA file, or (`None`) accept any certificate.
    pub ca: Option<PathBuf>,
    /// Name to verify instead of the URL's host.
    pub server_name: Option<String>,
    /// Bound on the connect (to each address of the host), and on the request from the connect
    /// to the end of the response.
    pub timeout: Duration,
}

/// `http`: one request with `Connection: close`. A transport failure is reported in
/// [`HttpReport::error`]; `Err` is a setup error (the CA file, the server name).
pub fn request(opts: &HttpOpts) -> Result<HttpReport> {
    let url = &opts.url;
    let tls_setup = if url.tls {
        let verify = match &opts.ca {
            Some(path) => Verify::Ca(path),
            None => Verify::AnyCertificate,
        };
        let name = opts.server_name.as_deref().unwrap_or(&url.host);
        let name = ServerName::try_from(name.to_string()).with_context(|| format!("server name {name:?}"))?;
        Some((tls::client_config(verify)?, name))
    } else {
        None
    };
    let request = Request {
        method: &opts.method,
        target: &url.target,
        host: &url.authority,
        token: opts.token.as_deref(),
        json: opts.data.as_deref().map(str::as_bytes),
        close: true,
    }
    .encode();
    let outcome = (|| -> Result<Response, String> {
        let (to, sock) = connect_any(url, opts.timeout)?;
        let describe = |f: Failure| match f {
            Failure::Step(step, err) => format!("{step} {to}: {err}"),
            Failure::Rejected { message, .. } => message,
            Failure::Stopped => "stopped by a signal".into(),
        };
        let mut reader = ResponseReader::default();
        match &tls_setup {
            Some((config, name)) => {
                let mut tls = handshake(sock, config, name).map_err(describe)?;
                let resp = exchange(&mut tls, &mut reader, &request, MAX_HTTP_BODY).map_err(describe)?;
                close(&mut tls);
                Ok(resp)
            }
            None => {
                let mut sock = sock;
                exchange(&mut sock, &mut reader, &request, MAX_HTTP_BODY).map_err(describe)
            }
        }
    })();
    Ok(match outcome {
        Ok(resp) => {
            HttpReport { status: resp.status, body: String::from_utf8_lossy(&resp.body).into_owned(), error: None }
        }
        Err(error) => HttpReport { status: 0, body: String::new(), error: Some(error) },
    })
}

/// Connects to the first address of the URL's host (an IP, or a name the system resolves)
/// that answers, each tried within `timeout`.
fn connect_any(url: &Url, timeout: Duration) -> Result<(SocketAddr, Sock), String> {
    let addrs =
        (url.host.as_str(), url.port).to_socket_addrs().map_err(|err| format!("resolving {}: {err}", url.host))?;
    let mut last = format!("{} has no address", url.host);
    for to in addrs {
        match Sock::connect(to, timeout, OnStop::GiveUp) {
            Ok(sock) => return Ok((to, sock)),
            Err(err) => last = format!("connect {to}: {err}"),
        }
        if stop::requested() {
            break;
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_map_to_stream_kinds() {
        let kind = |f: Failure| Broken::from(f).0;
        assert_eq!(kind(Failure::Step("connect", io::Error::from(ErrorKind::ConnectionRefused))), "connect");
        assert_eq!(kind(Failure::Step("tls", io::Error::from(ErrorKind::TimedOut))), "tls");
        assert_eq!(kind(Failure::Step("read", io::Error::from(ErrorKind::TimedOut))), "timeout");
        assert_eq!(kind(Failure::Step("read", io::Error::from(ErrorKind::UnexpectedEof))), "closed");
        assert_eq!(kind(Failure::Step("write", io::Error::from(ErrorKind::BrokenPipe))), "reset");
        assert_eq!(kind(Failure::Step("read", io::Error::from(ErrorKind::InvalidData))), "protocol");
        let tls_err = io::Error::new(ErrorKind::InvalidData, rustls::Error::DecryptError);
        assert_eq!(kind(Failure::Step("read", tls_err)), "tls");
    }
}
