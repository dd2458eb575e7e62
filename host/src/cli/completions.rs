//! `gorch-host completions SHELL`: a completion script for the shell, on stdout.

use clap::CommandFactory;

use super::Cli;

/// `gorch-host completions SHELL`. Install the script where the shell looks for them, for
/// example `gorch-host completions bash > /etc/bash_completion.d/gorch-host`, or
/// `gorch-host completions zsh > "${fpath[1]}/_gorch-host"`.
#[derive(Debug, clap::Args)]
pub struct CompletionsCmd {
    /// The shell: bash, zsh, fish, elvish or powershell.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

impl CompletionsCmd {
    /// Writes the script to stdout.
    pub fn run(self) -> anyhow::Result<()> {
        let mut cmd = Cli::command();
        let name = cmd.get_name().to_string();
        clap_complete::generate(self.shell, &mut cmd, name, &mut std::io::stdout());
        Ok(())
    }
}
