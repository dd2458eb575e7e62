//! The commands that act on a running host through its write routes: `publish`, `send`,
//! `restart`, `stop`, `reload`. Each prints what happened and fails, naming the reason, on a refusal.

use std::io::Read;

use anyhow::Context;
use hyper::{Method, StatusCode};

use super::client::{Target, segment};
use crate::plugin::{ReloadAction, ReloadReport};

/// `gorch-host publish TOPIC [DATA]`.
#[derive(Debug, clap::Args)]
pub struct PublishCmd {
    /// The topic.
    pub topic: String,
    /// The message; without it, standard input is read (files and pipes work).
    pub data: Option<String>,
    /// The host.
    #[command(flatten)]
    pub target: Target,
}

impl PublishCmd {
    /// Publishes the message.
    pub async fn run(self) -> anyhow::Result<()> {
        let path = format!("/gorchestra/api/topics/{}", segment(&self.topic));
        let what = format!("published {{}} byte(s) on {:?}", self.topic);
        deliver(&self.target, &path, self.data, &what).await
    }
}

/// `gorch-host send NAME [DATA]`.
#[derive(Debug, clap::Args)]
pub struct SendCmd {
    /// The routine.
    pub name: String,
    /// The message; without it, standard input is read (files and pipes work).
    pub data: Option<String>,
    /// The host.
    #[command(flatten)]
    pub target: Target,
}

impl SendCmd {
    /// Sends the message to the routine's mailbox.
    pub async fn run(self) -> anyhow::Result<()> {
        let path = format!("/gorchestra/api/routines/{}/mailbox", segment(&self.name));
        let what = format!("sent {{}} byte(s) to {:?}", self.name);
        deliver(&self.target, &path, self.data, &what).await
    }
}

/// Posts DATA (or standard input) to `path` and prints `what` (its `{}` is the size) with
/// the queue length the host answered.
async fn deliver(
    target: &Target,
    path: &str,
    data: Option<String>,
    what: &str,
) -> anyhow::Result<()> {
    let body = data_or_stdin(data)?;
    let len = body.len();
    let answer = target.post(path, body).await?;
    let queue = answer.get("queueLen").and_then(|v| v.as_u64()).unwrap_or(0);
    println!("{} (queue length {queue})", what.replacen("{}", &len.to_string(), 1));
    Ok(())
}

/// `gorch-host restart NAME` and `gorch-host stop NAME`.
#[derive(Debug, clap::Args)]
pub struct RoutineCmd {
    /// The routine.
    pub name: String,
    /// The host.
    #[command(flatten)]
    pub target: Target,
}

impl RoutineCmd {
    /// Asks the host to `action` (`restart` or `stop`) the routine.
    pub async fn run(self, action: &str) -> anyhow::Result<()> {
        let path = format!("/gorchestra/api/routines/{}/{action}", segment(&self.name));
        self.target.post(&path, Vec::new()).await?;
        let done = if action == "stop" { "stop requested for" } else { "restart requested for" };
        println!("{done} {:?}", self.name);
        Ok(())
    }
}

fn data_or_stdin(data: Option<String>) -> anyhow::Result<Vec<u8>> {
    match data {
        Some(d) => Ok(d.into_bytes()),
        None => {
            let mut buf = Vec::new();
            std::io::stdin().read_to_end(&mut buf).context("cannot read standard input")?;
            Ok(buf)
        }
    }
}

/// `gorch-host reload`.
#[derive(Debug, clap::Args)]
pub struct ReloadCmd {
    /// The host.
    #[command(flatten)]
    pub target: Target,
}

impl ReloadCmd {
    /// Asks the host to apply its plugin directory; prints the report, and fails naming
    /// every plugin that failed.
    pub async fn run(self) -> anyhow::Result<()> {
        let (status, body) =
            self.target.request(Method::POST, "/gorchestra/api/reload", Vec::new()).await?;
        let report: ReloadReport = match serde_json::from_slice(&body) {
            Ok(r) if status.is_success() || status == StatusCode::UNPROCESSABLE_ENTITY => r,
            _ => anyhow::bail!("{}", super::client::refusal(status, &body)),
        };
        let mut failed = Vec::new();
        for c in &report.plugins {
            let action = serde_json::to_value(c.action).unwrap_or_default();
            let action = action.as_str().unwrap_or("");
            let version =
                c.version.as_deref().map(|v| format!(" (version {v})")).unwrap_or_default();
            let note = c.error.as_deref().map(|e| format!(": {e}")).unwrap_or_default();
            println!("{:<14} {}{version}{note}", action, c.file);
            if c.action == ReloadAction::Failed {
                failed.push(format!("{}: {}", c.file, c.error.as_deref().unwrap_or("failed")));
            }
        }
        if !failed.is_empty() {
            anyhow::bail!(
                "{} plugin(s) failed to reload:\n  {}",
                failed.len(),
                failed.join("\n  ")
            );
        }
        Ok(())
    }
}
