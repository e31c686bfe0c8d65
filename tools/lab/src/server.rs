//! The TCP servers of the lab: `serve` (greeting, then echo), `sink` (reads and discards) and
//! `source` (writes as fast as it can).
//!
//! Each prints exactly one line, `listening ADDR`, on stdout once bound (so a test that binds
//! port 0 learns the port) and nothing else there; problems go to stderr.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use socket2::{Domain, Protocol, Socket, Type};

/// Buffer size of the throughput servers: large enough that a syscall moves plenty of data.
pub const BULK_BUF: usize = 256 * 1024;

/// Connections a thread-per-connection server (`sink`, `source`) serves at once; more are closed
/// at once, so a misdirected connection flood cannot exhaust the machine.
const MAX_BULK_CONNS: usize = 256;

/// Binds a listening socket with SO_REUSEADDR and a deep accept queue (the connection-rate
/// benchmark keeps dozens of handshakes in flight).
pub fn bind(addr: SocketAddr) -> Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .context("creating the listening socket")?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into()).with_context(|| format!("binding {addr}"))?;
    socket.listen(4096).with_context(|| format!("listening on {addr}"))?;
    Ok(socket.into())
}

/// Prints the `listening ADDR` line and flushes it.
pub fn announce(listener: &TcpListener) -> Result<SocketAddr> {
    let addr = listener.local_addr()?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "listening {addr}")?;
    out.flush()?;
    Ok(addr)
}

/// Checks a server id: it travels as one greeting line.
pub fn check_id(id: &str) -> Result<()> {
    if id.is_empty() || id.len() > 64 || id.chars().any(|c| c.is_control()) {
        bail!("server id {id:?}: use 1 to 64 printable characters");
    }
    Ok(())
}

/// `serve`: on each connection writes `ID\n`, then echoes everything until EOF, then closes its
/// write side. Runs until the process is stopped.
pub fn serve(listener: TcpListener, id: &str, threads: usize) -> Result<()> {
    check_id(id)?;
    let greeting: Arc<[u8]> = format!("{id}\n").into_bytes().into();
    listener.set_nonblocking(true)?;
    // NOTE: tokio rather than a thread per connection: the connection-rate benchmark opens
    // 20k+ connections per second and spawning that many threads would make the server the
    // bottleneck it is meant not to be.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let mut last_report: Option<Instant> = None;
        loop {
            match listener.accept().await {
                Ok((conn, _)) => {
                    tokio::spawn(echo(conn, greeting.clone()));
                }
                Err(err) => {
                    // EMFILE and friends: report at most once a second, back off briefly.
                    if last_report.is_none_or(|t| t.elapsed() > Duration::from_secs(1)) {
                        eprintln!("cpha-lab serve: accept: {err}");
                        last_report = Some(Instant::now());
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    })
}

async fn echo(mut conn: tokio::net::TcpStream, greeting: Arc<[u8]>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A failed setsockopt only costs latency; the echo still works.
    conn.set_nodelay(true).ok();
    if conn.write_all(&greeting).await.is_err() {
        return;
    }
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match conn.read(&mut buf).await {
            Ok(0) => {
                // Half-close: the peer learns that everything it sent came back.
                conn.shutdown().await.ok();
                return;
            }
            Ok(n) => {
                if conn.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
            // Resets are routine here: tests cut paths on purpose.
            Err(_) => return,
        }
    }
}

/// `sink`: reads and discards everything on every connection.
pub fn sink(listener: TcpListener) -> Result<()> {
    bulk_server(listener, "sink", |mut conn| {
        let mut buf = vec![0u8; BULK_BUF];
        loop {
            match conn.read(&mut buf) {
                Ok(0) => return,
                Ok(_) => {}
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    })
}

/// `source`: writes as fast as it can on every connection until the peer goes away.
pub fn source(listener: TcpListener) -> Result<()> {
    bulk_server(listener, "source", |mut conn| {
        let buf = vec![0x5au8; BULK_BUF];
        loop {
            match conn.write(&buf) {
                Ok(0) => return,
                Ok(_) => {}
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    })
}

/// Thread per connection with blocking I/O: the cheapest way to move bulk data for a handful of
/// connections.
fn bulk_server(listener: TcpListener, what: &'static str, handle: fn(TcpStream)) -> Result<()> {
    let active = Arc::new(AtomicUsize::new(0));
    let mut last_report: Option<Instant> = None;
    loop {
        let conn = match listener.accept() {
            Ok((conn, _)) => conn,
            Err(err) => {
                if last_report.is_none_or(|t| t.elapsed() > Duration::from_secs(1)) {
                    eprintln!("cpha-lab {what}: accept: {err}");
                    last_report = Some(Instant::now());
                }
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if active.load(Ordering::SeqCst) >= MAX_BULK_CONNS {
            continue;
        }
        active.fetch_add(1, Ordering::SeqCst);
        let done = active.clone();
        let spawned = thread::Builder::new().name(what.into()).stack_size(256 * 1024).spawn(move || {
            handle(conn);
            done.fetch_sub(1, Ordering::SeqCst);
        });
        if let Err(err) = spawned {
            active.fetch_sub(1, Ordering::SeqCst);
            eprintln!("cpha-lab {what}: starting a connection thread: {err}");
        }
    }
}

/// Ends the process after `d`, so a server nobody stopped does not outlive its test run.
pub fn exit_after(d: Duration) {
    thread::spawn(move || {
        thread::sleep(d);
        eprintln!("cpha-lab: --max-duration {d:?} reached, exiting");
        std::process::exit(0);
    });
}
