//! The process's own figures: CPU seconds, resident memory and threads for the dashboard's
//! `/gorchestra/api/process`, and the standard `process_*` Prometheus metrics.

use prometheus::Registry;

/// Process figures for the dashboard's live CPU%.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ProcessStats {
    cpu_seconds: f64,
    resident_bytes: u64,
    threads: u64,
}

/// Reads `/proc/self/stat` (utime, stime, threads) and `/proc/self/statm` (resident pages).
pub(super) fn read() -> ProcessStats {
    let mut p = ProcessStats { cpu_seconds: 0.0, resident_bytes: 0, threads: 0 };
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat")
        && let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r)
    {
        let f: Vec<&str> = rest.split_whitespace().collect();
        // Fields after the command: state is 0, utime 11, stime 12, num_threads 17.
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        p.cpu_seconds = (ticks(11) + ticks(12)) as f64 / 100.0;
        p.threads = ticks(17);
    }
    if let Ok(statm) = std::fs::read_to_string("/proc/self/statm") {
        let pages: u64 = statm.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0);
        p.resident_bytes = pages * 4096;
    }
    p
}

/// Registers the standard `process_*` metrics in `registry` (nothing off Linux).
pub(super) fn register(registry: &Registry) -> prometheus::Result<()> {
    #[cfg(target_os = "linux")]
    registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;
    #[cfg(not(target_os = "linux"))]
    let _ = registry;
    Ok(())
}

/// A registry with only the standard `process_*` metrics (empty off Linux).
pub(super) fn registry() -> Registry {
    let r = Registry::new();
    register(&r).expect("fresh registry");
    r
}
