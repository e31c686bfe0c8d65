//! The `cpha` binary: parse the command line, start logging, run, map the error to an exit code.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = match cpha::cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            // --help and --version are not errors; usage errors exit 64 (EX_USAGE), not clap's 2.
            let _ = err.print();
            return if err.use_stderr() { ExitCode::from(cpha::exit::USAGE) } else { ExitCode::SUCCESS };
        }
    };
    cpha::logging::init(cli.log_level.as_deref(), cli.log_format);
    match cli.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // The whole chain, once, on one line: journald shows it as one entry.
            tracing::error!("{err:#}");
            ExitCode::from(cpha::exit::code_for(&err))
        }
    }
}
