//! `gorch-host ps`: the stats table of a running host, from its JSON API.

use anyhow::Context;

use super::client::Target;
use crate::routine::{Snapshot, write_stats_table};

/// `gorch-host ps`.
#[derive(Debug, clap::Args)]
pub struct PsCmd {
    /// The host.
    #[command(flatten)]
    pub target: Target,
}

impl PsCmd {
    /// Fetches the routines and prints the table.
    pub async fn run(self) -> anyhow::Result<()> {
        let body = self.target.get("/gorchestra/api/routines").await?;
        let snaps: Vec<Snapshot> = serde_json::from_slice(&body)
            .context("unexpected answer from /gorchestra/api/routines")?;
        write_stats_table(&mut std::io::stdout().lock(), &snaps)?;
        Ok(())
    }
}
