//! Every external program cpha runs (nft, iptables-restore, haproxy, ...) goes through [`run`]:
//! no shell, stdin fed from memory, stderr captured, and a typed error that names the command.

use std::ffi::OsStr;
use std::io::Write;
use std::process::{Command, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("`{program}` was not found in PATH; install it (Debian package: {package})")]
    NotFound { program: String, package: &'static str },
    #[error("`{command}` was refused by the kernel: {stderr}; run cpha as root or with CAP_NET_ADMIN")]
    PermissionDenied { command: String, stderr: String },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed { command: String, status: String, stderr: String },
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
        _ => "unknown",
    }
}

/// Runs `program args...` with `stdin` as its standard input; returns stdout on success.
pub fn run<S: AsRef<OsStr>>(program: &str, args: &[S], stdin: Option<&[u8]>) -> Result<String, ExecError> {
    let command = describe(program, args);
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
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin was piped");
        if let Err(source) = pipe.write_all(input) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(ExecError::Io { command, source });
        }
    }
    let output = child.wait_with_output().map_err(|source| ExecError::Io { command: command.clone(), source })?;
    let stderr = String::from_utf8_lossy(&output.stderr).trim().replace('\n', "; ");
    if !output.status.success() {
        if stderr.contains("Operation not permitted") || stderr.contains("Permission denied") {
            return Err(ExecError::PermissionDenied { command, stderr });
        }
        return Err(ExecError::Failed { command, status: output.status.to_string(), stderr });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
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
