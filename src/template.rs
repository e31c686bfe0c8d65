//! What the haproxy.cfg and keepalived.conf renderers share about tera templates.

/// The error and its sources on one line (tera's parse errors span several).
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        out.push_str(": ");
        out.push_str(&e.to_string());
        source = e.source();
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}
