//! Supervision through the public API: policies, backoff (exact, with paused time), jitter
//! bounds, reset after a stable run, intensity, stop during backoff, and at-least-once
//! delivery across crashes with a real guest.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use gorch_host::{
    Backoff, Intensity, Orchestrator, RestartPolicy, SpawnOptions, State, Supervision, WasmOptions,
};
use proptest::prelude::*;
use tokio::time::Instant;

use crate::common::*;

fn sup(restart: RestartPolicy, initial_ms: u64, max_ms: u64) -> Supervision {
    Supervision {
        restart,
        backoff: Backoff {
            initial: Duration::from_millis(initial_ms),
            max: Duration::from_millis(max_ms),
            multiplier: 2.0,
            jitter: 0.0,
            stable_after: Duration::from_secs(3600),
        },
        intensity: Intensity { max_restarts: 100, within: Duration::from_secs(3600) },
        max_deliveries: 3,
        rollback_window: Duration::ZERO,
    }
}

/// A native routine that records when each run starts and then fails.
fn spawn_failing(
    orch: &Orchestrator,
    s: Supervision,
    runs: Arc<Mutex<Vec<Instant>>>,
) -> gorch_host::RoutineHandle {
    orch.spawn(SpawnOptions::new("flaky").supervision(s), move |_ctx| {
        let runs = runs.clone();
        async move {
            runs.lock().unwrap().push(Instant::now());
            Err::<(), _>("flaky failed")
        }
    })
    .unwrap()
}

fn gaps(runs: &[Instant]) -> Vec<u64> {
    runs.windows(2).map(|w| (w[1] - w[0]).as_millis() as u64).collect()
}

#[test]
fn backoff_follows_the_exact_sequence_up_to_the_cap() {
    run_paused(async {
        let orch = Orchestrator::new();
        let runs = Arc::new(Mutex::new(Vec::new()));
        let mut s = sup(RestartPolicy::OnFailure, 100, 1000);
        s.intensity.max_restarts = 6;
        let h = spawn_failing(&orch, s, runs.clone());
        assert_eq!(h.wait().await, State::Failed);
        assert_eq!(gaps(&runs.lock().unwrap()), vec![100, 200, 400, 800, 1000, 1000]);
        assert_eq!(h.restarts(), 6);
        let err = last_error(&orch, "flaky");
        assert_eq!(err, "gave up: more than 6 restarts within 1h; last: flaky failed");
        shutdown(&orch).await;
    })
}

#[test]
fn a_stable_run_resets_the_backoff() {
    run_paused(async {
        let orch = Orchestrator::new();
        let runs = Arc::new(Mutex::new(Vec::new()));
        let mut s = sup(RestartPolicy::OnFailure, 100, 10_000);
        s.backoff.stable_after = Duration::from_secs(1);
        s.intensity.max_restarts = 4;
        let r2 = runs.clone();
        let h = orch
            .spawn(SpawnOptions::new("sometimes-stable").supervision(s), move |ctx| {
                let runs = r2.clone();
                async move {
                    let n = {
                        let mut r = runs.lock().unwrap();
                        r.push(Instant::now());
                        r.len()
                    };
                    // The third run lasts 2 s: longer than stable-after.
                    if n == 3 {
                        ctx.sleep(Duration::from_secs(2)).await;
                    }
                    Err::<(), _>("failed")
                }
            })
            .unwrap();
        assert_eq!(h.wait().await, State::Failed);
        // 100, 200, then run 3 takes 2 s and the delay starts over at 100, then 200.
        assert_eq!(gaps(&runs.lock().unwrap()), vec![100, 200, 2100, 200]);
        shutdown(&orch).await;
    })
}

/// A stop request, and a shutdown, during a one-minute backoff both act at once.
#[test]
fn stop_and_shutdown_during_backoff_act_at_once() {
    for via_shutdown in [false, true] {
        run_paused(async move {
            let orch = Orchestrator::new();
            let runs = Arc::new(Mutex::new(Vec::new()));
            let h = spawn_failing(&orch, sup(RestartPolicy::Always, 60_000, 60_000), runs.clone());
            assert!(wait_until_paused(|| h.state() == State::Backoff).await);
            let t = Instant::now();
            if via_shutdown {
                assert_eq!(orch.shutdown(Duration::from_secs(5)).await.stopped, 1);
            } else {
                h.stop();
            }
            assert_eq!(h.wait().await, State::Stopped);
            assert!(t.elapsed() < Duration::from_millis(10));
            assert_eq!(runs.lock().unwrap().len(), 1);
            shutdown(&orch).await;
        })
    }
}

#[derive(Clone, Copy, Debug)]
enum How {
    Ok,
    Err,
    Panic,
    IdleTimeout,
    Kill,
}

/// Every policy against every way a run can end: restarted or not, and the end state.
#[test]
fn policy_by_outcome_matrix() {
    use RestartPolicy::*;
    let cases = [
        // (policy, how, restarted?, final state when not restarted)
        (Never, How::Ok, false, State::Stopped),
        (Never, How::Err, false, State::Failed),
        (Never, How::Panic, false, State::Panicked),
        (Never, How::IdleTimeout, false, State::TimedOut),
        (Never, How::Kill, false, State::Stopped),
        (OnFailure, How::Ok, false, State::Stopped),
        (OnFailure, How::Err, true, State::Failed),
        (OnFailure, How::Panic, true, State::Panicked),
        (OnFailure, How::IdleTimeout, true, State::TimedOut),
        (OnFailure, How::Kill, false, State::Stopped),
        (Always, How::Ok, true, State::Stopped),
        (Always, How::Err, true, State::Failed),
        (Always, How::Panic, true, State::Panicked),
        (Always, How::IdleTimeout, true, State::TimedOut),
        (Always, How::Kill, false, State::Stopped),
    ];
    run_paused(async move {
        let orch = Orchestrator::new();
        for (i, (policy, how, restarted, end)) in cases.into_iter().enumerate() {
            let mut s = sup(policy, 10, 10);
            // One restart at most, then the routine gives up as FAILED.
            s.intensity.max_restarts = 1;
            let opts = SpawnOptions::new(format!("case-{i}"))
                .supervision(s)
                .idle_timeout(Duration::from_millis(50))
                .grace(Duration::from_millis(10));
            let h = orch
                .spawn(opts, move |ctx| async move {
                    match how {
                        How::Ok => Ok(()),
                        How::Err => Err("err".to_string()),
                        How::Panic => panic!("boom"),
                        How::IdleTimeout | How::Kill => {
                            ctx.cancelled().await;
                            Ok(())
                        }
                    }
                })
                .unwrap();
            if let How::Kill = how {
                tokio::time::sleep(Duration::from_millis(5)).await;
                h.stop();
            } else if let How::IdleTimeout = how {
                // Keeps beating from outside so that only the first run times out? No: each
                // run must time out by itself, so nothing beats.
            }
            let state = h.wait().await;
            let want = if restarted { State::Failed } else { end };
            assert_eq!(state, want, "{policy:?} × {how:?}");
            assert_eq!(h.restarts(), u64::from(restarted), "{policy:?} × {how:?}");
        }
        shutdown(&orch).await;
    })
}

proptest! {
    #[test]
    fn jitter_stays_within_its_bounds(
        initial_ms in 1u64..10_000,
        extra_ms in 0u64..100_000,
        multiplier in 1.0f64..10.0,
        jitter in 0.0f64..=1.0,
        attempt in 0u32..64,
        u in 0.0f64..1.0,
    ) {
        let b = Backoff {
            initial: Duration::from_millis(initial_ms),
            max: Duration::from_millis(initial_ms + extra_ms),
            multiplier,
            jitter,
            stable_after: Duration::from_secs(30),
        };
        let base = b.base_delay(attempt);
        prop_assert!(base >= b.initial && base <= b.max);
        let d = b.delay(attempt, u).as_secs_f64();
        let base = base.as_secs_f64();
        prop_assert!(d >= base * (1.0 - jitter) - 1e-9, "{d} < {base} × (1 - {jitter})");
        prop_assert!(d <= base * (1.0 + jitter) + 1e-9, "{d} > {base} × (1 + {jitter})");
    }
}

#[test]
fn invalid_backoff_settings_are_rejected() {
    let ok = Backoff::default();
    assert!(ok.validate().is_ok());
    for bad in [
        Backoff { multiplier: 0.5, ..ok.clone() },
        Backoff { jitter: 1.5, ..ok.clone() },
        Backoff { jitter: -0.1, ..ok.clone() },
        Backoff { max: Duration::from_millis(1), initial: Duration::from_secs(1), ..ok.clone() },
    ] {
        assert!(bad.validate().is_err(), "{bad:?}");
    }
}

fn poison_supervision() -> Supervision {
    Supervision {
        restart: RestartPolicy::OnFailure,
        backoff: Backoff {
            initial: Duration::ZERO,
            max: Duration::ZERO,
            multiplier: 1.0,
            jitter: 0.0,
            stable_after: Duration::from_secs(30),
        },
        intensity: Intensity { max_restarts: 100, within: Duration::from_secs(60) },
        max_deliveries: 3,
        rollback_window: Duration::ZERO,
    }
}

/// 1,000 messages with one poison among them, through a guest that panics on the poison:
/// none is missing, none is duplicated, order is kept, and the poison reaches `dead-letter`
/// after `max-deliveries`.
#[test]
fn a_crash_loses_no_message_and_poison_goes_to_dead_letter() {
    for source in ["mailbox", "testkit-in"] {
        run(async move {
            let orch = Orchestrator::new();
            let opts = SpawnOptions::new("poisoned")
                .queue_capacity(2000)
                .supervision(poison_supervision());
            let h = spawn_mode_with(
                &orch,
                opts,
                "poison",
                WasmOptions::default().env("SOURCE", source),
            );
            let out = orch.bus().topic("testkit-out", 2000).unwrap();
            let dead = orch.bus().topic(gorch_host::DEAD_LETTER_TOPIC, 16).unwrap();
            let input = if source == "mailbox" {
                h.mailbox().clone()
            } else {
                orch.bus().topic(source, 2000).unwrap()
            };
            for i in 0..1000 {
                let payload = if i == 500 { "poison".to_string() } else { format!("m{i}") };
                input.send(payload.as_str().into()).await.unwrap();
            }
            let mut got = Vec::new();
            while got.len() < 999 {
                let m = tokio::time::timeout(Duration::from_secs(20), out.recv())
                    .await
                    .unwrap_or_else(|_| panic!("{source}: only {} messages arrived", got.len()))
                    .unwrap();
                got.push(String::from_utf8(m.payload).unwrap());
            }
            let want: Vec<String> =
                (0..1000).filter(|i| *i != 500).map(|i| format!("m{i}")).collect();
            assert_eq!(got, want, "{source}");
            let letter =
                tokio::time::timeout(Duration::from_secs(10), dead.recv()).await.unwrap().unwrap();
            let v: serde_json::Value = serde_json::from_slice(&letter.payload).unwrap();
            assert_eq!(v["routine"], "poisoned");
            assert_eq!(v["deliveries"], 3);
            assert_eq!(v["payload"], serde_json::json!(b"poison".to_vec()));
            assert!(v["error"].as_str().unwrap().contains("poisoned after 2 restarts"), "{v}");
            assert_eq!(h.restarts(), 3, "{source}");
            assert_eq!(h.state(), State::Running);
            shutdown(&orch).await;
        });
    }
}

/// Spawns members a, b, c of a group; `fails` fails on its first run only; the others wait
/// for cancellation. Returns the handles and the log of run starts.
fn spawn_group(
    orch: &Orchestrator,
    strategy: gorch_host::Strategy,
    fails: &'static str,
) -> (Vec<gorch_host::RoutineHandle>, Arc<Mutex<Vec<String>>>) {
    let g =
        orch.group("g", strategy, Intensity { max_restarts: 10, within: Duration::from_secs(60) });
    let log = Arc::new(Mutex::new(Vec::new()));
    let handles = ["a", "b", "c"]
        .into_iter()
        .map(|name| {
            let log = log.clone();
            let opts = SpawnOptions::new(name)
                .supervision(sup(RestartPolicy::OnFailure, 100, 100))
                .group(&g);
            orch.spawn(opts, move |ctx| {
                let log = log.clone();
                async move {
                    log.lock().unwrap().push(format!("{}{}", ctx.name(), ctx.restarts()));
                    if ctx.name() == fails && ctx.restarts() == 0 {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        return Err("first run fails".to_string());
                    }
                    ctx.cancelled().await;
                    Ok(())
                }
            })
            .unwrap()
        })
        .collect();
    (handles, log)
}

async fn settle(handles: &[gorch_host::RoutineHandle]) {
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(handles.iter().all(|h| h.state() == State::Running));
}

#[test]
fn one_for_one_restarts_only_the_member() {
    run_paused(async {
        let orch = Orchestrator::new();
        let (hs, log) = spawn_group(&orch, gorch_host::Strategy::OneForOne, "b");
        settle(&hs).await;
        assert_eq!(hs.iter().map(|h| h.restarts()).collect::<Vec<_>>(), vec![0, 1, 0]);
        assert_eq!(*log.lock().unwrap(), vec!["a0", "b0", "c0", "b1"]);
        shutdown(&orch).await;
    })
}

#[test]
fn one_for_all_restarts_every_member_in_start_order() {
    run_paused(async {
        let orch = Orchestrator::new();
        let (hs, log) = spawn_group(&orch, gorch_host::Strategy::OneForAll, "b");
        settle(&hs).await;
        assert_eq!(hs.iter().map(|h| h.restarts()).collect::<Vec<_>>(), vec![1, 1, 1]);
        assert_eq!(*log.lock().unwrap(), vec!["a0", "b0", "c0", "a1", "b1", "c1"]);
        shutdown(&orch).await;
    })
}

#[test]
fn rest_for_one_restarts_the_member_and_those_after_it() {
    run_paused(async {
        let orch = Orchestrator::new();
        let (hs, log) = spawn_group(&orch, gorch_host::Strategy::RestForOne, "b");
        settle(&hs).await;
        assert_eq!(hs.iter().map(|h| h.restarts()).collect::<Vec<_>>(), vec![0, 1, 1]);
        assert_eq!(*log.lock().unwrap(), vec!["a0", "b0", "c0", "b1", "c1"]);
        shutdown(&orch).await;
    })
}

#[test]
fn the_group_intensity_limit_ends_the_whole_group() {
    run_paused(async {
        let orch = Orchestrator::new();
        let g = orch.group(
            "pipeline",
            gorch_host::Strategy::OneForOne,
            Intensity { max_restarts: 2, within: Duration::from_secs(60) },
        );
        let failing = orch
            .spawn(
                SpawnOptions::new("failing")
                    .supervision(sup(RestartPolicy::OnFailure, 100, 100))
                    .group(&g),
                |_| async { Err::<(), _>("always fails") },
            )
            .unwrap();
        let steady = orch
            .spawn(SpawnOptions::new("steady").group(&g), |ctx| async move {
                ctx.cancelled().await;
                Ok::<(), String>(())
            })
            .unwrap();
        assert_eq!(failing.wait().await, State::Failed);
        assert_eq!(steady.wait().await, State::Failed);
        assert_eq!(failing.restarts(), 2);
        assert!(g.gave_up());
        for name in ["failing", "steady"] {
            let err = last_error(&orch, name);
            assert!(
                err.starts_with("group pipeline gave up: more than 2 restarts"),
                "{name}: {err}"
            );
        }
        shutdown(&orch).await;
    })
}

/// A routine that ends for good on its own (here: it fails and its policy does not restart
/// it) loses nothing silently: what is queued in its mailbox goes to `dead-letter`, each
/// letter naming the routine, the mailbox and why.
#[test]
fn a_routine_that_gives_up_sends_its_queued_messages_to_dead_letter() {
    run(async {
        let orch = Orchestrator::new();
        let dead = orch.bus().topic(gorch_host::DEAD_LETTER_TOPIC, 64).unwrap();
        let gate = Arc::new(tokio::sync::Notify::new());
        let g = gate.clone();
        let opts = SpawnOptions::new("quitter").supervision(sup(RestartPolicy::Never, 0, 0));
        let h = orch
            .spawn(opts, move |_ctx| {
                let g = g.clone();
                async move {
                    g.notified().await;
                    Err::<(), _>("quitter failed")
                }
            })
            .unwrap();
        for i in 0..5 {
            h.mailbox().send(format!("q{i}").as_str().into()).await.unwrap();
        }
        gate.notify_one();
        assert_eq!(wait_end(&h, Duration::from_secs(10)).await, State::Failed);
        for i in 0..5 {
            let m = tokio::time::timeout(Duration::from_secs(10), dead.recv())
                .await
                .expect("a dead letter")
                .unwrap();
            let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
            assert_eq!(v["routine"], "quitter");
            assert_eq!(v["source"], "mailbox");
            assert_eq!(v["payload"], serde_json::json!(format!("q{i}").into_bytes()));
            assert!(v["error"].as_str().unwrap().contains("quitter failed"), "{v}");
        }
        assert_eq!(dead.len(), 0);
        shutdown(&orch).await;
    });
}
