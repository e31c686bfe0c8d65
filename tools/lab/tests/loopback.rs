//! The cpha-lab command-line contract, on loopback (no privileges needed): servers announce their
//! address once, clients print one JSON line and exit 0 only when nothing failed.

use std::net::{SocketAddr, TcpListener};
use std::process::Command;
use std::time::{Duration, Instant};

use cpha_lab::netns::{wait_for, Child};
use cpha_lab::report::{LoadReport, ProbeReport, StreamReport, ThroughputReport};

const LAB: &str = env!("CARGO_BIN_EXE_cpha-lab");
const T: Duration = Duration::from_secs(10);

fn lab(args: &[&str]) -> Child {
    let mut cmd = Command::new(LAB);
    cmd.args(args);
    Child::spawn(cmd, format!("cpha-lab {}", args.join(" "))).unwrap()
}

/// Starts a server on 127.0.0.1:0 and returns it with the address it announced.
fn server(args: &[&str]) -> (Child, SocketAddr) {
    let mut all = args.to_vec();
    all.extend(["--listen", "127.0.0.1:0", "--max-duration", "120s"]);
    let mut child = lab(&all);
    let addr = child.listening_addr(T).unwrap();
    assert_ne!(addr.port(), 0);
    (child, addr)
}

/// Runs a client to completion: its exit code and its parsed JSON line.
fn client<R: serde::de::DeserializeOwned>(args: &[&str]) -> (i32, R) {
    let mut child = lab(args);
    let (status, lines) = child.finish(Duration::from_secs(60)).unwrap();
    assert_eq!(lines.len(), 1, "one JSON line, got {lines:?}");
    (status.code().unwrap(), serde_json::from_str(&lines[0]).unwrap())
}

/// An address where nothing listens: bound once, then released.
fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

#[test]
fn probe_reads_the_greeting_of_serve() {
    let (_srv, addr) = server(&["serve", "--id", "alpha"]);
    let (code, r): (_, ProbeReport) = client(&["probe", "--to", &addr.to_string(), "--count", "5"]);
    assert_eq!(code, 0);
    assert_eq!((r.ok, r.failed), (5, 0));
    assert_eq!(r.ids.get("alpha"), Some(&5));
    assert!(r.errors.is_empty());
}

#[test]
fn probe_fails_where_nothing_listens() {
    let addr = closed_port().to_string();
    let (code, r): (_, ProbeReport) = client(&["probe", "--to", &addr, "--count", "3"]);
    assert_eq!(code, 1);
    assert_eq!((r.ok, r.failed), (0, 3));
    assert_eq!(r.errors.len(), 3);
    assert!(r.errors[0].contains("connect"), "{:?}", r.errors);
}

#[test]
fn serve_echoes_and_announces_only_once() {
    use std::io::{Read, Write};
    let (mut srv, addr) = server(&["serve", "--id", "echo"]);
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s.write_all(b"hello, lab").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut got = String::new();
    s.read_to_string(&mut got).unwrap();
    assert_eq!(got, "echo\nhello, lab");
    // Still running, and quiet: no second announcement (not an exit, which is an error too).
    let err = srv.stdout_line(Duration::from_millis(300)).unwrap_err().to_string();
    assert!(err.contains("printed no line within"), "{err}");
}

#[test]
fn serve_rejects_an_id_that_would_break_the_greeting() {
    let mut child = lab(&["serve", "--listen", "127.0.0.1:0", "--id", "a\nb"]);
    let (status, lines) = child.finish(T).unwrap();
    assert_eq!(status.code(), Some(1));
    assert!(lines.is_empty(), "{lines:?}");
}

#[test]
fn stream_survives_until_sigterm_and_reports() {
    let (_srv, addr) = server(&["serve", "--id", "s1"]);
    let dir = std::env::temp_dir().join(format!("cpha-lab-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ready = dir.join("stream.ready");
    let ready_s = ready.to_string_lossy().into_owned();
    let mut stream = lab(&["stream", "--to", &addr.to_string(), "--interval", "10ms", "--ready-file", &ready_s]);
    wait_for("the ready file", T, || Ok(ready.exists().then_some(()))).unwrap();
    assert_eq!(std::fs::read_to_string(&ready).unwrap(), "s1\n");
    std::thread::sleep(Duration::from_millis(200));
    stream.signal(libc::SIGTERM).unwrap();
    let (status, lines) = stream.finish(T).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let r: StreamReport = serde_json::from_str(&lines[0]).unwrap();
    assert!(r.ok, "{r:?}");
    assert_eq!(status.code(), Some(0));
    assert_eq!(r.id.as_deref(), Some("s1"));
    assert!(r.roundtrips >= 5, "{r:?}");
    assert_eq!(r.bytes, r.roundtrips * 256);
}

#[test]
fn stream_reports_a_break_when_the_server_dies() {
    let (srv, addr) = server(&["serve", "--id", "s2"]);
    let dir = std::env::temp_dir().join(format!("cpha-lab-test-break-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ready = dir.join("stream.ready");
    let mut stream =
        lab(&["stream", "--to", &addr.to_string(), "--interval", "10ms", "--ready-file", &ready.to_string_lossy()]);
    wait_for("the ready file", T, || Ok(ready.exists().then_some(()))).unwrap();
    srv.signal(libc::SIGKILL).unwrap();
    let (status, lines) = stream.finish(T).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let r: StreamReport = serde_json::from_str(&lines[0]).unwrap();
    assert!(!r.ok, "{r:?}");
    assert_eq!(status.code(), Some(1));
    assert!(r.roundtrips >= 1);
    assert!(r.error.as_deref().unwrap_or_default().contains("round trip"), "{r:?}");
}

#[test]
fn connect_loop_counts_ids_and_flags_unexpected_ones() {
    let (_srv, addr) = server(&["serve", "--id", "good"]);
    let to = addr.to_string();
    let (code, r): (_, LoadReport) = client(&[
        "connect-loop",
        "--to",
        &to,
        "--concurrency",
        "4",
        "--duration",
        "10s",
        "--max-conns",
        "200",
        "--expect-id",
        "good",
    ]);
    assert_eq!(code, 0, "{r:?}");
    assert_eq!((r.ok, r.failed), (200, 0), "max-conns bounds the run");
    assert_eq!(r.ids.get("good"), Some(&200));
    assert!(r.p99_ms > 0.0 && r.p50_ms <= r.p99_ms && r.p99_ms <= r.max_ms, "{r:?}");

    let (code, r): (_, LoadReport) = client(&[
        "connect-loop",
        "--to",
        &to,
        "--concurrency",
        "2",
        "--duration",
        "10s",
        "--max-conns",
        "20",
        "--expect-id",
        "other",
    ]);
    assert_eq!(code, 1);
    assert_eq!((r.ok, r.failed), (0, 20));
    assert_eq!(r.error_kinds.get("unexpected id"), Some(&20));
}

#[test]
fn connect_loop_counts_refused_connections() {
    let to = closed_port().to_string();
    let (code, r): (_, LoadReport) =
        client(&["connect-loop", "--to", &to, "--concurrency", "2", "--duration", "10s", "--max-conns", "10"]);
    assert_eq!(code, 1);
    assert_eq!((r.ok, r.failed), (0, 10));
    assert_eq!(r.error_kinds.get("connect: refused"), Some(&10), "{r:?}");
}

#[test]
fn connect_loop_honours_rate_and_stops_on_sigterm() {
    let (_srv, addr) = server(&["serve", "--id", "r"]);
    let mut child =
        lab(&["connect-loop", "--to", &addr.to_string(), "--concurrency", "2", "--duration", "60s", "--rate", "100"]);
    std::thread::sleep(Duration::from_millis(1000));
    let started = Instant::now();
    child.signal(libc::SIGTERM).unwrap();
    let (status, lines) = child.finish(T).unwrap();
    assert!(started.elapsed() < Duration::from_secs(3));
    let r: LoadReport = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(status.code(), Some(0), "{r:?}");
    // About 100 in one second; generous bounds for a busy machine.
    assert!((50..=130).contains(&r.ok), "{r:?}");
    assert_eq!(r.failed, 0);
}

#[test]
fn connrate_reports_a_rate() {
    let (_srv, addr) = server(&["serve", "--id", "c"]);
    let (code, r): (_, LoadReport) =
        client(&["connrate", "--to", &addr.to_string(), "--concurrency", "8", "--duration", "500ms"]);
    assert_eq!(code, 0, "{r:?}");
    assert!(r.ok > 50, "{r:?}");
    assert_eq!(r.concurrency, 8);
    assert!(r.conns_per_sec > 0.0 && r.duration_s >= 0.5, "{r:?}");
}

#[test]
fn throughput_both_ways() {
    let (_sink, sink) = server(&["sink"]);
    let (_source, source) = server(&["source"]);
    for (to, mode) in [(sink, "write"), (source, "read")] {
        let (code, r): (_, ThroughputReport) =
            client(&["throughput", "--to", &to.to_string(), "--duration", "300ms", "--mode", mode]);
        assert_eq!(code, 0);
        assert_eq!(r.mode, mode);
        assert!(r.bytes > 1_000_000, "{r:?}");
        assert!(r.gbit_per_sec > 0.01 && r.duration_s >= 0.3, "{r:?}");
    }
}

#[test]
fn throughput_fails_where_nothing_listens() {
    let to = closed_port().to_string();
    let mut child = lab(&["throughput", "--to", &to, "--duration", "1s"]);
    let (status, lines) = child.finish(T).unwrap();
    assert_eq!(status.code(), Some(1));
    assert!(lines.is_empty());
}
