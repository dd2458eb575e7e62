//! Messaging from real guests: every WIT error variant, competing consumers, flooding, and
//! channel statistics against a model under concurrency.

use std::time::Duration;

use gorch_host::{
    Bus, CallError, Channel, Message, Orchestrator, SpawnOptions, State, WasmOptions,
};
use proptest::prelude::*;

use crate::common::*;

#[test]
fn each_wit_error_variant_reaches_a_guest() {
    run(async {
        let orch = Orchestrator::with_bus(Bus::with_max_topics(5));
        let opts = SpawnOptions::new("errs").message_bytes(1024);
        let h = spawn_mode_with(&orch, opts, "errors", WasmOptions::default().env("BIG", "2048"));
        // The guest blocks on `doomed` once the other checks are done; removing the topic
        // closes it under the guest.
        assert!(wait_until(Duration::from_secs(10), || doomed_is_waited_on(&orch)).await);
        assert!(orch.bus().remove("doomed"));
        assert_eq!(wait_end(&h, Duration::from_secs(10)).await, State::Failed);
        // "flood-0".."flood-4" fill the limit of 5 topics ("t" was refused before it was
        // created, the bad names too, and "doomed" is gone).
        assert_eq!(
            last_error(&orch, "errs"),
            "no-such-routine(nobody) too-large(1024) invalid-name() invalid-name(has space) closed limit@5"
        );
        // And `cancelled`: a blocked recv woken by stop.
        let r = spawn_mode(&orch, SpawnOptions::new("recv"), "recv");
        assert!(wait_until(Duration::from_secs(10), || r.state() == State::Running).await);
        assert!(wait_until(Duration::from_secs(10), || r.mailbox().waiting_receivers() == 1).await);
        r.stop();
        r.wait().await;
        assert_eq!(last_error(&orch, "recv"), "recv: cancelled");
        shutdown(&orch).await;
    })
}

/// The `errors` guest waits in its receive on topic `doomed` (it created the topic with
/// that receive): removing the topic now closes it under the guest.
fn doomed_is_waited_on(orch: &Orchestrator) -> bool {
    orch.bus().get("doomed").is_some_and(|t| t.waiting_receivers() >= 1)
}

#[test]
fn competing_consumers_share_a_topic_without_duplicates() {
    run(async {
        let orch = Orchestrator::new();
        let a = spawn_mode(&orch, SpawnOptions::new("relay-a"), "bus-relay");
        let b = spawn_mode(&orch, SpawnOptions::new("relay-b"), "bus-relay");
        let input = orch.bus().topic("testkit-in", 64).unwrap();
        let out = orch.bus().topic("testkit-out", 4096).unwrap();
        let n = 2000u32;
        for i in 0..n {
            input.send(i.to_le_bytes().to_vec().into()).await.unwrap();
        }
        let mut got = Vec::new();
        while got.len() < n as usize {
            let m =
                tokio::time::timeout(Duration::from_secs(10), out.recv()).await.unwrap().unwrap();
            got.push(u32::from_le_bytes(m.payload.try_into().unwrap()));
        }
        got.sort();
        assert_eq!(got, (0..n).collect::<Vec<_>>(), "a message was lost or duplicated");
        let (ra, rb) = (a.snapshot().messages_in, b.snapshot().messages_in);
        assert!(ra > 0 && rb > 0, "both consumers received: {ra} + {rb}");
        shutdown(&orch).await;
    })
}

#[test]
fn a_flooding_guest_gets_errors_and_the_host_stays_small() {
    run(async {
        let orch = Orchestrator::new();
        let errs = spawn_mode(&orch, SpawnOptions::new("errs"), "errors");
        let huge = spawn_mode_with(
            &orch,
            SpawnOptions::new("huge"),
            "huge",
            WasmOptions::default().memory(256 << 20),
        );
        // Nobody reads `flood`: the publisher blocks at the topic's capacity.
        let flood = spawn_mode_with(
            &orch,
            SpawnOptions::new("flood"),
            "flood",
            WasmOptions::default().env("COUNT", "100000").env("SIZE", "1024"),
        );
        assert_eq!(wait_end(&huge, Duration::from_secs(20)).await, State::Failed);
        assert_eq!(last_error(&orch, "huge"), "payload too large (limit 1048576 bytes)");
        assert!(wait_until(Duration::from_secs(20), || doomed_is_waited_on(&orch)).await);
        orch.bus().remove("doomed");
        assert_eq!(wait_end(&errs, Duration::from_secs(20)).await, State::Failed);
        assert!(last_error(&orch, "errs").contains(" limit@"), "{}", last_error(&orch, "errs"));
        assert_eq!(orch.bus().len(), gorch_host::defaults::DEFAULT_MAX_TOPICS);
        let t = orch.bus().topic("flood", 1).unwrap();
        assert!(
            wait_until(Duration::from_secs(10), || t.len()
                == gorch_host::defaults::DEFAULT_TOPIC_CAPACITY)
            .await
        );
        assert_eq!(flood.state(), State::Running, "blocked in publish, not failed");
        // Bounded: what the host holds for the flood is one topic's capacity of 1 KiB
        // messages, and it stays there while the guest keeps trying.
        let held = || orch.topics().iter().map(|t| t.bytes).sum::<usize>();
        assert!(
            held() <= gorch_host::defaults::DEFAULT_TOPIC_CAPACITY * 1024 + 2 * 1024 * 1024,
            "{}",
            held()
        );
        let published = t.stats().sends;
        let waits = wait_until(Duration::from_secs(10), || t.waiting_senders() == 1).await;
        assert!(waits, "the publisher is not waiting in its send: {:?}", t.stats());
        assert_eq!(t.stats().sends, published, "the publisher waits instead of queueing more");
        shutdown(&orch).await;
    })
}

#[derive(Debug, Clone)]
enum Op {
    TrySend(u8),
    TryRecv,
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Random sequences of operations against a VecDeque model: stats stay exact.
    #[test]
    fn channel_stats_match_a_model(cap in 1usize..8, ops in proptest::collection::vec(
        prop_oneof![any::<u8>().prop_map(Op::TrySend), Just(Op::TryRecv)], 0..200)) {
        let ch: Channel<Vec<u8>> = Channel::new(cap);
        let mut model = std::collections::VecDeque::new();
        let (mut sends, mut recvs) = (0u64, 0u64);
        for op in ops {
            match op {
                Op::TrySend(n) => {
                    let r = ch.try_send(vec![0; n as usize]);
                    if model.len() < cap {
                        prop_assert!(r.is_ok());
                        model.push_back(n as usize);
                        sends += 1;
                    } else {
                        prop_assert!(r.is_err());
                    }
                }
                Op::TryRecv => {
                    let r = ch.try_recv();
                    match model.pop_front() {
                        Some(n) => { prop_assert_eq!(r.unwrap().len(), n); recvs += 1; }
                        None => prop_assert!(r.is_err()),
                    }
                }
            }
            let s = ch.stats();
            prop_assert_eq!(s.len, model.len());
            prop_assert_eq!(s.approx_bytes, model.iter().sum::<usize>());
            prop_assert_eq!((s.sends, s.recvs), (sends, recvs));
            prop_assert_eq!((s.blocked_send_ns, s.blocked_recv_ns), (0, 0), "no waiting happened");
        }
    }
}

/// Many producers and consumers at once: every value arrives exactly once and the counters
/// add up.
#[test]
fn stats_stay_exact_under_concurrency() {
    run(async {
        let ch: Channel<Vec<u8>> = Channel::new(8);
        let mut tasks = Vec::new();
        for p in 0..4u32 {
            let ch = ch.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..2500u32 {
                    ch.send((p * 10_000 + i).to_le_bytes().to_vec()).await.unwrap();
                }
                Vec::new()
            }));
        }
        for _ in 0..4 {
            let ch = ch.clone();
            tasks.push(tokio::spawn(async move {
                let mut got = Vec::new();
                for _ in 0..2500 {
                    got.push(u32::from_le_bytes(ch.recv().await.unwrap().try_into().unwrap()));
                }
                got
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all.sort();
        let want: Vec<u32> = (0..4).flat_map(|p| (0..2500).map(move |i| p * 10_000 + i)).collect();
        assert_eq!(all, want);
        let s = ch.stats();
        assert_eq!((s.sends, s.recvs, s.len, s.approx_bytes), (10_000, 10_000, 0, 0));
    })
}

#[test]
fn cancellation_wakes_every_blocked_operation() {
    run(async {
        let ch: Channel<Vec<u8>> = Channel::new(1);
        let empty: Channel<Vec<u8>> = Channel::new(1);
        ch.try_send(vec![1]).unwrap();
        let token = tokio_util::sync::CancellationToken::new();
        let mut tasks = Vec::new();
        for _ in 0..5 {
            let (c, t) = (ch.clone(), token.clone());
            tasks.push(tokio::spawn(async move { c.send_cancellable(vec![2], &t).await.is_err() }));
            let (c, t) = (empty.clone(), token.clone());
            tasks.push(tokio::spawn(async move { c.recv_cancellable(&t).await.is_err() }));
        }
        // Every one of them is blocked before the cancellation.
        let blocked = wait_until(Duration::from_secs(10), || {
            ch.waiting_senders() == 5 && empty.waiting_receivers() == 5
        })
        .await;
        assert!(
            blocked,
            "{} senders, {} receivers",
            ch.waiting_senders(),
            empty.waiting_receivers()
        );
        token.cancel();
        for t in tasks {
            assert!(tokio::time::timeout(Duration::from_secs(10), t).await.unwrap().unwrap());
        }
    })
}

/// Receives `n` payloads from `out` as strings, failing the test after a generous bound.
async fn collect(out: &Channel<gorch_host::Message>, n: usize) -> Vec<String> {
    let mut got = Vec::new();
    while got.len() < n {
        let m = tokio::time::timeout(Duration::from_secs(20), out.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} messages arrived: {got:?}", got.len()))
            .unwrap();
        got.push(String::from_utf8(m.payload).unwrap());
    }
    got
}

/// `mailbox.recv-batch` through the SDK's `mailbox::batched`: every message once, in order,
/// and the iterator ends (a clean return) when the routine is stopped.
#[test]
fn a_guest_receives_its_mailbox_in_batches() {
    run(async {
        let orch = Orchestrator::new();
        let out = orch.bus().topic("testkit-out", 1000).unwrap();
        let opts = SpawnOptions::new("batcher").queue_capacity(1000);
        let h = spawn_mode_with(&orch, opts, "batch-echo", WasmOptions::default().env("MAX", "7"));
        let want: Vec<String> = (0..500).map(|i| format!("m{i}")).collect();
        for m in &want {
            h.mailbox().send(m.as_str().into()).await.unwrap();
        }
        assert_eq!(collect(&out, want.len()).await, want);
        assert_eq!(h.snapshot().messages_in, 500);
        h.stop();
        assert_eq!(wait_end(&h, Duration::from_secs(10)).await, State::Stopped);
        assert_eq!(last_error(&orch, "batcher"), "");
        shutdown(&orch).await;
    })
}

/// Topic `batch-in` holding "a", "b", "poison", "c", the `testkit-out` topic, and the
/// options of a `batch-trap` guest reading `batch-in` in batches of up to 16.
async fn poisoned_batch(orch: &Orchestrator) -> (Channel<Message>, Channel<Message>, WasmOptions) {
    let input = orch.bus().topic("batch-in", 64).unwrap();
    let out = orch.bus().topic("testkit-out", 64).unwrap();
    for m in ["a", "b", "poison", "c"] {
        input.send(m.into()).await.unwrap();
    }
    (input, out, WasmOptions::default().env("SOURCE", "batch-in").env("MAX", "16"))
}

/// `bus.recv-batch` takes what is queued in one call, and a guest that traps in the middle
/// of a batch gets the whole batch again, in order, after its restart (at-least-once: the
/// batch was not acknowledged), one message at a time (the host cannot tell which one
/// crashed it); the message after the batch comes once, after it, in a batch again.
#[test]
fn a_guest_that_traps_mid_batch_gets_the_whole_batch_again() {
    run(async {
        let orch = Orchestrator::new();
        let (input, out, wasm) = poisoned_batch(&orch).await;
        let opts = SpawnOptions::new("trapper").supervision(restart_at_once(5));
        let h = spawn_mode_with(&orch, opts, "batch-trap", wasm);
        let first = collect(&out, 2).await;
        assert_eq!(first, ["r0 n4 a", "r0 n4 b"]);
        let again = collect(&out, 4).await;
        assert_eq!(again, ["r1 n1 a", "r1 n1 b", "r1 n1 poison", "r1 n1 c"]);
        // Both queued under one lock, so that they are there for one batch.
        let mut de = std::collections::VecDeque::from([Message::from("d"), Message::from("e")]);
        input.send_many_cancellable(&mut de, &Default::default()).await.unwrap();
        assert_eq!(collect(&out, 2).await, ["r1 n2 d", "r1 n2 e"]);
        assert_eq!(h.restarts(), 1);
        assert!(input.is_empty(), "nothing left behind");
        h.stop();
        assert_eq!(wait_end(&h, Duration::from_secs(10)).await, State::Stopped);
        shutdown(&orch).await;
    })
}

/// A message that crashes its receiver every time, in the middle of a batch, is found and
/// dead-lettered alone: the batch's other messages are processed, none is dead-lettered with
/// it, and a batch crash counts no delivery (with `max-deliveries = 1` the poison goes to
/// `dead-letter` after its first delivery alone).
#[test]
fn a_poison_message_in_a_batch_is_dead_lettered_alone() {
    run(async {
        let orch = Orchestrator::new();
        let (input, out, wasm) = poisoned_batch(&orch).await;
        let letters = orch.bus().topic(gorch_host::DEAD_LETTER_TOPIC, 64).unwrap();
        let opts = SpawnOptions::new("poisoned").supervision(restart_at_once(1));
        let h = spawn_mode_with(&orch, opts, "batch-trap", wasm.env("POISON", "always"));
        assert_eq!(collect(&out, 2).await, ["r0 n4 a", "r0 n4 b"]);
        assert_eq!(collect(&out, 3).await, ["r1 n1 a", "r1 n1 b", "r2 n1 c"]);
        let letter = letters.recv_timeout(Duration::from_secs(10)).await.unwrap();
        let letter: serde_json::Value = serde_json::from_slice(&letter.payload).unwrap();
        assert_eq!(letter["payload"], serde_json::json!(b"poison".to_vec()), "{letter}");
        assert_eq!(letter["deliveries"], 1, "{letter}");
        assert!(letters.is_empty(), "only the poison is a dead letter");
        assert_eq!(h.restarts(), 2);
        assert!(input.is_empty(), "nothing left behind");
        h.stop();
        assert_eq!(wait_end(&h, Duration::from_secs(10)).await, State::Stopped);
        shutdown(&orch).await;
    })
}

/// `bus.publish-batch` from one guest and `bus.recv-batch` in another carry every message
/// (more than the topic's capacity, so both sides wait on the other).
#[test]
fn batches_flow_from_guest_to_guest() {
    run(async {
        let orch = Orchestrator::new();
        orch.bus().topic("batches", 16).unwrap();
        let env = |mode: &str, batch: &str| {
            WasmOptions::default()
                .env("TOPIC", "batches")
                .env("COUNT", "5000")
                .env("BATCH", batch)
                .env("MODE", mode)
        };
        let rx =
            orch.spawn_wasm(SpawnOptions::new("drain"), testkit(), env("drain", "10")).unwrap();
        let tx = orch.spawn_wasm(SpawnOptions::new("flood"), testkit(), env("flood", "7")).unwrap();
        assert_eq!(wait_end(&tx, Duration::from_secs(30)).await, State::Stopped);
        assert_eq!(wait_end(&rx, Duration::from_secs(30)).await, State::Stopped);
        let topic = orch.bus().topics().into_iter().find(|t| t.name == "batches").unwrap();
        assert_eq!((topic.published, topic.received, topic.len), (5000, 5000, 0));
        shutdown(&orch).await;
    })
}

/// `publish_batch` checks every size first: one payload over the limit publishes nothing.
/// A batch receive that times out is an empty batch, not an error.
#[test]
fn a_batch_with_one_payload_too_large_publishes_nothing() {
    run(async {
        let orch = Orchestrator::new();
        let topic = orch.bus().topic("pb", 16).unwrap();
        let opts = SpawnOptions::new("publisher").message_bytes(8);
        let h = orch
            .spawn(opts, |ctx| async move {
                let mixed = vec![b"ok".to_vec(), vec![0; 9], b"ok".to_vec()];
                if ctx.publish_batch("pb", mixed).await != Err(CallError::TooLarge(8)) {
                    return Err("a too-large payload was not refused".to_string());
                }
                ctx.publish_batch("pb", vec![b"a".to_vec(), b"b".to_vec()])
                    .await
                    .map_err(|e| e.to_string())?;
                let timed_out = ctx.recv_batch(4, Some(Duration::from_millis(1))).await;
                if timed_out != Ok(Vec::new()) {
                    return Err(format!("expected an empty batch, got {timed_out:?}"));
                }
                Ok(())
            })
            .unwrap();
        assert_eq!(wait_end(&h, Duration::from_secs(10)).await, State::Stopped);
        assert_eq!(last_error(&orch, "publisher"), "");
        let got: Vec<Vec<u8>> =
            std::iter::from_fn(|| topic.try_recv().ok().map(|m| m.payload)).collect();
        assert_eq!(got, [b"a".to_vec(), b"b".to_vec()]);
        shutdown(&orch).await;
    })
}

/// `mailbox.send-batch` from a guest delivers every message once, in order, through a
/// mailbox smaller than a batch (the sender waits for room); a batch with one payload over
/// the limit sends nothing; a name nobody runs is `no-such-routine`.
#[test]
fn send_batch_delivers_in_order_and_checks_sizes_first() {
    run(async {
        let orch = Orchestrator::new();
        let got = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
        let g = got.clone();
        let sink = orch
            .spawn(SpawnOptions::new("sink").queue_capacity(4), move |ctx| {
                let g = g.clone();
                async move {
                    while let Some(m) = ctx.recv(None).await? {
                        g.lock().push(u64::from_le_bytes(m[..8].try_into().unwrap()));
                    }
                    Ok::<(), CallError>(())
                }
            })
            .unwrap();
        let wasm = WasmOptions::default().env("TO", "sink").env("COUNT", "500").env("BATCH", "7");
        let flood = spawn_mode_with(&orch, SpawnOptions::new("flood"), "flood", wasm);
        assert_eq!(wait_end(&flood, Duration::from_secs(30)).await, State::Stopped);
        assert!(wait_until(Duration::from_secs(10), || got.lock().len() == 500).await);
        assert_eq!(*got.lock(), (0..500).collect::<Vec<u64>>());
        let opts = SpawnOptions::new("checks").message_bytes(8);
        let h = orch
            .spawn(opts, |ctx| async move {
                let mixed = vec![vec![9; 8], vec![0; 9]];
                if ctx.send_batch("sink", mixed).await != Err(CallError::TooLarge(8)) {
                    return Err("a too-large payload was not refused".to_string());
                }
                let r = ctx.send_batch("nowhere", vec![vec![0; 8]]).await;
                if r != Err(CallError::NoSuchRoutine("nowhere".into())) {
                    return Err(format!("expected no-such-routine, got {r:?}"));
                }
                Ok(())
            })
            .unwrap();
        assert_eq!(wait_end(&h, Duration::from_secs(10)).await, State::Stopped);
        assert_eq!(last_error(&orch, "checks"), "");
        assert_eq!(got.lock().len(), 500, "nothing of the refused batch arrived");
        sink.stop();
        shutdown(&orch).await;
    })
}

/// Issue 25, finding 10: a routine asked to stop that ignores it and receives again was
/// still handed queued messages during its grace period. Now every receive answers
/// `cancelled` at once, and the queue keeps its messages for the next run.
#[test]
fn a_routine_asked_to_stop_takes_nothing_more() {
    run(async {
        let orch = Orchestrator::new();
        let after_stop = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
        let seen = after_stop.clone();
        let h = orch
            .spawn(SpawnOptions::new("stubborn"), move |ctx| {
                let seen = seen.clone();
                async move {
                    ctx.recv(None).await?;
                    ctx.cancelled().await;
                    // Ignores the request and asks for more, as a careless guest would.
                    for _ in 0..3 {
                        let r = ctx.recv(Some(Duration::from_millis(10))).await;
                        seen.lock().push(r.map(|m| m.map(|_| ())));
                    }
                    Ok::<(), CallError>(())
                }
            })
            .unwrap();
        for i in 0..7 {
            h.mailbox().send(Message::new(format!("m{i}").into_bytes())).await.unwrap();
        }
        assert!(wait_until(Duration::from_secs(10), || h.mailbox().len() == 6).await);
        h.stop();
        assert_eq!(wait_end(&h, Duration::from_secs(10)).await, State::Stopped);
        assert_eq!(*after_stop.lock(), vec![Err(CallError::Cancelled); 3]);
        assert_eq!(h.mailbox().len(), 6, "queued messages left the queue after the stop");
        shutdown(&orch).await;
    })
}
