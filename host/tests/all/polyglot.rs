//! Guests in Python (`examples/guests-py`, componentize-py) and JavaScript
//! (`examples/guests-js`, componentize-js) through the real host: each beats, says hello on
//! a topic (JSON), echoes a message sent to its mailbox on its topic, and logs. The
//! components are built by `scripts/build-guests-{py,js}.sh` (run here when missing or
//! stale; a missing tool fails the test with the command that installs it) and compiled
//! once into a compile cache under the target directory, so only the first run pays for the
//! tens of seconds Cranelift takes on an 18 MB Python component.

use std::time::Duration;

use gorch_host::{Message, Orchestrator, PluginManifest, State, WasmComponent};

use crate::common::guests::{Lang, build_example, load, run_logged};
use crate::common::*;

/// How long a first (uncached) start may take on a loaded 2-core machine: a deadline, not
/// an expectation.
const PATIENCE: Duration = Duration::from_secs(120);

/// Spawns `component` as plugin `name` with the manifest defaults (as `gorch-host run`
/// would), then checks the worker's behaviour; returns the log.
fn exercise(component: &WasmComponent, name: &str, topic: &str, lang: &str) -> String {
    let manifest = PluginManifest::default();
    let ((), log) = run_logged(async {
        let orch = Orchestrator::new();
        let hello = orch.bus().topic("hello", 16).unwrap();
        let out = orch.bus().topic(topic, 16).unwrap();
        let h = orch
            .spawn_wasm(manifest.spawn_options(name.into()), component, manifest.wasm_options())
            .unwrap();

        // It says hello as JSON ...
        let m = hello.recv_timeout(PATIENCE).await.expect("no hello");
        let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(v, serde_json::json!({"worker": name, "lang": lang}));

        // ... echoes its mailbox on its topic (taken and republished in batches by the
        // helpers' recv_batch_timeout and publish_batch), in order ...
        h.mailbox().send(Message::new(b"ping from the test".to_vec())).await.unwrap();
        let m = out.recv_timeout(PATIENCE).await.expect("no echo");
        assert_eq!(m.payload, b"ping from the test");
        for i in 0..10 {
            h.mailbox().send(Message::new(format!("batch {i}").into_bytes())).await.unwrap();
        }
        for i in 0..10 {
            let m = out.recv_timeout(PATIENCE).await.expect("no echo of the batch");
            assert_eq!(m.payload, format!("batch {i}").into_bytes());
        }

        // ... and beats while it waits (the host's own beat at the start of the run is not
        // enough: the last beat must be well after it).
        let beat = wait_until(PATIENCE, || {
            let s = h.snapshot();
            s.uptime_seconds - s.idle_seconds > 0.2
        })
        .await;
        assert!(beat, "no beat from the guest: {:?}", h.snapshot());
        assert_eq!(h.state(), State::Running, "{:?}", h.snapshot());

        // A stop request reaches it as Cancelled, which the helper layer turns into a clean
        // return.
        h.stop();
        assert_eq!(wait_end(&h, Duration::from_secs(10)).await, State::Stopped);
        assert_eq!(last_error(&orch, name), "");
        shutdown(&orch).await;
    });
    log
}

#[test]
fn python_guest_beats_echoes_its_mailbox_publishes_and_logs() {
    let _heavy = crate::common::heavy();
    let component = load(&build_example(Lang::Python));
    let log = exercise(&component, "echo-py", "echo-py", "python");
    assert!(log.contains("echo-py starting (python, restarts: 0)"), "{log}");
    assert!(log.contains("first message echoed: 18 bytes"), "{log}");
}

#[test]
fn javascript_guest_beats_echoes_its_mailbox_publishes_and_logs() {
    let _heavy = crate::common::heavy();
    let component = load(&build_example(Lang::Js));
    let log = exercise(&component, "echo-js", "echo-js", "javascript");
    assert!(log.contains("echo-js starting (javascript, restarts: 0)"), "{log}");
    assert!(log.contains("first message echoed: 18 bytes"), "{log}");
}
