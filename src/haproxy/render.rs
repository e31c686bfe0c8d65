//! haproxy.cfg from a tera template: the built-in one (`haproxy.cfg.tera`) or the operator's.
//!
//! The context holds only values cpha parsed: server names and socket addresses from the
//! [`MemberSet`](crate::members::MemberSet) (DNS names already resolved to IP addresses),
//! numbers, and settings checked by [`HaproxySettings::check`]. Unknown variables are errors.
//!
//! Every rendering is done twice, with the servers and without them. The second one, the
//! "skeleton", is everything outside the server list; its digest goes into the file as the
//! global `description`, which `show info` reads back from the running worker. A changed
//! digest means a reload; an equal one means the Runtime API is enough.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Serialize;
use tera::Tera;

use crate::template::chain;

use super::settings::{time, Checked, HaproxySettings, SettingsError};
use crate::members::ServerName;

/// The built-in template.
pub const DEFAULT_TEMPLATE: &str = include_str!("haproxy.cfg.tera");

/// The prefix of the global `description` that carries the skeleton digest.
pub const DIGEST_PREFIX: &str = "cpha-skeleton-";

const HEADER: &str =
    "# Rendered by cpha. Do not edit: cpha rewrites this file and keeps HAProxy's servers equal to it.\n";

/// One server of the apiserver backend: a member's server name and the IP address and port it
/// is reached at.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Server {
    pub name: ServerName,
    pub addr: SocketAddr,
}

/// A rendered configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// The whole file.
    pub text: String,
    /// Digest of everything outside the server list (16 hex digits).
    pub digest: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error(transparent)]
    Settings(#[from] SettingsError),
    #[error("cannot read the haproxy.cfg template {}: {source}", path.display())]
    ReadTemplate {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the haproxy.cfg template {origin} does not parse: {message}")]
    Parse { origin: String, message: String },
    #[error("rendering the haproxy.cfg template {origin} failed: {message}")]
    Render { origin: String, message: String },
    #[error("the haproxy.cfg template {origin} renders the servers wrongly: {message}")]
    ServerLines { origin: String, message: String },
}

/// A compiled template and where it came from (for error messages).
#[derive(Debug)]
pub struct Template {
    tera: Tera,
    origin: String,
}

const NAME: &str = "haproxy.cfg";

impl Template {
    /// The built-in template.
    pub fn builtin() -> Template {
        Template::compile(DEFAULT_TEMPLATE, "(built-in)".into()).expect("the built-in template parses")
    }

    /// The operator's template at `path`.
    pub fn load(path: &Path) -> Result<Template, RenderError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| RenderError::ReadTemplate { path: path.to_path_buf(), source })?;
        Template::compile(&text, path.display().to_string())
    }

    /// The template the settings name, or the built-in one.
    pub fn from_settings(settings: &HaproxySettings) -> Result<Template, RenderError> {
        match &settings.template {
            Some(path) => Template::load(path),
            None => Ok(Template::builtin()),
        }
    }

    /// Compiles template text; `origin` names it in errors.
    pub fn compile(text: &str, origin: String) -> Result<Template, RenderError> {
        let mut tera = Tera::default();
        // NOTE: no HTML escaping: the values are parsed addresses, names and numbers.
        tera.autoescape_on(vec![]);
        tera.add_raw_template(NAME, text)
            .map_err(|e| RenderError::Parse { origin: origin.clone(), message: chain(&e) })?;
        Ok(Template { tera, origin })
    }

    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Renders the file for `servers`, with the frontend on `bind`.
    pub fn render(
        &self,
        settings: &HaproxySettings,
        checked: &Checked,
        bind: SocketAddr,
        servers: &[Server],
    ) -> Result<Rendered, RenderError> {
        let full = self.render_text(settings, checked, bind, servers)?;
        let skeleton = self.render_text(settings, checked, bind, &[])?;
        self.check_server_lines(&skeleton, &full, checked, servers)?;
        // The cluster CA's content is read by HAProxy only when it loads the file: a new
        // content must reload it, as a change of the file would.
        let keywords = match &checked.ca_fingerprint {
            Some(f) => format!("{} # ca {f}", checked.server_params),
            None => checked.server_params.clone(),
        };
        let digest = digest(&skeleton, &keywords);
        let mut text = String::with_capacity(full.len() + 256);
        text.push_str(HEADER);
        text.push_str(&full);
        if !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&format!(
            "\n# Added by cpha: the digest of everything above but the server lines; cpha reads it back with `show info`.\nglobal\n    description {DIGEST_PREFIX}{digest}\n"
        ));
        Ok(Rendered { text, digest })
    }

    fn render_text(
        &self,
        settings: &HaproxySettings,
        checked: &Checked,
        bind: SocketAddr,
        servers: &[Server],
    ) -> Result<String, RenderError> {
        let context = Context::new(settings, checked, bind, servers);
        let context = tera::Context::from_serialize(&context)
            .map_err(|e| RenderError::Render { origin: self.origin.clone(), message: chain(&e) })?;
        self.tera
            .render(NAME, &context)
            .map_err(|e| RenderError::Render { origin: self.origin.clone(), message: chain(&e) })
    }

    /// The rendering with servers must be the skeleton plus exactly one line
    /// `server NAME ADDR PARAMS` per server: what `add server` creates at run time.
    fn check_server_lines(
        &self,
        skeleton: &str,
        full: &str,
        checked: &Checked,
        servers: &[Server],
    ) -> Result<(), RenderError> {
        let err = |message: String| RenderError::ServerLines { origin: self.origin.clone(), message };
        let mut expected: Vec<String> =
            servers.iter().map(|s| format!("server {} {} {}", s.name, s.addr, checked.server_params)).collect();
        let mut skeleton_lines = skeleton.lines().filter(|l| !l.trim().is_empty()).peekable();
        let mut extra = Vec::new();
        for line in full.lines().filter(|l| !l.trim().is_empty()) {
            if skeleton_lines.peek() == Some(&line) {
                skeleton_lines.next();
            } else {
                extra.push(line.split_whitespace().collect::<Vec<_>>().join(" "));
            }
        }
        if let Some(line) = skeleton_lines.next() {
            return Err(err(format!(
                "the line {:?} changes when servers are present; only `server` lines may depend on backend.servers",
                line.trim()
            )));
        }
        expected.sort();
        extra.sort();
        if expected != extra {
            let unexpected: Vec<&String> = extra.iter().filter(|l| !expected.contains(l)).collect();
            let missing: Vec<&String> = expected.iter().filter(|l| !extra.contains(l)).collect();
            return Err(err(format!(
                "each server must be written exactly as `server {{{{ server.name }}}} {{{{ server.addr }}}} {{{{ backend.server_params }}}}` (unexpected: {unexpected:?}; missing: {missing:?})"
            )));
        }
        Ok(())
    }
}

/// Renders with the template the settings name; see [`Template::render`].
pub fn render(settings: &HaproxySettings, bind: SocketAddr, servers: &[Server]) -> Result<Rendered, RenderError> {
    let checked = settings.check()?;
    Template::from_settings(settings)?.render(settings, &checked, bind, servers)
}

/// The digest found in a rendered file, if any.
pub fn digest_in(text: &str) -> Option<&str> {
    text.lines().rev().find_map(|l| l.trim().strip_prefix("description ")?.strip_prefix(DIGEST_PREFIX))
}

/// 64-bit FNV-1a of the skeleton and the server keywords, as 16 hex digits. Not a security
/// measure: it only tells two renderings apart, and is stable across runs and releases.
fn digest(skeleton: &str, server_params: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in skeleton.bytes().chain([0u8]).chain(server_params.bytes()) {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{hash:016x}")
}

#[derive(Serialize)]
struct Context<'a> {
    cpha: CphaContext,
    global: GlobalContext<'a>,
    defaults: DefaultsContext,
    frontend: FrontendContext<'a>,
    backend: BackendContext<'a>,
    /// `null` when the stats listener is off.
    stats: Option<StatsContext<'a>>,
}

#[derive(Serialize)]
struct StatsContext<'a> {
    /// `127.0.0.1:8404`.
    bind: String,
    /// Checked basic-auth credentials, or `null`.
    user: Option<&'a str>,
    password: Option<&'a str>,
}

#[derive(Serialize)]
struct CphaContext {
    version: &'static str,
}

#[derive(Serialize)]
struct GlobalContext<'a> {
    user: Option<&'a str>,
    group: Option<&'a str>,
    maxconn: Option<u32>,
    admin_socket: &'a str,
    hard_stop_after: String,
}

#[derive(Serialize)]
struct DefaultsContext {
    timeout_connect: String,
    timeout_client: String,
    timeout_server: String,
    timeout_tunnel: String,
    timeout_client_fin: String,
    timeout_server_fin: String,
    timeout_check: String,
}

#[derive(Serialize)]
struct FrontendContext<'a> {
    name: &'a str,
    /// `10.0.0.10:6443` or `[fd00::10]:6443`.
    bind: String,
    address: String,
    port: u16,
    ipv6: bool,
    transparent: bool,
}

#[derive(Serialize)]
struct BackendContext<'a> {
    name: &'a str,
    balance: &'static str,
    check_path: &'static str,
    live_path: &'static str,
    server_params: &'a str,
    servers: Vec<ServerContext>,
}

#[derive(Serialize)]
struct ServerContext {
    name: String,
    /// `10.0.0.11:6443` or `[fd00::11]:6443`.
    addr: String,
    address: String,
    port: u16,
}

impl<'a> Context<'a> {
    fn new(settings: &'a HaproxySettings, checked: &'a Checked, bind: SocketAddr, servers: &[Server]) -> Self {
        let t = &settings.timeouts;
        Context {
            cpha: CphaContext { version: env!("CARGO_PKG_VERSION") },
            global: GlobalContext {
                user: checked.user.as_ref().map(|u| u.as_str()),
                group: checked.group.as_ref().map(|g| g.as_str()),
                maxconn: settings.maxconn,
                admin_socket: checked.admin_socket.as_str(),
                hard_stop_after: time(settings.hard_stop_after),
            },
            defaults: DefaultsContext {
                timeout_connect: time(t.connect),
                timeout_client: time(t.client),
                timeout_server: time(t.server),
                timeout_tunnel: time(t.tunnel),
                timeout_client_fin: time(t.client_fin),
                timeout_server_fin: time(t.server_fin),
                timeout_check: time(settings.health_check.timeout),
            },
            frontend: FrontendContext {
                name: checked.frontend.as_str(),
                bind: bind.to_string(),
                address: bind.ip().to_string(),
                port: bind.port(),
                ipv6: bind.is_ipv6(),
                transparent: settings.transparent,
            },
            backend: BackendContext {
                name: checked.backend.as_str(),
                balance: settings.balance.as_str(),
                check_path: "/readyz",
                live_path: "/livez",
                server_params: &checked.server_params,
                servers: servers
                    .iter()
                    .map(|s| ServerContext {
                        name: s.name.to_string(),
                        addr: s.addr.to_string(),
                        address: s.addr.ip().to_string(),
                        port: s.addr.port(),
                    })
                    .collect(),
            },
            stats: checked.stats_listen.map(|listen| StatsContext {
                bind: listen.to_string(),
                user: checked.stats_auth.as_ref().map(|a| a.user.as_str()),
                password: checked.stats_auth.as_ref().map(|a| a.password.expose()),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::members::{MemberSet, ParseOptions};
    use crate::testutil::golden;

    fn servers(list: &str) -> Vec<Server> {
        let set: MemberSet = crate::members::parse(list, &ParseOptions::default()).unwrap();
        set.iter().map(|m| Server { name: m.name().clone(), addr: m.socket_addr().unwrap() }).collect()
    }

    fn settings() -> HaproxySettings {
        HaproxySettings::default()
    }

    fn bind() -> SocketAddr {
        "10.0.0.10:6443".parse().unwrap()
    }

    /// `haproxy -c` on text; the file must parse in HAProxy 2.6 exactly as cpha renders it.
    fn haproxy_accepts(name: &str, text: &str) {
        let dir = std::env::temp_dir().join(format!("cpha-render-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, text).unwrap();
        let out = std::process::Command::new("haproxy")
            .arg("-c")
            .arg("-f")
            .arg(&path)
            .output()
            .expect("haproxy is installed");
        std::fs::remove_dir_all(&dir).unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "haproxy -c refused {name}: {stderr}");
        assert!(!stderr.contains("WARNING"), "haproxy -c warns about {name}: {stderr}");
    }

    #[test]
    fn golden_default_template() {
        let cases = [
            ("haproxy-v4-three.cfg", settings(), bind(), servers("10.0.0.11, 10.0.0.12, 10.0.0.13")),
            (
                "haproxy-v6-named.cfg",
                HaproxySettings {
                    transparent: true,
                    balance: super::super::settings::Balance::Roundrobin,
                    ..settings()
                },
                "[fd00::10]:6443".parse().unwrap(),
                servers("cp1=[fd00::11]:6443, cp2=fd00::12, 10.0.0.13:7443"),
            ),
            ("haproxy-empty.cfg", settings(), "127.0.0.1:9445".parse().unwrap(), Vec::new()),
            (
                "haproxy-ca-root.cfg",
                {
                    let mut s = HaproxySettings { user: None, group: None, ..settings() };
                    s.health_check.ca_file = Some("/etc/ssl/certs/ca-certificates.crt".into());
                    s.health_check.inter = Duration::from_secs(2);
                    s.hard_stop_after = Duration::from_secs(90);
                    s.maxconn = Some(5000);
                    s
                },
                bind(),
                servers("10.0.0.11"),
            ),
        ];
        for (name, s, b, list) in cases {
            let r = render(&s, b, &list).unwrap();
            golden(name, &r.text);
            haproxy_accepts(name, &r.text);
            assert_eq!(digest_in(&r.text), Some(r.digest.as_str()));
        }
    }

    use std::time::Duration;

    #[test]
    fn digest_ignores_servers_and_follows_everything_else() {
        let s = settings();
        let a = render(&s, bind(), &servers("10.0.0.11")).unwrap();
        let b = render(&s, bind(), &servers("10.0.0.12, 10.0.0.13")).unwrap();
        let none = render(&s, bind(), &[]).unwrap();
        assert_ne!(a.text, b.text);
        assert_eq!(a.digest, b.digest);
        assert_eq!(a.digest, none.digest);
        let moved = render(&s, "10.0.0.10:7443".parse().unwrap(), &servers("10.0.0.11")).unwrap();
        assert_ne!(moved.digest, a.digest, "a new bind is outside the server list");
        let mut tuned = settings();
        tuned.health_check.rise = 3;
        let tuned = render(&tuned, bind(), &servers("10.0.0.11")).unwrap();
        assert_ne!(tuned.digest, a.digest, "server keywords are part of the digest");
        let timeouts = HaproxySettings { hard_stop_after: Duration::from_secs(60), ..settings() };
        assert_ne!(render(&timeouts, bind(), &[]).unwrap().digest, a.digest);
    }

    #[test]
    fn rendering_is_deterministic() {
        let list = servers("10.0.0.13, cp1=10.0.0.11, [fd00::1]");
        assert_eq!(render(&settings(), bind(), &list).unwrap(), render(&settings(), bind(), &list).unwrap());
    }

    #[test]
    fn server_lines_carry_exactly_the_runtime_keywords() {
        let r = render(&settings(), bind(), &servers("cp1=[fd00::11]:6443")).unwrap();
        let line = r.text.lines().find(|l| l.trim_start().starts_with("server ")).unwrap();
        let c = settings().check().unwrap();
        assert_eq!(line.trim(), format!("server cp1 [fd00::11]:6443 {}", c.server_params));
    }

    fn template(text: &str) -> Template {
        Template::compile(text, "test.tera".into()).unwrap()
    }

    fn render_with(text: &str, list: &[Server]) -> Result<Rendered, RenderError> {
        let s = settings();
        let c = s.check().unwrap();
        template(text).render(&s, &c, bind(), list)
    }

    #[test]
    fn unknown_variables_and_syntax_errors_are_clear() {
        let e = render_with("global\n    maxconn {{ global.maxconns }}\n", &[]).unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, RenderError::Render { .. }), "{e:?}");
        assert!(text.contains("test.tera") && text.contains("global.maxconns"), "{text}");

        let e = Template::compile("global\n  {% for x in %}\n", "bad.tera".into()).unwrap_err();
        assert!(matches!(e, RenderError::Parse { .. }), "{e:?}");
        let text = e.to_string();
        assert!(
            text.contains("bad.tera") && text.contains("--> 2:15") && text.contains("expected an expression"),
            "{text}"
        );
        assert!(!text.contains('\n'), "{text}");

        let e = Template::load(Path::new("/nonexistent/cpha.tera")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/cpha.tera"), "{e}");
    }

    #[test]
    fn templates_that_write_servers_differently_are_refused() {
        let list = servers("10.0.0.11");
        let base = "backend b\n";
        let e = render_with(
            &format!(
                "{base}{{% for s in backend.servers %}}server {{{{ s.name }}}} {{{{ s.addr }}}} check\n{{% endfor %}}"
            ),
            &list,
        )
        .unwrap_err();
        assert!(matches!(e, RenderError::ServerLines { .. }), "{e:?}");
        assert!(e.to_string().contains("unexpected"), "{e}");
        let e = render_with(&format!("{base}    maxconn {{{{ backend.servers | length }}}}\n"), &list).unwrap_err();
        assert!(e.to_string().contains("only `server` lines"), "{e}");
        let e = render_with(base, &list).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
        let ok = format!(
            "{base}{{% for s in backend.servers %}}  server   {{{{ s.name }}}}  {{{{ s.addr }}}} {{{{ backend.server_params }}}}\n{{% endfor %}}"
        );
        render_with(&ok, &list).unwrap();
    }

    #[test]
    fn nothing_outside_parsed_values_reaches_the_file() {
        // Members are parsed before they get here: separators and comment signs are refused.
        // So is a line of several words: a pasted section or server line is one invalid entry.
        for hostile in [
            "10.0.0.1;del server",
            "10.0.0.1#x",
            "cp1=10.0.0.1\"",
            "10.0.0.1/program",
            "10.0.0.1\nprogram x",
            "10.0.0.1\nserver evil 10.201.66.6:6443 check",
        ] {
            let refused = crate::members::parse(hostile, &ParseOptions::default());
            assert!(
                matches!(refused, Err(crate::members::MembersError::InvalidEntry { .. })),
                "{hostile:?}: {refused:?}"
            );
        }
        // A newline only separates entries: `program` alone is a DNS member, rendered as a
        // server line of its resolved address, never as a section.
        let set = crate::members::parse("10.0.0.1\nprogram", &ParseOptions::default()).unwrap();
        let list: Vec<Server> = set
            .iter()
            .enumerate()
            .map(|(i, m)| Server {
                name: m.name().clone(),
                addr: m.socket_addr().unwrap_or_else(|| SocketAddr::from(([10, 9, 9, i as u8], m.port()))),
            })
            .collect();
        let r = render(&settings(), bind(), &list).unwrap();
        assert!(r.text.contains("    server m-program-6443 10.9.9.1:6443 check "), "{}", r.text);
        assert!(!r.text.lines().any(|l| l.trim_start().starts_with("program")), "{}", r.text);
        // Settings are checked before rendering.
        let s = HaproxySettings { frontend_name: "fe\n  program x".into(), ..settings() };
        assert!(matches!(render(&s, bind(), &[]), Err(RenderError::Settings(_))));
        // Every line of a rendering is a comment, a section or an indented keyword line.
        for line in r.text.lines() {
            assert!(
                line.is_empty()
                    || line.starts_with('#')
                    || ["global", "defaults", "frontend ", "backend "].iter().any(|s| line.starts_with(s))
                    || line.starts_with("    "),
                "{line:?}"
            );
        }
    }
}
