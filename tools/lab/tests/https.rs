//! The HTTPS clients (`https-loop`, `https-stream`, `http`) against the real Kubernetes API
//! stand-in on loopback (no privileges needed). A counting TCP relay in front of the stand-in
//! shows, from the server side, how many connections a client opened, and can cut them.
//!
//! Build the stand-in first, into the same target directory: `cargo build -p kube-standin`
//! (or point `CPHA_LAB_BIN_DIR` at the directory that holds it).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use cpha_lab::netns::{require_bin, wait_for, Child};
use cpha_lab::report::{HttpReport, LoadReport, StreamReport};

const LAB: &str = env!("CARGO_BIN_EXE_cpha-lab");
const T: Duration = Duration::from_secs(20);
const ADMIN_TOKEN: &str = "admin-secret";

/// Starts `cpha-lab` with a command line split at whitespace (no argument here has any).
fn lab(line: &str) -> Child {
    let mut cmd = Command::new(LAB);
    cmd.args(line.split_whitespace());
    Child::spawn(cmd, format!("cpha-lab {line}")).unwrap()
}

/// Runs a client to completion: its exit code and its parsed JSON line.
fn client<R: serde::de::DeserializeOwned>(line: &str) -> (i32, R) {
    let mut child = lab(line);
    let (status, lines) = child.finish(Duration::from_secs(60)).unwrap();
    assert_eq!(lines.len(), 1, "one JSON line, got {lines:?}");
    (status.code().unwrap(), serde_json::from_str(&lines[0]).unwrap())
}

/// A free loopback port (bound once, then released).
fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// A scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("cpha-lab-https-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running kube-standin: HTTPS API on `api`, plain-HTTP fault endpoint on `control`.
struct Standin {
    child: Child,
    api: SocketAddr,
    control: SocketAddr,
    ca: PathBuf,
}

impl Standin {
    /// Starts one with its CA in `cert_dir`.
    fn start(cert_dir: &Path) -> Standin {
        let bin = require_bin("kube-standin").unwrap();
        let control = free_addr();
        let mut cmd = Command::new(bin);
        cmd.args(["--listen", "127.0.0.1:0", "--control-listen", &control.to_string(), "--log", "warn"])
            .arg("--cert-dir")
            .arg(cert_dir)
            .args(["--token", &format!("admin:{ADMIN_TOKEN}:*/*")]);
        let mut child = Child::spawn(cmd, "kube-standin").unwrap();
        let api = child.listening_addr(T).unwrap();
        Standin { child, api, control, ca: cert_dir.join("ca.crt") }
    }

    fn ca(&self) -> String {
        self.ca.display().to_string()
    }

    fn faults_url(&self) -> String {
        format!("http://{}/_standin/faults", self.control)
    }
}

/// A TCP relay to `upstream` that counts the connections it accepted and can cut them all.
struct Relay {
    addr: SocketAddr,
    accepted: Arc<AtomicU64>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl Relay {
    fn start(upstream: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicU64::new(0));
        let open = Arc::new(Mutex::new(Vec::new()));
        let (count, conns) = (accepted.clone(), open.clone());
        // NOTE: the accept thread lives as long as the test process; the listener is only
        // reachable by this test.
        thread::spawn(move || {
            for down in listener.incoming() {
                let Ok(down) = down else { continue };
                count.fetch_add(1, Ordering::SeqCst);
                let Ok(up) = TcpStream::connect(upstream) else { continue };
                conns.lock().unwrap().extend([down.try_clone().unwrap(), up.try_clone().unwrap()]);
                let (down2, up2) = (down.try_clone().unwrap(), up.try_clone().unwrap());
                thread::spawn(move || pipe(down, up));
                thread::spawn(move || pipe(up2, down2));
            }
        });
        Relay { addr, accepted, open }
    }

    fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Closes every relayed connection on both sides, as a proxy that goes away would.
    fn cut(&self) {
        for s in self.open.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// Copies until EOF or an error, then passes the FIN on.
fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

fn wait_ready(ready: &Path) {
    wait_for("the ready file", T, || Ok(ready.exists().then_some(()))).unwrap();
}

#[test]
fn https_loop_opens_a_new_connection_per_request_and_checks_the_status() {
    let dir = Scratch::new("loop");
    let api = Standin::start(&dir.join("pki"));
    let relay = Relay::start(api.api);
    let (to, ca) = (relay.addr, api.ca());
    let (code, r): (_, LoadReport) =
        client(&format!("https-loop --to {to} --ca {ca} --concurrency 4 --duration 30s --max-conns 60"));
    assert_eq!(code, 0, "{r:?}");
    assert_eq!((r.ok, r.failed), (60, 0), "{r:?}");
    assert!(r.error_kinds.is_empty() && r.errors.is_empty() && r.ids.is_empty(), "{r:?}");
    assert!(r.p50_ms > 0.0 && r.p50_ms <= r.p99_ms && r.p99_ms <= r.max_ms, "{r:?}");
    assert!(r.conns_per_sec > 0.0, "{r:?}");
    assert_eq!(relay.accepted(), 60, "one TCP connection per request");

    // The path is the one asked for: the stand-in has no such check (404), as expected here.
    let (code, r): (_, LoadReport) = client(&format!(
        "https-loop --to {to} --ca {ca} --duration 30s --max-conns 10 --path /readyz/nope --expect-status 404"
    ));
    assert_eq!((code, r.ok, r.failed), (0, 10, 0), "{r:?}");

    // A 200 where 503 is expected is a failed connection of kind "status".
    let (code, r): (_, LoadReport) =
        client(&format!("https-loop --to {to} --duration 30s --max-conns 10 --concurrency 2 --expect-status 503"));
    assert_eq!(code, 1, "{r:?}");
    assert_eq!((r.ok, r.failed), (0, 10), "{r:?}");
    assert_eq!(r.error_kinds.get("status"), Some(&10), "{r:?}");
    assert!(r.errors[0].contains("status 200, expected 503: ok"), "{r:?}");
    assert_eq!(relay.accepted(), 80);
}

#[test]
fn https_loop_verifies_the_certificate_against_the_ca() {
    let dir = Scratch::new("verify");
    let api = Standin::start(&dir.join("pki"));
    let other = Standin::start(&dir.join("other-pki"));
    let run = |extra: &str| -> (i32, LoadReport) {
        client(&format!("https-loop --to {} --duration 30s --max-conns 5 --concurrency 1 {extra}", api.api))
    };
    // The stand-in's certificate names 127.0.0.1 and "kubernetes"; without --ca any will do.
    for extra in [format!("--ca {}", api.ca()), format!("--ca {} --server-name kubernetes", api.ca()), String::new()] {
        let (code, r) = run(&extra);
        assert_eq!((code, r.ok), (0, 5), "{extra}: {r:?}");
    }
    for extra in [format!("--ca {}", other.ca()), format!("--ca {} --server-name not-in.the-cert", api.ca())] {
        let (code, r) = run(&extra);
        assert_eq!((code, r.ok, r.failed), (1, 0, 5), "{extra}: {r:?}");
        assert_eq!(r.error_kinds.get("tls: certificate"), Some(&5), "{extra}: {r:?}");
    }
    // Nothing listening.
    let (code, r): (_, LoadReport) = client(&format!("https-loop --to {} --duration 30s --max-conns 3", free_addr()));
    assert_eq!((code, r.failed), (1, 3), "{r:?}");
    assert_eq!(r.error_kinds.get("connect: refused"), Some(&3), "{r:?}");
}

#[test]
fn https_loop_honours_rate_and_stops_on_sigterm() {
    let dir = Scratch::new("rate");
    let api = Standin::start(&dir.join("pki"));
    let mut child = lab(&format!("https-loop --to {} --duration 60s --rate 40", api.api));
    thread::sleep(Duration::from_millis(1000));
    let signalled = Instant::now();
    child.signal(libc::SIGTERM).unwrap();
    let (status, lines) = child.finish(T).unwrap();
    assert!(signalled.elapsed() < Duration::from_secs(3));
    let r: LoadReport = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(status.code(), Some(0), "{r:?}");
    // About 40 in one second; generous bounds for a busy machine.
    assert!((15..=55).contains(&r.ok), "{r:?}");
    assert_eq!(r.failed, 0, "{r:?}");
}

#[test]
fn https_stream_keeps_one_connection_until_sigterm() {
    let dir = Scratch::new("stream");
    let api = Standin::start(&dir.join("pki"));
    let relay = Relay::start(api.api);
    let ready = dir.join("stream.ready");
    let mut stream = lab(&format!(
        "https-stream --to {} --ca {} --interval 20ms --ready-file {}",
        relay.addr,
        api.ca(),
        ready.display()
    ));
    wait_ready(&ready);
    assert_eq!(std::fs::read_to_string(&ready).unwrap(), "200\n");
    thread::sleep(Duration::from_millis(500));
    stream.signal(libc::SIGTERM).unwrap();
    let (status, lines) = stream.finish(T).unwrap();
    let r: StreamReport = serde_json::from_str(&lines[0]).unwrap();
    assert!(r.ok, "{r:?}");
    assert_eq!(status.code(), Some(0));
    assert_eq!((r.error.as_deref(), r.error_kind.as_deref()), (None, None), "{r:?}");
    assert!(r.roundtrips >= 5, "{r:?}");
    // Each answer to /readyz is a head of about 180 bytes and "ok".
    assert!(r.bytes > r.roundtrips * 100 && r.bytes < r.roundtrips * 400, "{r:?}");
    assert_eq!(relay.accepted(), 1, "all round trips on one connection");
}

#[test]
fn https_stream_fails_when_the_server_goes_away() {
    let dir = Scratch::new("stream-kill");
    let mut api = Standin::start(&dir.join("pki"));
    let ready = dir.join("stream.ready");
    let mut stream = lab(&format!("https-stream --to {} --interval 20ms --ready-file {}", api.api, ready.display()));
    wait_ready(&ready);
    api.child.signal(libc::SIGKILL).unwrap();
    api.child.wait_timeout(T).unwrap().expect("the stand-in exits on SIGKILL");
    let (status, lines) = stream.finish(T).unwrap();
    let r: StreamReport = serde_json::from_str(&lines[0]).unwrap();
    assert!(!r.ok, "{r:?}");
    assert_eq!(status.code(), Some(1));
    assert!(r.roundtrips >= 1, "{r:?}");
    assert!(matches!(r.error_kind.as_deref(), Some("closed" | "reset")), "{r:?}");
    assert!(r.error.as_deref().unwrap().contains("round trip"), "{r:?}");
}

#[test]
fn https_stream_fails_when_the_path_is_cut_or_the_answer_changes() {
    let dir = Scratch::new("stream-cut");
    let api = Standin::start(&dir.join("pki"));
    let relay = Relay::start(api.api);
    let ready = dir.join("cut.ready");
    let mut stream = lab(&format!("https-stream --to {} --interval 20ms --ready-file {}", relay.addr, ready.display()));
    wait_ready(&ready);
    relay.cut();
    let (status, lines) = stream.finish(T).unwrap();
    let r: StreamReport = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!((r.ok, status.code()), (false, Some(1)), "{r:?}");
    assert!(matches!(r.error_kind.as_deref(), Some("closed" | "reset")), "{r:?}");

    // /readyz starts failing in the middle of the stream: a failure of kind "status".
    let ready = dir.join("status.ready");
    let mut stream = lab(&format!("https-stream --to {} --interval 20ms --ready-file {}", api.api, ready.display()));
    wait_ready(&ready);
    let (code, _): (_, HttpReport) =
        client(&format!(r#"http --method POST --url {} --data {{"readyzFail":true}}"#, api.faults_url()));
    assert_eq!(code, 0);
    let (status, lines) = stream.finish(T).unwrap();
    let r: StreamReport = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!((r.ok, status.code(), r.error_kind.as_deref()), (false, Some(1), Some("status")), "{r:?}");
    assert!(r.error.as_deref().unwrap().contains("status 500, expected 200"), "{r:?}");
}

#[test]
fn http_drives_the_fault_endpoint() {
    let dir = Scratch::new("http");
    let api = Standin::start(&dir.join("pki"));
    let readyz = format!("https://{}/readyz", api.api);
    let ca = api.ca();

    let (code, r): (_, HttpReport) = client(&format!("http --url {readyz} --ca {ca}"));
    assert_eq!((code, r.status, r.body.as_str(), r.error), (0, 200, "ok", None));

    // The control endpoint (plain HTTP, no credentials) makes /readyz fail.
    let (code, r): (_, HttpReport) =
        client(&format!(r#"http --method POST --url {} --data {{"readyzFail":true}}"#, api.faults_url()));
    assert_eq!((code, r.status), (0, 200), "{r:?}");
    let doc: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(doc["faults"]["readyzFail"], true, "{doc}");
    let (code, r): (_, HttpReport) = client(&format!("http --url {readyz} --insecure"));
    assert_eq!((code, r.status), (1, 500), "{r:?}");
    assert!(r.body.contains("[-]shutdown failed"), "{r:?}");
    let (code, r): (_, LoadReport) =
        client(&format!("https-loop --to {} --ca {ca} --duration 30s --max-conns 4 --expect-status 500", api.api));
    assert_eq!((code, r.ok), (0, 4), "{r:?}");

    // The same endpoint on the API port needs the admin token.
    let faults = format!("https://{}/_standin/faults", api.api);
    let (code, r): (_, HttpReport) = client(&format!("http --method DELETE --url {faults} --ca {ca}"));
    assert_eq!((code, r.status), (1, 401), "{r:?}");
    let (code, r): (_, HttpReport) =
        client(&format!("http --method DELETE --url {faults} --ca {ca} --token {ADMIN_TOKEN}"));
    assert_eq!((code, r.status), (0, 200), "{r:?}");
    let (code, r): (_, HttpReport) = client(&format!("http --url {readyz} --ca {ca}"));
    assert_eq!((code, r.status, r.body.as_str()), (0, 200, "ok"));
}

#[test]
fn http_reports_transport_errors_and_refuses_unverified_https_by_default() {
    let (code, r): (_, HttpReport) = client(&format!("http --url http://{}/ --timeout 2s", free_addr()));
    assert_eq!((code, r.status), (1, 0), "{r:?}");
    assert!(r.error.as_deref().unwrap().starts_with("connect 127.0.0.1:"), "{r:?}");

    // Neither --ca nor --insecure: a usage error, before any output.
    let mut child = lab("http --url https://127.0.0.1:1/readyz");
    let (status, lines) = child.finish(T).unwrap();
    assert_eq!((status.code(), lines.len()), (Some(2), 0), "{lines:?}");
}
