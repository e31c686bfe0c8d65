//! kube-standin entry point: parse flags, start logging, run, map the outcome to an exit code
//! (64 usage, 78 configuration, 1 runtime failure, 130 aborted drain).

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = match kube_standin::cli::Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 64 } else { 0 };
            // Help and version go to stdout, usage errors to stderr, as clap formats them.
            let _printed = e.print();
            return ExitCode::from(code);
        }
    };
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .or_else(|| EnvFilter::try_new(&cli.log).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(false);
    if journal {
        fmt.without_time().init();
    } else {
        fmt.init();
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "starting the async runtime");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(kube_standin::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::from(match e {
                kube_standin::RunError::Config(_) => 78,
                kube_standin::RunError::Runtime(_) => 1,
                kube_standin::RunError::Aborted => 130,
            })
        }
    }
}
