//! `gorch-host ps`: the stats table of a running host, from its JSON API; with `--cluster`,
//! every node's (the host fetches them through NATS, so one address is enough).

use anyhow::Context;

use super::client::Target;
use crate::cluster::ClusterRoutines;
use crate::logguard::escape;
use crate::routine::{Snapshot, write_stats_table};

/// `gorch-host ps`.
#[derive(Debug, clap::Args)]
pub struct PsCmd {
    /// The host.
    #[command(flatten)]
    pub target: Target,
    /// Every node's routines (the host must run with --nats).
    #[arg(long)]
    pub cluster: bool,
}

impl PsCmd {
    /// Fetches the routines and prints the table.
    pub async fn run(self) -> anyhow::Result<()> {
        let out = &mut std::io::stdout().lock();
        if self.cluster {
            let body = self.target.get("/gorchestra/api/cluster?routines=true").await?;
            let view: ClusterRoutines = serde_json::from_slice(&body)
                .context("unexpected answer from /gorchestra/api/cluster")?;
            for n in &view.nodes {
                use std::io::Write;
                let addr = if n.info.addr.is_empty() { "-" } else { n.info.addr.as_str() };
                writeln!(
                    out,
                    "NODE {} ({addr}, {} routines)",
                    escape(&n.info.node),
                    n.info.routines
                )?;
                match &n.error {
                    Some(e) => writeln!(out, "  not answering: {}", escape(e))?,
                    None => write_stats_table(out, &n.routines)?,
                }
                writeln!(out)?;
            }
            return Ok(());
        }
        let body = self.target.get("/gorchestra/api/routines").await?;
        let snaps: Vec<Snapshot> = serde_json::from_slice(&body)
            .context("unexpected answer from /gorchestra/api/routines")?;
        write_stats_table(out, &snaps)?;
        Ok(())
    }
}
