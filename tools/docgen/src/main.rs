//! `cpha-docgen OUT_DIR`: writes cpha's man pages (`OUT_DIR/man/*.1`) and shell completions
//! (`OUT_DIR/usr/share/...`) from its clap definitions. Used by `tools/build-deb`.

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args_os().skip(1);
    let (Some(out), None) = (args.next(), args.next()) else {
        anyhow::bail!("usage: cpha-docgen OUT_DIR");
    };
    for path in cpha_docgen::generate(std::path::Path::new(&out))? {
        println!("{}", path.display());
    }
    Ok(())
}
