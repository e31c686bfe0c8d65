//! A TCP forwarder on loopback whose open connections can be frozen: bytes stop flowing both
//! ways but the sockets stay open, as when a NAT entry or a peer vanishes without a reset.
//! Connections opened after the freeze flow normally. This is how a dead watch connection
//! looks to a client, which only a client-side idle timeout can notice.
#![allow(dead_code)]

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use anyhow::Result;

pub struct FreezeProxy {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<Conn>>>,
}

struct Conn {
    frozen: Arc<AtomicBool>,
    sockets: [TcpStream; 2],
}

impl FreezeProxy {
    /// Listens on 127.0.0.1 (port 0) and forwards each connection to `upstream`.
    pub fn start(upstream: SocketAddr) -> Result<FreezeProxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<Conn>>> = Arc::default();
        let (stop2, conns2) = (stop.clone(), conns.clone());
        thread::Builder::new().name("freeze-proxy".into()).spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        if let Err(e) = forward(client, upstream, &conns2) {
                            eprintln!("freeze proxy: {e:#}");
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => thread::sleep(Duration::from_millis(10)),
                    Err(e) => {
                        eprintln!("freeze proxy: accept: {e}");
                        thread::sleep(Duration::from_millis(10));
                    }
                }
            }
        })?;
        Ok(FreezeProxy { addr, stop, conns })
    }

    /// Freezes every connection open now; returns how many.
    pub fn freeze(&self) -> usize {
        let conns = self.conns.lock().unwrap();
        for c in conns.iter() {
            c.frozen.store(true, Ordering::SeqCst);
        }
        conns.len()
    }
}

fn forward(client: TcpStream, upstream: SocketAddr, conns: &Mutex<Vec<Conn>>) -> Result<()> {
    client.set_nonblocking(false)?;
    let server = TcpStream::connect(upstream)?;
    let frozen = Arc::new(AtomicBool::new(false));
    for (from, to) in [(client.try_clone()?, server.try_clone()?), (server.try_clone()?, client.try_clone()?)] {
        let frozen = frozen.clone();
        thread::Builder::new().name("freeze-pump".into()).spawn(move || pump(from, to, &frozen))?;
    }
    conns.lock().unwrap().push(Conn { frozen, sockets: [client, server] });
    Ok(())
}

/// Copies `from` to `to` until either side closes; while frozen, reads are dropped on the floor
/// and the peer's close is not passed on either.
fn pump(mut from: TcpStream, mut to: TcpStream, frozen: &AtomicBool) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => {
                if !frozen.load(Ordering::SeqCst) {
                    let _ = to.shutdown(Shutdown::Write);
                }
                return;
            }
            Ok(n) => {
                if frozen.load(Ordering::SeqCst) {
                    continue;
                }
                if to.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

impl Drop for FreezeProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().iter() {
            for s in &c.sockets {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }
}
