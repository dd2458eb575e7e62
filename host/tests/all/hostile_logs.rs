//! The log under hostile or crashing guests: guest text cannot forge a host line (log
//! calls, stdout, stderr), and a restart storm is summarized per routine while the counts
//! stay exact. The log is captured from a `tracing_subscriber::fmt` subscriber like the
//! binary's, on a current-thread runtime (the subscriber is the thread's default).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use gorch_host::{
    Backoff, Intensity, Orchestrator, RestartPolicy, RoutineHandle, SpawnOptions, State,
    Supervision,
};
use tracing::Level;

use crate::common::*;

/// What a forger puts after a line break: a host line, timestamp first.
const FORGED: &str = "1999-12-31T23:59:59.999999Z ERROR gorch_host::cli: FORGED";

/// Runs `f` with the binary's log format at INFO; returns its result and the log.
fn capture<T>(f: impl FnOnce() -> T) -> (T, String) {
    capture_log("info", f)
}

/// The lines a terminal shows: a carriage return starts over at the left margin as a
/// newline does.
fn visual_lines(log: &str) -> Vec<&str> {
    log.split(['\n', '\r']).collect()
}

/// Every line that shows FORGED is the routine's own line (it carries its field) and none
/// starts with the forged timestamp; `expected` such lines were written.
fn assert_unforged(log: &str, routine: &str, expected: usize) {
    assert!(!log.contains('\x1b'), "an escape sequence reached the log:\n{log}");
    let forged: Vec<&str> =
        visual_lines(log).into_iter().filter(|l| l.contains("FORGED")).collect();
    for line in &forged {
        assert!(!line.starts_with("1999-12-31"), "forged host line:\n{line}\nin:\n{log}");
        assert!(line.contains(&format!("routine=\"{routine}\"")), "not attributed:\n{line}");
    }
    assert_eq!(forged.len(), expected, "{log}");
}

#[test]
fn a_routines_log_calls_cannot_forge_host_lines() {
    let ((), log) = capture(|| {
        run_paused(async {
            let orch = Orchestrator::new();
            let h = orch
                .spawn(SpawnOptions::new("forger"), |ctx| async move {
                    ctx.log(Level::ERROR, &format!("x\n{FORGED}"));
                    ctx.log(Level::WARN, &format!("x\r{FORGED}"));
                    ctx.log(Level::INFO, &format!("x\x1b[2K\r{FORGED}\u{2028}{FORGED}"));
                    Ok::<(), String>(())
                })
                .unwrap();
            assert_eq!(wait_end(&h, Duration::from_secs(10)).await, State::Stopped);
            shutdown(&orch).await;
        })
    });
    assert_unforged(&log, "forger", 3);
    assert!(log.contains(r"x\n1999-12-31T23:59:59.999999Z ERROR"), "{log}");
    assert!(log.contains(r"x\u{1b}[2K\r1999-12-31"), "{log}");
}

#[test]
fn a_guests_stdout_stderr_and_log_cannot_forge_host_lines() {
    let ((), log) = capture(|| {
        run_paused(async {
            let orch = Orchestrator::new();
            let h = spawn_mode(&orch, SpawnOptions::new("forger-wasm"), "forge");
            assert_eq!(wait_end(&h, Duration::from_secs(30)).await, State::Stopped);
            shutdown(&orch).await;
        })
    });
    // Two lines each on stdout, stderr and `log` carry FORGED; the rest stay whole.
    assert_unforged(&log, "forger-wasm", 6);
    assert!(log.contains(r"out\r1999-12-31"), "{log}");
    assert!(log.contains(r"err\r1999-12-31"), "{log}");
    assert!(log.contains(r"log\n1999-12-31"), "{log}");
}

/// Restart always, a fixed `backoff` and no intensity limit: a storm.
fn storm(backoff: Duration) -> Supervision {
    Supervision {
        restart: RestartPolicy::Always,
        backoff: Backoff {
            initial: backoff,
            max: backoff,
            multiplier: 1.0,
            jitter: 0.0,
            stable_after: Duration::from_secs(3600),
        },
        intensity: Intensity { max_restarts: u32::MAX, within: Duration::from_secs(1) },
        ..Supervision::default()
    }
}

/// A routine that writes a panic-like line and fails at once, counting its runs.
fn spawn_crasher(
    orch: &Orchestrator,
    name: &str,
    sup: Supervision,
) -> (RoutineHandle, Arc<AtomicU64>) {
    let runs = Arc::new(AtomicU64::new(0));
    let counter = runs.clone();
    let h = orch
        .spawn(SpawnOptions::new(name).supervision(sup), move |ctx| {
            counter.fetch_add(1, Relaxed);
            async move {
                ctx.log(Level::WARN, "thread 'main' panicked at src/lib.rs:1:1: boom");
                Err::<(), String>("boom".into())
            }
        })
        .unwrap();
    (h, runs)
}

fn count(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

/// The suppressed counts of the summary lines about `what`.
fn suppressed(log: &str, what: &str) -> u64 {
    log.lines()
        .filter(|l| l.contains("similar lines suppressed") && l.contains(what))
        .map(|l| {
            let msg = &l[l.find("similar").unwrap()..];
            let before = &l[..l.len() - msg.len()];
            before.split_whitespace().last().unwrap().parse::<u64>().unwrap()
        })
        .sum()
}

#[test]
fn a_restart_storm_is_summarized_per_window_and_the_counts_stay_exact() {
    let ((restarts, runs), log) = capture(|| {
        run_paused(async {
            let orch = Orchestrator::new();
            let (h, runs) = spawn_crasher(&orch, "stormy", storm(Duration::from_millis(10)));
            // 25 s of paused time, 100 crashes a second: three windows of 10 s.
            tokio::time::sleep(Duration::from_millis(25_005)).await;
            h.stop();
            assert_eq!(wait_end(&h, Duration::from_secs(10)).await, State::Stopped);
            shutdown(&orch).await;
            (h.restarts(), runs.load(Relaxed))
        })
    });
    assert!(runs > 2000, "{runs} runs");
    assert_eq!(restarts, runs - 1, "the restart count stays exact");
    // The first restarts of each window in full: 3 windows of at most 10.
    let restart_lines = count(&log, "restarting in");
    assert!((10..=30).contains(&restart_lines), "{restart_lines} restart lines:\n{log}");
    // Every run ended in a restart decision (the last one's backoff was cut short by the
    // stop): each is logged or counted in a summary.
    assert_eq!(restart_lines as u64 + suppressed(&log, "(restarts)"), runs, "{log}");
    // The guest's crash lines: those of the first runs of each window, then summarized.
    let guest_lines = count(&log, "panicked at");
    assert!(guest_lines <= 40, "{guest_lines} guest lines:\n{log}");
    assert_eq!(guest_lines as u64 + suppressed(&log, "(guest output)"), runs, "{log}");
    assert!(log.lines().count() < 100, "{log}");
}

#[test]
fn a_storm_without_backoff_is_summarized_when_the_routine_ends() {
    let ((restarts, runs), log) = capture(|| {
        run_paused(async {
            let orch = Orchestrator::new();
            let (h, runs) = spawn_crasher(&orch, "hurricane", storm(Duration::ZERO));
            // No backoff: the clock never moves, the restarts only yield to this task.
            while runs.load(Relaxed) < 1000 {
                tokio::task::yield_now().await;
            }
            h.stop();
            assert_eq!(wait_end(&h, Duration::from_secs(10)).await, State::Stopped);
            shutdown(&orch).await;
            (h.restarts(), runs.load(Relaxed))
        })
    });
    assert_eq!(restarts, runs - 1);
    assert_eq!(count(&log, "restarting in"), 10, "{log}");
    assert_eq!(10 + suppressed(&log, "(restarts)"), runs, "{log}");
    assert_eq!(
        count(&log, "panicked at") as u64 + suppressed(&log, "(guest output)"),
        runs,
        "{log}"
    );
    assert!(log.lines().count() < 40, "{log}");
}
