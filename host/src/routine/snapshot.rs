//! [`Snapshot`]: a point-in-time view of a routine (the JSON API's routine object, with the
//! contract's camelCase field names), and the stats table that `print_stats` and
//! `gorch-host ps` print from snapshots.

use std::io;

use crate::routine::state::{Health, State};

/// A point-in-time view of a routine, as served by `/gorchestra/api/routines`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    /// Stable id (unchanged across restarts).
    pub id: u64,
    /// Unique name.
    pub name: String,
    /// The plugin it came from (empty for native routines).
    pub plugin: String,
    /// Lifecycle state.
    pub state: State,
    /// Health.
    pub health: Health,
    /// Restarts so far.
    pub restarts: u64,
    /// Seconds since the current run started (0 when not running).
    pub uptime_seconds: f64,
    /// Seconds since the last heartbeat.
    pub idle_seconds: f64,
    /// CPU time of the routine's task plus `add-busy`, all runs.
    pub busy_seconds: f64,
    /// Wasm fuel units used, all runs (0 for native routines). `None` (JSON `null`) when the
    /// routine runs with `metering = "time"`: it is not counted, which is not 0.
    pub fuel_consumed: Option<u64>,
    /// Linear memory of the current instance.
    pub memory_bytes: u64,
    /// Messages in the mailbox.
    pub queue_len: usize,
    /// Mailbox capacity.
    pub queue_cap: usize,
    /// Approximate bytes in the mailbox.
    pub queue_bytes: usize,
    /// Messages taken from the mailbox and topics.
    pub messages_in: u64,
    /// Messages sent to mailboxes and published on topics.
    pub messages_out: u64,
    /// The last error, trap or stop reason.
    pub last_error: Option<String>,
    /// The version of the code it runs: the first 12 hex digits of the component's SHA-256
    /// (empty for native routines).
    #[serde(default)]
    pub version: String,
    /// Live upgrades so far.
    #[serde(default)]
    pub upgrades: u64,
}

/// Writes the stats table of `snaps` (like gorchestra's `PrintStats`): what
/// [`Orchestrator::print_stats`](crate::Orchestrator::print_stats) and `gorch-host ps` print.
pub fn write_stats_table(w: &mut dyn io::Write, snaps: &[Snapshot]) -> io::Result<()> {
    writeln!(
        w,
        "{:>5}  {:<20} {:<12} {:<9} {:<12} {:>4} {:>9} {:>8} {:>9} {:>12} {:>9} {:>9} {:>8} {:>8}  {:<12} {:>3}  LAST ERROR",
        "ID",
        "NAME",
        "PLUGIN",
        "STATE",
        "HEALTH",
        "RST",
        "UPTIME",
        "IDLE",
        "BUSY",
        "FUEL",
        "MEM",
        "QUEUE",
        "IN",
        "OUT",
        "VERSION",
        "UPG"
    )?;
    for s in snaps {
        writeln!(
            w,
            "{:>5}  {:<20} {:<12} {:<9} {:<12} {:>4} {:>8.1}s {:>7.1}s {:>8.3}s {:>12} {:>9} {:>9} {:>8} {:>8}  {:<12} {:>3}  {}",
            s.id,
            truncate(&s.name, 20),
            truncate(&s.plugin, 12),
            s.state.as_str(),
            s.health.as_str(),
            s.restarts,
            s.uptime_seconds,
            s.idle_seconds,
            s.busy_seconds,
            s.fuel_consumed.map_or_else(|| "-".to_string(), |f| f.to_string()),
            human_bytes(s.memory_bytes),
            format!("{}/{}", s.queue_len, s.queue_cap),
            s.messages_in,
            s.messages_out,
            if s.version.is_empty() { "-" } else { &s.version },
            s.upgrades,
            s.last_error
                .as_deref()
                .map(|e| truncate(e.lines().next().unwrap_or(""), 60))
                .unwrap_or_default(),
        )?;
    }
    Ok(())
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

/// `65536` → `64.0KiB`.
fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 { format!("{b}B") } else { format!("{v:.1}{}", UNITS[i]) }
}
