//! The commands that act on a running host through its write routes: `publish`, `send`,
//! `restart`, `stop`, `reload`. Each prints what happened and fails, naming the reason, on a refusal.

use std::io::Read;

use anyhow::Context;
use hyper::{Method, StatusCode};

use super::client::{Target, segment};
use crate::plugin::about_file;
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
        crate::names::validate_topic_name(&self.topic)
            .map_err(|e| anyhow::anyhow!("invalid topic name {:?}: {e}", self.topic))?;
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
        crate::names::validate_routine_name(&self.name)
            .map_err(|e| anyhow::anyhow!("invalid routine name {:?}: {e}", self.name))?;
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

/// How long `reload` waits for the host's report.
const RELOAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3600);

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
        // Rolling out a plugin with many instances takes a grace period per instance.
        let (status, body) = self
            .target
            .request_within(Method::POST, "/gorchestra/api/reload", Vec::new(), RELOAD_TIMEOUT)
            .await?;
        let report: ReloadReport = match serde_json::from_slice(&body) {
            Ok(r) if status.is_success() || status == StatusCode::UNPROCESSABLE_ENTITY => r,
            _ => anyhow::bail!("{}", super::client::refusal(status, &body)),
        };
        let mut failed = Vec::new();
        for c in &report.plugins {
            let version =
                c.version.as_deref().map(|v| format!(" (version {v})")).unwrap_or_default();
            let line = match c.error.as_deref() {
                Some(e) => about_file(&c.file, e),
                None => c.file.clone(),
            };
            println!("{:<14} {line}{version}", c.action.as_str());
            if c.action == ReloadAction::Failed {
                failed.push(line);
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
