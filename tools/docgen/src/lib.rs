//! cpha's man pages and shell completions, generated from the clap definitions of the `cpha`
//! binary (`cpha::cli::Cli`), so they say exactly what `--help` says. The Debian package
//! (`tools/build-deb`) ships what this writes; nothing here is installed by itself.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::CommandFactory as _;
use clap_complete::Shell;

/// The shells whose completions the package installs, and where Debian's packages of those
/// shells look for them.
pub const SHELLS: [(Shell, &str); 3] = [
    (Shell::Bash, "usr/share/bash-completion/completions/cpha"),
    (Shell::Zsh, "usr/share/zsh/vendor-completions/_cpha"),
    (Shell::Fish, "usr/share/fish/vendor_completions.d/cpha.fish"),
];

/// The command as the binary parses it, named as installed.
pub fn command() -> clap::Command {
    cpha::cli::Cli::command().bin_name("cpha")
}

/// Writes `man/cpha.1`, `man/cpha-SUBCOMMAND.1` for every subcommand, and the completion of
/// each shell in [`SHELLS`] under `out`, at the path it installs to. Returns every file written.
pub fn generate(out: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let man = out.join("man");
    std::fs::create_dir_all(&man).with_context(|| format!("creating {}", man.display()))?;
    let cmd = command();
    clap_mangen::generate_to(cmd.clone(), &man).with_context(|| format!("writing man pages to {}", man.display()))?;
    for entry in std::fs::read_dir(&man)? {
        written.push(entry?.path());
    }
    for (shell, rel) in SHELLS {
        let path = out.join(rel);
        let dir = path.parent().expect("a completion path has a directory");
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut text = Vec::new();
        clap_complete::generate(shell, &mut cmd.clone(), "cpha", &mut text);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
    }
    written.sort();
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The long flags (`--listen`) and environment variables a command takes, globals included.
    fn flags_and_env(cmd: &clap::Command) -> Vec<(String, Option<String>)> {
        cmd.get_arguments()
            .filter(|a| !a.is_hide_set())
            .filter_map(|a| {
                let env = a.get_env().map(|e| e.to_string_lossy().into_owned());
                a.get_long().map(|l| (format!("--{l}"), env))
            })
            .collect()
    }

    /// roff writes every `-` as `\-`.
    fn roff(text: &str) -> String {
        text.replace('-', "\\-")
    }

    #[test]
    fn pages_and_completions_cover_every_subcommand_and_flag() {
        let out = std::env::temp_dir().join(format!("cpha-docgen-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        let written = generate(&out).unwrap();
        let read = |p: PathBuf| std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));

        let mut cmd = command();
        cmd.build();
        let subcommands: Vec<&clap::Command> =
            cmd.get_subcommands().filter(|c| !c.is_hide_set() && c.get_name() != "help").collect();
        assert!(subcommands.len() >= 7, "cpha has at least 7 subcommands, found {}", subcommands.len());
        let top = read(out.join("man/cpha.1"));
        let completions: Vec<(Shell, String)> = SHELLS.iter().map(|(s, rel)| (*s, read(out.join(rel)))).collect();
        for sub in &subcommands {
            let name = sub.get_name();
            assert!(top.contains(&roff(&format!("cpha-{name}(1)"))), "cpha(1) does not list cpha-{name}(1)");
            let page = read(out.join(format!("man/cpha-{name}.1")));
            if let Some(about) = sub.get_about() {
                assert!(page.contains(&roff(&about.to_string())), "cpha-{name}(1) lacks its description");
            }
            for (flag, env) in flags_and_env(sub) {
                assert!(page.contains(&roff(&flag)), "cpha-{name}(1) does not document {flag}");
                if let Some(env) = env {
                    assert!(page.contains(&roff(&env)), "cpha-{name}(1) does not name {env} for {flag}");
                }
                for (shell, text) in &completions {
                    assert!(text.contains(flag.trim_start_matches('-')), "{shell} completion lacks {name} {flag}");
                }
            }
            for (shell, text) in &completions {
                assert!(text.contains(name), "{shell} completion lacks `cpha {name}`");
            }
        }
        // A page for each nested subcommand too (`cpha members add`), with its description.
        let mut nested = 0;
        for sub in &subcommands {
            for inner in sub.get_subcommands().filter(|c| !c.is_hide_set() && c.get_name() != "help") {
                nested += 1;
                let page = read(out.join(format!("man/cpha-{}-{}.1", sub.get_name(), inner.get_name())));
                if let Some(about) = inner.get_about() {
                    assert!(
                        page.contains(&roff(&about.to_string())),
                        "cpha-{}-{}(1) lacks its description",
                        sub.get_name(),
                        inner.get_name()
                    );
                }
            }
        }
        // Nothing but those pages and the three completions.
        assert_eq!(written.len(), subcommands.len() + nested + 1 + SHELLS.len(), "{written:?}");
        std::fs::remove_dir_all(&out).unwrap();
    }
}
