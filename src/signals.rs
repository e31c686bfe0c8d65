//! The one signal handler of every long-running command: SIGTERM and SIGINT stop, SIGHUP
//! reloads, SIGUSR1 resyncs. Each arrives as a [`Signal`] on a channel, so a loop selects on it
//! like on any other input (and tests send them without a process).

use tokio::sync::mpsc;

/// What a signal asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGHUP: re-read the configuration.
    Reload,
    /// SIGUSR1: resync HAProxy and the forward.
    Resync,
    /// SIGTERM or SIGINT: stop (a second one stops without waiting).
    Stop,
}

/// Installs the handlers and returns the stream of signals. Commands that have nothing to
/// reload or resync ignore those.
pub fn listen() -> anyhow::Result<mpsc::Receiver<Signal>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut usr1 = signal(SignalKind::user_defined1())?;
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(async move {
        loop {
            let signal = tokio::select! {
                _ = term.recv() => Signal::Stop,
                _ = int.recv() => Signal::Stop,
                _ = hup.recv() => Signal::Reload,
                _ = usr1.recv() => Signal::Resync,
            };
            if tx.send(signal).await.is_err() {
                return;
            }
        }
    });
    Ok(rx)
}

/// Waits for the first stop signal, then for a second one; `stopping` fires at the first,
/// `abort` at the second. For commands whose only signals are the stop ones.
pub async fn stop_then_abort(
    mut signals: mpsc::Receiver<Signal>,
    stopping: tokio_util::sync::CancellationToken,
    abort: tokio_util::sync::CancellationToken,
) {
    let mut stops = 0;
    while let Some(signal) = signals.recv().await {
        if signal != Signal::Stop {
            continue;
        }
        stops += 1;
        if stops == 1 {
            stopping.cancel();
        } else {
            tracing::warn!("second stop signal: not waiting any longer");
            abort.cancel();
            return;
        }
    }
}
