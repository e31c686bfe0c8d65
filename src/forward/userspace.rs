//! The userspace forward: a TCP proxy for hosts where neither nftables nor iptables can be used,
//! and for mixed-family or loopback-crossing forwards the kernel cannot do.
//!
//! It owns one listening socket and the connections accepted on it:
//! - **Listener.** Built with SO_REUSEADDR and a backlog of 4096; SO_REUSEPORT only when asked
//!   for, so that HAProxy can bind the same port during a handover (without it, a port held by
//!   another program is [`UserspaceError::AddrInUse`]). An IPv6 wildcard (`[::]`) is bound with
//!   IPV6_V6ONLY: `0.0.0.0:P` and `[::]:P` are two distinct listeners, and `[::]` never takes
//!   IPv4 connections whatever `net.ipv6.bindv6only` says.
//! - **Targets.** Each new connection goes to the next target in round-robin order; a target that
//!   refuses or does not answer within the connect timeout is skipped for the following one and
//!   counted in [`Summary::target_failures`]. When every target fails the client is reset.
//!   [`Targets::set`] changes where new connections go; open connections stay where they are.
//! - **Data path.** Each direction moves bytes socket → pipe → socket with `splice(2)`, so the
//!   payload never enters userspace; the pipe is drained completely before the next read, so a
//!   splice into it never blocks. Where the kernel refuses to splice (or no pipe can be had) the
//!   direction falls back to a copy through a 256 KiB buffer. TCP_NODELAY is set on both
//!   sockets (apiserver traffic is request/response), with keepalive to notice dead peers. A
//!   connection holds six descriptors (two sockets, two pipes): size `LimitNOFILE=` for it.
//! - **Socket buffers.** Left to the kernel's autotuning unless [`Config::socket_buffer`] fixes
//!   them. `tools/bench` measures both: a fixed 1 MiB moved single-stream throughput by −24%
//!   (cubic, between hosts, where it caps the window) to +12% across runs and layouts, with no
//!   consistent sign, so the kernel's choice stands. A fixed size is set with SO_RCVBUFFORCE/SO_SNDBUFFORCE when the
//!   process may (CAP_NET_ADMIN), else with the plain options when `net.core.rmem_max`/
//!   `wmem_max` allow it; a buffer the kernel would cap below the asked size would be worse than
//!   autotuning, so then autotuning stays.
//! - **TCP semantics.** An EOF on one side becomes a `shutdown(SHUT_WR)` on the other once
//!   everything read before it was written; the connection ends when both directions ended. An
//!   error on either side (a reset, a failed write) resets both.
//! - **Shutdown.** Cancelling the token stops accepting at once: connections the kernel already
//!   completed are taken from the accept queue, then the listener is closed. Open connections get
//!   up to the drain timeout to finish; the rest are reset.
//!
//! NOTE: with `reuse_port`, closing the listener still resets connections that arrive in its
//! accept queue between that last sweep and the close, unless `net.ipv4.tcp_migrate_req=1`
//! (Linux 5.14+) moves them to a sibling listener such as HAProxy's.

use std::io;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use nix::errno::Errno;
use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::io::Interest;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn, Instrument as _};

const BACKLOG: i32 = 4096;
/// Pipe size asked for per direction; `/proc/sys/fs/pipe-max-size` defaults to 1 MiB.
const PIPE_SIZE: usize = 1 << 20;
/// What a pipe holds when the kernel refuses to enlarge it.
const DEFAULT_PIPE_SIZE: usize = 64 * 1024;
const COPY_BUFFER: usize = 256 * 1024;
/// Idle pipes kept for reuse, two per connection; each holds two descriptors and no pages.
const PIPE_POOL_MAX: usize = 32;
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(50);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_PROBES: u32 = 3;
/// Set once the kernel refused to splice between two TCP sockets: later connections then copy
/// without asking again (and without spending two pipes each).
static SPLICE_UNSUPPORTED: AtomicBool = AtomicBool::new(false);

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub targets: Vec<SocketAddr>,
    /// SO_REUSEPORT on the listener, so HAProxy can bind the same port during a handover.
    pub reuse_port: bool,
    pub connect_timeout: Duration,
    /// Longest wait for open connections to finish after shutdown begins.
    pub drain_timeout: Duration,
    /// Send and receive buffer size for both sockets of each connection; `None` leaves them to
    /// the kernel's autotuning.
    pub socket_buffer: Option<usize>,
}

#[derive(Debug, thiserror::Error)]
pub enum UserspaceError {
    #[error("{addr} is already in use by another program; stop it or pick another --listen port")]
    AddrInUse { addr: SocketAddr },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// What a finished proxy did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Summary {
    /// Client connections accepted.
    pub accepted: u64,
    /// Connection attempts to a target that were refused, failed or timed out.
    pub target_failures: u64,
    /// Connections that finished by themselves after shutdown began.
    pub drained: u64,
    /// Connections still open at the end of the drain timeout, reset.
    pub aborted: u64,
}

/// A live handle that changes the targets new connections go to.
#[derive(Debug, Clone)]
pub struct Targets(tokio::sync::watch::Sender<Vec<SocketAddr>>);

impl Targets {
    /// Sends new connections to `targets` from now on; open connections stay where they are. An
    /// empty list makes new connections be reset.
    pub fn set(&self, targets: Vec<SocketAddr>) {
        self.0.send_replace(targets);
    }

    fn current(&self) -> Vec<SocketAddr> {
        self.0.borrow().clone()
    }
}

/// A bound listener and its settings; [`Proxy::run`] serves it until cancelled.
pub struct Proxy {
    /// Kept as a std socket so that `bind` works outside a runtime; registered in `run`.
    listener: std::net::TcpListener,
    local_addr: SocketAddr,
    targets: Targets,
    reuse_port: bool,
    connect_timeout: Duration,
    drain_timeout: Duration,
    socket_buffer: Option<usize>,
}

impl Proxy {
    /// Binds and listens on `cfg.listen`; serves nothing until [`Proxy::run`].
    pub fn bind(cfg: Config) -> Result<Proxy, UserspaceError> {
        let listener = listen(cfg.listen, cfg.reuse_port)?;
        let local_addr = listener.local_addr().map_err(|source| UserspaceError::Bind { addr: cfg.listen, source })?;
        Ok(Proxy {
            listener,
            local_addr,
            targets: Targets(tokio::sync::watch::Sender::new(cfg.targets)),
            reuse_port: cfg.reuse_port,
            connect_timeout: cfg.connect_timeout,
            drain_timeout: cfg.drain_timeout,
            socket_buffer: cfg.socket_buffer,
        })
    }

    /// The bound address (with the real port when `listen` asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn targets(&self) -> Targets {
        self.targets.clone()
    }

    /// Accepts and forwards connections until `shutdown` is cancelled, then drains them.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<Summary> {
        let Proxy { listener, local_addr, targets, reuse_port, connect_timeout, drain_timeout, socket_buffer } = self;
        let listener =
            TcpListener::from_std(listener).with_context(|| format!("registering the listener on {local_addr}"))?;
        info!(listen = %local_addr, targets = ?targets.current(), reuse_port, "userspace forward accepting connections");
        if reuse_port && tcp_migrate_req_off() {
            info!("net.ipv4.tcp_migrate_req is 0: connections still queued on this listener when it closes will be reset instead of moving to another listener on the port");
        }

        let failures = Arc::new(AtomicU64::new(0));
        let mut conns = JoinSet::new();
        let mut accepted: u64 = 0;
        let mut backoff = ACCEPT_BACKOFF_MIN;
        let mut spawn = |conns: &mut JoinSet<()>, client: TcpStream, peer: SocketAddr| {
            let id = accepted;
            accepted += 1;
            let span = tracing::debug_span!("conn", id, %peer);
            let targets = targets.current();
            // Round-robin: connection n starts at target n.
            let start = usize::try_from(id).unwrap_or(0);
            let conn = serve(client, targets, start, connect_timeout, socket_buffer, failures.clone());
            conns.spawn(conn.instrument(span));
        };

        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                Some(joined) = conns.join_next(), if !conns.is_empty() => report_join(joined),
                res = listener.accept() => match res {
                    Ok((client, peer)) => {
                        backoff = ACCEPT_BACKOFF_MIN;
                        spawn(&mut conns, client, peer);
                    }
                    Err(e) if transient_accept_error(&e) => {
                        debug!(error = %e, "accept: client went away before it was accepted");
                    }
                    Err(e) => {
                        // EMFILE, ENFILE, ENOBUFS...: the connection stays queued and the
                        // listener stays readable, so retrying at once would spin.
                        warn!(error = %e, retry_in = ?backoff, "cannot accept a connection");
                        tokio::select! {
                            () = shutdown.cancelled() => break,
                            () = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    }
                },
            }
        }

        // Connections whose handshake the kernel already completed would be reset by the close:
        // take them and let them drain with the others.
        match listener.into_std() {
            Ok(listener) => {
                for _ in 0..BACKLOG {
                    match listener.accept() {
                        Ok((client, peer)) => {
                            match client.set_nonblocking(true).and_then(|()| TcpStream::from_std(client)) {
                                Ok(client) => spawn(&mut conns, client, peer),
                                Err(e) => warn!(%peer, error = %e, "cannot take over a queued connection"),
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) if transient_accept_error(&e) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => {
                            debug!(error = %e, "accept queue sweep stopped");
                            break;
                        }
                    }
                }
            }
            Err(e) => warn!(error = %e, "cannot sweep the accept queue before closing"),
        }

        let open = conns.len();
        info!(open, timeout = ?drain_timeout, "stopped accepting; draining open connections");
        let mut drained: u64 = 0;
        let drain = async {
            while let Some(joined) = conns.join_next().await {
                report_join(joined);
                drained += 1;
            }
        };
        if tokio::time::timeout(drain_timeout, drain).await.is_err() {
            debug!("drain timeout reached");
        }
        let aborted = conns.len() as u64;
        conns.shutdown().await;

        let summary = Summary { accepted, target_failures: failures.load(Ordering::Relaxed), drained, aborted };
        info!(
            accepted = summary.accepted,
            target_failures = summary.target_failures,
            drained = summary.drained,
            aborted = summary.aborted,
            "userspace forward stopped"
        );
        Ok(summary)
    }
}

fn listen(addr: SocketAddr, reuse_port: bool) -> Result<std::net::TcpListener, UserspaceError> {
    let bind_err = |source: io::Error| {
        if source.kind() == io::ErrorKind::AddrInUse {
            UserspaceError::AddrInUse { addr }
        } else {
            UserspaceError::Bind { addr, source }
        }
    };
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).map_err(bind_err)?;
    socket.set_reuse_address(true).map_err(bind_err)?;
    if reuse_port {
        socket.set_reuse_port(true).map_err(bind_err)?;
    }
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        socket.set_only_v6(true).map_err(bind_err)?;
    }
    socket.bind(&addr.into()).map_err(bind_err)?;
    // listen(2) is where a port held by a bound but not yet listening socket shows up.
    socket.listen(BACKLOG).map_err(bind_err)?;
    socket.set_nonblocking(true).map_err(bind_err)?;
    Ok(socket.into())
}

fn transient_accept_error(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset)
}

fn report_join(joined: Result<(), tokio::task::JoinError>) {
    if let Err(e) = joined {
        if e.is_panic() {
            error!(error = %e, "a connection task panicked");
        }
    }
}

fn tcp_migrate_req_off() -> bool {
    crate::sysinfo::sysctl("net.ipv4.tcp_migrate_req").is_some_and(|v| v == "0")
}

/// One client connection: pick a target, then relay until both directions end.
async fn serve(
    client: TcpStream,
    targets: Vec<SocketAddr>,
    start: usize,
    connect_timeout: Duration,
    socket_buffer: Option<usize>,
    failures: Arc<AtomicU64>,
) {
    let Some((server, target)) = connect_any(&targets, start, connect_timeout, &failures).await else {
        if targets.is_empty() {
            warn!("no targets configured; resetting the client");
        } else {
            debug!("no target reachable; resetting the client");
        }
        reset(&client);
        return;
    };
    tune(&client, socket_buffer);
    tune(&server, socket_buffer);
    debug!(%target, "forwarding");
    let began = Instant::now();
    let mut pair = Pair { client, server, clean: false };
    match pair.relay().await {
        Ok((up, down)) => {
            pair.clean = true;
            debug!(up, down, elapsed = ?began.elapsed(), "closed");
        }
        Err(e) => debug!(error = %e, elapsed = ?began.elapsed(), "connection failed; resetting both sides"),
    }
}

async fn connect_any(
    targets: &[SocketAddr],
    start: usize,
    connect_timeout: Duration,
    failures: &AtomicU64,
) -> Option<(TcpStream, SocketAddr)> {
    let n = targets.len();
    for i in 0..n {
        let target = targets[(start % n + i) % n];
        let err = match tokio::time::timeout(connect_timeout, TcpStream::connect(target)).await {
            Ok(Ok(server)) => return Some((server, target)),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {connect_timeout:?}"),
        };
        failures.fetch_add(1, Ordering::Relaxed);
        warn!(%target, error = %err, "cannot connect to target; trying the next one");
    }
    None
}

fn tune(stream: &TcpStream, socket_buffer: Option<usize>) {
    if let Some(bytes) = socket_buffer {
        size_buffers(stream, bytes);
    }
    if let Err(e) = stream.set_nodelay(true) {
        debug!(error = %e, "cannot set TCP_NODELAY");
    }
    let keepalive =
        TcpKeepalive::new().with_time(KEEPALIVE_IDLE).with_interval(KEEPALIVE_INTERVAL).with_retries(KEEPALIVE_PROBES);
    if let Err(e) = SockRef::from(stream).set_tcp_keepalive(&keepalive) {
        debug!(error = %e, "cannot enable TCP keepalive");
    }
}

/// Gives `stream` fixed send and receive buffers of `bytes`, or leaves them to autotuning when the
/// kernel would cap them below that (see the module docs).
fn size_buffers(stream: &TcpStream, bytes: usize) {
    static FORCE_DENIED: AtomicBool = AtomicBool::new(false);
    static AUTOTUNE_LOGGED: AtomicBool = AtomicBool::new(false);
    static CORE_MAX: std::sync::OnceLock<(usize, usize)> = std::sync::OnceLock::new();

    if !FORCE_DENIED.load(Ordering::Relaxed) {
        use nix::sys::socket::{setsockopt, sockopt};
        match setsockopt(stream, sockopt::RcvBufForce, &bytes)
            .and_then(|()| setsockopt(stream, sockopt::SndBufForce, &bytes))
        {
            Ok(()) => return,
            Err(Errno::EPERM) => FORCE_DENIED.store(true, Ordering::Relaxed),
            Err(e) => {
                debug!(error = %e, "cannot size the socket buffers");
                return;
            }
        }
    }
    // Read once: a per-connection read of two sysctl files would cost more than it could save.
    let (rmem_max, wmem_max) = *CORE_MAX.get_or_init(|| (core_max("net.core.rmem_max"), core_max("net.core.wmem_max")));
    if rmem_max >= bytes && wmem_max >= bytes {
        let sock = SockRef::from(stream);
        if let Err(e) = sock.set_recv_buffer_size(bytes).and_then(|()| sock.set_send_buffer_size(bytes)) {
            debug!(error = %e, "cannot size the socket buffers");
        }
    } else if !AUTOTUNE_LOGGED.swap(true, Ordering::Relaxed) {
        info!(
            wanted = bytes,
            rmem_max,
            wmem_max,
            "socket buffers left to the kernel's autotuning: without CAP_NET_ADMIN they are capped by net.core.rmem_max and wmem_max, which are smaller"
        );
    }
}

/// A buffer-size sysctl, or 0 (allowing nothing) when it cannot be read.
fn core_max(key: &str) -> usize {
    crate::sysinfo::sysctl(key).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// Makes the close of `stream` send a RST: the peer learns the stream was cut, not finished.
fn reset(stream: &TcpStream) {
    if let Err(e) = SockRef::from(stream).set_linger(Some(Duration::ZERO)) {
        debug!(error = %e, "cannot arm a reset on close");
    }
}

/// Both sockets of a forwarded connection. Dropped before both directions ended cleanly (an
/// error, or an abort at the end of the drain), it resets both sides.
struct Pair {
    client: TcpStream,
    server: TcpStream,
    clean: bool,
}

impl Drop for Pair {
    fn drop(&mut self) {
        if !self.clean {
            reset(&self.client);
            reset(&self.server);
        }
    }
}

impl Pair {
    /// Relays both directions; returns the bytes sent client → server and server → client.
    async fn relay(&self) -> io::Result<(u64, u64)> {
        let pipes = if SPLICE_UNSUPPORTED.load(Ordering::Relaxed) {
            None
        } else {
            match PIPES.take().and_then(|a| Ok((a, PIPES.take()?))) {
                Ok(pipes) => Some(pipes),
                Err(e) => {
                    debug!(error = %e, "no pipe for splice; copying through a buffer");
                    None
                }
            }
        };
        let (up_pipe, down_pipe) = match &pipes {
            Some((a, b)) => (Some(a), Some(b)),
            None => (None, None),
        };
        // try_join: the first error drops the other direction, and then `Pair` resets both.
        let moved = tokio::try_join!(
            one_way(&self.client, &self.server, up_pipe),
            one_way(&self.server, &self.client, down_pipe)
        )?;
        // Both directions ended at EOF with their pipe drained: the pipes can serve another
        // connection. After an error they may hold data and are closed instead.
        if let Some((a, b)) = pipes {
            PIPES.give_back(a);
            PIPES.give_back(b);
        }
        Ok(moved)
    }
}

/// Moves bytes `from` → `to` until EOF, then half-closes `to`.
async fn one_way(from: &TcpStream, to: &TcpStream, pipe: Option<&Pipe>) -> io::Result<u64> {
    let moved = match pipe {
        Some(pipe) => match splice_loop(from, to, pipe).await {
            Ok(moved) => moved,
            Err(Relay::Unsupported(e)) => {
                if !SPLICE_UNSUPPORTED.swap(true, Ordering::Relaxed) {
                    warn!(error = %e, "the kernel refuses to splice between TCP sockets; copying through userspace buffers");
                }
                copy_loop(from, to).await?
            }
            Err(Relay::Io(e)) => return Err(e),
        },
        None => copy_loop(from, to).await?,
    };
    match SockRef::from(to).shutdown(Shutdown::Write) {
        Ok(()) => Ok(moved),
        // The peer is already gone; the other direction reports how.
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(moved),
        Err(e) => Err(e),
    }
}

enum Relay {
    /// Splice refused before any byte moved: the direction can still fall back to copying.
    Unsupported(io::Error),
    Io(io::Error),
}

impl From<io::Error> for Relay {
    fn from(e: io::Error) -> Self {
        Relay::Io(e)
    }
}

/// socket → pipe → socket. The pipe is empty whenever we read, so EAGAIN from the read can only
/// mean "socket empty", and it holds data whenever we write, so EAGAIN there means "socket full":
/// both map exactly onto tokio's readiness.
async fn splice_loop(from: &TcpStream, to: &TcpStream, pipe: &Pipe) -> Result<u64, Relay> {
    let mut total: u64 = 0;
    loop {
        let n = loop {
            from.readable().await?;
            match from.try_io(Interest::READABLE, || splice_once(from, &pipe.write, pipe.size)) {
                Ok(n) => break n,
                Err(e) if would_block_or_interrupted(&e) => {}
                Err(e) if total == 0 && splice_refused(&e) => return Err(Relay::Unsupported(e)),
                Err(e) => return Err(Relay::Io(e)),
            }
        };
        if n == 0 {
            return Ok(total);
        }
        let mut in_pipe = n;
        while in_pipe > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || splice_once(&pipe.read, to, in_pipe)) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero).into()),
                Ok(m) => in_pipe -= m,
                Err(e) if would_block_or_interrupted(&e) => {}
                Err(e) => return Err(Relay::Io(e)),
            }
        }
        total += n as u64;
    }
}

// NOTE: splice(2) into a socket sends without MSG_NOSIGNAL, so a write to a reset peer raises
// SIGPIPE. Rust's runtime ignores SIGPIPE before `main`, turning it into EPIPE here; a binary
// that restores the default action would be killed by the first client that goes away.
fn splice_once(from: impl AsFd, to: impl AsFd, len: usize) -> io::Result<usize> {
    splice(from, None, to, None, len, SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE)
        .map_err(io::Error::from)
}

fn splice_refused(e: &io::Error) -> bool {
    matches!(e.raw_os_error().map(Errno::from_raw), Some(Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP))
}

fn would_block_or_interrupted(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted)
}

/// The fallback: read into a buffer, write it all out, repeat.
async fn copy_loop(from: &TcpStream, to: &TcpStream) -> io::Result<u64> {
    let mut buf = vec![0u8; COPY_BUFFER];
    let mut total: u64 = 0;
    loop {
        from.readable().await?;
        let n = match from.try_read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if would_block_or_interrupted(&e) => continue,
            Err(e) => return Err(e),
        };
        let mut written = 0;
        while written < n {
            to.writable().await?;
            match to.try_write(&buf[written..n]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(m) => written += m,
                Err(e) if would_block_or_interrupted(&e) => {}
                Err(e) => return Err(e),
            }
        }
        total += n as u64;
    }
}

/// A non-blocking pipe used as the in-kernel buffer of one direction.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    size: usize,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        let wanted = i32::try_from(PIPE_SIZE).unwrap_or(i32::MAX);
        // Refused above pipe-max-size or the per-user pipe quota: the default size still works,
        // only with more syscalls per megabyte.
        let size = match fcntl(write.as_raw_fd(), FcntlArg::F_SETPIPE_SZ(wanted)) {
            Ok(size) => usize::try_from(size).unwrap_or(DEFAULT_PIPE_SIZE),
            Err(_) => fcntl(write.as_raw_fd(), FcntlArg::F_GETPIPE_SZ)
                .ok()
                .and_then(|size| usize::try_from(size).ok())
                .unwrap_or(DEFAULT_PIPE_SIZE),
        };
        Ok(Pipe { read, write, size })
    }
}

/// Drained pipes kept for the next connections: creating, enlarging and closing two pipes per
/// connection took about a tenth of the proxy's CPU at thousands of connections per second.
struct PipePool {
    idle: Mutex<Vec<Pipe>>,
    max: usize,
}

static PIPES: PipePool = PipePool::new(PIPE_POOL_MAX);

impl PipePool {
    const fn new(max: usize) -> PipePool {
        PipePool { idle: Mutex::new(Vec::new()), max }
    }

    fn take(&self) -> io::Result<Pipe> {
        let pooled = self.idle.lock().ok().and_then(|mut idle| idle.pop());
        pooled.map_or_else(Pipe::new, Ok)
    }

    /// Only for an empty pipe: the next connection would otherwise receive its bytes.
    fn give_back(&self, pipe: Pipe) {
        if let Ok(mut idle) = self.idle.lock() {
            if idle.len() < self.max {
                idle.push(pipe);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::task::JoinHandle;

    const LIMIT: Duration = Duration::from_secs(20);

    fn config(targets: Vec<SocketAddr>) -> Config {
        Config {
            listen: "127.0.0.1:0".parse().expect("literal address"),
            targets,
            reuse_port: false,
            connect_timeout: Duration::from_secs(2),
            drain_timeout: Duration::from_secs(2),
            socket_buffer: None,
        }
    }

    /// A proxy running on a spawned task; cancelled when dropped, so a failing test stops it.
    struct Running {
        addr: SocketAddr,
        targets: Targets,
        token: CancellationToken,
        task: JoinHandle<anyhow::Result<Summary>>,
    }

    impl Running {
        fn start(cfg: Config) -> Running {
            let proxy = Proxy::bind(cfg).expect("bind the proxy");
            let token = CancellationToken::new();
            Running {
                addr: proxy.local_addr(),
                targets: proxy.targets(),
                token: token.clone(),
                task: tokio::spawn(proxy.run(token)),
            }
        }

        async fn stop(mut self) -> Summary {
            self.token.cancel();
            (&mut self.task).await.expect("proxy task").expect("proxy run")
        }
    }

    impl Drop for Running {
        fn drop(&mut self) {
            self.token.cancel();
        }
    }

    async fn bounded<F: std::future::Future>(f: F) -> F::Output {
        tokio::time::timeout(LIMIT, f).await.expect("test exceeded its time limit")
    }

    /// A target that answers every connection with `tag`, then echoes until EOF.
    async fn tag_server(tag: u8) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind target");
        let addr = listener.local_addr().expect("target address");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    s.write_all(&[tag]).await?;
                    let (mut r, mut w) = s.split();
                    tokio::io::copy(&mut r, &mut w).await?;
                    io::Result::Ok(())
                });
            }
        });
        addr
    }

    /// An address where nothing listens: connecting to it is refused.
    fn closed_port() -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("address")
    }

    /// Connects through the proxy and returns the target's tag.
    async fn tag_via(proxy: SocketAddr) -> (TcpStream, u8) {
        let mut s = TcpStream::connect(proxy).await.expect("connect to proxy");
        let mut tag = [0u8; 1];
        s.read_exact(&mut tag).await.expect("tag from target");
        (s, tag[0])
    }

    fn pattern(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    fn fnv1a(data: &[u8]) -> u64 {
        data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
    }

    #[tokio::test]
    async fn bytes_flow_both_ways_intact() {
        bytes_flow_both_ways_intact_with(None).await;
    }

    #[tokio::test]
    async fn bytes_flow_both_ways_intact_with_fixed_buffers() {
        bytes_flow_both_ways_intact_with(Some(1 << 20)).await;
    }

    async fn bytes_flow_both_ways_intact_with(socket_buffer: Option<usize>) {
        const LEN: usize = 6 << 20;
        let up = pattern(1, LEN);
        let down = pattern(2, LEN);
        let (up_sum, down_sum) = (fnv1a(&up), fnv1a(&down));

        // The target sends `down` while it reads everything the client sends, then reports it.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind target");
        let target = listener.local_addr().expect("target address");
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await?;
            let (mut r, mut w) = s.into_split();
            let send = async {
                w.write_all(&down).await?;
                w.shutdown().await
            };
            let mut got = Vec::new();
            let (sent, read) = tokio::join!(send, r.read_to_end(&mut got));
            sent?;
            read?;
            io::Result::Ok(got)
        });

        let proxy = Running::start(Config { socket_buffer, ..config(vec![target]) });
        let client = TcpStream::connect(proxy.addr).await.expect("connect");
        let (mut r, mut w) = client.into_split();
        let send = async {
            w.write_all(&up).await?;
            w.shutdown().await
        };
        let mut got = Vec::new();
        let (sent, read) = bounded(async { tokio::join!(send, r.read_to_end(&mut got)) }).await;
        sent.expect("client send");
        read.expect("client read");
        let at_server = bounded(server).await.expect("server task").expect("server io");

        assert_eq!(got.len(), LEN, "bytes received by the client");
        assert_eq!(fnv1a(&got), down_sum, "server → client checksum");
        assert_eq!(at_server.len(), LEN, "bytes received by the server");
        assert_eq!(fnv1a(&at_server), up_sum, "client → server checksum");

        let summary = bounded(proxy.stop()).await;
        assert_eq!(summary.accepted, 1);
        assert_eq!(summary.target_failures, 0);
    }

    #[tokio::test]
    async fn half_close_reaches_the_server_which_still_replies() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind target");
        let target = listener.local_addr().expect("target address");
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await?;
            let mut request = Vec::new();
            // Returns only once the client's FIN came through the proxy.
            s.read_to_end(&mut request).await?;
            let mut reply = b"reply:".to_vec();
            reply.extend_from_slice(&request);
            s.write_all(&reply).await?;
            s.shutdown().await?;
            io::Result::Ok(())
        });

        let proxy = Running::start(config(vec![target]));
        let mut client = TcpStream::connect(proxy.addr).await.expect("connect");
        client.write_all(b"hello").await.expect("send");
        client.shutdown().await.expect("shutdown(Write)");
        let mut reply = Vec::new();
        bounded(client.read_to_end(&mut reply)).await.expect("read reply");
        assert_eq!(reply, b"reply:hello");
        bounded(server).await.expect("server task").expect("server io");
        bounded(proxy.stop()).await;
    }

    #[tokio::test]
    async fn refused_target_is_skipped_and_counted() {
        let good = tag_server(b'G').await;
        let proxy = Running::start(config(vec![closed_port(), good]));
        // The first connection starts at the refused target.
        let (mut s, tag) = bounded(tag_via(proxy.addr)).await;
        assert_eq!(tag, b'G');
        s.write_all(b"ping").await.expect("send");
        let mut echo = [0u8; 4];
        bounded(s.read_exact(&mut echo)).await.expect("echo");
        assert_eq!(&echo, b"ping");
        drop(s);
        let summary = bounded(proxy.stop()).await;
        assert_eq!(summary.accepted, 1);
        assert_eq!(summary.target_failures, 1);
    }

    #[tokio::test]
    async fn client_is_closed_when_every_target_fails() {
        let proxy = Running::start(config(vec![closed_port(), closed_port()]));
        let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
        let mut buf = [0u8; 1];
        match bounded(s.read(&mut buf)).await {
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset),
            Ok(n) => panic!("expected a reset, read {n} bytes"),
        }
        let summary = bounded(proxy.stop()).await;
        assert_eq!(summary.accepted, 1);
        assert_eq!(summary.target_failures, 2);
    }

    #[tokio::test]
    async fn target_that_does_not_answer_times_out_and_is_skipped() {
        // A listener with a full accept queue drops SYNs: the connect hangs, as to a lost host.
        let stuck = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        let loopback: SocketAddr = "127.0.0.1:0".parse().expect("literal address");
        stuck.bind(&loopback.into()).expect("bind");
        stuck.listen(0).expect("listen");
        let stuck_addr = stuck.local_addr().expect("address").as_socket().expect("inet address");
        let mut fillers = Vec::new();
        let mut refused_at = None;
        for i in 0..4 {
            match tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(stuck_addr)).await {
                Ok(Ok(s)) => fillers.push(s),
                Ok(Err(e)) => panic!("filler connect failed: {e}"),
                Err(_) => {
                    refused_at = Some(i);
                    break;
                }
            }
        }
        assert!(refused_at.is_some(), "the stuck listener kept accepting handshakes");

        let good = tag_server(b'G').await;
        let mut cfg = config(vec![stuck_addr, good]);
        cfg.connect_timeout = Duration::from_millis(300);
        let proxy = Running::start(cfg);
        let began = Instant::now();
        let (_s, tag) = bounded(tag_via(proxy.addr)).await;
        assert_eq!(tag, b'G');
        assert!(began.elapsed() >= Duration::from_millis(250), "the stuck target was not waited for");
        let summary = bounded(proxy.stop()).await;
        assert_eq!(summary.target_failures, 1);
    }

    #[tokio::test]
    async fn new_connections_alternate_between_two_targets() {
        let a = tag_server(b'A').await;
        let b = tag_server(b'B').await;
        let proxy = Running::start(config(vec![a, b]));
        let mut tags = Vec::new();
        for _ in 0..4 {
            let (_s, tag) = bounded(tag_via(proxy.addr)).await;
            tags.push(tag);
        }
        assert_eq!(tags, b"ABAB");
        bounded(proxy.stop()).await;
    }

    #[tokio::test]
    async fn set_moves_new_connections_and_keeps_open_ones() {
        let a = tag_server(b'A').await;
        let b = tag_server(b'B').await;
        let proxy = Running::start(config(vec![a]));
        let (mut old, tag) = bounded(tag_via(proxy.addr)).await;
        assert_eq!(tag, b'A');

        proxy.targets.set(vec![b]);
        for _ in 0..2 {
            let (_s, tag) = bounded(tag_via(proxy.addr)).await;
            assert_eq!(tag, b'B');
        }

        // The connection opened before the change still reaches A.
        old.write_all(b"still").await.expect("send");
        let mut echo = [0u8; 5];
        bounded(old.read_exact(&mut echo)).await.expect("echo");
        assert_eq!(&echo, b"still");
        drop(old);
        bounded(proxy.stop()).await;
    }

    #[tokio::test]
    async fn port_held_by_another_socket_is_addr_in_use() {
        let holder = std::net::TcpListener::bind("127.0.0.1:0").expect("bind holder");
        let addr = holder.local_addr().expect("address");
        for reuse_port in [false, true] {
            let mut cfg = config(vec![addr]);
            cfg.listen = addr;
            cfg.reuse_port = reuse_port;
            match Proxy::bind(cfg) {
                Err(UserspaceError::AddrInUse { addr: a }) => assert_eq!(a, addr),
                Err(e) => panic!("expected AddrInUse, got {e}"),
                Ok(_) => panic!("bound {addr} although another socket holds it"),
            }
        }
    }

    #[test]
    fn reuse_port_shares_the_port_with_another_reuse_port_listener() {
        let mut cfg = config(vec![closed_port()]);
        cfg.reuse_port = true;
        let first = Proxy::bind(cfg.clone()).expect("first bind");
        cfg.listen = first.local_addr();
        let second = Proxy::bind(cfg).expect("second bind on the same port");
        assert_eq!(second.local_addr(), first.local_addr());
    }

    #[test]
    fn ipv6_wildcard_is_ipv6_only() {
        let v4 = Proxy::bind(Config { listen: "0.0.0.0:0".parse().expect("literal address"), ..config(vec![]) })
            .expect("bind 0.0.0.0");
        let port = v4.local_addr().port();
        let v6 = match Proxy::bind(Config {
            listen: SocketAddr::new("::".parse().expect("literal address"), port),
            ..config(vec![])
        }) {
            Ok(v6) => v6,
            // A host without IPv6 cannot say anything about it.
            Err(UserspaceError::Bind { source, .. }) if source.raw_os_error() == Some(Errno::EAFNOSUPPORT as i32) => {
                return
            }
            Err(e) => panic!("[::]:{port} next to 0.0.0.0:{port}: {e}"),
        };
        let only_v6 = SockRef::from(&v6.listener).only_v6().expect("IPV6_V6ONLY");
        assert!(only_v6);
    }

    #[tokio::test]
    async fn shutdown_drains_what_finishes_and_resets_the_rest() {
        let target = tag_server(b'T').await;
        let drain_timeout = Duration::from_millis(1500);
        let mut cfg = config(vec![target]);
        cfg.drain_timeout = drain_timeout;
        let proxy = Running::start(cfg);
        let (mut quick, _) = bounded(tag_via(proxy.addr)).await;
        let (mut slow, _) = bounded(tag_via(proxy.addr)).await;

        let cancelled = Instant::now();
        proxy.token.cancel();
        // Give the proxy a moment to see the cancellation: then it must refuse new clients.
        tokio::time::sleep(Duration::from_millis(200)).await;
        match TcpStream::connect(proxy.addr).await {
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused),
            Ok(_) => panic!("the proxy still accepts connections after shutdown began"),
        }

        // `quick` finishes its exchange during the drain; `slow` stays open past the timeout.
        quick.write_all(b"bye").await.expect("send during drain");
        quick.shutdown().await.expect("shutdown(Write)");
        let mut rest = Vec::new();
        bounded(quick.read_to_end(&mut rest)).await.expect("reply during drain");
        assert_eq!(rest, b"bye");

        let mut buf = [0u8; 1];
        let cut = bounded(slow.read(&mut buf)).await;
        assert!(cancelled.elapsed() >= drain_timeout, "the open connection was cut before the drain timeout");
        match cut {
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset),
            Ok(n) => panic!("expected the open connection reset, read {n} bytes"),
        }

        let summary = bounded(proxy.stop()).await;
        assert_eq!(summary.accepted, 2);
        assert_eq!(summary.drained, 1);
        assert_eq!(summary.aborted, 1);
    }

    #[tokio::test]
    async fn connections_queued_at_shutdown_are_served_not_reset() {
        let target = tag_server(b'Q').await;
        let proxy = Proxy::bind(config(vec![target])).expect("bind");
        let addr = proxy.local_addr();
        // The kernel completes this handshake while nothing accepts yet.
        let mut queued = TcpStream::connect(addr).await.expect("connect");
        let token = CancellationToken::new();
        token.cancel();
        let run = tokio::spawn(proxy.run(token));

        let mut tag = [0u8; 1];
        bounded(queued.read_exact(&mut tag)).await.expect("tag");
        assert_eq!(tag[0], b'Q');
        queued.shutdown().await.expect("shutdown(Write)");
        let mut rest = Vec::new();
        bounded(queued.read_to_end(&mut rest)).await.expect("EOF");

        let summary = bounded(run).await.expect("task").expect("run");
        assert_eq!(summary.accepted, 1);
        assert_eq!(summary.drained, 1);
        assert_eq!(summary.aborted, 0);
    }

    /// Relays one connection with `one_way` in both directions, with or without pipes, and
    /// returns (bytes client → server, bytes server → client) as counted by the relay.
    async fn relay_directly(splice: bool) -> (u64, u64) {
        let target = tag_server(b'C').await;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let front = listener.local_addr().expect("address");
        let relay = tokio::spawn(async move {
            let (client, _) = listener.accept().await?;
            let server = TcpStream::connect(target).await?;
            let pipes = if splice { Some((Pipe::new()?, Pipe::new()?)) } else { None };
            let (up_pipe, down_pipe) = match &pipes {
                Some((a, b)) => (Some(a), Some(b)),
                None => (None, None),
            };
            let mut pair = Pair { client, server, clean: false };
            let moved = tokio::try_join!(
                one_way(&pair.client, &pair.server, up_pipe),
                one_way(&pair.server, &pair.client, down_pipe),
            )?;
            pair.clean = true;
            io::Result::Ok(moved)
        });
        let data = pattern(3, 3 << 20);
        let mut s = TcpStream::connect(front).await.expect("connect");
        let (mut r, mut w) = s.split();
        let send = async {
            w.write_all(&data).await?;
            w.shutdown().await
        };
        let mut got = Vec::new();
        let (sent, read) = bounded(async { tokio::join!(send, r.read_to_end(&mut got)) }).await;
        sent.expect("send");
        read.expect("read");
        assert_eq!(got.first(), Some(&b'C'), "tag from the target");
        assert_eq!(got.len(), data.len() + 1, "echoed length");
        assert_eq!(fnv1a(&got[1..]), fnv1a(&data), "echo checksum");
        bounded(relay).await.expect("task").expect("relay")
    }

    #[tokio::test]
    async fn splice_relays_between_tcp_sockets() {
        let (up, down) = relay_directly(true).await;
        assert_eq!((up, down), (3 << 20, (3 << 20) + 1));
        assert!(
            !SPLICE_UNSUPPORTED.load(Ordering::Relaxed),
            "the kernel refused splice and the relay fell back to copying"
        );
    }

    #[tokio::test]
    async fn buffered_copy_relays_like_splice() {
        let (up, down) = relay_directly(false).await;
        assert_eq!((up, down), (3 << 20, (3 << 20) + 1));
    }

    #[tokio::test]
    async fn socket_buffers_get_the_asked_size_or_stay_autotuned() {
        // Larger than Debian's default net.core.rmem_max (208 KiB), smaller than any sane limit
        // for SO_RCVBUFFORCE.
        const ASKED: usize = 3 << 20;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let stream = TcpStream::connect(listener.local_addr().expect("address")).await.expect("connect");
        let before = SockRef::from(&stream).recv_buffer_size().expect("SO_RCVBUF");
        size_buffers(&stream, ASKED);
        let sock = SockRef::from(&stream);
        let (rcv, snd) = (sock.recv_buffer_size().expect("SO_RCVBUF"), sock.send_buffer_size().expect("SO_SNDBUF"));
        let plain_allowed = core_max("net.core.rmem_max") >= ASKED && core_max("net.core.wmem_max") >= ASKED;
        if nix::unistd::geteuid().is_root() || plain_allowed {
            // The kernel doubles the asked size for its bookkeeping.
            assert_eq!((rcv, snd), (2 * ASKED, 2 * ASKED));
        } else {
            assert_eq!(rcv, before, "a capped buffer was set instead of leaving autotuning on");
        }
    }

    #[test]
    fn pipe_pool_reuses_given_back_pipes_up_to_its_cap() {
        let pool = PipePool::new(1);
        let first = pool.take().expect("pipe");
        let second = pool.take().expect("pipe");
        let first_fd = first.read.as_raw_fd();
        assert_ne!(first_fd, second.read.as_raw_fd());
        pool.give_back(first);
        pool.give_back(second); // over the cap: closed
        assert_eq!(pool.idle.lock().expect("pool lock").len(), 1);
        let again = pool.take().expect("pipe");
        assert_eq!(again.read.as_raw_fd(), first_fd, "the pooled pipe is handed out again");
        assert!(pool.idle.lock().expect("pool lock").is_empty());
    }

    #[test]
    fn pipes_are_enlarged_when_the_kernel_allows() {
        let pipe = Pipe::new().expect("pipe");
        let max: usize =
            std::fs::read_to_string("/proc/sys/fs/pipe-max-size").ok().and_then(|v| v.trim().parse().ok()).unwrap_or(0);
        if max >= PIPE_SIZE {
            assert_eq!(pipe.size, PIPE_SIZE);
        } else {
            assert!(pipe.size >= 4096, "pipe of {} bytes", pipe.size);
        }
    }

    #[tokio::test]
    async fn reset_by_the_target_resets_the_client() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind target");
        let target = listener.local_addr().expect("target address");
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await?;
            let mut req = [0u8; 4];
            s.read_exact(&mut req).await?;
            reset(&s);
            drop(s);
            io::Result::Ok(())
        });
        let proxy = Running::start(config(vec![target]));
        let mut client = TcpStream::connect(proxy.addr).await.expect("connect");
        client.write_all(b"ping").await.expect("send");
        let mut buf = [0u8; 1];
        match bounded(client.read(&mut buf)).await {
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset),
            Ok(n) => panic!("expected a reset, read {n} bytes"),
        }
        bounded(proxy.stop()).await;
    }
}
