//! Wasm routines end to end: outcomes, traps, stopping, watchdog, accounting, limits,
//! sandbox, mailbox and bus, fairness. Every guest is a real component from
//! `examples/guests`.

use std::time::{Duration, Instant};

use gorch_host::{Health, Metering, Orchestrator, SpawnError, SpawnOptions, State, WasmOptions};

use crate::common::*;

#[test]
fn normal_return_is_stopped() {
    run(async {
        let orch = Orchestrator::new();
        let h = spawn_mode(&orch, SpawnOptions::new("ok"), "ok");
        assert_eq!(wait_end(&h, Duration::from_secs(10)).await, State::Stopped);
        assert_eq!(h.health(), Health::Ok);
        assert!(orch.get(h.id()).is_none(), "finished routines leave the registry");
        assert_eq!(orch.history().last().map(|s| s.name.clone()), Some("ok".into()));
        shutdown(&orch).await;
    })
}

#[test]
fn err_is_failed_with_the_message() {
    run(async {
        let orch = Orchestrator::new();
        let h = spawn_mode(&orch, SpawnOptions::new("err"), "err");
        assert_eq!(wait_end(&h, Duration::from_secs(10)).await, State::Failed);
        assert_eq!(h.health(), Health::Failed);
        assert_eq!(last_error(&orch, "err"), "testkit failed on purpose");
        shutdown(&orch).await;
    })
}

#[test]
fn traps_are_panicked_with_the_reason() {
    run(async {
        let orch = Orchestrator::new();
        let cases = [
            ("panic", "testkit panic: kaboom"),
            ("unreachable", "unreachable"),
            ("oob", "out of bounds memory access"),
            ("stack-overflow", "call stack exhausted"),
        ];
        let handles: Vec<_> =
            cases.iter().map(|(m, _)| spawn_mode(&orch, SpawnOptions::new(*m), m)).collect();
        for (h, (mode, want)) in handles.iter().zip(cases) {
            assert_eq!(wait_end(h, Duration::from_secs(10)).await, State::Panicked, "{mode}");
            assert_eq!(h.health(), Health::Panic);
            let err = last_error(&orch, mode);
            assert!(err.contains(want), "{mode}: {err:?} lacks {want:?}");
        }
        // The guest's panic message and location reach lastError.
        let err = last_error(&orch, "panic");
        assert!(err.contains("panicked at testkit/src/lib.rs"), "{err}");
        shutdown(&orch).await;
    })
}

#[test]
fn stopping_a_spinning_guest_waits_the_grace_period_then_kills_it() {
    run(async {
        let orch = Orchestrator::new();
        let grace = Duration::from_millis(200);
        let h = spawn_mode(&orch, SpawnOptions::new("spin").grace(grace), "spin");
        assert!(
            wait_until(Duration::from_secs(10), || h.snapshot().fuel_consumed.unwrap() > 0).await
        );
        let t = Instant::now();
        h.stop();
        assert_eq!(wait_end(&h, Duration::from_secs(5)).await, State::Stopped);
        let took = t.elapsed();
        // Causal only: the kill waits for the grace period (a lower bound no load can
        // break); that it came at all (a spinning guest never returns) is the epoch trap.
        assert!(took >= grace, "killed before the grace period: {took:?}");
        assert_eq!(last_error(&orch, "spin"), "killed");
        // The accounting of a killed instance: fuel is written back at least every
        // FUEL_YIELD_INTERVAL units, busy time comes from timing every poll.
        let s = h.snapshot();
        assert!(
            s.fuel_consumed.unwrap() > gorch_host::defaults::FUEL_YIELD_INTERVAL,
            "fuel {}",
            s.fuel_consumed.unwrap()
        );
        assert!(s.busy_seconds > 0.0, "busy {}", s.busy_seconds);
        shutdown(&orch).await;
    })
}

#[test]
fn a_guest_blocked_in_recv_is_woken_by_stop() {
    run(async {
        let orch = Orchestrator::new();
        let h = spawn_mode(&orch, SpawnOptions::new("recv").grace(Duration::from_secs(30)), "recv");
        assert!(wait_until(Duration::from_secs(10), || h.state() == State::Running).await);
        assert!(wait_until(Duration::from_secs(10), || h.mailbox().waiting_receivers() == 1).await);
        h.stop();
        // Woken by the stop, not killed after the grace period: recv returned `cancelled`.
        assert_eq!(wait_end(&h, Duration::from_secs(20)).await, State::Stopped);
        assert_eq!(last_error(&orch, "recv"), "recv: cancelled");
        shutdown(&orch).await;
    })
}

#[test]
fn a_guest_blocked_in_sleep_is_woken_by_stop() {
    run(async {
        let orch = Orchestrator::new();
        let opts = SpawnOptions::new("sleeper").grace(Duration::from_secs(30));
        let h = spawn_mode(&orch, opts, "sleep-forever");
        assert!(wait_until(Duration::from_secs(10), || h.state() == State::Running).await);
        h.stop();
        // Woken by the stop, not killed after the grace period: sleep returned false.
        assert_eq!(wait_end(&h, Duration::from_secs(20)).await, State::Stopped);
        assert_eq!(last_error(&orch, "sleeper"), "sleep returned false");
        shutdown(&orch).await;
    })
}

#[test]
fn idle_timeout_stops_blocked_and_spinning_guests_as_timed_out() {
    run(async {
        let orch = Orchestrator::new();
        let idle = Duration::from_millis(300);
        let opts =
            |n: &str| SpawnOptions::new(n).idle_timeout(idle).grace(Duration::from_millis(100));
        let blocked = spawn_mode(&orch, opts("hang"), "beat-then-hang");
        let spinning = spawn_mode(&orch, opts("spinner"), "spin");
        // Half the timeout without a beat: IDLE.
        assert!(wait_until(Duration::from_secs(10), || blocked.health() == Health::Idle).await);
        for h in [&blocked, &spinning] {
            assert_eq!(wait_end(h, Duration::from_secs(10)).await, State::TimedOut, "{}", h.name());
            assert_eq!(h.health(), Health::IdleTimeout);
            assert!(last_error(&orch, h.name()).starts_with("idle timeout"));
        }
        shutdown(&orch).await;
    })
}

#[test]
fn shutdown_is_bounded_with_stuck_guests() {
    run(async {
        let orch = Orchestrator::new();
        let long = SpawnOptions::new("x").grace(Duration::from_secs(60));
        for i in 0..4 {
            spawn_mode(&orch, SpawnOptions { name: format!("spin-{i}"), ..long.clone() }, "spin");
        }
        spawn_mode(&orch, SpawnOptions { name: "sleeper".into(), ..long.clone() }, "sleep-forever");
        let polite = spawn_mode(&orch, SpawnOptions::new("polite"), "recv");
        assert!(
            wait_until(Duration::from_secs(10), || orch
                .list()
                .iter()
                .all(|h| h.state() == State::Running))
            .await
        );

        let bound = Duration::from_millis(500);
        let t = Instant::now();
        let report = orch.shutdown(bound).await;
        let took = t.elapsed();
        // Causal: the bound, not the 60 s grace periods, ended it (how far past the bound
        // depends on the machine's load).
        assert!(took < Duration::from_secs(30), "shutdown took {took:?}");
        assert!(report.unstoppable.is_empty(), "{report:?}");
        assert_eq!(report.killed, vec!["spin-0", "spin-1", "spin-2", "spin-3"]);
        assert_eq!(report.stopped, 6);
        assert_eq!(polite.state(), State::Stopped);
        // Idempotent: the second call returns the same report at once.
        assert_eq!(orch.shutdown(bound).await, report);
        // Spawning afterwards is an error.
        let err = orch.spawn_wasm(SpawnOptions::new("late"), testkit(), WasmOptions::default());
        assert!(matches!(err, Err(SpawnError::ShutDown)));
    })
}

#[test]
fn compute_shows_more_fuel_and_busy_time_than_idle() {
    run(async {
        let orch = Orchestrator::new();
        let compute = spawn_mode_with(
            &orch,
            SpawnOptions::new("compute"),
            "compute",
            WasmOptions::default().env("ITERS", "30000000"),
        );
        let idle = spawn_mode(&orch, SpawnOptions::new("idle"), "idle");
        wait_end(&compute, Duration::from_secs(30)).await;
        wait_end(&idle, Duration::from_secs(30)).await;
        let (c, i) = (compute.snapshot(), idle.snapshot());
        assert!(c.fuel_consumed.unwrap() > 100 * i.fuel_consumed.unwrap().max(1), "{c:?} vs {i:?}");
        assert!(c.fuel_consumed.unwrap() > 30_000_000);
        // Busy time is wall time in polls (a loaded machine stretches either run), so only
        // fuel compares the work; both runs were timed.
        assert!(c.busy_seconds > 0.0 && i.busy_seconds > 0.0, "{c:?} vs {i:?}");
        shutdown(&orch).await;
    })
}

#[test]
fn add_busy_adds_to_busy_time() {
    run(async {
        let orch = Orchestrator::new();
        let h = spawn_mode_with(
            &orch,
            SpawnOptions::new("busy"),
            "add-busy",
            WasmOptions::default().env("MILLIS", "1500"),
        );
        wait_end(&h, Duration::from_secs(10)).await;
        let busy = h.snapshot().busy_seconds;
        assert!((1.5..2.5).contains(&busy), "busy {busy}");
        shutdown(&orch).await;
    })
}

#[test]
fn a_trapped_instance_keeps_its_fuel() {
    run(async {
        let orch = Orchestrator::new();
        // Computes 2 M rounds, then hits `unreachable`.
        let h = spawn_mode(&orch, SpawnOptions::new("trap"), "unreachable");
        assert_eq!(wait_end(&h, Duration::from_secs(10)).await, State::Panicked);
        assert!(h.snapshot().fuel_consumed.unwrap() > 2_000_000, "{:?}", h.snapshot());
        shutdown(&orch).await;
    })
}

#[test]
fn the_memory_limit_traps() {
    run(async {
        let orch = Orchestrator::new();
        let h = spawn_mode_with(
            &orch,
            SpawnOptions::new("memhog"),
            "memhog",
            WasmOptions::default().memory(16 << 20),
        );
        assert_eq!(wait_end(&h, Duration::from_secs(10)).await, State::Panicked);
        let err = last_error(&orch, "memhog");
        assert!(err.contains("memory allocation of"), "{err}");
        shutdown(&orch).await;
    })
}

#[test]
fn the_fuel_limit_traps() {
    run(async {
        let orch = Orchestrator::new();
        let h = spawn_mode_with(
            &orch,
            SpawnOptions::new("fuel"),
            "compute",
            WasmOptions::default().fuel(5_000_000).env("ITERS", "100000000"),
        );
        assert_eq!(wait_end(&h, Duration::from_secs(10)).await, State::Panicked);
        assert!(last_error(&orch, "fuel").contains("fuel"), "{}", last_error(&orch, "fuel"));
        assert_eq!(h.snapshot().fuel_consumed, Some(5_000_000));
        shutdown(&orch).await;
    })
}

#[test]
fn the_sandbox_denies_files_env_and_sockets() {
    run(async {
        let orch = Orchestrator::new();
        let h = spawn_mode(&orch, SpawnOptions::new("sandbox"), "sandbox");
        let state = wait_end(&h, Duration::from_secs(10)).await;
        assert_eq!(state, State::Stopped, "{}", last_error(&orch, "sandbox"));
        shutdown(&orch).await;
    })
}

#[test]
fn identity_and_mailbox_reach_a_native_routine() {
    run(async {
        let orch = Orchestrator::new();
        let (tx, rx) = tokio::sync::oneshot::channel::<Vec<u8>>();
        let tx = std::sync::Mutex::new(Some(tx));
        let observer = orch
            .spawn(SpawnOptions::new("observer"), move |ctx| {
                let tx = tx.lock().unwrap().take();
                async move {
                    let msg = ctx.recv(None).await?.unwrap_or_default();
                    if let Some(tx) = tx {
                        let _ = tx.send(msg);
                    }
                    Ok::<(), gorch_host::CallError>(())
                }
            })
            .unwrap();
        let guest = spawn_mode(&orch, SpawnOptions::new("ident"), "identity");
        let msg = tokio::time::timeout(Duration::from_secs(10), rx).await.unwrap().unwrap();
        assert_eq!(String::from_utf8(msg).unwrap(), format!("{}|ident", guest.id()));
        assert_eq!(wait_end(&guest, Duration::from_secs(5)).await, State::Stopped);
        assert_eq!(wait_end(&observer, Duration::from_secs(5)).await, State::Stopped);
        assert_eq!(guest.snapshot().messages_out, 1);
        assert_eq!(observer.snapshot().messages_in, 1);
        shutdown(&orch).await;
    })
}

#[test]
fn mailbox_to_bus_round_trip_through_a_guest() {
    run(async {
        let orch = Orchestrator::new();
        let echo = spawn_mode(&orch, SpawnOptions::new("echo"), "echo");
        let relay = spawn_mode(&orch, SpawnOptions::new("relay"), "bus-relay");
        let out = orch.bus().topic("testkit-out", 64).unwrap();
        let inp = orch.bus().topic("testkit-in", 64).unwrap();
        for i in 0..10u8 {
            echo.mailbox().send(vec![i].into()).await.unwrap();
            inp.send(vec![100 + i].into()).await.unwrap();
        }
        let mut got = Vec::new();
        for _ in 0..20 {
            let m =
                tokio::time::timeout(Duration::from_secs(10), out.recv()).await.unwrap().unwrap();
            got.push(m.payload[0]);
        }
        got.sort();
        let want: Vec<u8> = (0..10).chain(100..110).collect();
        assert_eq!(got, want);
        // The sender counts a message once its publish returns: poll, do not race it.
        let counted = || echo.snapshot().messages_in == 10 && relay.snapshot().messages_out == 10;
        assert!(wait_until(Duration::from_secs(5), counted).await, "{:?}", relay.snapshot());
        shutdown(&orch).await;
        // Both were woken from their blocking recv by the shutdown.
        assert_eq!(echo.state(), State::Stopped);
        assert_eq!(relay.state(), State::Stopped);
    })
}

#[test]
fn a_plain_wasi_command_runs_as_a_worker() {
    run(async {
        let orch = Orchestrator::new();
        let cmd = engine().load_file(gorch_artifacts::path("hello-command")).unwrap();
        assert!(cmd.is_command());
        let ok = orch.spawn_wasm(SpawnOptions::new("hello"), &cmd, WasmOptions::default()).unwrap();
        let fail_opts =
            WasmOptions { args: vec!["hello".into(), "--fail".into()], ..Default::default() };
        let fail = orch.spawn_wasm(SpawnOptions::new("hello-fail"), &cmd, fail_opts).unwrap();
        assert_eq!(wait_end(&ok, Duration::from_secs(10)).await, State::Stopped);
        assert_eq!(wait_end(&fail, Duration::from_secs(10)).await, State::Failed);
        // WASI 0.2's `exit` carries only ok or err: any non-zero status arrives as 1.
        assert_eq!(last_error(&orch, "hello-fail"), "exited with status 1");
        shutdown(&orch).await;
    })
}

#[test]
fn loading_rejects_what_is_not_a_worker_component() {
    let e = engine();
    let err = e.load_bytes("junk.wasm", b"not wasm at all").unwrap_err().to_string();
    assert_eq!(err, "junk.wasm: not a WebAssembly file (bad magic number)");
    let core = b"\0asm\x01\0\0\0";
    let err = e.load_bytes("core.wasm", core).unwrap_err().to_string();
    assert!(err.starts_with("core.wasm: is a core wasm module, not a component"), "{err}");
    // A component that exports nothing of ours.
    let empty_component = b"\0asm\x0d\0\x01\0";
    let err = e.load_bytes("empty.wasm", empty_component).unwrap_err().to_string();
    assert!(err.contains("exports neither `run`"), "{err}");
    let err = e.load_file("/nonexistent/x.wasm").unwrap_err().to_string();
    assert!(err.starts_with("/nonexistent/x.wasm: "), "{err}");
}

/// Timers must fire while guests spin on every worker thread (epoch slices plus the
/// runtime's event interval). How late is load-dependent: BENCHMARKS.md has the figure.
#[test]
fn timers_fire_on_time_under_spinning_guests() {
    run(async {
        let orch = Orchestrator::new();
        for i in 0..4 {
            spawn_mode(&orch, SpawnOptions::new(format!("spin-{i}")), "spin");
        }
        assert!(
            wait_until(Duration::from_secs(10), || orch
                .snapshots()
                .iter()
                .all(|s| s.fuel_consumed.unwrap() > 0))
            .await
        );
        // Causal: without epoch slices the spinning guests would hold every worker thread
        // and no timer would fire; how late they fire depends on the machine's load.
        let timers = async {
            for _ in 0..50 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        let fired = tokio::time::timeout(Duration::from_secs(30), timers).await;
        assert!(fired.is_ok(), "timers starved by spinning guests");
        shutdown(&orch).await;
    })
}

#[test]
fn time_metering_runs_without_fuel_and_a_stop_kills_its_spin_loop() {
    run(async {
        let orch = Orchestrator::new();
        let time = WasmOptions::default().metering(Metering::Time);
        assert_eq!(testkit_time().metering(), Metering::Time);
        // A run that returns: computes, ends Stopped, counts no fuel.
        let compute = orch
            .spawn_wasm(
                SpawnOptions::new("time-compute"),
                testkit_time(),
                time.clone().env("MODE", "compute").env("ITERS", "1000000"),
            )
            .unwrap();
        assert_eq!(compute.snapshot().fuel_consumed, None, "absent from the spawn on");
        assert_eq!(wait_end(&compute, Duration::from_secs(10)).await, State::Stopped);

        // A guest in `loop {}`: time-sliced (timed polls give busy time), then killed by
        // the epoch callback once the grace period of a stop is over.
        let grace = Duration::from_millis(100);
        let spin = orch
            .spawn_wasm(
                SpawnOptions::new("time-spin").grace(grace),
                testkit_time(),
                time.env("MODE", "spin"),
            )
            .unwrap();
        assert!(
            wait_until(Duration::from_secs(10), || spin.snapshot().busy_seconds > 0.0).await,
            "{:?}",
            spin.snapshot()
        );
        let json = serde_json::to_value(spin.snapshot()).unwrap();
        assert_eq!(json["fuelConsumed"], serde_json::Value::Null, "{json}");
        let mut text = String::new();
        gorch_host::obs::write_text(&orch, &mut text);
        assert!(!text.contains(r#"gorch_routine_fuel_consumed_total{name="time-spin"}"#));
        assert!(text.contains(r#"gorch_routine_busy_seconds_total{name="time-spin"}"#));
        spin.stop();
        assert_eq!(wait_end(&spin, Duration::from_secs(10)).await, State::Stopped);
        assert_eq!(last_error(&orch, "time-spin"), "killed");
        let s = spin.snapshot();
        assert!(s.busy_seconds > 0.0, "busy {}", s.busy_seconds);
        assert_eq!(s.fuel_consumed, None);
        let mut table = Vec::new();
        gorch_host::write_stats_table(&mut table, &[s]).unwrap();
        let table = String::from_utf8(table).unwrap();
        let row = table.lines().nth(1).unwrap();
        assert!(row.split_whitespace().any(|c| c == "-"), "{table}");
        shutdown(&orch).await;
    })
}

#[test]
fn metering_must_match_the_component_and_time_takes_no_fuel_limit() {
    run(async {
        let orch = Orchestrator::new();
        // The default stays fuel: options, component, snapshot.
        assert_eq!(WasmOptions::default().metering, Metering::Fuel);
        assert_eq!(testkit().metering(), Metering::Fuel);
        let h = spawn_mode_with(
            &orch,
            SpawnOptions::new("fuel-default"),
            "compute",
            WasmOptions::default().env("ITERS", "1000000"),
        );
        assert_eq!(wait_end(&h, Duration::from_secs(10)).await, State::Stopped);
        assert!(h.snapshot().fuel_consumed.is_some_and(|f| f > 1_000_000), "{:?}", h.snapshot());

        let time = WasmOptions::default().metering(Metering::Time);
        let refused = |r: Result<gorch_host::RoutineHandle, SpawnError>| match r {
            Err(SpawnError::Options(why)) => why.to_string(),
            other => panic!("not refused: {other:?}"),
        };
        let why = refused(orch.spawn_wasm(SpawnOptions::new("a"), testkit(), time.clone()));
        assert!(why.contains("loaded for fuel metering") && why.contains("time"), "{why}");
        let why = refused(orch.spawn_wasm(
            SpawnOptions::new("b"),
            testkit_time(),
            WasmOptions::default(),
        ));
        assert!(why.contains("loaded for time metering"), "{why}");
        let why = refused(orch.spawn_wasm(SpawnOptions::new("c"), testkit_time(), time.fuel(10)));
        assert!(why.contains("fuel limit") && why.contains("time"), "{why}");
        assert!(orch.get_by_name("a").is_none() && orch.get_by_name("c").is_none());
        shutdown(&orch).await;
    })
}
