//! The layering of `src/`: the graph of its top-level modules, computed from the sources
//! (`crate::NAME` paths, `use crate::{...}` groups and `super::` paths that reach the crate
//! root), has no cycle. docs/architecture.md draws the layers; a new import that closes a
//! cycle fails here, naming the modules and the files that point back.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level module -> the top-level modules it refers to, each with one file that does.
type Graph = BTreeMap<String, BTreeMap<String, String>>;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module path of a file under `src/`: `src/agent/driver.rs` -> [agent, driver],
/// `src/agent/mod.rs` -> [agent], `src/fsutil.rs` -> [fsutil].
fn module_path(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    let last = parts.pop().unwrap();
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" {
        parts.push(stem.to_string());
    }
    parts
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The first segment after `crate::` of every path in `text`, including each item of a
/// `crate::{a, b::c}` group; and for `super::` chains that climb to the crate root, the
/// segment after them.
fn referenced_tops(text: &str, depth: usize) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < text.len() {
        let rest = &text[i..];
        let preceded_by_ident = i > 0 && is_ident(bytes[i - 1] as char);
        if !preceded_by_ident && rest.starts_with("crate::") {
            let after = &rest["crate::".len()..];
            if let Some(group) = after.strip_prefix('{') {
                let mut level = 1;
                let mut item = String::new();
                let mut at_start = true;
                for c in group.chars() {
                    match c {
                        '{' => level += 1,
                        '}' => {
                            level -= 1;
                            if level == 0 {
                                break;
                            }
                        }
                        ',' if level == 1 => {
                            if !item.is_empty() {
                                out.push(std::mem::take(&mut item));
                            }
                            at_start = true;
                        }
                        c if level == 1 && at_start && is_ident(c) => item.push(c),
                        _ if level == 1 && at_start && !item.is_empty() => {
                            out.push(std::mem::take(&mut item));
                            at_start = false;
                        }
                        _ => {}
                    }
                }
                if !item.is_empty() {
                    out.push(item);
                }
            } else {
                let name: String = after.chars().take_while(|c| is_ident(*c)).collect();
                if !name.is_empty() {
                    out.push(name);
                }
            }
            i += "crate::".len();
            continue;
        }
        if !preceded_by_ident && rest.starts_with("super::") {
            let mut ups = 0;
            let mut tail = rest;
            while let Some(t) = tail.strip_prefix("super::") {
                ups += 1;
                tail = t;
            }
            if ups == depth {
                let name: String = tail.chars().take_while(|c| is_ident(*c)).collect();
                if !name.is_empty() {
                    out.push(name);
                }
            }
            i += ups * "super::".len();
            continue;
        }
        i += rest.chars().next().map_or(1, char::len_utf8);
    }
    out
}

fn graph(src: &Path) -> Graph {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let tops: BTreeSet<String> = files
        .iter()
        .filter_map(|f| module_path(f.strip_prefix(src).unwrap()).first().cloned())
        .filter(|t| t != "lib" && t != "main")
        .collect();
    let mut g = Graph::new();
    for file in &files {
        let rel = file.strip_prefix(src).unwrap();
        let path = module_path(rel);
        let Some(top) = path.first().filter(|t| tops.contains(*t)) else { continue };
        let text = std::fs::read_to_string(file).unwrap();
        let node = g.entry(top.clone()).or_default();
        for target in referenced_tops(&text, path.len()) {
            if &target != top && tops.contains(&target) {
                node.entry(target).or_insert_with(|| rel.display().to_string());
            }
        }
    }
    g
}

/// The strongly connected components with more than one module (Tarjan).
fn cycles(g: &Graph) -> Vec<Vec<String>> {
    struct T<'a> {
        g: &'a Graph,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a str) {
        let n = t.index.len();
        t.index.insert(v, n);
        t.low.insert(v, n);
        t.stack.push(v);
        t.on.insert(v);
        let targets: Vec<&'a str> = t.g.get(v).map(|m| m.keys().map(String::as_str).collect()).unwrap_or_default();
        for w in targets {
            if !t.index.contains_key(w) {
                visit(t, w);
                let lw = t.low[w];
                let lv = t.low.get_mut(v).unwrap();
                *lv = (*lv).min(lw);
            } else if t.on.contains(w) {
                let iw = t.index[w];
                let lv = t.low.get_mut(v).unwrap();
                *lv = (*lv).min(iw);
            }
        }
        if t.low[v] == t.index[v] {
            let mut scc = Vec::new();
            while let Some(w) = t.stack.pop() {
                t.on.remove(w);
                scc.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if scc.len() > 1 {
                scc.sort();
                t.out.push(scc);
            }
        }
    }
    let mut t =
        T { g, index: BTreeMap::new(), low: BTreeMap::new(), stack: Vec::new(), on: BTreeSet::new(), out: Vec::new() };
    for v in g.keys() {
        if !t.index.contains_key(v.as_str()) {
            visit(&mut t, v);
        }
    }
    t.out
}

#[test]
fn the_top_level_modules_of_src_form_no_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let g = graph(&src);
    assert!(g.len() >= 15, "too few modules found: {:?}", g.keys());
    // The graph is read from the sources for real: a few edges every layout has.
    assert!(g["agent"].contains_key("haproxy") && g["cli"].contains_key("agent"), "{g:?}");
    let found = cycles(&g);
    let mut report = String::new();
    for scc in &found {
        report.push_str(&format!("cycle among {scc:?}:\n"));
        for from in scc {
            for (to, file) in &g[from] {
                if scc.contains(to) {
                    report.push_str(&format!("  {from} -> {to} (e.g. src/{file})\n"));
                }
            }
        }
    }
    assert!(found.is_empty(), "src/'s top-level modules import each other in a cycle:\n{report}");
}

#[test]
fn the_check_finds_a_cycle_and_follows_every_kind_of_path() {
    let text = "use crate::{a, b::{c, d}, e::f};\nfn x() { crate::g::h(); super::super::i::j(); notcrate::k(); }";
    let mut found = referenced_tops(text, 2);
    found.sort();
    assert_eq!(found, ["a", "b", "e", "g", "i"]);
    assert_eq!(referenced_tops("super::i::j()", 1), ["i"]);
    assert!(referenced_tops("super::i::j()", 2).is_empty(), "one level up from a/b is a, not the root");
    let mut g = Graph::new();
    for (from, to) in [("metrics", "cli"), ("cli", "agent"), ("agent", "metrics"), ("agent", "exec")] {
        g.entry(from.into()).or_default().insert(to.into(), format!("{from}.rs"));
    }
    assert_eq!(cycles(&g), [vec!["agent".to_string(), "cli".into(), "metrics".into()]]);
    g.get_mut("metrics").unwrap().remove("cli");
    assert!(cycles(&g).is_empty());
}
