//! Reloads: triggered through the master socket, systemd or a command, and confirmed from the
//! master CLI in every case. In 2.6 the master's `reload` prints nothing (design note 14,
//! docs/design-notes.md#reloads-cost), so success is read back: `show proc` must list a new
//! worker after the master's reload count went up, and that worker's `show info` must carry the
//! digest of the file just written.

use std::fmt;
use std::time::{Duration, Instant};

use super::render::DIGEST_PREFIX;
use super::runtime::{Cli, Command, RuntimeError};
use super::settings::{HaproxySettings, ReloadMethod};
use super::state::{parse_info_description, parse_proc, ProcList};
use crate::exec::{self, ExecError};

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("cannot read the master CLI before reloading: {0}")]
    Master(#[source] RuntimeError),
    #[error("triggering the reload failed: {0}")]
    Trigger(#[source] TriggerError),
    #[error("HAProxy could not load the new configuration ({failed} failed reload(s); workers {workers:?} keep the previous one)")]
    Failed { failed: u32, workers: Vec<u32> },
    #[error("the reload was not confirmed within {timeout:?}: {last}")]
    NotConfirmed { timeout: Duration, last: String },
    #[error("the new worker {pid} runs configuration {found:?}, not the one written ({expected})")]
    WrongConfig { pid: u32, expected: String, found: Option<String> },
}

#[derive(Debug, thiserror::Error)]
pub enum TriggerError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Exec(#[from] ExecError),
    #[error("the reload task failed: {0}")]
    Join(String),
}

/// A confirmed reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    pub before: ProcList,
    pub after: ProcList,
    /// Workers started by this reload.
    pub new_workers: Vec<u32>,
    /// Workers of the previous configuration still finishing their connections.
    pub old_workers: Vec<u32>,
}

impl fmt::Display for ReloadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "reload {} confirmed: workers {:?} -> {:?}",
            self.after.master.reloads,
            self.before.worker_pids(),
            self.new_workers
        )?;
        if !self.old_workers.is_empty() {
            write!(f, " (old {:?} finishing)", self.old_workers)?;
        }
        Ok(())
    }
}

/// Reads `show proc` from the master.
pub async fn show_proc(master: &Cli) -> Result<ProcList, RuntimeError> {
    let cmd = Command::ShowProc;
    let text = master.run(&cmd).await?;
    parse_proc(&text).map_err(|reason| RuntimeError::parse(&cmd, reason, &text))
}

/// The skeleton digest a worker runs, from its `show info` through the master CLI.
pub async fn worker_digest(master: &Cli, pid: u32) -> Result<Option<String>, RuntimeError> {
    let cmd = Command::InWorker { pid, command: Box::new(Command::ShowInfo) };
    let text = master.run(&cmd).await?;
    Ok(digest_of_info(&text))
}

/// The digest in a `show info` answer.
pub fn digest_of_info(info: &str) -> Option<String> {
    parse_info_description(info).and_then(|d| d.strip_prefix(DIGEST_PREFIX)).map(str::to_string)
}

/// Triggers a reload with the configured method and waits until the master confirms a worker
/// running `expected_digest`.
pub async fn reload(
    settings: &HaproxySettings,
    master: &Cli,
    expected_digest: &str,
) -> Result<ReloadReport, ReloadError> {
    let before = show_proc(master).await.map_err(ReloadError::Master)?;
    trigger(settings, master, &before).await.map_err(ReloadError::Trigger)?;
    confirm(master, &before, expected_digest, settings.reload_timeout).await
}

async fn trigger(settings: &HaproxySettings, master: &Cli, before: &ProcList) -> Result<(), TriggerError> {
    let (program, args) = match &settings.reload {
        ReloadMethod::MasterSocket => {
            // The master closes the connection when it re-executes itself, possibly before the
            // answer is read: only a command that could not be sent is a failure here, and the
            // read-back decides the rest.
            match master.raw(&Command::Reload).await {
                Ok(_) => {}
                Err(e @ (RuntimeError::Unreachable { .. } | RuntimeError::Unsafe { .. })) => return Err(e.into()),
                Err(e) => tracing::debug!("reload: {e}"),
            }
            return Ok(());
        }
        ReloadMethod::Systemd { unit } => ("systemctl".to_string(), vec!["reload".to_string(), unit.clone()]),
        ReloadMethod::Command { argv } => (argv[0].clone(), argv[1..].to_vec()),
    };
    tracing::debug!(master_pid = before.master.pid, %program, ?args, "triggering a reload");
    tokio::task::spawn_blocking(move || exec::run(&program, &args, None))
        .await
        .map_err(|e| TriggerError::Join(e.to_string()))??;
    Ok(())
}

/// Polls `show proc` until a worker started after `before` runs `expected_digest`.
pub async fn confirm(
    master: &Cli,
    before: &ProcList,
    expected_digest: &str,
    timeout: Duration,
) -> Result<ReloadReport, ReloadError> {
    let deadline = Instant::now() + timeout;
    let mut last: String;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        match show_proc(master).await {
            Ok(after) => {
                let restarted = after.master.pid != before.master.pid;
                let new_workers: Vec<u32> =
                    after.workers.iter().map(|w| w.pid).filter(|pid| !before.worker_pids().contains(pid)).collect();
                let reloaded = restarted || after.master.reloads > before.master.reloads;
                if reloaded && new_workers.is_empty() && after.failed_reloads > 0 {
                    return Err(ReloadError::Failed { failed: after.failed_reloads, workers: after.worker_pids() });
                }
                if reloaded {
                    if let Some(&pid) = new_workers.first() {
                        match worker_digest(master, pid).await {
                            Ok(Some(d)) if d == expected_digest => {
                                let old_workers = after.old_workers.iter().map(|w| w.pid).collect();
                                return Ok(ReloadReport { before: before.clone(), after, new_workers, old_workers });
                            }
                            Ok(found) => {
                                return Err(ReloadError::WrongConfig {
                                    pid,
                                    expected: expected_digest.to_string(),
                                    found,
                                })
                            }
                            Err(e) => last = format!("worker {pid}: {e}"),
                        }
                    } else {
                        last = format!("reload {} counted, no new worker yet", after.master.reloads);
                    }
                } else {
                    last = format!("the master still counts {} reload(s)", after.master.reloads);
                }
            }
            // The master re-executes itself during a reload; its socket answers again after.
            Err(e) => last = e.to_string(),
        }
        if Instant::now() >= deadline {
            return Err(ReloadError::NotConfirmed { timeout, last });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_digest_from_show_info() {
        assert_eq!(
            digest_of_info("Name: HAProxy\ndescription: cpha-skeleton-00112233aabbccdd\n").as_deref(),
            Some("00112233aabbccdd")
        );
        assert_eq!(digest_of_info("Name: HAProxy\ndescription: the lab\n"), None);
        assert_eq!(digest_of_info("Name: HAProxy\n"), None);
    }
}
