//! The Runtime API (the worker's admin stats socket) and the master CLI: one command per
//! connection, built from parsed values only, each answer checked against what HAProxy 2.6
//! prints on success.
//!
//! NOTE: HAProxy splits a command line on `;` and ends it at a newline (design note 15,
//! docs/design-notes.md#runtime-api-in-2-6).
//! [`Command`] holds typed values ([`ServerName`], [`ProxyName`], [`SocketAddr`]) whose text has
//! neither, and [`Command::line`] checks the finished line again before anything is sent.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use super::settings::ProxyName;
use crate::members::ServerName;

/// The largest answer read; `show stat` of a few dozen servers is a few KiB.
const MAX_RESPONSE: usize = 4 << 20;

/// Where a CLI listens: a unix socket, or a TCP address (tests, or `stats socket ipv4@...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "{}", p.display()),
            Endpoint::Tcp(a) => write!(f, "{a}"),
        }
    }
}

impl From<&Path> for Endpoint {
    fn from(p: &Path) -> Self {
        Endpoint::Unix(p.to_path_buf())
    }
}

/// A server's administrative state, as `set server ... state` takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminState {
    Ready,
    Drain,
    Maint,
}

/// One command. Displaying it gives the exact line sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command<'a> {
    AddServer {
        backend: &'a ProxyName,
        server: &'a ServerName,
        addr: SocketAddr,
        params: &'a str,
    },
    DelServer {
        backend: &'a ProxyName,
        server: &'a ServerName,
    },
    SetAddr {
        backend: &'a ProxyName,
        server: &'a ServerName,
        addr: SocketAddr,
    },
    SetState {
        backend: &'a ProxyName,
        server: &'a ServerName,
        state: AdminState,
    },
    EnableHealth {
        backend: &'a ProxyName,
        server: &'a ServerName,
    },
    /// `set server ... health down`: the server must pass `rise` checks before it takes traffic.
    SetHealthDown {
        backend: &'a ProxyName,
        server: &'a ServerName,
    },
    ShutdownSessions {
        backend: &'a ProxyName,
        server: &'a ServerName,
    },
    ShowServersState {
        backend: &'a ProxyName,
    },
    /// `show stat <backend> 4 -1`: the backend's server rows only.
    ShowStat {
        backend: &'a ProxyName,
    },
    ShowInfo,
    /// Master CLI only.
    ShowProc,
    /// Master CLI only; the master closes the connection and prints nothing in 2.6.
    Reload,
    /// Master CLI only: `@!<pid> <command>` runs `command` in that worker.
    InWorker {
        pid: u32,
        command: Box<Command<'a>>,
    },
}

impl fmt::Display for Command<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::AddServer { backend, server, addr, params } => {
                write!(f, "add server {backend}/{server} {addr} {params}")
            }
            Command::DelServer { backend, server } => write!(f, "del server {backend}/{server}"),
            Command::SetAddr { backend, server, addr } => {
                write!(f, "set server {backend}/{server} addr {} port {}", addr.ip(), addr.port())
            }
            Command::SetState { backend, server, state } => {
                let state = match state {
                    AdminState::Ready => "ready",
                    AdminState::Drain => "drain",
                    AdminState::Maint => "maint",
                };
                write!(f, "set server {backend}/{server} state {state}")
            }
            Command::EnableHealth { backend, server } => write!(f, "enable health {backend}/{server}"),
            Command::SetHealthDown { backend, server } => write!(f, "set server {backend}/{server} health down"),
            Command::ShutdownSessions { backend, server } => write!(f, "shutdown sessions server {backend}/{server}"),
            Command::ShowServersState { backend } => write!(f, "show servers state {backend}"),
            Command::ShowStat { backend } => write!(f, "show stat {backend} 4 -1"),
            Command::ShowInfo => f.write_str("show info"),
            Command::ShowProc => f.write_str("show proc"),
            Command::Reload => f.write_str("reload"),
            Command::InWorker { pid, command } => write!(f, "@!{pid} {command}"),
        }
    }
}

impl Command<'_> {
    /// The line to send, newline included. Refuses a line holding a separator, which only a
    /// bug could produce.
    pub fn line(&self) -> Result<String, RuntimeError> {
        let text = self.to_string();
        if let Some(c) =
            text.chars().find(|&c| !(c == ' ' || c.is_ascii_graphic()) || matches!(c, ';' | '#' | '\\' | '\'' | '"'))
        {
            return Err(RuntimeError::Unsafe { command: text.escape_default().to_string(), ch: c });
        }
        Ok(format!("{text}\n"))
    }

    /// What HAProxy prints when this command succeeded; anything else is its error message.
    fn accepts(&self, response: &str) -> bool {
        let r = response.trim();
        match self {
            Command::AddServer { .. } => r == "New server registered.",
            Command::DelServer { .. } => r == "Server deleted.",
            Command::SetAddr { .. } => r.starts_with("IP changed from") || r.starts_with("no need to change the addr"),
            Command::SetState { .. }
            | Command::EnableHealth { .. }
            | Command::SetHealthDown { .. }
            | Command::ShutdownSessions { .. } => r.is_empty(),
            Command::Reload => true,
            Command::InWorker { command, .. } => {
                !r.starts_with("Can't find the target PID") && command.accepts(response)
            }
            // Answers of `show` commands are parsed; a parse failure carries the text.
            Command::ShowServersState { .. } | Command::ShowStat { .. } | Command::ShowInfo | Command::ShowProc => {
                !is_error_text(r)
            }
        }
    }
}

/// The error lines `show` commands print instead of a table.
fn is_error_text(r: &str) -> bool {
    [
        "Can't find backend",
        "No such proxy",
        "No such backend",
        "Unknown command",
        "Permission denied",
        "Can't find the target PID",
    ]
    .iter()
    .any(|e| r.starts_with(e))
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("HAProxy does not answer on {endpoint}: {source}")]
    Unreachable {
        endpoint: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` on {endpoint} did not finish within {timeout:?}")]
    Timeout { endpoint: String, command: String, timeout: Duration },
    #[error("`{command}` on {endpoint}: {source}")]
    Io {
        endpoint: String,
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` on {endpoint} answered more than {MAX_RESPONSE} bytes")]
    TooLarge { endpoint: String, command: String },
    #[error("HAProxy refused `{command}`: {response}")]
    Refused { command: String, response: String },
    #[error(
        "refusing the socket {endpoint}: it is served by uid {uid}, not by root or cpha's user (HAProxy binds its \
         sockets before it drops privileges; another process replaced this one)"
    )]
    Impostor { endpoint: String, uid: u32 },
    #[error("cannot read the answer to `{command}`: {reason} (answer: {response})")]
    Parse { command: String, reason: String, response: String },
    #[error("refusing to send `{command}`: it contains '{}'", ch.escape_default())]
    Unsafe { command: String, ch: char },
}

impl RuntimeError {
    /// Whether nothing listens on the socket (HAProxy not running, or restarting).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, RuntimeError::Unreachable { .. })
    }

    pub(crate) fn parse(command: &Command<'_>, reason: impl Into<String>, response: &str) -> RuntimeError {
        RuntimeError::Parse { command: command.to_string(), reason: reason.into(), response: printable(response, 300) }
    }
}

/// HAProxy's text made safe for one log line: printable ASCII kept, the rest escaped, cut at
/// `max` characters.
pub fn printable(text: &str, max: usize) -> String {
    let escaped = crate::logging::printable(text.trim());
    match escaped.get(..max) {
        Some(head) if escaped.len() > max => format!("{head}..."),
        _ => escaped,
    }
}

/// A connection factory for one CLI socket.
#[derive(Debug, Clone)]
pub struct Cli {
    endpoint: Endpoint,
    timeout: Duration,
}

impl Cli {
    pub fn new(endpoint: Endpoint, timeout: Duration) -> Self {
        Cli { endpoint, timeout }
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Sends one command and returns HAProxy's answer when it means success.
    pub async fn run(&self, command: &Command<'_>) -> Result<String, RuntimeError> {
        let response = self.raw(command).await?;
        if command.accepts(&response) {
            Ok(response)
        } else {
            Err(RuntimeError::Refused { command: command.to_string(), response: printable(&response, 500) })
        }
    }

    /// Sends one command and returns the answer as it is.
    pub async fn raw(&self, command: &Command<'_>) -> Result<String, RuntimeError> {
        let line = command.line()?;
        let endpoint = self.endpoint.to_string();
        let text = command.to_string();
        let exchange = async {
            let io_err = |source| RuntimeError::Io { endpoint: endpoint.clone(), command: text.clone(), source };
            let unreachable = |source| RuntimeError::Unreachable { endpoint: endpoint.clone(), source };
            let mut buf = Vec::new();
            match &self.endpoint {
                Endpoint::Unix(path) => {
                    let mut s = UnixStream::connect(path).await.map_err(unreachable)?;
                    trusted_peer(&s).map_err(|uid| RuntimeError::Impostor { endpoint: endpoint.clone(), uid })?;
                    exchange(&mut s, &line, &mut buf).await.map_err(io_err)?;
                }
                Endpoint::Tcp(addr) => {
                    let mut s = TcpStream::connect(addr).await.map_err(unreachable)?;
                    exchange(&mut s, &line, &mut buf).await.map_err(io_err)?;
                }
            }
            if buf.len() > MAX_RESPONSE {
                return Err(RuntimeError::TooLarge { endpoint: endpoint.clone(), command: text.clone() });
            }
            Ok(String::from_utf8_lossy(&buf).into_owned())
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(result) => result,
            Err(_) => {
                Err(RuntimeError::Timeout { endpoint: self.endpoint.to_string(), command: text, timeout: self.timeout })
            }
        }
    }
}

/// Checks who listens on a unix socket (`SO_PEERCRED`: the credentials of the process that
/// called `listen`). HAProxy's master creates its sockets as root before any worker drops
/// privileges; a socket served by anyone else (the `haproxy` user can write Debian's
/// `/run/haproxy`) must not be believed, since its answers drive the handover. `Err(uid)`.
pub fn trusted_peer(s: &UnixStream) -> Result<(), u32> {
    let uid = match s.peer_cred() {
        Ok(cred) => cred.uid(),
        // Not knowing is not trusting.
        Err(_) => u32::MAX,
    };
    if uid == 0 || uid == nix::unistd::geteuid().as_raw() {
        Ok(())
    } else {
        Err(uid)
    }
}

/// Writes the line, half-closes, and reads until HAProxy closes the connection.
///
/// NOTE: the master CLI keeps a connection open after answering until the client's side is
/// closed; the worker's CLI closes on its own. Half-closing (as `socat` does) suits both.
async fn exchange<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
    line: &str,
    buf: &mut Vec<u8>,
) -> std::io::Result<()> {
    s.write_all(line.as_bytes()).await?;
    s.shutdown().await?;
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_RESPONSE {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> (ProxyName, ServerName) {
        (ProxyName::parse("backendName", "kube-apiservers").unwrap(), "cp1".parse().unwrap())
    }

    #[test]
    fn builds_exact_command_lines() {
        let (b, s) = names();
        let v6: SocketAddr = "[fd00::11]:6443".parse().unwrap();
        let v4: SocketAddr = "10.0.0.11:6443".parse().unwrap();
        let cases = [
            (
                Command::AddServer { backend: &b, server: &s, addr: v6, params: "check inter 1s" },
                "add server kube-apiservers/cp1 [fd00::11]:6443 check inter 1s",
            ),
            (Command::DelServer { backend: &b, server: &s }, "del server kube-apiservers/cp1"),
            (
                Command::SetAddr { backend: &b, server: &s, addr: v6 },
                "set server kube-apiservers/cp1 addr fd00::11 port 6443",
            ),
            (
                Command::SetAddr { backend: &b, server: &s, addr: v4 },
                "set server kube-apiservers/cp1 addr 10.0.0.11 port 6443",
            ),
            (
                Command::SetState { backend: &b, server: &s, state: AdminState::Drain },
                "set server kube-apiservers/cp1 state drain",
            ),
            (
                Command::SetState { backend: &b, server: &s, state: AdminState::Maint },
                "set server kube-apiservers/cp1 state maint",
            ),
            (
                Command::SetState { backend: &b, server: &s, state: AdminState::Ready },
                "set server kube-apiservers/cp1 state ready",
            ),
            (Command::EnableHealth { backend: &b, server: &s }, "enable health kube-apiservers/cp1"),
            (Command::SetHealthDown { backend: &b, server: &s }, "set server kube-apiservers/cp1 health down"),
            (Command::ShutdownSessions { backend: &b, server: &s }, "shutdown sessions server kube-apiservers/cp1"),
            (Command::ShowServersState { backend: &b }, "show servers state kube-apiservers"),
            (Command::ShowStat { backend: &b }, "show stat kube-apiservers 4 -1"),
            (Command::InWorker { pid: 42, command: Box::new(Command::ShowInfo) }, "@!42 show info"),
        ];
        for (cmd, want) in cases {
            assert_eq!(cmd.line().unwrap(), format!("{want}\n"));
        }
    }

    #[test]
    fn refuses_separators_in_a_line() {
        let (b, s) = names();
        for params in ["check; del server x/y", "check\nshow env", "check # x"] {
            let e = Command::AddServer { backend: &b, server: &s, addr: "10.0.0.1:1".parse().unwrap(), params }
                .line()
                .unwrap_err();
            assert!(matches!(e, RuntimeError::Unsafe { .. }), "{e:?}");
        }
    }

    #[test]
    fn classifies_answers_captured_from_haproxy_2_6() {
        let (b, s) = names();
        let add = Command::AddServer { backend: &b, server: &s, addr: "10.0.0.1:1".parse().unwrap(), params: "check" };
        assert!(add.accepts("New server registered.\n\n"));
        assert!(!add.accepts("Already exists a server with the same name in backend.\n\n"));
        assert!(!add.accepts("unknown keyword 'bogus'.\n\n"));
        assert!(!add.accepts("No such backend.\n"));
        let del = Command::DelServer { backend: &b, server: &s };
        assert!(del.accepts("Server deleted.\n"));
        assert!(!del.accepts("Only servers in maintenance mode can be deleted.\n"));
        assert!(!del.accepts("No such server.\n"));
        let set = Command::SetAddr { backend: &b, server: &s, addr: "10.0.0.1:1".parse().unwrap() };
        assert!(set.accepts("IP changed from '127.0.0.1' to '127.0.0.2', port changed from '17503' to '17504' by 'stats socket command'\n\n"));
        assert!(set.accepts("no need to change the addr, no need to change the port by 'stats socket command'\n\n"));
        assert!(!set.accepts("Invalid addr 'bogus' by 'stats socket command'\n\n"));
        let health = Command::EnableHealth { backend: &b, server: &s };
        assert!(health.accepts("\n"));
        assert!(!health.accepts("No such server.\n"));
        let state = Command::ShowServersState { backend: &b };
        assert!(!state.accepts("Can't find backend.\n"));
        assert!(!Command::ShowStat { backend: &b }.accepts("No such proxy.\n"));
        let inw = Command::InWorker { pid: 1, command: Box::new(Command::ShowInfo) };
        assert!(!inw.accepts("Can't find the target PID matching the prefix '@!99999'\n"));
        assert!(inw.accepts("Name: HAProxy\n"));
    }

    #[test]
    fn printable_escapes_and_cuts() {
        assert_eq!(printable("a\nb\u{1b}", 100), "a\\nb\\u{1b}");
        assert_eq!(printable(&"x".repeat(20), 5), "xxxxx...");
    }
}
