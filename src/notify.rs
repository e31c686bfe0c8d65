//! Every sd-notify message cpha sends goes through here. Outside systemd (no NOTIFY_SOCKET) each
//! call is a no-op.

use sd_notify::NotifyState;

fn send(states: &[NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(err) = sd_notify::notify(false, states) {
        tracing::warn!("sd_notify failed: {err}");
    }
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
