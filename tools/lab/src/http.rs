//! A minimal HTTP/1.1 client for the HTTPS clients, over blocking sockets: the request line and
//! headers, a response reader that finds the end of each response (Content-Length, chunked, or
//! the close of the connection), URLs, and a socket with a deadline that gives up on
//! SIGTERM/SIGINT when asked to.

use std::error::Error;
use std::fmt;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::str::FromStr;
use std::time::{Duration, Instant};

use crate::stop;

/// Longest response head (status line and headers) accepted.
const MAX_HEAD: usize = 64 * 1024;

/// Longest chunk-size or trailer line accepted.
const MAX_LINE: usize = 4096;

/// What a [`Sock`] does when SIGTERM/SIGINT arrives in the middle of a read or write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnStop {
    /// Fail the operation with a [`Stopped`] error (short connections: the run is over).
    GiveUp,
    /// Carry on until the operation completes or the deadline passes (a stream finishes its
    /// round trip and then stops at a clean point).
    Finish,
}

/// The error a [`Sock`] returns once a stop was asked for, with [`OnStop::GiveUp`].
#[derive(Debug)]
pub struct Stopped;

impl fmt::Display for Stopped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("stopped by a signal")
    }
}

impl Error for Stopped {}

/// True for the error of a [`Sock`] that gave up on a stop request.
pub fn is_stopped(err: &io::Error) -> bool {
    err.get_ref().is_some_and(|e| e.is::<Stopped>())
}

/// A TCP stream whose reads and writes share one deadline, set per exchange.
///
/// NOTE: it never returns `Interrupted` or `WouldBlock`: rustls retries the first forever and
/// takes the second for a non-blocking socket. An interrupted system call is retried here (after
/// checking for a stop), and an expired socket timeout becomes `TimedOut`.
#[derive(Debug)]
pub struct Sock {
    tcp: TcpStream,
    deadline: Instant,
    timeout: Duration,
    on_stop: OnStop,
}

impl Sock {
    /// Connects within `timeout`; the same `timeout` then bounds the exchange that follows,
    /// counted from the start of the connect.
    pub fn connect(to: SocketAddr, timeout: Duration, on_stop: OnStop) -> io::Result<Sock> {
        let deadline = Instant::now() + timeout;
        let tcp = TcpStream::connect_timeout(&to, timeout)?;
        tcp.set_nodelay(true)?;
        Ok(Sock { tcp, deadline, timeout, on_stop })
    }

    /// Gives the next exchange `timeout` from now.
    pub fn restart_deadline(&mut self) {
        self.deadline = Instant::now() + self.timeout;
    }

    /// Closes the write side (our FIN); errors are the caller's to ignore or report.
    pub fn shutdown_write(&self) -> io::Result<()> {
        self.tcp.shutdown(Shutdown::Write)
    }

    /// Checks for a stop and the deadline, and sets the socket timeout to the time left.
    fn arm(&self, read: bool) -> io::Result<()> {
        if self.on_stop == OnStop::GiveUp && stop::requested() {
            return Err(io::Error::other(Stopped));
        }
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(self.timed_out());
        }
        if read {
            self.tcp.set_read_timeout(Some(left))
        } else {
            self.tcp.set_write_timeout(Some(left))
        }
    }

    fn timed_out(&self) -> io::Error {
        io::Error::new(ErrorKind::TimedOut, format!("timed out ({:?} for the exchange)", self.timeout))
    }

    fn io<T>(&mut self, read: bool, mut op: impl FnMut(&mut TcpStream) -> io::Result<T>) -> io::Result<T> {
        loop {
            self.arm(read)?;
            match op(&mut self.tcp) {
                Err(err) if err.kind() == ErrorKind::Interrupted => {}
                Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Err(self.timed_out())
                }
                other => return other,
            }
        }
    }
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.io(true, |tcp| tcp.read(buf))
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.io(false, |tcp| tcp.write(buf))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One request. Header values come from flags: [`check_token`] keeps them to one line.
#[derive(Clone, Debug)]
pub struct Request<'a> {
    pub method: &'a str,
    /// Path and query, starting with `/`.
    pub target: &'a str,
    pub host: &'a str,
    /// Sent as `Authorization: Bearer TOKEN`.
    pub token: Option<&'a str>,
    /// Sent as `application/json`.
    pub json: Option<&'a [u8]>,
    /// Ask the server to close the connection after the response.
    pub close: bool,
}

impl Request<'_> {
    pub fn encode(&self) -> Vec<u8> {
        let mut head = format!(
            "{} {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: cpha-lab\r\nAccept: */*\r\n",
            self.method, self.target, self.host
        );
        if let Some(token) = self.token {
            head.push_str(&format!("Authorization: Bearer {token}\r\n"));
        }
        match self.json {
            Some(body) => {
                head.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()))
            }
            None if self.method != "GET" => head.push_str("Content-Length: 0\r\n"),
            None => {}
        }
        if self.close {
            head.push_str("Connection: close\r\n");
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        out.extend_from_slice(self.json.unwrap_or_default());
        out
    }
}

/// A request target flag: starts with `/`, no spaces or control characters.
pub fn check_target(s: &str) -> Result<String, String> {
    if !s.starts_with('/') {
        return Err(format!("{s:?}: a path must start with /"));
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("{s:?}: no spaces or control characters in a path"));
    }
    Ok(s.to_string())
}

/// A bearer token flag: printable ASCII without spaces.
pub fn check_token(s: &str) -> Result<String, String> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("a token is printable ASCII without spaces".into());
    }
    Ok(s.to_string())
}

/// One response, its body complete.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Response {
    pub status: u16,
    pub reason: String,
    /// Names in lower case, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The server closes the connection after this response: `Connection: close`, an HTTP/1.0
    /// answer without keep-alive, or a body that ends with the connection.
    pub close: bool,
    /// Bytes of the response on the wire (head, body and chunk framing).
    pub wire_bytes: u64,
}

impl Response {
    /// The first value of a header (name in any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The start of the body as text, for error messages.
    pub fn body_snippet(&self) -> String {
        let text = String::from_utf8_lossy(&self.body);
        let text = text.trim();
        match text.char_indices().nth(120) {
            Some((at, _)) => format!("{}...", &text[..at]),
            None => text.to_string(),
        }
    }
}

fn protocol(msg: impl Into<String>) -> io::Error {
    io::Error::new(ErrorKind::InvalidData, msg.into())
}

fn closed(msg: impl Into<String>) -> io::Error {
    io::Error::new(ErrorKind::UnexpectedEof, msg.into())
}

/// Reads responses from one connection, keeping bytes that arrive ahead of the one asked for.
#[derive(Debug, Default)]
pub struct ResponseReader {
    buf: Vec<u8>,
    pos: usize,
    /// Bytes consumed since the start of the current response.
    taken: u64,
}

impl ResponseReader {
    /// Bytes received beyond the responses read so far.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Reads more bytes; 0 at the end of the stream.
    fn fill(&mut self, r: &mut impl Read) -> io::Result<usize> {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
        let old = self.buf.len();
        self.buf.resize(old + 16 * 1024, 0);
        let n = match r.read(&mut self.buf[old..]) {
            Ok(n) => n,
            Err(err) => {
                self.buf.truncate(old);
                return Err(err);
            }
        };
        self.buf.truncate(old + n);
        Ok(n)
    }

    fn take(&mut self, n: usize) -> &[u8] {
        let at = self.pos;
        self.pos += n;
        self.taken += n as u64;
        &self.buf[at..at + n]
    }

    /// The next line, without its CRLF (or bare LF).
    fn line(&mut self, r: &mut impl Read, max: usize, what: &str) -> io::Result<String> {
        loop {
            if let Some(i) = self.buf[self.pos..].iter().position(|&b| b == b'\n') {
                let line = self.take(i + 1);
                let line = line.strip_suffix(b"\n").unwrap_or(line);
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                return String::from_utf8(line.to_vec()).map_err(|_| protocol(format!("{what} is not UTF-8")));
            }
            if self.pending() > max {
                return Err(protocol(format!("{what} longer than {max} bytes")));
            }
            if self.fill(r)? == 0 {
                return Err(closed(format!("the connection closed in the middle of the {what}")));
            }
        }
    }

    fn exact(&mut self, r: &mut impl Read, n: usize, out: &mut Vec<u8>) -> io::Result<()> {
        while self.pending() < n {
            if self.fill(r)? == 0 {
                return Err(closed(format!(
                    "the connection closed {} bytes into a body of {}",
                    out.len() + self.pending(),
                    out.len() + n
                )));
            }
        }
        out.extend_from_slice(self.take(n));
        Ok(())
    }

    /// Reads one complete response (interim 1xx answers are skipped). A body longer than
    /// `max_body` is a protocol error.
    pub fn read_response(&mut self, r: &mut impl Read, max_body: usize) -> io::Result<Response> {
        self.taken = 0;
        loop {
            if self.pending() == 0 && self.fill(r)? == 0 {
                return Err(closed("the server closed the connection before a response"));
            }
            let mut resp = self.read_head(r)?;
            if (100..200).contains(&resp.status) {
                if resp.status == 101 {
                    return Err(protocol("101 Switching Protocols was not asked for"));
                }
                continue;
            }
            self.read_body(r, &mut resp, max_body)?;
            resp.wire_bytes = self.taken;
            return Ok(resp);
        }
    }

    fn read_head(&mut self, r: &mut impl Read) -> io::Result<Response> {
        let status_line = self.line(r, MAX_HEAD, "status line")?;
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or_default();
        let code = parts.next().unwrap_or_default();
        let reason = parts.next().unwrap_or_default().to_string();
        let http10 = match version {
            "HTTP/1.1" => false,
            "HTTP/1.0" => true,
            _ => return Err(protocol(format!("not an HTTP/1.x status line: {status_line:?}"))),
        };
        let status = match code.parse::<u16>() {
            Ok(s) if code.len() == 3 && (100..600).contains(&s) => s,
            _ => return Err(protocol(format!("bad status code in {status_line:?}"))),
        };
        let mut headers = Vec::new();
        let mut head_len = status_line.len();
        loop {
            let line = self.line(r, MAX_HEAD, "response head")?;
            if line.is_empty() {
                break;
            }
            head_len += line.len();
            if head_len > MAX_HEAD {
                return Err(protocol(format!("response head longer than {MAX_HEAD} bytes")));
            }
            let Some((name, value)) = line.split_once(':') else {
                return Err(protocol(format!("bad header line {line:?}")));
            };
            if name.is_empty() || name.contains(|c: char| c.is_whitespace()) {
                return Err(protocol(format!("bad header name in {line:?}")));
            }
            headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
        }
        let tokens = |name: &str| -> Vec<String> {
            headers
                .iter()
                .filter(|(n, _)| n == name)
                .flat_map(|(_, v)| v.split(',').map(|t| t.trim().to_ascii_lowercase()))
                .collect()
        };
        let connection = tokens("connection");
        let close = if http10 {
            !connection.iter().any(|t| t == "keep-alive")
        } else {
            connection.iter().any(|t| t == "close")
        };
        Ok(Response { status, reason, headers, body: Vec::new(), close, wire_bytes: 0 })
    }

    fn read_body(&mut self, r: &mut impl Read, resp: &mut Response, max_body: usize) -> io::Result<()> {
        if resp.status == 204 || resp.status == 304 {
            return Ok(());
        }
        let encodings: Vec<String> = resp
            .headers
            .iter()
            .filter(|(n, _)| n == "transfer-encoding")
            .flat_map(|(_, v)| v.split(',').map(|t| t.trim().to_ascii_lowercase()))
            .collect();
        if !encodings.is_empty() {
            if encodings.last().map(String::as_str) != Some("chunked") {
                return Err(protocol(format!("transfer-encoding {encodings:?} does not end with chunked")));
            }
            return self.read_chunked(r, &mut resp.body, max_body);
        }
        let mut lengths = resp.headers.iter().filter(|(n, _)| n == "content-length").map(|(_, v)| v.as_str());
        if let Some(first) = lengths.next() {
            let len: u64 = first.parse().map_err(|_| protocol(format!("bad content-length {first:?}")))?;
            if lengths.any(|other| other != first) {
                return Err(protocol("content-length headers disagree"));
            }
            if len > max_body as u64 {
                return Err(protocol(format!("a body of {len} bytes is over the {max_body}-byte limit")));
            }
            return self.exact(r, len as usize, &mut resp.body);
        }
        // No framing: the body ends with the connection.
        resp.close = true;
        loop {
            let n = self.pending();
            resp.body.extend_from_slice(self.take(n));
            if resp.body.len() > max_body {
                return Err(protocol(format!("a body over the {max_body}-byte limit")));
            }
            match self.fill(r) {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                // A TLS peer that closes without close_notify: the body still ended there.
                Err(err) if err.kind() == ErrorKind::UnexpectedEof => return Ok(()),
                Err(err) => return Err(err),
            }
        }
    }

    fn read_chunked(&mut self, r: &mut impl Read, body: &mut Vec<u8>, max_body: usize) -> io::Result<()> {
        loop {
            let line = self.line(r, MAX_LINE, "chunk size line")?;
            let hex = line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(hex, 16).map_err(|_| protocol(format!("bad chunk size line {line:?}")))?;
            if size == 0 {
                // Trailers, up to the empty line.
                while !self.line(r, MAX_LINE, "trailer")?.is_empty() {}
                return Ok(());
            }
            if body.len().saturating_add(size) > max_body {
                return Err(protocol(format!("a chunked body over the {max_body}-byte limit")));
            }
            self.exact(r, size, body)?;
            if !self.line(r, MAX_LINE, "chunk end")?.is_empty() {
                return Err(protocol("chunk data longer than its size"));
            }
        }
    }
}

/// An `http://` or `https://` URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Url {
    pub tls: bool,
    /// Host name or IP address, without brackets.
    pub host: String,
    pub port: u16,
    /// `host[:port]` as written, for the Host header.
    pub authority: String,
    /// Path and query (`/` when the URL has none); the fragment is dropped.
    pub target: String,
}

impl FromStr for Url {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (tls, rest) = if let Some(rest) = strip_prefix_ignore_case(s, "https://") {
            (true, rest)
        } else if let Some(rest) = strip_prefix_ignore_case(s, "http://") {
            (false, rest)
        } else {
            return Err(format!("{s:?}: expected an http:// or https:// URL"));
        };
        let rest = rest.split('#').next().unwrap_or_default();
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, target) = rest.split_at(end);
        if authority.contains('@') {
            return Err(format!("{s:?}: user information in URLs is not supported (use --token)"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or_else(|| format!("{s:?}: unclosed [ in the host"))?;
            if host.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(format!("{s:?}: {host:?} is not an IPv6 address"));
            }
            match after {
                "" => (host, None),
                p => (host, Some(p.strip_prefix(':').ok_or_else(|| format!("{s:?}: junk after ]"))?)),
            }
        } else {
            match authority.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            }
        };
        let bracketed = authority.starts_with('[');
        if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c.is_control() || (c == ':' && !bracketed)) {
            return Err(format!("{s:?}: bad host {host:?}"));
        }
        let port = match port {
            None => {
                if tls {
                    443
                } else {
                    80
                }
            }
            Some(p) => p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| format!("{s:?}: bad port {p:?}"))?,
        };
        let target = match target {
            "" => "/".to_string(),
            t if t.starts_with('?') => format!("/{t}"),
            t => t.to_string(),
        };
        check_target(&target).map_err(|e| format!("{s:?}: {e}"))?;
        Ok(Url { tls, host: host.to_string(), port, authority: authority.to_string(), target })
    }
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix).then(|| &s[prefix.len()..])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader that hands out its data in small pieces, as a socket may.
    struct Trickle<'a> {
        data: &'a [u8],
        step: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.step.min(buf.len()).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    fn parse_all(wire: &[u8], step: usize) -> io::Result<Vec<Response>> {
        let mut r = Trickle { data: wire, step };
        let mut reader = ResponseReader::default();
        let mut out = Vec::new();
        loop {
            match reader.read_response(&mut r, 1 << 20) {
                Ok(resp) => out.push(resp),
                Err(err) if err.kind() == ErrorKind::UnexpectedEof && err.to_string().contains("before a response") => {
                    return Ok(out)
                }
                Err(err) => return Err(err),
            }
        }
    }

    #[test]
    fn responses_on_one_connection_split_anywhere() {
        let wire = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: text/plain\r\n\r\nok\
                     HTTP/1.1 100 Continue\r\n\r\n\
                     HTTP/1.1 500 Internal Server Error\r\nTransfer-Encoding: chunked\r\n\r\n\
                     5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nx-trailer: 1\r\n\r\n\
                     HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n";
        for step in [1, 3, 7, wire.len()] {
            let got = parse_all(wire, step).unwrap();
            assert_eq!(got.len(), 3, "step {step}");
            assert_eq!((got[0].status, got[0].body.as_slice(), got[0].close), (200, &b"ok"[..], false));
            assert_eq!(got[0].header("Content-Type"), Some("text/plain"));
            assert_eq!(got[0].wire_bytes, 66);
            assert_eq!((got[1].status, got[1].body.as_slice()), (500, &b"hello, world"[..]));
            assert_eq!(got[1].reason, "Internal Server Error");
            assert_eq!((got[2].status, got[2].close, got[2].body.len()), (204, true, 0));
            let total: u64 = got.iter().map(|r| r.wire_bytes).sum();
            assert_eq!(total, wire.len() as u64);
        }
    }

    #[test]
    fn a_body_without_framing_ends_with_the_connection() {
        let got = parse_all(b"HTTP/1.0 200 OK\r\n\r\nall of it", 4).unwrap();
        assert_eq!((got[0].body.as_slice(), got[0].close), (&b"all of it"[..], true));
        let got = parse_all(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n", 4).unwrap();
        assert!(!got[0].close);
    }

    #[test]
    fn broken_responses_are_errors() {
        let cases: [(&[u8], ErrorKind, &str); 8] = [
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort",
                ErrorKind::UnexpectedEof,
                "5 bytes into a body of 10",
            ),
            (b"HTTP/1.1 200 OK\r\ncontent-le", ErrorKind::UnexpectedEof, "middle of the response head"),
            (b"SSH-2.0-OpenSSH\r\n\r\n", ErrorKind::InvalidData, "not an HTTP/1.x"),
            (b"HTTP/1.1 2000 OK\r\n\r\n", ErrorKind::InvalidData, "bad status code"),
            (b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n", ErrorKind::InvalidData, "bad header line"),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab",
                ErrorKind::InvalidData,
                "disagree",
            ),
            (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n", ErrorKind::InvalidData, "bad chunk size"),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nabc\r\n0\r\n\r\n",
                ErrorKind::InvalidData,
                "longer than its size",
            ),
        ];
        for (wire, kind, text) in cases {
            let err = parse_all(wire, 5).unwrap_err();
            assert_eq!(err.kind(), kind, "{}: {err}", String::from_utf8_lossy(wire));
            assert!(err.to_string().contains(text), "{}: {err}", String::from_utf8_lossy(wire));
        }
        let mut reader = ResponseReader::default();
        let mut r = Trickle { data: b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\nhello world", step: 100 };
        let err = reader.read_response(&mut r, 10).unwrap_err();
        assert!(err.to_string().contains("over the 10-byte limit"), "{err}");
    }

    #[test]
    fn requests_are_encoded() {
        let get =
            Request { method: "GET", target: "/readyz", host: "10.0.0.1:6443", token: None, json: None, close: true };
        assert_eq!(
            String::from_utf8(get.encode()).unwrap(),
            "GET /readyz HTTP/1.1\r\nHost: 10.0.0.1:6443\r\nUser-Agent: cpha-lab\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        );
        let post = Request {
            method: "POST",
            target: "/_standin/faults",
            host: "h",
            token: Some("t0k"),
            json: Some(br#"{"a":1}"#),
            close: false,
        };
        let text = String::from_utf8(post.encode()).unwrap();
        assert!(text.contains("Authorization: Bearer t0k\r\n"), "{text}");
        assert!(text.contains("Content-Type: application/json\r\nContent-Length: 7\r\n\r\n{\"a\":1}"), "{text}");
        let delete = Request { method: "DELETE", json: None, token: None, ..post };
        assert!(String::from_utf8(delete.encode()).unwrap().contains("Content-Length: 0\r\n"));
    }

    #[test]
    fn urls_parse() {
        let u: Url = "http://127.0.0.1:9000/_standin/faults".parse().unwrap();
        assert_eq!(
            u,
            Url {
                tls: false,
                host: "127.0.0.1".into(),
                port: 9000,
                authority: "127.0.0.1:9000".into(),
                target: "/_standin/faults".into()
            }
        );
        let u: Url = "HTTPS://[::1]/readyz?verbose#frag".parse().unwrap();
        assert_eq!((u.tls, u.host.as_str(), u.port, u.target.as_str()), (true, "::1", 443, "/readyz?verbose"));
        let u: Url = "https://kubernetes:6443?x=1".parse().unwrap();
        assert_eq!((u.host.as_str(), u.port, u.target.as_str()), ("kubernetes", 6443, "/?x=1"));
        assert_eq!("http://h".parse::<Url>().unwrap().target, "/");
        for (bad, reason) in [
            ("ftp://h/", "expected an http:// or https:// URL"),
            ("h:80/", "expected an http:// or https:// URL"),
            ("http://", "bad host"),
            ("http://:80/", "bad host"),
            ("http://h:0/", "bad port"),
            ("http://h:99999/", "bad port"),
            ("http://u@h/", "user information"),
            ("http://[::1/", "unclosed ["),
            ("http://[nope]/", "is not an IPv6 address"),
            ("http://h/a b", "no spaces or control characters"),
            ("http://::1/", "bad host"),
        ] {
            let err = bad.parse::<Url>().expect_err(bad);
            assert!(err.contains(reason), "{bad:?}: {err}");
        }
    }

    #[test]
    fn flags_are_checked() {
        assert!(check_target("/readyz?verbose").is_ok());
        assert!(check_target("readyz").unwrap_err().contains("must start with /"));
        assert!(check_target("/a\r\nX: y").unwrap_err().contains("no spaces or control characters"));
        assert!(check_token("admin-secret").is_ok());
        for bad in ["a b", ""] {
            assert!(check_token(bad).unwrap_err().contains("printable ASCII without spaces"), "{bad:?}");
        }
    }
}
