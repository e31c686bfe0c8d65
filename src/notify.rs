//! Every sd-notify message cpha sends goes through here. Outside systemd (no NOTIFY_SOCKET) each
//! call is a no-op.

use sd_notify::NotifyState;

fn send(states: &[NotifyState]) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let message = states.iter().map(|s| format!("{s}\n")).collect::<String>();
    if let Err(err) = send_to(&path, message.as_bytes()) {
        tracing::warn!("sd_notify failed: {err}");
    }
}

/// NOTE: non-blocking, so a notification socket nobody reads (a full receive queue) drops the
/// message instead of stalling the agent's loop, the watchdog pings included.
fn send_to(path: &std::ffi::OsStr, message: &[u8]) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let socket = UnixDatagram::unbound()?;
    socket.set_nonblocking(true)?;
    let bytes = path.as_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name)?
        }
        None => SocketAddr::from_pathname(std::path::Path::new(path))?,
    };
    socket.send_to_addr(message, &addr)?;
    Ok(())
}

/// READY=1 with a status sentence: the first real state is in place.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// STATUS= a human sentence, on every transition.
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// STOPPING=1: shutdown has begun.
pub fn stopping(status: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// WATCHDOG=1, when systemd asked for it (WatchdogSec= in the unit).
pub fn watchdog() {
    if std::env::var_os("WATCHDOG_USEC").is_some() {
        send(&[NotifyState::Watchdog]);
    }
}

/// The watchdog interval systemd asked for, if any.
pub fn watchdog_interval() -> Option<std::time::Duration> {
    let mut usec = 0;
    sd_notify::watchdog_enabled(false, &mut usec).then(|| std::time::Duration::from_micros(usec))
}
