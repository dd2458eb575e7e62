//! The `gorch-host` binary: parse arguments, set up logging and the runtime, run the command,
//! print the error chain on failure.

use clap::Parser;
use gorch_host::cli::Cli;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = gorch_host::runtime_builder()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(cli.run()));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
