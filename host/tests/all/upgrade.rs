//! Live upgrade through the library: a routine's code is replaced while it keeps its name,
//! its mailbox and every queued or in-flight message.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gorch_host::{
    CallError, Orchestrator, RestartPolicy, RoutineHandle, SpawnOptions, State, WasmComponent,
    WasmOptions,
};

use crate::common::*;

fn echo_v2() -> &'static WasmComponent {
    static C: std::sync::OnceLock<WasmComponent> = std::sync::OnceLock::new();
    C.get_or_init(|| engine().load_file(gorch_artifacts::path("echo")).expect("echo"))
}

/// A native routine that drains `topic` into `seen`.
fn drain(orch: &Orchestrator, topic: &'static str, seen: Arc<Mutex<Vec<u32>>>) -> RoutineHandle {
    orch.spawn(SpawnOptions::new(format!("drain-{topic}")), move |ctx| {
        let seen = seen.clone();
        async move {
            while let Some(m) = ctx.bus_recv(topic, None).await? {
                let n = String::from_utf8_lossy(&m).parse().unwrap();
                seen.lock().unwrap().push(n);
            }
            Ok::<(), CallError>(())
        }
    })
    .unwrap()
}

#[test]
fn an_upgrade_mid_stream_keeps_the_name_the_mailbox_and_every_message() {
    run(async {
        const N: u32 = 3000;
        let orch = Orchestrator::new();
        let seen = Arc::new(Mutex::new(Vec::new()));
        // v1 (testkit in echo mode) publishes on testkit-out, v2 (the echo guest) on echo.
        let d1 = drain(&orch, "testkit-out", seen.clone());
        let d2 = drain(&orch, "echo", seen.clone());
        let opts = SpawnOptions::new("svc").queue_capacity(64).restart(RestartPolicy::OnFailure);
        let svc = spawn_mode(&orch, opts, "echo");
        let v1 = svc.version();
        assert_eq!(v1.len(), 12, "{v1}");
        let producer = orch
            .spawn(SpawnOptions::new("producer"), |ctx| async move {
                for i in 0..N {
                    // A sender never sees no-such-routine during the upgrade.
                    ctx.send("svc", i.to_string().into_bytes()).await?;
                }
                Ok::<(), CallError>(())
            })
            .unwrap();
        assert!(wait_until(Duration::from_secs(30), || seen.lock().unwrap().len() > 500).await);
        svc.upgrade(echo_v2(), WasmOptions::default()).await.unwrap();
        assert_eq!(wait_end(&producer, Duration::from_secs(60)).await, State::Stopped);
        assert!(
            wait_until(Duration::from_secs(30), || seen.lock().unwrap().len() >= N as usize).await,
            "{} of {N} arrived",
            seen.lock().unwrap().len()
        );
        let mut counts: HashMap<u32, u32> = HashMap::new();
        for n in seen.lock().unwrap().iter() {
            *counts.entry(*n).or_default() += 1;
        }
        assert!((0..N).all(|i| counts.contains_key(&i)), "a message was lost");
        let dups = counts.values().filter(|c| **c > 1).count();
        assert!(dups <= 1, "{dups} messages delivered twice (at most the in-flight one)");

        let snap = svc.snapshot();
        assert_eq!((snap.name.as_str(), snap.upgrades, snap.restarts), ("svc", 1, 0));
        assert_eq!(snap.version, echo_v2().version());
        assert_ne!(snap.version, v1);
        let old = orch.history().into_iter().find(|s| s.name == "svc").expect("old record");
        assert_eq!(old.version, v1);
        assert!(old.last_error.unwrap().contains("upgraded to version"), "history record");
        svc.stop();
        d1.stop();
        d2.stop();
        shutdown(&orch).await;
    });
}

#[test]
fn an_upgrade_of_a_guest_that_ignores_cancellation_kills_it_and_keeps_its_message() {
    run(async {
        let orch = Orchestrator::new();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let d = drain(&orch, "echo", seen.clone());
        // v1 takes a message and then spins, ignoring the stop request.
        let opts = SpawnOptions::new("stuck").grace(Duration::from_millis(50));
        let h = spawn_mode(&orch, opts, "take-then-spin");
        h.mailbox().try_send("7".into()).unwrap();
        assert!(wait_until(Duration::from_secs(10), || h.snapshot().messages_in == 1).await);
        h.mailbox().try_send("8".into()).unwrap();
        h.upgrade(echo_v2(), WasmOptions::default()).await.unwrap();
        // The in-flight message comes first, then the one that was queued.
        assert!(wait_until(Duration::from_secs(10), || seen.lock().unwrap().len() == 2).await);
        assert_eq!(*seen.lock().unwrap(), vec![7, 8]);
        assert_eq!((h.upgrades(), h.restarts(), h.state()), (1, 0, State::Running));
        h.stop();
        d.stop();
        shutdown(&orch).await;
    });
}

#[test]
fn an_upgrade_in_backoff_starts_the_new_version_at_once() {
    run(async {
        let orch = Orchestrator::new();
        let h = spawn_mode(&orch, SpawnOptions::new("down").supervision(hour_backoff()), "err");
        assert!(wait_until(Duration::from_secs(10), || h.state() == State::Backoff).await);
        h.upgrade(echo_v2(), WasmOptions::default()).await.unwrap();
        assert_eq!(h.state(), State::Running);
        assert_eq!(h.version(), echo_v2().version());
        h.stop();
        shutdown(&orch).await;
    });
}

fn counter(version: &str) -> &'static WasmComponent {
    static V1: std::sync::OnceLock<WasmComponent> = std::sync::OnceLock::new();
    static V2: std::sync::OnceLock<WasmComponent> = std::sync::OnceLock::new();
    let cell = if version == "v1" { &V1 } else { &V2 };
    let file = if version == "v1" { "counter" } else { "counter2" };
    cell.get_or_init(|| engine().load_file(gorch_artifacts::path(file)).expect("counter"))
}

/// A native routine that drains the `counter` topic (`v1:3`, ...) into `seen`.
fn drain_text(orch: &Orchestrator, seen: Arc<Mutex<Vec<String>>>) -> RoutineHandle {
    orch.spawn(SpawnOptions::new("drain-counter"), move |ctx| {
        let seen = seen.clone();
        async move {
            while let Some(m) = ctx.bus_recv("counter", None).await? {
                seen.lock().unwrap().push(String::from_utf8_lossy(&m).into_owned());
            }
            Ok::<(), CallError>(())
        }
    })
    .unwrap()
}

async fn send_and_see(h: &RoutineHandle, seen: &Arc<Mutex<Vec<String>>>, want: &str) {
    h.mailbox().try_send("tick".into()).unwrap();
    let ok = wait_until(Duration::from_secs(10), || {
        seen.lock().unwrap().last().map(String::as_str) == Some(want)
    })
    .await;
    assert!(ok, "wanted {want}, saw {:?}", seen.lock().unwrap());
}

#[test]
fn a_stateful_worker_keeps_its_state_across_an_upgrade() {
    run(async {
        let orch = Orchestrator::new();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let d = drain_text(&orch, seen.clone());
        assert!(counter("v1").is_stateful() && !echo_v2().is_stateful());
        let h = orch
            .spawn_wasm(SpawnOptions::new("ctr"), counter("v1"), WasmOptions::default())
            .unwrap();
        for n in 1..=3 {
            send_and_see(&h, &seen, &format!("v1:{n}")).await;
        }
        h.upgrade(counter("v2"), WasmOptions::default()).await.unwrap();
        // The count went on where v1 left it.
        send_and_see(&h, &seen, "v2:4").await;
        assert_eq!((h.upgrades(), h.version()), (1, counter("v2").version().to_string()));
        h.stop();
        d.stop();
        shutdown(&orch).await;
    });
}

#[test]
fn a_refused_state_fails_the_upgrade_and_the_old_version_comes_back_with_it() {
    run(async {
        let orch = Orchestrator::new();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let d = drain_text(&orch, seen.clone());
        let h = orch
            .spawn_wasm(SpawnOptions::new("ctr"), counter("v1"), WasmOptions::default())
            .unwrap();
        send_and_see(&h, &seen, "v1:1").await;
        send_and_see(&h, &seen, "v1:2").await;
        let refusing = WasmOptions::default().env("REFUSE_STATE", "1");
        let err = h.upgrade(counter("v2"), refusing).await.unwrap_err();
        assert!(matches!(err, gorch_host::UpgradeError::Refused(_)), "{err:?}");
        let err = err.to_string();
        assert!(err.contains("refusing the saved state on purpose"), "{err}");
        // v1 again, with its count.
        send_and_see(&h, &seen, "v1:3").await;
        assert_eq!((h.upgrades(), h.version()), (0, counter("v1").version().to_string()));
        let last = h.snapshot().last_error.unwrap_or_default();
        assert!(last.contains("failed") && last.contains("started again"), "{last}");
        h.stop();
        d.stop();
        shutdown(&orch).await;
    });
}
