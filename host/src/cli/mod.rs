//! The `gorch-host` command line: [`main`] (what the binary calls), and one clap struct per
//! subcommand, each in its own file with a `run()`: [`RunCmd`], [`CheckCmd`], [`PsCmd`],
//! [`CompletionsCmd`].
//! Errors here are `anyhow` (printed with their cause chain); the library's are typed.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::wasm::{CompileCache, DEFAULT_MEMORY_RESERVATION, DEFAULT_POOL_SIZE, EngineConfig};

mod act;
mod check;
mod client;
mod completions;
mod local_nats;
mod new;
mod ps;
mod run;
mod watch;

pub use act::{PublishCmd, ReloadCmd, RoutineCmd, SendCmd};
pub use check::CheckCmd;
pub use client::Target;
pub use completions::CompletionsCmd;
pub use new::{Lang, NewCmd};
pub use ps::PsCmd;
pub use run::RunCmd;

/// Runs sandboxed WebAssembly component workers and keeps them alive and visible.
#[derive(Debug, Parser)]
#[command(name = "gorch-host", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load, validate and start every plugin in a directory; run until SIGINT/SIGTERM.
    Run(Box<RunCmd>),
    /// Validate component files against the gorch:worker world; print imports and exports.
    Check(CheckCmd),
    /// Print the stats table of a running host (from its JSON API).
    Ps(PsCmd),
    /// Publish a message on a topic of a running host (DATA, or standard input).
    Publish(PublishCmd),
    /// Send a message to a routine's mailbox on a running host (DATA, or standard input).
    Send(SendCmd),
    /// Restart a routine of a running host now (no backoff, not counted as a failure).
    Restart(RoutineCmd),
    /// Stop a routine of a running host on request (no restart follows).
    Stop(RoutineCmd),
    /// Apply the plugin directory of a running host now (live upgrade; like SIGHUP).
    Reload(ReloadCmd),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) to stdout.
    Completions(CompletionsCmd),
    /// Write a ready-to-build guest project (Rust, Python or JavaScript) and its manifest.
    New(NewCmd),
}

/// How `run` writes its log lines (`--log-format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event (colours only on a terminal, never with NO_COLOR).
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `target`, `message` and the event's
    /// fields, such as `routine` and `plugin` on guest lines): for log shippers.
    Json,
}

/// The `gorch-host` program: parses `args` (the first is the program name), sets up logging
/// and the runtime, runs the command and prints the error chain on failure. The binary is
/// this one call; the demo example calls it too.
pub fn main<I, T>(args: I) -> std::process::ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = Cli::parse_from(args);
    let format = match &cli.command {
        Command::Run(r) => r.log_format,
        _ => LogFormat::Text,
    };
    init_logging(format);
    let result = crate::runtime_builder().build().map_err(anyhow::Error::from).and_then(|rt| {
        let result = rt.block_on(cli.run());
        // A compile still running on the blocking pool (start-up cut short by a signal) must
        // not hold the exit back: it only produces a cache entry, written atomically.
        rt.shutdown_timeout(std::time::Duration::from_millis(200));
        result
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            match format {
                // Every line a JSON object, the last one too.
                LogFormat::Json => tracing::error!("{e:#}"),
                LogFormat::Text => eprintln!("error: {e:#}"),
            }
            std::process::ExitCode::FAILURE
        }
    }
}

/// Sets up the global subscriber: `RUST_LOG` (default `info`) to stderr, as text or JSON.
fn init_logging(format: LogFormat) {
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
    };
    match format {
        LogFormat::Text => {
            // Colours only on a terminal, and never with NO_COLOR (https://no-color.org).
            let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
            tracing_subscriber::fmt()
                .with_ansi(ansi)
                .with_env_filter(filter())
                .with_writer(std::io::stderr)
                .init();
        }
        LogFormat::Json => {
            // The event's fields at the top level, next to `message`: `routine`, `plugin`.
            tracing_subscriber::fmt()
                .json()
                .flatten_event(true)
                .with_ansi(false)
                .with_env_filter(filter())
                .with_writer(std::io::stderr)
                .init();
        }
    }
}

impl Cli {
    /// Runs the chosen subcommand.
    pub async fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::Run(c) => c.run().await,
            Command::Check(c) => c.run(),
            Command::Ps(c) => c.run().await,
            Command::Publish(c) => c.run().await,
            Command::Send(c) => c.run().await,
            Command::Restart(c) => c.run("restart").await,
            Command::Stop(c) => c.run("stop").await,
            Command::Reload(c) => c.run().await,
            Command::Completions(c) => c.run(),
            Command::New(c) => c.run(),
        }
    }
}

/// Engine settings shared by `run` and `check`.
#[derive(Debug, clap::Args)]
pub struct EngineArgs {
    /// Directory of compiled components, so later starts skip compilation
    /// [default: $XDG_CACHE_HOME/gorch-host or ~/.cache/gorch-host].
    #[arg(long, env = "GORCH_CACHE_DIR", value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Compile every component at start, without reading or writing the cache.
    #[arg(long, conflicts_with = "cache_dir")]
    pub no_cache: bool,
}

impl EngineArgs {
    /// The engine configuration these flags ask for, with room in the instance pool for
    /// `instances` concurrent instances (at least the default). Past what 4 GiB reservations
    /// fit in the address space, each linear memory reserves less (down to 64 MiB, the size
    /// measured with 100,000 workers): a large directory starts instead of exhausting the
    /// address space.
    pub fn config(&self, instances: usize) -> EngineConfig {
        let cache_dir = if self.no_cache {
            None
        } else {
            self.cache_dir.clone().or_else(CompileCache::default_dir)
        };
        let pool_size = u32::try_from(instances).unwrap_or(u32::MAX).max(DEFAULT_POOL_SIZE);
        let memory_reservation = reservation_for(pool_size);
        if memory_reservation < DEFAULT_MEMORY_RESERVATION {
            tracing::info!(
                "{pool_size} instances: each linear memory reserves {} MiB of address space",
                memory_reservation >> 20
            );
        }
        EngineConfig { cache_dir, pool_size, memory_reservation, ..Default::default() }
    }
}

/// Address space the pooled linear memories may take in all (half of x86-64's 128 TiB of
/// user space, leaving the rest to stacks, tables, the heap and guard regions).
const ADDRESS_BUDGET: u64 = 64 << 40;
/// The smallest reservation per memory the CLI chooses (what 100,000 workers ran with).
const MIN_RESERVATION: u64 = 64 << 20;

/// The largest power-of-two reservation per memory, at most the default, that fits
/// `instances` memories in [`ADDRESS_BUDGET`] (at least [`MIN_RESERVATION`]).
fn reservation_for(instances: u32) -> u64 {
    let per = ADDRESS_BUDGET / u64::from(instances.max(1)) / 2; // a component may have 2
    let pow2 = if per == 0 { 0 } else { 1u64 << (63 - per.leading_zeros()) };
    pow2.clamp(MIN_RESERVATION, DEFAULT_MEMORY_RESERVATION)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_directories_get_smaller_reservations_that_fit_the_address_space() {
        assert_eq!(reservation_for(1000), DEFAULT_MEMORY_RESERVATION);
        assert_eq!(reservation_for(20_000), 1 << 30);
        assert_eq!(reservation_for(100_000), 256 << 20);
        assert_eq!(reservation_for(u32::MAX), MIN_RESERVATION);
        for n in [1, 7, 1000, 8191, 20_000, 65_536, 100_000] {
            assert!(
                u64::from(n) * 2 * reservation_for(n)
                    <= ADDRESS_BUDGET.max(2 * MIN_RESERVATION * u64::from(n))
            );
        }
    }
}
