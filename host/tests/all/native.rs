//! Native routines: the same states, context and stats as wasm ones.

use std::time::Duration;

use gorch_host::{CallError, Health, Orchestrator, SpawnError, SpawnOptions, State};

use crate::common::*;

#[test]
fn native_outcomes_map_to_states() {
    run(async {
        let orch = Orchestrator::new();
        let ok = orch.spawn(SpawnOptions::new("ok"), |_| async { Ok::<(), String>(()) }).unwrap();
        let err = orch.spawn(SpawnOptions::new("err"), |_| async { Err::<(), _>("nope") }).unwrap();
        let panic = orch
            .spawn(SpawnOptions::new("panic"), |_| async {
                panic!("native boom") as Result<(), String>
            })
            .unwrap();
        assert_eq!(wait_end(&ok, Duration::from_secs(5)).await, State::Stopped);
        assert_eq!(wait_end(&err, Duration::from_secs(5)).await, State::Failed);
        assert_eq!(wait_end(&panic, Duration::from_secs(5)).await, State::Panicked);
        assert_eq!(last_error(&orch, "err"), "nope");
        assert_eq!(last_error(&orch, "panic"), "panicked: native boom");
        shutdown(&orch).await;
    })
}

#[test]
fn names_are_unique_and_validated() {
    run(async {
        let orch = Orchestrator::new();
        let h = orch
            .spawn(SpawnOptions::new("one"), |ctx| async move {
                ctx.cancelled().await;
                Ok::<(), String>(())
            })
            .unwrap();
        let dup = orch.spawn(SpawnOptions::new("one"), |_| async { Ok::<(), String>(()) });
        assert!(matches!(dup, Err(SpawnError::NameTaken(n)) if n == "one"));
        let bad = orch.spawn(SpawnOptions::new("has\u{7}bell"), |_| async { Ok::<(), String>(()) });
        assert!(matches!(bad, Err(SpawnError::InvalidName { .. })));
        assert_eq!(orch.get_by_name("one").unwrap().id(), h.id());
        assert_eq!(orch.list().len(), 1);
        shutdown(&orch).await;
        assert_eq!(h.state(), State::Stopped);
    })
}

#[test]
fn context_send_recv_and_counters() {
    run(async {
        let orch = Orchestrator::new();
        let sink = orch
            .spawn(SpawnOptions::new("sink").queue_capacity(4), |ctx| async move {
                let mut n = 0;
                while let Some(_m) = ctx.recv(Some(Duration::from_secs(5))).await? {
                    n += 1;
                    ctx.beat();
                    if n == 10 {
                        break;
                    }
                }
                Ok::<(), CallError>(())
            })
            .unwrap();
        let src = orch
            .spawn(SpawnOptions::new("src").message_bytes(8), |ctx| async move {
                assert_eq!(ctx.send("sink", vec![0; 9]).await, Err(CallError::TooLarge(8)));
                assert_eq!(
                    ctx.send("nobody", vec![1]).await,
                    Err(CallError::NoSuchRoutine("nobody".into()))
                );
                for i in 0..10u8 {
                    ctx.send("sink", vec![i]).await?;
                }
                ctx.publish("topic-a", b"x".to_vec()).await?;
                Ok::<(), CallError>(())
            })
            .unwrap();
        assert_eq!(wait_end(&src, Duration::from_secs(5)).await, State::Stopped);
        assert_eq!(wait_end(&sink, Duration::from_secs(5)).await, State::Stopped);
        assert_eq!(src.snapshot().messages_out, 11);
        assert_eq!(sink.snapshot().messages_in, 10);
        let topics = orch.topics();
        assert_eq!(topics.len(), 1);
        assert_eq!(
            (topics[0].name.as_str(), topics[0].published, topics[0].bytes),
            ("topic-a", 1, 1)
        );
        shutdown(&orch).await;
    })
}

#[test]
fn snapshots_use_the_design_field_names_and_print_stats_prints_a_table() {
    run(async {
        let orch = Orchestrator::new();
        let h = orch
            .spawn(
                SpawnOptions::new("worker").idle_timeout(Duration::from_secs(60)),
                |ctx| async move {
                    ctx.beat();
                    ctx.add_busy(Duration::from_millis(250));
                    ctx.cancelled().await;
                    Ok::<(), String>(())
                },
            )
            .unwrap();
        assert!(wait_until(Duration::from_secs(5), || h.snapshot().busy_seconds >= 0.25).await);
        let json = serde_json::to_value(orch.snapshots()).unwrap();
        let obj = json[0].as_object().unwrap();
        let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        keys.sort();
        let mut want = vec![
            "id",
            "name",
            "plugin",
            "state",
            "health",
            "restarts",
            "uptimeSeconds",
            "idleSeconds",
            "busySeconds",
            "fuelConsumed",
            "memoryBytes",
            "queueLen",
            "queueCap",
            "queueBytes",
            "messagesIn",
            "messagesOut",
            "lastError",
            "version",
            "upgrades",
        ];
        want.sort();
        assert_eq!(keys, want);
        assert_eq!(obj["state"], "RUNNING");
        assert_eq!(obj["health"], "OK");
        assert_eq!(h.health(), Health::Ok);

        let mut out = Vec::new();
        orch.print_stats(&mut out).unwrap();
        let table = String::from_utf8(out).unwrap();
        let mut lines = table.lines();
        assert!(lines.next().unwrap().contains("NAME"));
        assert!(lines.next().unwrap().contains("worker"));
        shutdown(&orch).await;
        let hist = orch.history();
        assert_eq!(hist.len(), 1);
        assert_eq!(hist[0].state, State::Stopped);
    })
}

#[test]
fn a_native_routine_that_ignores_cancellation_is_dropped_after_the_grace_period() {
    run(async {
        let orch = Orchestrator::new();
        let h = orch
            .spawn(SpawnOptions::new("stubborn").grace(Duration::from_millis(50)), |_| async {
                std::future::pending::<()>().await;
                Ok::<(), String>(())
            })
            .unwrap();
        h.stop();
        assert_eq!(wait_end(&h, Duration::from_secs(2)).await, State::Stopped);
        shutdown(&orch).await;
    })
}
