//! Every external program cpha runs (nft, iptables-restore, haproxy, ...) goes through [`run`]:
//! no shell, stdin fed from memory, stderr captured, a bounded run time, a tracing span, and a
//! typed error that names the command.
//!
//! NOTE: the bound matters because the agent's loop pings the systemd watchdog: a hung `nft`
//! or `haproxy -c` must become an error the loop survives, not a stall that gets the agent
//! killed with its forward half-changed.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long any external program may run before it is killed ([`run_with_timeout`] to choose).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("`{program}` was not found in PATH; install it (Debian package: {package})")]
    NotFound { program: String, package: &'static str },
    #[error("`{command}` was refused by the kernel: {stderr}; run cpha as root or with CAP_NET_ADMIN")]
    PermissionDenied { command: String, stderr: String },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed { command: String, status: String, stderr: String },
    #[error("`{command}` did not finish within {timeout:?} and was killed")]
    TimedOut { command: String, timeout: Duration },
    #[error("could not run `{command}`: {source}")]
    Io {
        command: String,
        #[source]
        source: std::io::Error,
    },
}

/// The Debian package that ships a program, for the "install it" hint.
fn package_of(program: &str) -> &'static str {
    match program {
        "nft" => "nftables",
        "iptables" | "iptables-save" | "iptables-restore" | "ip6tables" | "ip6tables-save" | "ip6tables-restore" => {
            "iptables"
        }
        "haproxy" => "haproxy",
        "ip" => "iproute2",
        "conntrack" => "conntrack",
        "keepalived" => "keepalived",
        _ => "unknown",
    }
}

/// Runs `program args...` with `stdin` as its standard input, for at most [`DEFAULT_TIMEOUT`];
/// returns stdout on success.
pub fn run<S: AsRef<OsStr>>(program: &str, args: &[S], stdin: Option<&[u8]>) -> Result<String, ExecError> {
    run_with_timeout(program, args, stdin, DEFAULT_TIMEOUT)
}

/// [`run`] with its own bound: past `timeout` the program is killed and reaped.
pub fn run_with_timeout<S: AsRef<OsStr>>(
    program: &str,
    args: &[S],
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> Result<String, ExecError> {
    let command = describe(program, args);
    let _span = tracing::debug_span!("exec", command = %command).entered();
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            return Err(ExecError::NotFound { program: program.to_string(), package: package_of(program) })
        }
        Err(source) => return Err(ExecError::Io { command, source }),
    };
    // Both pipes are read on their own threads so a chatty program cannot block on a full pipe
    // while we wait for it to exit.
    let stdout = drain(child.stdout.take().expect("stdout was piped"));
    let stderr = drain(child.stderr.take().expect("stderr was piped"));
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin was piped");
        if let Err(source) = pipe.write_all(input) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(ExecError::Io { command, source });
        }
    }
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                tracing::warn!(%command, ?timeout, "external program killed after its time bound");
                return Err(ExecError::TimedOut { command, timeout });
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(2)),
            Err(source) => return Err(ExecError::Io { command, source }),
        }
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = String::from_utf8_lossy(&stderr.join().unwrap_or_default()).trim().replace('\n', "; ");
    if !status.success() {
        if stderr.contains("Operation not permitted") || stderr.contains("Permission denied") {
            return Err(ExecError::PermissionDenied { command, stderr });
        }
        return Err(ExecError::Failed { command, status: status.to_string(), stderr });
    }
    Ok(String::from_utf8_lossy(&stdout).into_owned())
}

fn drain(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = pipe.read_to_end(&mut out);
        out
    })
}

/// Whether `program` can be found in PATH.
pub fn available(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false)
}

fn describe<S: AsRef<OsStr>>(program: &str, args: &[S]) -> String {
    let mut s = program.to_string();
    for arg in args {
        s.push(' ');
        s.push_str(&arg.as_ref().to_string_lossy());
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hung_program_is_killed_at_its_bound() {
        let started = Instant::now();
        let err = run_with_timeout("sleep", &["30"], None, Duration::from_millis(200)).unwrap_err();
        assert!(matches!(err, ExecError::TimedOut { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
        assert!(err.to_string().contains("sleep 30"), "{err}");
    }

    #[test]
    fn output_stdin_and_failures() {
        assert_eq!(run("cat", &[] as &[&str], Some(b"hello")).unwrap(), "hello");
        let big = vec![b'x'; 1 << 20];
        assert_eq!(run("cat", &[] as &[&str], Some(&big)).unwrap().len(), 1 << 20, "no deadlock on full pipes");
        let err = run("sh", &["-c", "echo oops >&2; exit 3"], None).unwrap_err();
        assert!(matches!(&err, ExecError::Failed { stderr, .. } if stderr == "oops"), "{err}");
        assert!(matches!(run("cpha-no-such-program", &[] as &[&str], None), Err(ExecError::NotFound { .. })));
    }
}
