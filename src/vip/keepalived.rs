//! The real VIP actuator: keepalived driven through files, a FIFO and a signal.
//!
//! - **Health**: the `track_file` keepalived watches (inotify) gets one number, written
//!   atomically: 0, minus the degraded penalty, or -254 (FAULT). No script is forked.
//! - **Configuration**: keepalived.conf is rendered from the settings and the peers, written
//!   as a candidate, checked with `keepalived --config-test` (in this network namespace, since
//!   it checks interfaces), renamed into place, and keepalived reloaded (SIGHUP to its pid file,
//!   or the configured command), only when the text changed and at most once per
//!   `minReloadInterval`; changes that arrive meanwhile are coalesced.
//! - **Observation**: keepalived writes its VRRP state changes to a FIFO it keeps open while it
//!   runs (`vrrp_notify_fifo`), so the end of that FIFO is keepalived's exit. Whether this host
//!   holds the address is read from the kernel's address list.
//! - **Release**: a SIGKILLed keepalived leaves the address on the interface (two hosts would
//!   hold it); removing it is the one change cpha makes to the address itself.

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader};
use std::net::IpAddr;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::place::{self, Placement};
use super::render::{self, Template};
use super::{Advertised, VipSettings, Vrrp, VrrpObserved};
use crate::exec;

/// `keepalived --config-test` and the reload command get this long.
const KEEPALIVED_TIMEOUT: Duration = Duration::from_secs(10);

/// What the VIP's tasks report to the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VipEvent {
    Observed(VrrpObserved),
    /// A configuration step finished: what changed, or why nothing did.
    Configured(Result<String, String>),
}

/// See the module documentation.
pub struct Keepalived {
    settings: VipSettings,
    place: Placement,
    peers: watch::Sender<Option<Vec<IpAddr>>>,
}

impl Keepalived {
    /// Checks the settings against this host and prepares the files keepalived reads (the
    /// tracked file, created "degraded" when absent; the FIFO; keepalived.conf for `members`,
    /// written before this returns, so keepalived can start after cpha); starts the
    /// configuration and observation tasks, which report on `events` until `stop`.
    pub fn start(
        settings: VipSettings,
        members: Vec<IpAddr>,
        poll: Duration,
        events: mpsc::Sender<VipEvent>,
        stop: CancellationToken,
    ) -> anyhow::Result<Keepalived> {
        let place = place::locate(&settings).map_err(|e| crate::exit::Coded::config(e.to_string()))?;
        let template = Template::from_settings(&settings).map_err(|e| crate::exit::Coded::config(e.to_string()))?;
        let k = &settings.keepalived;
        for path in [&k.track_file, &k.notify_fifo, &k.config_file] {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            }
        }
        if !k.track_file.exists() {
            write_track(&k.track_file, Advertised::Degraded.track_value(settings.degraded_penalty))?;
        }
        ensure_fifo(&k.notify_fifo)?;
        let first = apply(&settings, &place, &template, &render::peers(&settings, &members, &place));
        let report = match first {
            Ok(Some(report)) => Some(Ok(report)),
            Ok(None) => None,
            Err(err) => Some(Err(err)),
        };
        if let Some(report) = report {
            match &report {
                Ok(done) => tracing::info!("{done}"),
                Err(err) => tracing::error!("keepalived: {err}"),
            }
            let _ = events.try_send(VipEvent::Configured(report));
        }
        let (peers, peers_rx) = watch::channel(Some(members));
        tokio::spawn(configure(settings.clone(), place.clone(), template, peers_rx, events.clone(), stop.clone()));
        tokio::spawn(observe(settings.clone(), poll, events, stop));
        Ok(Keepalived { settings, place, peers })
    }

    pub fn placement(&self) -> &Placement {
        &self.place
    }

    /// Writes the advertised health into the tracked file.
    pub fn advertise(&self, level: Advertised) -> anyhow::Result<()> {
        write_track(&self.settings.keepalived.track_file, level.track_value(self.settings.degraded_penalty))
    }

    /// The members' addresses changed: the unicast peers follow (when they come from them).
    pub fn members(&self, members: Vec<IpAddr>) {
        self.peers.send_replace(Some(members));
    }

    /// Whether this host holds the address now (the kernel's address list).
    pub fn holds(&self) -> bool {
        place::held(self.settings.address).is_ok_and(|held| held.is_some())
    }

    /// VRRP's master-down interval at this host's priority: after this host gave the address
    /// up, a backup holds it within this long, even if the priority-0 advertisement was lost.
    pub fn takeover(&self) -> Duration {
        let advert = self.settings.advert_interval;
        let skew = advert * (256 - self.settings.priority.min(255)) / 256;
        advert * 3 + skew
    }

    /// Removes the address from this host (keepalived is gone and left it behind).
    pub fn release(&self) -> anyhow::Result<String> {
        let vip = self.settings.address;
        let Some(held) = place::held(vip)? else { return Ok(format!("{vip} is not on this host")) };
        let address = format!("{vip}/{}", held.prefix_len);
        exec::run("ip", &["address", "del", &address, "dev", &held.interface], None)?;
        Ok(format!("removed {address} from {}: keepalived is not running", held.interface))
    }
}

fn write_track(path: &Path, value: i64) -> anyhow::Result<()> {
    crate::fsutil::write_atomic(path, format!("{value}\n").as_bytes(), 0o644)
}

/// Creates the FIFO if it is missing; anything else at that path is an error.
fn ensure_fifo(path: &Path) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        crate::fsutil::check_dir(dir).with_context(|| format!("refusing the FIFO {}", path.display()))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_fifo() => Ok(()),
        Ok(_) => Err(crate::exit::Coded::config(format!(
            "vip.keepalived.notifyFifo {} exists and is not a FIFO",
            path.display()
        ))
        .into()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600))
                .with_context(|| format!("creating the FIFO {}", path.display()))
        }
        Err(err) => Err(err).with_context(|| format!("reading {}", path.display())),
    }
}

/// The configuration task: render, and when the text changed, validate, swap and reload.
async fn configure(
    settings: VipSettings,
    place: Placement,
    template: Template,
    mut peers: watch::Receiver<Option<Vec<IpAddr>>>,
    events: mpsc::Sender<VipEvent>,
    stop: CancellationToken,
) {
    let min_interval = settings.keepalived.min_reload_interval;
    let settings = std::sync::Arc::new(settings);
    let template = std::sync::Arc::new(template);
    // The explicit-peers and multicast cases render once, without waiting for members.
    let needs_members = settings.unicast_peers.is_none() && !settings.multicast;
    loop {
        let members = peers.borrow_and_update().clone();
        if members.is_some() || !needs_members {
            let wanted = render::peers(&settings, &members.unwrap_or_default(), &place);
            let (s, p, t) = (settings.clone(), place.clone(), template.clone());
            let result = tokio::task::spawn_blocking(move || apply(&s, &p, &t, &wanted))
                .await
                .unwrap_or_else(|e| Err(format!("panicked: {e}")));
            let changed = matches!(&result, Ok(Some(_)));
            match &result {
                Ok(Some(report)) => tracing::info!("{report}"),
                Ok(None) => {}
                Err(err) => tracing::error!("keepalived: {err}"),
            }
            let report = result.map(|r| r.unwrap_or_default());
            if report.as_ref().is_ok_and(String::is_empty) {
                // Nothing changed: nothing to say.
            } else if events.send(VipEvent::Configured(report)).await.is_err() {
                return;
            }
            if changed {
                tokio::select! {
                    () = tokio::time::sleep(min_interval) => {}
                    () = stop.cancelled() => return,
                }
            }
        }
        tokio::select! {
            changed = peers.changed() => if changed.is_err() { return },
            () = stop.cancelled() => return,
        }
    }
}

/// Mode of keepalived.conf: only keepalived, as root, reads it, and a custom template may put
/// a secret in it (VRRP authentication).
const CONFIG_MODE: u32 = 0o600;

/// One configuration step. `Ok(None)`: the file already says this.
fn apply(s: &VipSettings, place: &Placement, template: &Template, peers: &[IpAddr]) -> Result<Option<String>, String> {
    let text = template.render(s, place, peers).map_err(|e| e.to_string())?;
    let path = &s.keepalived.config_file;
    if std::fs::read_to_string(path).is_ok_and(|current| current == text) {
        crate::fsutil::owned::in_step(path, text.as_bytes(), CONFIG_MODE);
        return Ok(None);
    }
    let candidate =
        crate::fsutil::Candidate::write(path, text.as_bytes(), CONFIG_MODE).map_err(|e| format!("{e:#}"))?;
    config_test(&s.keepalived.binary, candidate.path())?;
    candidate.commit().map_err(|e| format!("{e:#}"))?;
    let peers_text = if peers.is_empty() {
        "no unicast peer".to_string()
    } else {
        peers.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
    };
    let reload = reload(s)?;
    Ok(Some(format!("{} written (peers: {peers_text}); {reload}", path.display())))
}

/// `keepalived --config-test`: keepalived's own parser, in this network namespace.
pub fn config_test(binary: &Path, file: &Path) -> Result<(), String> {
    let program = binary.to_string_lossy();
    let arg = format!("--use-file={}", file.display());
    match exec::run_with_timeout(&program, &["--config-test", arg.as_str()], None, KEEPALIVED_TIMEOUT) {
        Ok(_) => Ok(()),
        Err(exec::ExecError::Failed { stderr, .. }) => Err(format!(
            "keepalived --config-test refused the rendered file; the running one is kept: {}",
            stderr.trim()
        )),
        Err(err) => Err(format!("keepalived --config-test: {err}")),
    }
}

/// Makes a running keepalived re-read its file.
fn reload(s: &VipSettings) -> Result<String, String> {
    let k = &s.keepalived;
    if let Some((program, args)) = k.reload_command.split_first() {
        exec::run_with_timeout(program, args, None, KEEPALIVED_TIMEOUT).map_err(|e| format!("reload: {e}"))?;
        return Ok(format!("reloaded with `{}`", k.reload_command.join(" ")));
    }
    let Some(pid) = read_pid(&k.pid_file) else {
        return Ok(format!(
            "keepalived is not running ({} names no process): it reads the file when it starts",
            k.pid_file.display()
        ));
    };
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGHUP) {
        Ok(()) => Ok(format!("keepalived (pid {pid}) reloaded with SIGHUP")),
        Err(nix::errno::Errno::ESRCH) => {
            Ok(format!("keepalived (pid {pid}) is not running: it reads the file when it starts"))
        }
        Err(err) => Err(format!("SIGHUP to keepalived (pid {pid}): {err}")),
    }
}

/// The pid in keepalived's pid file, if that process exists and is keepalived.
fn read_pid(path: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(path).ok()?.trim().parse().ok()?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    (pid > 1 && comm.trim() == "keepalived").then_some(pid)
}

/// After keepalived closes its FIFO, how long cpha waits for it to open it again (a reload
/// closes and reopens it) before taking it for gone, unless its pid file shows it running.
const REOPEN_GRACE: Duration = Duration::from_millis(300);

/// What the FIFO reader thread sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fifo {
    /// keepalived opened it (or had it open when cpha started reading).
    Opened,
    State(Vrrp),
    /// Every writer closed it: keepalived exited, or is reloading.
    Closed,
}

/// The observation task: keepalived's state from the FIFO, the address from the kernel, every
/// `poll` and at each FIFO event; reports each change.
async fn observe(settings: VipSettings, poll: Duration, events: mpsc::Sender<VipEvent>, stop: CancellationToken) {
    let fifo = settings.keepalived.notify_fifo.clone();
    let pid_file = settings.keepalived.pid_file.clone();
    let (lines_tx, mut lines) = mpsc::channel::<Fifo>(16);
    let mut vrrp = if has_reader(&fifo) { Vrrp::Unknown } else { Vrrp::Gone };
    // NOTE: a thread, not a tokio task: opening a FIFO blocks until keepalived opens it, and
    // the thread ends with the process.
    std::thread::Builder::new()
        .name("cpha-vrrp-fifo".into())
        .spawn(move || read_fifo(&fifo, &lines_tx))
        .expect("spawning the FIFO reader");
    let mut closed_at: Option<tokio::time::Instant> = None;
    let mut last: Option<VrrpObserved> = None;
    let mut tick = tokio::time::interval(poll.min(REOPEN_GRACE));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            event = lines.recv() => match event {
                Some(Fifo::State(state)) => vrrp = state,
                Some(Fifo::Opened) => {
                    closed_at = None;
                    if vrrp == Vrrp::Gone {
                        vrrp = Vrrp::Unknown;
                    }
                }
                Some(Fifo::Closed) => closed_at = Some(tokio::time::Instant::now()),
                None => return,
            },
            _ = tick.tick() => {}
        }
        if let Some(at) = closed_at {
            // A reload closes the FIFO too: gone only when no keepalived process runs, or it
            // did not reopen the FIFO within the grace.
            if read_pid(&pid_file).is_some() {
                if vrrp == Vrrp::Gone {
                    vrrp = Vrrp::Unknown;
                }
            } else if at.elapsed() >= REOPEN_GRACE {
                vrrp = Vrrp::Gone;
            }
        }
        let holds = match place::held(settings.address) {
            Ok(held) => held.is_some(),
            Err(err) => {
                tracing::warn!("reading this host's addresses: {err}");
                continue;
            }
        };
        let now = VrrpObserved { vrrp, holds };
        if last != Some(now) {
            last = Some(now);
            if events.send(VipEvent::Observed(now)).await.is_err() {
                return;
            }
        }
    }
}

/// Reads the FIFO forever, reporting opens, state lines and closes.
fn read_fifo(path: &PathBuf, out: &mpsc::Sender<Fifo>) {
    loop {
        // Blocks until a writer (keepalived) has the FIFO open.
        let file = match OpenOptions::new().read(true).open(path) {
            Ok(f) => f,
            Err(err) => {
                tracing::warn!("opening the keepalived notify FIFO {}: {err}", path.display());
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        if out.blocking_send(Fifo::Opened).is_err() {
            return;
        }
        for line in BufReader::new(file).lines() {
            let Ok(line) = line else { break };
            if let Some(state) = Vrrp::from_fifo_line(&line) {
                tracing::debug!(line, "keepalived");
                if out.blocking_send(Fifo::State(state)).is_err() {
                    return;
                }
            }
        }
        // End of file: every writer closed it.
        if out.blocking_send(Fifo::Closed).is_err() {
            return;
        }
    }
}

/// Whether some process has the FIFO open for reading: keepalived holds it read-write, so a
/// non-blocking open for writing succeeds exactly when keepalived runs (checked before cpha
/// opens its own reading end).
fn has_reader(path: &Path) -> bool {
    OpenOptions::new().write(true).custom_flags(nix::libc::O_NONBLOCK).open(path).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fifo_with_no_reader_has_no_keepalived_and_a_plain_file_is_refused() {
        let dir = crate::testutil::TempDir::new("vip");
        let fifo = dir.path().join("fifo");
        ensure_fifo(&fifo).unwrap();
        ensure_fifo(&fifo).unwrap();
        assert!(!has_reader(&fifo));
        let _reader = OpenOptions::new().read(true).custom_flags(nix::libc::O_NONBLOCK).open(&fifo).unwrap();
        assert!(has_reader(&fifo));
        let plain = dir.path().join("plain");
        std::fs::write(&plain, "x").unwrap();
        let err = ensure_fifo(&plain).unwrap_err().to_string();
        assert!(err.contains("is not a FIFO"), "{err}");
    }

    #[test]
    fn the_fifo_reader_reports_open_states_and_the_end() {
        let dir = crate::testutil::TempDir::new("vip");
        let fifo = dir.path().join("fifo");
        ensure_fifo(&fifo).unwrap();
        let (tx, mut rx) = mpsc::channel(16);
        let path = fifo.clone();
        std::thread::spawn(move || read_fifo(&path, &tx));
        use std::io::Write;
        let mut writer = OpenOptions::new().read(true).write(true).open(&fifo).unwrap();
        assert_eq!(rx.blocking_recv().unwrap(), Fifo::Opened);
        writeln!(writer, "INSTANCE \"cpha\" BACKUP 100").unwrap();
        writeln!(writer, "INSTANCE \"cpha\" MASTER 100").unwrap();
        drop(writer);
        let got: Vec<_> = (0..3).map(|_| rx.blocking_recv().unwrap()).collect();
        assert_eq!(got, vec![Fifo::State(Vrrp::Backup), Fifo::State(Vrrp::Master), Fifo::Closed]);
    }

    #[test]
    fn no_pid_file_means_not_running() {
        let dir = crate::testutil::TempDir::new("vip");
        assert_eq!(read_pid(&dir.path().join("none.pid")), None);
        let own = dir.path().join("own.pid");
        std::fs::write(&own, std::process::id().to_string()).unwrap();
        assert_eq!(read_pid(&own), None, "a process that is not keepalived");
    }
}
