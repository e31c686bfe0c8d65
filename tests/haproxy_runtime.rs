//! cpha's HAProxy actuator against a real HAProxy 2.6 in master-worker mode, on loopback.
//!
//! Each test starts its own `haproxy -W -S <dir>/master.sock,level,admin -f <dir>/haproxy.cfg`
//! (as systemd or a DaemonSet would) and TLS apiserver stand-ins: `/readyz` answers 200 or 500
//! as the test decides, and a plain-text `ECHO` line turns a connection into an echo stream whose
//! first answer names the apiserver, so a test knows where HAProxy sent it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cpha::haproxy::reload::show_proc;
use cpha::haproxy::runtime::{Cli, Endpoint};
use cpha::haproxy::state::ProcList;
use cpha::haproxy::{
    ApplyError, ApplyReport, Haproxy, HaproxySettings, ReloadMethod, RenderError, RenderInput, ServerStatus,
};
use cpha::members::{MemberSet, ParseOptions};
use cpha::metrics::{ApplyLabels, ApplyMethod, Metrics, Outcome, ResultLabel};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls;

// ---------------------------------------------------------------------------------------------
// TLS material and apiserver stand-ins

struct Pki {
    server: Arc<rustls::ServerConfig>,
    ca_pem: String,
}

fn pki() -> Pki {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "cpha test cluster CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &ca, &ca_key)
        .unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone()], key)
        .unwrap();
    Pki { server: Arc::new(server), ca_pem: ca.pem() }
}

/// A kube-apiserver stand-in on 127.0.0.1.
struct Apiserver {
    addr: SocketAddr,
    ready: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Apiserver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Apiserver {
    async fn start(id: &str, tls: &Arc<rustls::ServerConfig>) -> Apiserver {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let ready = Arc::new(AtomicBool::new(true));
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.clone());
        let (id, r) = (id.to_string(), ready.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let (acceptor, id, ready) = (acceptor.clone(), id.clone(), r.clone());
                tokio::spawn(async move {
                    let _ = serve(stream, acceptor, &id, &ready).await;
                });
            }
        });
        Apiserver { addr, ready, task }
    }

    fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }
}

async fn serve(
    stream: TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    id: &str,
    ready: &AtomicBool,
) -> std::io::Result<()> {
    let mut first = [0u8; 1];
    stream.peek(&mut first).await?;
    if first[0] == 0x16 {
        // A TLS ClientHello: HAProxy's health check.
        let mut tls = acceptor.accept(stream).await?;
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
            let n = tls.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        let request = String::from_utf8_lossy(&head);
        let path = request.split_whitespace().nth(1).unwrap_or("");
        let (status, body) = match path {
            // Alive whether ready or not, as a kube-apiserver shutting down gracefully.
            "/livez" => ("200 OK", "ok"),
            "/readyz" if ready.load(Ordering::SeqCst) => ("200 OK", "ok"),
            "/readyz" => ("500 Internal Server Error", "[-]shutdown failed: reason withheld\nreadyz check failed"),
            _ => ("404 Not Found", "not found"),
        };
        let response =
            format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
        tls.write_all(response.as_bytes()).await?;
        tls.shutdown().await?;
        return Ok(());
    }
    // A plain `ECHO` stream from a test client, through HAProxy.
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    if lines.next_line().await?.as_deref() != Some("ECHO") {
        return Ok(());
    }
    write.write_all(format!("ID {id}\n").as_bytes()).await?;
    while let Some(line) = lines.next_line().await? {
        write.write_all(format!("{line}\n").as_bytes()).await?;
    }
    Ok(())
}

/// A client connection through HAProxy to one apiserver.
struct Echo {
    id: String,
    reader: BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
}

impl Echo {
    async fn open(frontend: SocketAddr) -> Echo {
        let stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(frontend)).await.unwrap().unwrap();
        let (read, mut writer) = stream.into_split();
        writer.write_all(b"ECHO\n").await.unwrap();
        let mut reader = BufReader::new(read);
        let mut line = String::new();
        tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line)).await.unwrap().unwrap();
        let id = line.trim().strip_prefix("ID ").unwrap_or_else(|| panic!("no ID line: {line:?}")).to_string();
        Echo { id, reader, writer }
    }

    /// Whether the connection still carries data both ways.
    async fn alive(&mut self) -> bool {
        if self.writer.write_all(b"ping\n").await.is_err() {
            return false;
        }
        let mut line = String::new();
        match tokio::time::timeout(Duration::from_secs(3), self.reader.read_line(&mut line)).await {
            Ok(Ok(n)) => n > 0 && line == "ping\n",
            _ => false,
        }
    }

    /// Waits until the peer closes the connection.
    async fn closed_within(&mut self, d: Duration) -> bool {
        let mut line = String::new();
        matches!(tokio::time::timeout(d, self.reader.read_line(&mut line)).await, Ok(Ok(0)) | Ok(Err(_)))
    }
}

/// Opens connections until one lands on each of `ids`.
async fn echoes_on(frontend: SocketAddr, ids: &[&str]) -> Vec<Echo> {
    let mut found: Vec<Option<Echo>> = ids.iter().map(|_| None).collect();
    for _ in 0..20 {
        let e = Echo::open(frontend).await;
        if let Some(i) = ids.iter().position(|id| *id == e.id) {
            if found[i].is_none() {
                found[i] = Some(e);
            }
        }
        if found.iter().all(Option::is_some) {
            return found.into_iter().map(Option::unwrap).collect();
        }
    }
    panic!("no connection reached every one of {ids:?}");
}

// ---------------------------------------------------------------------------------------------
// HAProxy and the test's directory

struct Lab {
    dir: PathBuf,
    pki: Pki,
    haproxy: Option<std::process::Child>,
    /// Tests run side by side on the host's loopback: each HAProxy its own stats port.
    stats: SocketAddr,
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop_haproxy();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

impl Lab {
    fn new(name: &str) -> Lab {
        assert!(cpha::exec::available("haproxy"), "haproxy must be installed for these tests");
        // The rendered file drops privileges to the haproxy user, as in production.
        assert!(nix::unistd::geteuid().is_root(), "these tests start HAProxy as root");
        let dir = std::env::temp_dir().join(format!("cpha-haproxy-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Lab { dir, pki: pki(), haproxy: None, stats: free_port() }
    }

    fn settings(&self) -> HaproxySettings {
        let mut s = HaproxySettings {
            config_path: self.dir.join("haproxy.cfg"),
            admin_socket: self.dir.join("admin.sock"),
            master_socket: self.dir.join("master.sock"),
            min_reload_interval: Duration::ZERO,
            drain_timeout: Duration::from_secs(2),
            reload_timeout: Duration::from_secs(10),
            runtime_timeout: Duration::from_secs(3),
            stats: cpha::haproxy::settings::StatsSettings { listen: Some(self.stats), credentials_file: None },
            ..HaproxySettings::default()
        };
        // Not the host's /etc/kubernetes/pki/ca.crt: absent unless a test writes it.
        s.health_check.cluster_ca_file = Some(self.cluster_ca());
        s
    }

    fn cluster_ca(&self) -> PathBuf {
        self.dir.join("cluster-ca.crt")
    }

    fn config(&self) -> String {
        std::fs::read_to_string(self.dir.join("haproxy.cfg")).unwrap()
    }

    fn master(&self) -> Cli {
        Cli::new(Endpoint::Unix(self.dir.join("master.sock")), Duration::from_secs(3))
    }

    async fn procs(&self) -> ProcList {
        show_proc(&self.master()).await.unwrap()
    }

    /// Starts HAProxy on the file cpha wrote, the way its systemd unit does (without -Ws).
    async fn start_haproxy(&mut self) {
        let log = std::fs::File::create(self.dir.join("haproxy.log")).unwrap();
        let master = format!("{},level,admin", self.dir.join("master.sock").display());
        let child = std::process::Command::new("haproxy")
            .args(["-W", "-S", &master, "-f"])
            .arg(self.dir.join("haproxy.cfg"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.haproxy = Some(child);
        let master = self.master();
        let admin = Cli::new(Endpoint::Unix(self.dir.join("admin.sock")), Duration::from_secs(1));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(procs) = show_proc(&master).await {
                if !procs.workers.is_empty() && admin.run(&cpha::haproxy::runtime::Command::ShowInfo).await.is_ok() {
                    return;
                }
            }
            let exited = self.haproxy.as_mut().unwrap().try_wait().unwrap();
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "HAProxy did not start ({exited:?}): {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn master_pid(&self) -> u32 {
        self.haproxy.as_ref().unwrap().id()
    }

    fn stop_haproxy(&mut self) {
        if let Some(mut child) = self.haproxy.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("haproxy.log")).unwrap_or_default()
    }
}

async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_up(hp: &mut Haproxy, up: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let h = hp.health().await;
        if h.answers && h.up == up {
            return;
        }
        assert!(Instant::now() < deadline, "waiting for {up} UP servers, last health {h:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn members(list: &str) -> MemberSet {
    cpha::members::parse(list, &ParseOptions { allow_empty: true, ..ParseOptions::default() }).unwrap()
}

fn applies(m: &Metrics, method: ApplyMethod, result: Outcome) -> u64 {
    m.applies.get_or_create(&ApplyLabels { method, result }).get()
}

fn reloads(m: &Metrics, result: Outcome) -> u64 {
    m.reloads.get_or_create(&ResultLabel { result }).get()
}

/// The members resolved as the agent resolves them.
async fn servers(set: &MemberSet) -> Vec<cpha::haproxy::Server> {
    let resolved = cpha::haproxy::resolve::resolve(set, &Default::default(), Duration::from_secs(5)).await;
    assert!(resolved.unresolved.is_empty(), "{:?}", resolved.unresolved);
    resolved.servers
}

async fn apply(hp: &mut Haproxy, set: &MemberSet, bind: SocketAddr) -> ApplyReport {
    match hp.apply(&RenderInput { servers: &servers(set).await, bind }).await {
        Ok(r) => r,
        Err(e) => panic!("apply failed: {e}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_changes_go_through_the_runtime_api_without_a_reload() {
    let mut lab = Lab::new("runtime");
    let (a, b, c, d) = (
        Apiserver::start("a", &lab.pki.server).await,
        Apiserver::start("b", &lab.pki.server).await,
        Apiserver::start("c", &lab.pki.server).await,
        Apiserver::start("d", &lab.pki.server).await,
    );
    let frontend = free_port();
    let metrics = Arc::new(Metrics::default());
    let mut hp = Haproxy::new(lab.settings(), metrics.clone()).unwrap();

    // First boot: HAProxy is not running yet, so only the file is written.
    let ab = members(&format!("a={}, b={}", a.addr, b.addr));
    assert!(!hp.health().await.answers);
    let report = apply(&mut hp, &ab, frontend).await;
    assert!(!report.running && report.file_written, "{report}");
    assert_eq!(report.method, Some(ApplyMethod::File));
    assert_eq!(lab.config(), hp.render(&RenderInput { servers: &servers(&ab).await, bind: frontend }).unwrap().text);

    lab.start_haproxy().await;
    wait_up(&mut hp, 2).await;
    let before = lab.procs().await;
    let mut conns = echoes_on(frontend, &["a", "b"]).await;
    // A reload would restart b's clock; let it tick first so the comparison below can fail.
    let b_since = wait_for("b's state to age", Duration::from_secs(5), || {
        let hp = &hp;
        async move { Some(hp.snapshot().await.ok()?.get("b")?.since_change).filter(|s| *s >= 1) }
    })
    .await;

    // a leaves, c joins, b stays.
    let bc = members(&format!("b={}, c={}", b.addr, c.addr));
    let report = apply(&mut hp, &bc, frontend).await;
    assert_eq!(report.method, Some(ApplyMethod::Runtime), "{report}");
    assert_eq!(report.added, ["c"]);
    assert_eq!(report.draining, ["a"]);
    assert!(report.file_written);
    assert_eq!(lab.config(), hp.render(&RenderInput { servers: &servers(&bc).await, bind: frontend }).unwrap().text);
    assert!(!lab.config().contains(&a.addr.to_string()));

    let snap = hp.snapshot().await.unwrap();
    let sa = snap.get("a").expect("a drains before it is deleted");
    assert_eq!((sa.status, sa.sessions), (ServerStatus::Drain, 1), "{snap}");
    let sb = snap.get("b").unwrap();
    assert_eq!(sb.status, ServerStatus::Up, "{snap}");
    assert!(sb.since_change >= b_since, "b's state was not reset: {} < {b_since}", sb.since_change);
    assert!(conns[0].alive().await, "the connection to the draining server still works");
    assert!(conns[1].alive().await, "the connection to the server that stays survives");
    wait_up(&mut hp, 2).await;
    for _ in 0..4 {
        let e = Echo::open(frontend).await;
        assert_ne!(e.id, "a", "a draining server takes no new connection");
    }

    // c keeps its name and moves to d's address.
    let bd = members(&format!("b={}, c={}", b.addr, d.addr));
    let report = apply(&mut hp, &bd, frontend).await;
    assert_eq!(report.method, Some(ApplyMethod::Runtime), "{report}");
    assert_eq!(report.readdressed, ["c"]);
    assert!(report.added.is_empty() && report.draining.is_empty(), "{report}");
    let snap = hp.snapshot().await.unwrap();
    assert_eq!(snap.get("c").unwrap().socket_addr(), Some(d.addr), "{snap}");
    assert_eq!(lab.config(), hp.render(&RenderInput { servers: &servers(&bd).await, bind: frontend }).unwrap().text);

    // The drain timeout passes with a's connection still open: it is shut down, a deleted.
    tokio::time::sleep(Duration::from_secs(2)).await;
    hp.health().await;
    assert!(hp.snapshot().await.unwrap().get("a").is_none(), "a is deleted after its drain timeout");
    assert!(conns[0].closed_within(Duration::from_secs(3)).await, "a's remaining session was shut down");
    assert!(conns[1].alive().await, "b's connection is still there");
    wait_up(&mut hp, 2).await;

    // Removing a server without sessions deletes it in the same apply.
    let d_only = members(&format!("c={}", d.addr));
    conns.truncate(0);
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        // b's idle connections (from echoes_on and the probes above) are gone once dropped.
        loop {
            if hp.snapshot().await.unwrap().get("b").unwrap().sessions == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(closed.is_ok(), "b's sessions did not end");
    let report = apply(&mut hp, &d_only, frontend).await;
    assert_eq!(report.draining, ["b"], "{report}");
    assert_eq!(report.deleted, ["b"], "{report}");
    assert_eq!(hp.snapshot().await.unwrap().servers.len(), 1);

    // No reload happened at any point.
    let after = lab.procs().await;
    assert_eq!(after.master.reloads, before.master.reloads, "{after:?}");
    assert_eq!(after.worker_pids(), before.worker_pids());
    assert_eq!(reloads(&metrics, Outcome::Ok) + reloads(&metrics, Outcome::Error), 0);
    assert_eq!(applies(&metrics, ApplyMethod::Runtime, Outcome::Ok), 3);
    assert_eq!(applies(&metrics, ApplyMethod::File, Outcome::Ok), 1);

    // Nothing to do: no command, no file write.
    let report = apply(&mut hp, &d_only, frontend).await;
    assert_eq!(report.method, None, "{report}");
    assert!(!report.file_written);
    assert!(!lab.log().contains("ALERT"), "{}", lab.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_outside_the_server_list_reloads_once_and_is_read_back() {
    let mut lab = Lab::new("reload");
    let a = Apiserver::start("a", &lab.pki.server).await;
    let b = Apiserver::start("b", &lab.pki.server).await;
    let frontend = free_port();
    let metrics = Arc::new(Metrics::default());
    let mut settings = lab.settings();
    settings.min_reload_interval = Duration::from_secs(3);
    let mut hp = Haproxy::new(settings.clone(), metrics.clone()).unwrap();
    let ab = members(&format!("a={}, b={}", a.addr, b.addr));
    apply(&mut hp, &ab, frontend).await;
    lab.start_haproxy().await;
    wait_up(&mut hp, 2).await;

    let report = apply(&mut hp, &ab, frontend).await;
    assert_eq!(report.method, None, "an unchanged input changes nothing: {report}");
    let before = lab.procs().await;

    // The frontend moves: only a reload can do that.
    let moved = free_port();
    let t0 = Instant::now();
    let report = apply(&mut hp, &ab, moved).await;
    let first_reload = Instant::now();
    assert_eq!(report.method, Some(ApplyMethod::Reload), "{report}");
    let reload = report.reload.as_ref().expect("a reload report");
    let after = lab.procs().await;
    assert_eq!(after.master.reloads, before.master.reloads + 1, "exactly one reload: {after:?}");
    assert_eq!(reload.new_workers, after.worker_pids());
    assert!(after.worker_pids().iter().all(|p| !before.worker_pids().contains(p)), "new workers: {after:?}");
    assert_eq!(lab.config(), hp.render(&RenderInput { servers: &servers(&ab).await, bind: moved }).unwrap().text);
    assert_eq!(reloads(&metrics, Outcome::Ok), 1);
    assert_eq!(applies(&metrics, ApplyMethod::Reload, Outcome::Ok), 1);
    assert!(t0.elapsed() < Duration::from_secs(10));
    let e = Echo::open(moved).await;
    assert!(["a", "b"].contains(&e.id.as_str()));
    let refused = TcpStream::connect(frontend).await.map(|_| ());
    assert!(
        matches!(&refused, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused),
        "the old frontend port is released: {refused:?}"
    );

    // Applying the same input again does not reload.
    let report = apply(&mut hp, &ab, moved).await;
    assert_eq!(report.method, None, "{report}");
    assert_eq!(lab.procs().await.master.reloads, after.master.reloads);

    // New check tuning, reloaded with a configured command this time; minReloadInterval holds.
    settings.health_check.rise = 3;
    settings.reload = ReloadMethod::Command { argv: vec!["kill".into(), "-USR2".into(), lab.master_pid().to_string()] };
    hp.set_settings(settings.clone()).unwrap();
    let report = apply(&mut hp, &ab, moved).await;
    assert_eq!(report.method, Some(ApplyMethod::Reload), "{report}");
    assert!(first_reload.elapsed() >= Duration::from_secs(3), "minReloadInterval was not respected");
    let again = lab.procs().await;
    assert_eq!(again.master.reloads, after.master.reloads + 1);
    assert!(lab.config().contains("fall 2 rise 3 observe layer4"));
    assert_eq!(reloads(&metrics, Outcome::Ok), 2);
    wait_up(&mut hp, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_templates_and_candidates_leave_the_file_and_haproxy_untouched() {
    let mut lab = Lab::new("invalid");
    let a = Apiserver::start("a", &lab.pki.server).await;
    let b = Apiserver::start("b", &lab.pki.server).await;
    let frontend = free_port();
    let metrics = Arc::new(Metrics::default());
    let mut hp = Haproxy::new(lab.settings(), metrics.clone()).unwrap();
    let a_only = members(&format!("a={}", a.addr));
    apply(&mut hp, &a_only, frontend).await;
    lab.start_haproxy().await;
    wait_up(&mut hp, 1).await;
    let live = lab.config();
    let procs = lab.procs().await;
    let ab = members(&format!("a={}, b={}", a.addr, b.addr));

    // A template using an unknown variable: a render error naming it.
    let bad = lab.dir.join("unknown.tera");
    std::fs::write(
        &bad,
        cpha::haproxy::render::DEFAULT_TEMPLATE.replace("{{ global.admin_socket }}", "{{ global.admin_sock }}"),
    )
    .unwrap();
    let mut settings = lab.settings();
    settings.template = Some(bad.clone());
    let mut other = Haproxy::new(settings.clone(), metrics.clone()).unwrap();
    let err = other.apply(&RenderInput { servers: &servers(&ab).await, bind: frontend }).await.unwrap_err();
    assert!(matches!(err, ApplyError::Render(RenderError::Render { .. })), "{err:?}");
    assert!(err.to_string().contains("global.admin_sock") && err.to_string().contains("unknown.tera"), "{err}");

    // A template that does not parse is refused when the settings are loaded.
    let broken = lab.dir.join("broken.tera");
    std::fs::write(&broken, "global\n{% if %}\n").unwrap();
    settings.template = Some(broken.clone());
    let err = Haproxy::new(settings.clone(), metrics.clone()).err().expect("refused");
    assert!(matches!(err, RenderError::Parse { .. }), "{err:?}");
    let err = hp.set_settings(settings.clone()).expect_err("refused");
    assert!(matches!(err, RenderError::Parse { .. }), "{err:?}");

    // A template HAProxy refuses: haproxy -c stops it before anything changes.
    let refused = lab.dir.join("refused.tera");
    std::fs::write(
        &refused,
        cpha::haproxy::render::DEFAULT_TEMPLATE.replace("    retries 3\n", "    retries 3\n    bogus-directive on\n"),
    )
    .unwrap();
    settings.template = Some(refused);
    let mut other = Haproxy::new(settings, metrics.clone()).unwrap();
    let err = other.apply(&RenderInput { servers: &servers(&ab).await, bind: frontend }).await.unwrap_err();
    assert!(matches!(err, ApplyError::Check(cpha::haproxy::CheckError::Refused { .. })), "{err:?}");
    assert!(err.to_string().contains("bogus-directive"), "{err}");

    assert_eq!(lab.config(), live, "the live file is untouched");
    let left: Vec<String> = std::fs::read_dir(&lab.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(left.is_empty(), "no candidate left behind: {left:?}");
    let now = lab.procs().await;
    assert_eq!((now.master.reloads, now.worker_pids()), (procs.master.reloads, procs.worker_pids()));
    let snap = hp.snapshot().await.unwrap();
    assert_eq!(snap.servers.len(), 1, "{snap}");
    assert_eq!(applies(&metrics, ApplyMethod::File, Outcome::Error), 2);

    // The original actuator kept its settings after the refused set_settings, and still works.
    let report = apply(&mut hp, &ab, frontend).await;
    assert_eq!(report.method, Some(ApplyMethod::Runtime), "{report}");
    assert_eq!(report.added, ["b"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_at_start_fixes_a_stale_haproxy() {
    let mut lab = Lab::new("reconcile");
    let a = Apiserver::start("a", &lab.pki.server).await;
    let b = Apiserver::start("b", &lab.pki.server).await;
    let c = Apiserver::start("c", &lab.pki.server).await;
    let frontend = free_port();

    // An earlier cpha wrote {a}; HAProxy runs it. A new cpha process wants {b, c}.
    {
        let mut old = Haproxy::new(lab.settings(), Arc::new(Metrics::default())).unwrap();
        apply(&mut old, &members(&format!("a={}", a.addr)), frontend).await;
    }
    lab.start_haproxy().await;
    let before = lab.procs().await;
    let mut hp = Haproxy::new(lab.settings(), Arc::new(Metrics::default())).unwrap();
    let bc = members(&format!("b={}, c={}", b.addr, c.addr));
    let report = apply(&mut hp, &bc, frontend).await;
    assert_eq!(report.method, Some(ApplyMethod::Runtime), "{report}");
    let mut added = report.added.clone();
    added.sort();
    assert_eq!(added, ["b", "c"]);
    assert_eq!(lab.procs().await.master.reloads, before.master.reloads, "servers alone need no reload");
    wait_up(&mut hp, 2).await;
    assert_eq!(lab.config(), hp.render(&RenderInput { servers: &servers(&bc).await, bind: frontend }).unwrap().text);
    lab.stop_haproxy();

    // HAProxy started from a hand-written file: the rest of the file differs, so one reload.
    std::fs::write(
        lab.dir.join("haproxy.cfg"),
        format!(
            "global\n    master-worker\n    stats socket {} mode 600 level admin expose-fd listeners\ndefaults\n    mode tcp\n    timeout connect 5s\n    timeout client 30s\n    timeout server 30s\nfrontend fe\n    bind {frontend}\n    default_backend kube-apiservers\nbackend kube-apiservers\n    balance roundrobin\n    server a {}\n",
            lab.dir.join("admin.sock").display(),
            a.addr
        ),
    )
    .unwrap();
    lab.start_haproxy().await;
    let before = lab.procs().await;
    let mut hp = Haproxy::new(lab.settings(), Arc::new(Metrics::default())).unwrap();
    let report = apply(&mut hp, &bc, frontend).await;
    assert_eq!(report.method, Some(ApplyMethod::Reload), "{report}");
    assert!(report.reload_reasons[0].contains("not rendered by cpha"), "{report}");
    assert_eq!(lab.procs().await.master.reloads, before.master.reloads + 1);
    let snap = hp.snapshot().await.unwrap();
    let mut names: Vec<&str> = snap.servers.iter().map(|s| s.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["b", "c"], "{snap}");
    wait_up(&mut hp, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_up_servers_and_readyz_failures() {
    let mut lab = Lab::new("health");
    let a = Apiserver::start("a", &lab.pki.server).await;
    let b = Apiserver::start("b", &lab.pki.server).await;
    let frontend = free_port();
    let metrics = Arc::new(Metrics::default());
    let mut hp = Haproxy::new(lab.settings(), metrics.clone()).unwrap();
    // `localhost` is resolved by cpha; HAProxy gets the address.
    let set = members(&format!("a={}, b={}, local=localhost:{}", a.addr, b.addr, a.addr.port()));
    apply(&mut hp, &set, frontend).await;
    let health = hp.health().await;
    assert_eq!(health, cpha::haproxy::Health::default(), "HAProxy is not running yet");
    lab.start_haproxy().await;

    let snap = hp.snapshot().await.unwrap();
    let local = snap.get("local").unwrap().addr.unwrap();
    assert!(local.is_loopback(), "{snap}");
    assert!(lab.config().contains(&format!("server local {}", std::net::SocketAddr::new(local, a.addr.port()))));
    let expect_local_up = local.is_ipv4();
    let all = 2 + usize::from(expect_local_up);
    wait_up(&mut hp, all).await;
    assert_eq!(metrics.backend_servers_up.get(), all as i64);

    // a's /readyz fails (an apiserver shutting down): a goes DOWN within a few seconds.
    a.set_ready(false);
    let t0 = Instant::now();
    wait_up(&mut hp, 1).await;
    assert!(t0.elapsed() < Duration::from_secs(5), "detection took {:?}", t0.elapsed());
    let snap = hp.snapshot().await.unwrap();
    assert_eq!(snap.get("a").unwrap().status, ServerStatus::Down, "{snap}");
    // Told apart from a dead one: /livez passed, /readyz did not.
    assert_eq!(snap.get("a").unwrap().check_status, "L7STS", "{snap:?}");
    let h = hp.health().await;
    assert_eq!((h.answers, h.up, h.total), (true, 1, 3));
    assert_eq!(metrics.backend_servers_up.get(), 1);

    b.set_ready(false);
    wait_up(&mut hp, 0).await;
    assert!(hp.health().await.answers, "HAProxy answers even with no server UP");
    a.set_ready(true);
    wait_up(&mut hp, 1 + usize::from(expect_local_up)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_can_verify_the_apiserver_certificate() {
    let mut lab = Lab::new("verify");
    let a = Apiserver::start("a", &lab.pki.server).await;
    let other_ca = pki();
    let right = lab.dir.join("ca.crt");
    let wrong = lab.dir.join("other-ca.crt");
    std::fs::write(&right, &lab.pki.ca_pem).unwrap();
    std::fs::write(&wrong, &other_ca.ca_pem).unwrap();
    let frontend = free_port();
    let mut settings = lab.settings();
    settings.health_check.ca_file = Some(right);
    let mut hp = Haproxy::new(settings.clone(), Arc::new(Metrics::default())).unwrap();
    let set = members(&format!("a={}", a.addr));
    apply(&mut hp, &set, frontend).await;
    assert!(lab.config().contains("verify required ca-file"));
    lab.start_haproxy().await;
    wait_up(&mut hp, 1).await;

    // Signed by another CA: the check fails and the server goes DOWN.
    settings.health_check.ca_file = Some(wrong);
    hp.set_settings(settings).unwrap();
    let report = apply(&mut hp, &set, frontend).await;
    assert_eq!(report.method, Some(ApplyMethod::Reload), "{report}");
    wait_for("a to go DOWN", Duration::from_secs(10), || {
        let hp = &hp;
        async move { (hp.snapshot().await.ok()?.get("a")?.status == ServerStatus::Down).then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_ca_is_used_once_it_is_usable_and_a_refused_ca_keeps_the_live_file() {
    let mut lab = Lab::new("cluster-ca");
    let a = Apiserver::start("a", &lab.pki.server).await;
    let frontend = free_port();
    let metrics = Arc::new(Metrics::default());
    let mut hp = Haproxy::new(lab.settings(), metrics.clone()).unwrap();
    let set = members(&format!("a={}", a.addr));
    apply(&mut hp, &set, frontend).await;
    assert!(lab.config().contains("check check-ssl verify none "), "{}", lab.config());
    lab.start_haproxy().await;
    wait_up(&mut hp, 1).await;
    assert!(!hp.health().await.stale);

    // The CA appears: the read says the file is stale; one apply reloads onto verified checks.
    std::fs::write(lab.cluster_ca(), &lab.pki.ca_pem).unwrap();
    assert!(hp.health().await.stale);
    let report = apply(&mut hp, &set, frontend).await;
    assert_eq!(report.method, Some(ApplyMethod::Reload), "{report}");
    let verified = format!("check check-ssl verify required ca-file {} ", lab.cluster_ca().display());
    assert!(lab.config().contains(&verified), "{}", lab.config());
    assert!(!hp.health().await.stale);
    assert_eq!(apply(&mut hp, &set, frontend).await.method, None, "in step: nothing to do");
    // An agent restarted with the CA in place renders it from its first apply: no reload.
    let mut restarted = Haproxy::new(lab.settings(), Arc::new(Metrics::default())).unwrap();
    assert_eq!(apply(&mut restarted, &set, frontend).await.method, None, "the running file is the one it renders");
    drop(restarted);
    // A server added at run time gets the same keywords, and its verified checks pass.
    let b = Apiserver::start("b", &lab.pki.server).await;
    let ab = members(&format!("a={}, b={}", a.addr, b.addr));
    assert_eq!(apply(&mut hp, &ab, frontend).await.method, Some(ApplyMethod::Runtime));
    wait_up(&mut hp, 2).await;

    // Half written (kubeadm writes it in place): not named, so `haproxy -c` never sees it.
    std::fs::write(lab.cluster_ca(), &lab.pki.ca_pem[..lab.pki.ca_pem.len() / 2]).unwrap();
    assert!(hp.health().await.stale);
    let report = apply(&mut hp, &ab, frontend).await;
    assert_eq!(report.method, Some(ApplyMethod::Reload), "{report}");
    assert!(lab.config().contains("check check-ssl verify none ") && !lab.config().contains("ca-file"));
    wait_up(&mut hp, 2).await;

    // A CA file HAProxy cannot load, named by `caFile` (always used): `haproxy -c` refuses the
    // candidate, the live file and HAProxy stay as they were, and the error says why.
    let live = lab.config();
    let procs = lab.procs().await;
    let mut settings = lab.settings();
    settings.health_check.ca_file = Some(lab.cluster_ca());
    hp.set_settings(settings).unwrap();
    let err = hp.apply(&RenderInput { servers: &servers(&ab).await, bind: frontend }).await.unwrap_err();
    assert!(matches!(err, ApplyError::Check(cpha::haproxy::CheckError::Refused { .. })), "{err:?}");
    assert_eq!(lab.config(), live, "the live file is untouched");
    let now = lab.procs().await;
    assert_eq!((now.master.reloads, now.worker_pids()), (procs.master.reloads, procs.worker_pids()));
    wait_up(&mut hp, 2).await;
    // Back to the cluster CA, whole again: verified once more.
    hp.set_settings(lab.settings()).unwrap();
    std::fs::write(lab.cluster_ca(), &lab.pki.ca_pem).unwrap();
    let report = apply(&mut hp, &ab, frontend).await;
    assert_eq!(report.method, Some(ApplyMethod::Reload), "{report}");
    assert!(lab.config().contains(&verified));
    assert_eq!(applies(&metrics, ApplyMethod::File, Outcome::Error), 1, "only the refused caFile failed");
}

/// `GET path` on HAProxy's stats listener; the status code and the body.
fn stats_get(addr: SocketAddr, path: &str, auth: Option<&str>) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let auth = auth.map(|a| format!("Authorization: Basic {}\r\n", base64(a))).unwrap_or_default();
    write!(s, "GET {path} HTTP/1.0\r\nHost: stats\r\n{auth}\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("GET {path}: no status code in the response: {out:?}"));
    (status, out)
}

fn base64(s: &str) -> String {
    const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in s.as_bytes().chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_metrics_and_stats_are_served_with_the_configured_credentials() {
    let mut lab = Lab::new("stats");
    let a = Apiserver::start("a", &lab.pki.server).await;
    let creds = lab.dir.join("stats.auth");
    std::fs::write(&creds, "scraper:s3cret-pass\n").unwrap();
    let mut settings = lab.settings();
    let listen = settings.stats.listen.unwrap();
    settings.stats.credentials_file = Some(creds.clone());
    let mut hp = Haproxy::new(settings.clone(), Arc::new(Metrics::default())).unwrap();
    apply(&mut hp, &members(&format!("a={}", a.addr)), free_port()).await;
    lab.start_haproxy().await;
    let (status, _) = stats_get(listen, "/metrics", None);
    assert_eq!(status, 401, "no credentials, no metrics");
    let (status, _) = stats_get(listen, "/metrics", Some("scraper:wrong-pass"));
    assert_eq!(status, 401);
    let (status, body) = stats_get(listen, "/metrics", Some("scraper:s3cret-pass"));
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("haproxy_process_"), "{body}");
    assert!(body.contains("haproxy_server_status{proxy=\"kube-apiservers\",server=\"a\""), "{body}");
    let (status, body) = stats_get(listen, "/stats;csv", Some("scraper:s3cret-pass"));
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("kube-apiservers,a,"), "{body}");

    // A credentials file that would smuggle a second token is refused before anything is written.
    std::fs::write(&creds, "scraper:pass word here\n").unwrap();
    let err = Haproxy::new(settings, Arc::new(Metrics::default())).err().expect("refused").to_string();
    assert!(err.contains("stats.credentialsFile") && err.contains("without spaces"), "{err}");
}
