//! The cluster under faults, with real `nats-server` processes: a node restarted at once,
//! NATS gone at shutdown. Each case is bounded in time (deadlines, never sleeps that hope).

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use gorch_host::{CallError, Orchestrator, SpawnOptions, State};
use parking_lot::Mutex;

use crate::common::host::{read_until, run_host};
use crate::common::http::get;
use crate::common::nats::{Nats, leave, node};
use crate::common::{run, wait_end, wait_until, wait_until_blocking};

/// Publishes `prefix0..prefix{n-1}` on `topic` and returns once all were stored.
async fn publish_all(orch: &Orchestrator, topic: &'static str, prefix: &'static str, n: usize) {
    let h = orch
        .spawn(SpawnOptions::new(format!("publisher-{prefix}")), move |ctx| async move {
            for i in 0..n {
                ctx.publish(topic, format!("{prefix}{i}").into_bytes()).await?;
            }
            Ok::<(), CallError>(())
        })
        .unwrap();
    assert_eq!(wait_end(&h, Duration::from_secs(30)).await, State::Stopped);
}

/// What a collector routine has taken.
type Seen = Arc<Mutex<BTreeSet<String>>>;

/// A routine `name` that takes every message of `topic` into the returned set.
fn collector(orch: &Orchestrator, name: &str, topic: &'static str) -> Seen {
    let seen: Seen = Default::default();
    let s = seen.clone();
    orch.spawn(SpawnOptions::new(name), move |ctx| {
        let s = s.clone();
        async move {
            loop {
                match ctx.bus_recv(topic, Some(Duration::from_millis(200))).await {
                    Ok(Some(m)) => {
                        s.lock().insert(String::from_utf8_lossy(&m).into_owned());
                    }
                    Ok(None) => {}
                    Err(CallError::Cancelled) => return Ok(()),
                    Err(e) => return Err(e),
                }
            }
        }
    })
    .unwrap();
    seen
}

/// What a routine has taken, with how many copies of each.
type Copies = Arc<Mutex<BTreeMap<String, usize>>>;

/// A routine `name` that counts every copy it takes from `topic` (`None`: its mailbox).
fn tally(orch: &Orchestrator, name: &str, topic: Option<&'static str>) -> Copies {
    let got: Copies = Default::default();
    let g = got.clone();
    orch.spawn(SpawnOptions::new(name), move |ctx| {
        let g = g.clone();
        async move {
            loop {
                let m = match topic {
                    Some(t) => ctx.bus_recv(t, None).await?,
                    None => ctx.recv(None).await?,
                };
                let Some(m) = m else { break };
                *g.lock().entry(String::from_utf8_lossy(&m).into_owned()).or_default() += 1;
            }
            Ok::<(), CallError>(())
        }
    })
    .unwrap();
    got
}

/// Takes every message of `topic` until `want` distinct ones were seen (or a minute passed).
async fn drain(orch: &Orchestrator, topic: &'static str, want: usize) -> BTreeSet<String> {
    let seen = collector(orch, "drain", topic);
    wait_until(Duration::from_secs(60), || seen.lock().len() >= want).await;
    seen.lock().clone()
}

/// Finding 1: a node restarted within JetStream's duplicate window reused the message ids
/// of its previous life, and its new publishes were acknowledged and dropped.
#[test]
fn a_node_restarted_at_once_has_every_publish_stored() {
    let nats = Nats::start();
    run(async {
        for life in ["first-", "second-"] {
            // The same node name, as a restarted process has.
            let (a, ca) = node(&nats, "a").await;
            publish_all(&a, "kept", life, 5).await;
            leave(&a, &ca).await;
        }
        let (b, cb) = node(&nats, "b").await;
        let got = drain(&b, "kept", 10).await;
        let want: BTreeSet<String> = ["first-", "second-"]
            .iter()
            .flat_map(|life| (0..5).map(move |i| format!("{life}{i}")))
            .collect();
        assert_eq!(got, want, "publishes of the restarted node were dropped");
        leave(&b, &cb).await;
    });
}

/// Finding 5: with NATS gone, a node asked to stop must still exit within its shutdown
/// bound (it spent minutes in key-value timeouts before).
#[test]
fn sigterm_with_nats_gone_exits_within_the_bound() {
    let mut nats = Nats::start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(gorch_artifacts::path("testkit"), dir.path().join("idle.wasm")).unwrap();
    std::fs::write(
        dir.path().join("idle.toml"),
        "instances = 4\n[wasi]\nenv = { MODE = \"recv\" }\n",
    )
    .unwrap();
    let url = nats.url();
    let (mut host, rx) =
        run_host(dir.path(), &["--nats", &url, "--node", "n1", "--shutdown-timeout", "2s"]);
    read_until(&mut host, &rx, "metrics: http://");
    nats.kill();
    read_until(&mut host, &rx, "lost the NATS connection");
    let pid = host.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    // The bound is 2 s; a generous deadline for a loaded machine, far below the minutes
    // it took before.
    let exited =
        wait_until_blocking(Duration::from_secs(20), || matches!(host.try_wait(), Ok(Some(_))));
    let mut log = String::new();
    while let Ok(l) = rx.try_recv() {
        log.push_str(&l);
        log.push('\n');
    }
    assert!(exited, "still running 20 s after SIGTERM with NATS gone; log:\n{log}");
    let status = host.try_wait().unwrap().unwrap();
    assert!(status.success(), "{status}; log:\n{log}");
    assert!(log.contains("NATS is unreachable: leaving without removing"), "{log}");
}

/// Finding 3: a poison message of 400 KB made a dead letter (its payload as a JSON array of
/// numbers) larger than NATS carries; the publish failed, the message was handed back and
/// came straight back, for ever. Now: one dead letter (base64), the message settled.
#[test]
fn a_large_poison_message_is_dead_lettered_once() {
    let nats = Nats::start();
    run(async {
        let (a, ca) = node(&nats, "a").await;
        let poison = vec![255u8; 400 * 1024];
        let sup =
            gorch_host::Supervision { max_deliveries: 1, ..gorch_host::Supervision::for_plugin() };
        let crashy = a
            .spawn(SpawnOptions::new("crashy").supervision(sup), |ctx| async move {
                match ctx.bus_recv("big", None).await.map_err(|e| e.to_string())? {
                    Some(m) => Err(format!("cannot handle {} bytes", m.len())),
                    None => Ok(()),
                }
            })
            .unwrap();
        let p = poison.clone();
        let h = a
            .spawn(SpawnOptions::new("publisher"), move |ctx| {
                let p = p.clone();
                async move { ctx.publish("big", p).await }
            })
            .unwrap();
        assert_eq!(wait_end(&h, Duration::from_secs(30)).await, State::Stopped);

        let letters: Arc<Mutex<Vec<serde_json::Value>>> = Default::default();
        let l = letters.clone();
        a.spawn(SpawnOptions::new("letters"), move |ctx| {
            let l = l.clone();
            async move {
                while let Some(m) = ctx.bus_recv("dead-letter", None).await? {
                    l.lock().push(serde_json::from_slice(&m).unwrap());
                }
                Ok::<(), CallError>(())
            }
        })
        .unwrap();
        assert!(
            wait_until(Duration::from_secs(60), || !letters.lock().is_empty()).await,
            "no dead letter arrived: {:?}",
            crashy.snapshot()
        );
        let letter = letters.lock()[0].clone();
        use base64::Engine;
        let b64 = letter["payloadBase64"].as_str().expect("payloadBase64");
        let payload = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
        assert_eq!(payload, poison);
        assert_eq!(
            (letter["routine"].as_str(), letter["deliveries"].as_u64()),
            (Some("crashy"), Some(1))
        );
        // Settled: the stream is empty, the routine counted one dead letter and no more come.
        assert!(
            wait_until(Duration::from_secs(30), || {
                a.topics().iter().any(|t| t.name == "big" && t.len == 0)
            })
            .await
        );
        let text = {
            let mut out = String::new();
            gorch_host::obs::write_text(&a, &mut out);
            out
        };
        assert!(text.contains("gorch_dead_letters_total{name=\"crashy\"} 1"), "{text}");
        assert!(text.contains("gorch_dead_letters_dropped_total 0"), "{text}");
        assert_eq!(letters.lock().len(), 1);
        leave(&a, &ca).await;
    });
}

/// Finding 9: `ack-wait = "0s"` was accepted (JetStream then used 30 s while every message
/// in flight spun a zero-length progress loop), and a topic's consumer kept the ack wait of
/// whichever node created it.
#[test]
fn the_ack_wait_is_checked_and_the_consumer_takes_the_setting() {
    let nats = Nats::start();
    run(async {
        let orch = Orchestrator::new();
        let mut zero = gorch_host::ClusterConfig::new(nats.url(), "z");
        zero.ack_wait = Duration::ZERO;
        let err = gorch_host::Cluster::join(&orch, zero).await.unwrap_err();
        assert!(matches!(err, gorch_host::ClusterError::AckWait(_)), "{err}");
        assert!(err.to_string().contains("at least 1s"), "{err}");

        // Node a (ack wait 2 s) creates the topic; node b asks for 7 s.
        let (a, ca) = node(&nats, "a").await;
        publish_all(&a, "waits", "m", 1).await;
        let mut slow = gorch_host::ClusterConfig::new(nats.url(), "b");
        slow.ack_wait = Duration::from_secs(7);
        let b = Orchestrator::new();
        let cb = gorch_host::Cluster::join(&b, slow).await.unwrap();
        assert_eq!(drain(&b, "waits", 1).await.len(), 1);
        let client = async_nats::connect(nats.url()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let stream = js.get_stream("GORCH_T_waits").await.unwrap();
        let info = stream.consumer_info("gorch").await.unwrap();
        assert_eq!(info.config.ack_wait, Duration::from_secs(7));
        // Finding 10: the waiting pulls and the stream's bytes are bounded.
        assert_eq!(info.config.max_waiting, 4096);
        let mut stream = stream;
        let largest = stream.info().await.unwrap().config.max_message_size;
        assert!(largest > 0, "the topic stream takes messages of any size");
        // A node whose plugins send at most 1,000 bytes bounds the streams it creates by that.
        let mut small = gorch_host::ClusterConfig::new(nats.url(), "c");
        small.message_bytes = Some(1000);
        let c = Orchestrator::new();
        let cc = gorch_host::Cluster::join(&c, small).await.unwrap();
        publish_all(&c, "small", "m", 1).await;
        let mut stream = js.get_stream("GORCH_T_small").await.unwrap();
        assert_eq!(stream.info().await.unwrap().config.max_message_size, 1000);
        // A node whose plugins send larger messages is told the stream's limit.
        let big = a
            .spawn(SpawnOptions::new("big"), |ctx| async move {
                match ctx.publish("small", vec![0; 2000]).await {
                    Err(CallError::TooLarge(1000)) => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            })
            .unwrap();
        let end = wait_end(&big, Duration::from_secs(30)).await;
        assert_eq!(end, State::Stopped, "{}", crate::common::last_error(&a, "big"));
        leave(&c, &cc).await;
        leave(&b, &cb).await;
        leave(&a, &ca).await;
    });
}

/// Finding 2: after nats-server came back without its store, publishers blocked for ever,
/// consumers spun, `/readyz` stayed 200 and nothing was logged. Now the streams, the
/// consumer and the registry are created again and the cluster goes on.
#[test]
fn nats_restarted_without_its_store_heals() {
    let mut nats = Nats::start();
    run(async {
        let (a, ca) = node(&nats, "a").await;
        let (b, cb) = node(&nats, "b").await;
        let state = gorch_host::obs::ObsState::new(&a, None);
        state.set_ready(true);
        let app = gorch_host::obs::router(state, &gorch_host::ObsConfig::default());
        let seen = collector(&b, "worker", "work");
        publish_all(&a, "work", "before-", 3).await;
        assert!(wait_until(Duration::from_secs(30), || seen.lock().len() == 3).await);
        assert_eq!(get(&app, "/readyz", None).await.0, 200);

        nats.kill();
        // Not ready while NATS is away.
        let mut status = 200;
        for _ in 0..300 {
            status = get(&app, "/readyz", None).await.0.as_u16();
            if status == 503 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(status, 503, "/readyz while nats-server is down");
        nats.start_empty();
        // Ready again once the registry is repaired and the node renewed its lease.
        for _ in 0..300 {
            status = get(&app, "/readyz", None).await.0.as_u16();
            if status == 200 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(status, 200, "/readyz after nats-server came back without its store");
        // Each node registers its routines again in the new buckets, and reads them anew: a
        // routine started now is seen by the other node (the watches started over).
        let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
        let mut registered = false;
        for _ in 0..600 {
            if let Ok(kv) = js.get_key_value("gorch-routines").await
                && matches!(kv.get("r=worker=b").await, Ok(Some(_)))
            {
                registered = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(registered, "b's worker is not in the new registry");
        let late = b
            .spawn(SpawnOptions::new("late"), |ctx| async move {
                while ctx.recv(None).await?.is_some() {}
                Ok::<(), CallError>(())
            })
            .unwrap();
        assert!(
            wait_until(Duration::from_secs(30), || ca.nodes_running("late") == ["b"]).await,
            "node a does not see a routine started after the store was lost"
        );
        late.stop();
        publish_all(&a, "work", "after-", 5).await;
        let all = wait_until(Duration::from_secs(20), || seen.lock().len() == 8).await;
        if !all {
            let client = async_nats::connect(nats.url()).await.unwrap();
            let js = async_nats::jetstream::new(client);
            let mut st = js.get_stream("GORCH_T_work").await.unwrap();
            eprintln!("on failure: stream {:?}", st.info().await.unwrap().state);
            let ci = st.consumer_info("gorch").await.unwrap();
            eprintln!(
                "DEBUG consumer delivered {:?} ackfloor {:?} pending {} ackpending {} redelivered {}",
                ci.delivered, ci.ack_floor, ci.num_pending, ci.num_ack_pending, ci.num_redelivered
            );
            if let Ok(mut dl) = js.get_stream("GORCH_T_dead-letter").await {
                eprintln!("on failure: dead letters {:?}", dl.info().await.unwrap().state);
            }
        }
        assert!(all, "{:?}", seen.lock());
        leave(&b, &cb).await;
        leave(&a, &ca).await;
    });
}

/// Finding 10: `blockedPublishSeconds` counted a blocked publish only once it ended, so a
/// publisher stuck on a full topic showed 0.
#[test]
fn a_publish_blocked_on_a_full_topic_counts_while_it_waits() {
    let nats = Nats::start();
    run(async {
        let (a, ca) = node(&nats, "a").await;
        let cap = gorch_host::defaults::DEFAULT_TOPIC_CAPACITY;
        let h = a
            .spawn(SpawnOptions::new("flood"), move |ctx| async move {
                for i in 0..=cap {
                    ctx.publish("full", format!("m{i}").into_bytes()).await?;
                }
                Ok::<(), CallError>(())
            })
            .unwrap();
        let blocked = || {
            a.topics().iter().find(|t| t.name == "full").map_or(0.0, |t| t.blocked_publish_seconds)
        };
        assert!(
            wait_until(Duration::from_secs(60), || blocked() > 0.0).await,
            "no blocked time while the publisher waits: {:?}",
            a.topics()
        );
        assert_eq!(h.state(), State::Running, "still blocked in its publish");
        leave(&a, &ca).await;
    });
}

/// Finding 6: after `kill -9` of nats-server and a restart, messages already processed (the
/// consumer's ack floor past them) stayed in the work-queue stream and counted against its
/// capacity for good. A node that opens the topic removes them. (On this machine nats-server
/// 2.9 kept its deletes across the kill, so the stream is usually clean already: the test
/// checks that opening the topic leaves nothing processed behind, and prints what it found.)
#[test]
fn processed_messages_left_by_a_killed_nats_server_are_removed() {
    let mut nats = Nats::start();
    run(async {
        let (a, ca) = node(&nats, "a").await;
        publish_all(&a, "done", "m", 60).await;
        assert_eq!(drain(&a, "done", 60).await.len(), 60);
        // Every ack stored (the last one goes with the collector's next receive).
        let acked = || a.topics().iter().any(|t| t.name == "done" && t.len == 0);
        assert!(wait_until(Duration::from_secs(30), acked).await, "{:?}", a.topics());
        // Killed while the node is still in the cluster (its acks were confirmed).
        nats.kill();
        nats.start_again();
        leave(&a, &ca).await;
        let client = async_nats::connect(nats.url()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let mut stream = js.get_stream("GORCH_T_done").await.unwrap();
        let left = stream.info().await.unwrap().state.messages;
        eprintln!("processed messages left after kill -9: {left}");
        let (b, cb) = node(&nats, "b").await;
        // Opening the topic (a try-receive) cleans it.
        let h = b
            .spawn(SpawnOptions::new("peek"), |ctx| async move {
                ctx.bus_recv("done", Some(Duration::ZERO)).await.map(drop)
            })
            .unwrap();
        assert_eq!(wait_end(&h, Duration::from_secs(30)).await, State::Stopped);
        let left = stream.info().await.unwrap().state.messages;
        assert_eq!(left, 0, "processed messages still in the stream");
        leave(&b, &cb).await;
    });
}

/// Finding 7: acks lost in a disconnect made duplicates unseen, and a pull lost with the
/// server stalled consumers. Now, across a SIGKILL and restart of nats-server in the middle
/// of a stream, every published message is delivered (any duplicate is counted, never a
/// loss), the consumer goes on after the restart, and acks the server never confirmed are
/// counted in the metric.
#[test]
fn a_nats_restart_mid_stream_loses_nothing() {
    let mut nats = Nats::start();
    run(async {
        let (a, ca) = node(&nats, "a").await;
        let (b, cb) = node(&nats, "b").await;
        let copies = tally(&b, "consumer", Some("flow"));
        publish_all(&a, "flow", "first-", 100).await;
        assert!(wait_until(Duration::from_secs(30), || copies.lock().len() >= 20).await);
        nats.kill();
        assert!(wait_until(Duration::from_secs(30), || !cb.is_connected()).await);
        nats.start_again();
        publish_all(&a, "flow", "second-", 100).await;
        let all = wait_until(Duration::from_secs(60), || copies.lock().len() == 200).await;
        let copies = copies.lock().clone();
        assert!(all, "{} of 200 delivered", copies.len());
        let twice = copies.values().filter(|&&n| n > 1).count();
        let state = gorch_host::obs::ObsState::new(&b, None);
        let app = gorch_host::obs::router(state, &gorch_host::ObsConfig::default());
        let (_, metrics) = get(&app, "/metrics", None).await;
        eprintln!("200 delivered, {twice} more than once");
        assert!(metrics.contains("gorch_cluster_acks_unconfirmed_total"), "{metrics}");
        leave(&b, &cb).await;
        leave(&a, &ca).await;
    });
}

/// A plugin directory with one cluster-unique routine `solo` (the testkit guest echoing its
/// mailbox), for a real `gorch-host` node.
const SOLO: &str = "cluster-unique = true\n[wasi]\nenv = { MODE = \"echo\" }\n";

fn solo_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(gorch_artifacts::path("testkit"), dir.path().join("solo.wasm")).unwrap();
    std::fs::write(dir.path().join("solo.toml"), SOLO).unwrap();
    dir
}

fn signal(host: &crate::common::host::Host, sig: &str) {
    let pid = host.id().to_string();
    assert!(Command::new("kill").args([sig, &pid]).status().unwrap().success());
}

/// Waits until the server no longer holds `node`'s lease (a node's own view may lag).
async fn lease_gone(nats: &Nats, node: &str) -> bool {
    let client = async_nats::connect(nats.url()).await.unwrap();
    let kv = async_nats::jetstream::new(client).get_key_value("gorch-nodes").await.unwrap();
    for _ in 0..600 {
        if matches!(kv.get(node).await, Ok(None)) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Waits until node `who`'s view of the cluster does (or does not) list node `node`.
async fn sees(who: &gorch_host::Cluster, node: &str, listed: bool) -> bool {
    wait_until(Duration::from_secs(60), || {
        who.view().nodes.iter().any(|n| n.node == node) == listed
    })
    .await
}

/// Finding 4b: a cluster-unique routine on a node paused past its lease was claimed by
/// another node; after SIGCONT both copies ran. Now the paused node's copy stops.
#[test]
fn a_unique_routine_of_a_node_paused_past_its_lease_stops_when_it_resumes() {
    let nats = Nats::start();
    let dir = solo_dir();
    let url = nats.url();
    let (mut host, rx) = run_host(dir.path(), &["--nats", &url, "--node", "a"]);
    read_until(&mut host, &rx, "metrics: http://");
    run(async {
        let (b, cb) = node(&nats, "b").await;
        assert!(
            wait_until(Duration::from_secs(30), || cb.nodes_running("solo") == ["a"]).await,
            "node a's solo is not in the registry"
        );
        signal(&host, "-STOP");
        assert!(sees(&cb, "a", false).await, "a's lease did not expire");
        assert!(lease_gone(&nats, "a").await, "the server still holds a's lease");
        // Node a is gone as far as the cluster knows: b takes over the routine.
        let h = b
            .spawn(SpawnOptions::new("solo").cluster_unique(true), |ctx| async move {
                while ctx.recv(None).await?.is_some() {}
                Ok::<(), CallError>(())
            })
            .unwrap();
        // b holds the routine's claim before a comes back.
        let client = async_nats::connect(nats.url()).await.unwrap();
        let kv = async_nats::jetstream::new(client).get_key_value("gorch-routines").await.unwrap();
        let mut owner = None;
        for _ in 0..600 {
            owner = kv.get("u=solo").await.unwrap();
            if owner.as_deref() == Some(b"b".as_slice()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(owner.as_deref(), Some(b"b".as_slice()), "b did not take the claim");
        signal(&host, "-CONT");
        // a comes back, finds the claim taken and stops its copy.
        let log = read_until(&mut host, &rx, "took it over while this node was away");
        assert!(log.contains("routine \"solo\" is cluster-unique and node \"b\""), "{log}");
        assert!(sees(&cb, "a", true).await, "a did not take its lease again");
        assert_eq!(h.state(), State::Running);
        leave(&b, &cb).await;
    });
}

/// Finding 4a: a node paused past its lease while a new process took its node name: both
/// ran, both answered its requests, and the old one deleted the new one's lease when it
/// left. Now the old one finds its lease taken, stops and exits non-zero.
#[test]
fn a_node_whose_name_was_taken_while_it_was_paused_exits() {
    let nats = Nats::start();
    let url = nats.url();
    let (dir1, dir2) = (solo_dir(), solo_dir());
    let (mut first, rx1) = run_host(dir1.path(), &["--nats", &url, "--node", "a"]);
    read_until(&mut first, &rx1, "metrics: http://");
    run(async {
        let (b, cb) = node(&nats, "b").await;
        assert!(sees(&cb, "a", true).await);
        signal(&first, "-STOP");
        assert!(sees(&cb, "a", false).await, "a's lease did not expire");
        assert!(lease_gone(&nats, "a").await, "the server still holds a's lease");
        let (mut second, rx2) = run_host(dir2.path(), &["--nats", &url, "--node", "a"]);
        let log2 = read_until(&mut second, &rx2, "metrics: http://");
        let second_addr = format!("127.0.0.1:{}", crate::common::host::port_of(&log2));
        signal(&first, "-CONT");
        let exited =
            wait_until(Duration::from_secs(60), || matches!(first.try_wait(), Ok(Some(_)))).await;
        let mut log1 = String::new();
        while let Ok(l) = rx1.try_recv() {
            log1.push_str(&l);
            log1.push('\n');
        }
        assert!(exited, "the paused node still runs; log:\n{log1}");
        assert!(!first.try_wait().unwrap().unwrap().success(), "{log1}");
        assert!(log1.contains("was taken by another process"), "{log1}");
        // The new process keeps the name, its lease and its routine.
        assert!(
            wait_until(Duration::from_secs(30), || {
                cb.view().nodes.iter().any(|n| n.node == "a" && n.addr == second_addr)
                    && cb.nodes_running("solo") == ["a"]
            })
            .await,
            "{:?}",
            cb.view()
        );
        assert!(matches!(second.try_wait(), Ok(None)), "the new process must keep running");
        leave(&b, &cb).await;
    });
}

/// Finding 8: a send to a node paused with the request under way answered `closed` (and
/// HTTP 503 "full"), though the node took the message when it resumed. Now the routine's
/// send says the outcome is unknown, HTTP answers 504, and no message arrives twice.
#[test]
fn a_send_to_a_paused_node_has_an_unknown_outcome() {
    let nats = Nats::start();
    let dir = solo_dir();
    let url = nats.url();
    let (mut host, rx) = run_host(dir.path(), &["--nats", &url, "--node", "a"]);
    read_until(&mut host, &rx, "metrics: http://");
    run(async {
        let (b, cb) = node(&nats, "b").await;
        assert!(
            wait_until(Duration::from_secs(30), || cb.nodes_running("solo") == ["a"]).await,
            "node a's solo is not in the registry"
        );
        // solo (echo) publishes what it takes on `testkit-out`: count every copy.
        let copies = tally(&b, "counter", Some("testkit-out"));
        let send = |what: &'static str| {
            let result = Arc::new(Mutex::new(None));
            let r = result.clone();
            b.spawn(SpawnOptions::new(format!("send-{what}")), move |ctx| {
                let r = r.clone();
                async move {
                    *r.lock() = Some(ctx.send("solo", what.as_bytes().to_vec()).await);
                    Ok::<(), CallError>(())
                }
            })
            .unwrap();
            result
        };
        // Finding 8: sizes are checked before the call (it answered 404 "has ended").
        let big = vec![b'x'; 1_048_300];
        let too_large = b
            .spawn(SpawnOptions::new("big"), move |ctx| {
                let big = big.clone();
                async move {
                    match ctx.send("solo", big).await {
                        Err(CallError::TooLarge(_)) => Ok(()),
                        other => Err(format!("{other:?}")),
                    }
                }
            })
            .unwrap();
        let end = wait_end(&too_large, Duration::from_secs(30)).await;
        assert_eq!(end, State::Stopped, "{}", crate::common::last_error(&b, "big"));
        let before = send("before");
        assert!(wait_until(Duration::from_secs(30), || copies.lock().contains_key("before")).await);
        assert!(matches!(*before.lock(), Some(Ok(()))));

        let state = gorch_host::obs::ObsState::new(&b, None);
        state.set_ready(true);
        let app = gorch_host::obs::router(state, &gorch_host::ObsConfig::default());
        let (status, body) = crate::common::http::post(
            &app,
            "/gorchestra/api/routines/solo/mailbox",
            &"x".repeat(1_048_300),
        )
        .await;
        assert_eq!(status, 413, "{body}");
        signal(&host, "-STOP");
        let paused = send("paused");
        let (status, body) =
            crate::common::http::post(&app, "/gorchestra/api/routines/solo/mailbox", "by-http")
                .await;
        assert_eq!(status, 504, "{body}");
        assert!(body.contains("outcome is unknown"), "{body}");
        assert!(wait_until(Duration::from_secs(60), || paused.lock().is_some()).await);
        let result = paused.lock().take().unwrap();
        assert!(matches!(result, Err(CallError::OutcomeUnknown(_))), "{result:?}");

        signal(&host, "-CONT");
        assert!(sees(&cb, "a", true).await, "a did not take its lease again");
        let after = send("after");
        let arrived = wait_until(Duration::from_secs(60), || {
            matches!(*after.lock(), Some(Ok(()))) && copies.lock().contains_key("after")
        })
        .await;
        assert!(arrived, "{:?} {:?}", after.lock(), copies.lock());
        assert!(copies.lock().values().all(|&n| n == 1), "a message arrived twice: {copies:?}");
        leave(&b, &cb).await;
    });
}

/// Finding 8: a send whose answer was lost when nats-server went away answered `closed`
/// though its message had been delivered. Now a send's answer keeps its word across a
/// restart of nats-server: `ok` is delivered once, `closed` and `no-such-routine` are not
/// delivered, `outcome-unknown` at most once (a lost answer is retried with the send's id,
/// which the receiving node never takes twice).
#[test]
fn sends_keep_their_word_across_a_nats_restart() {
    let mut nats = Nats::start();
    run(async {
        let (a, ca) = node(&nats, "a").await;
        let (b, cb) = node(&nats, "b").await;
        let got = tally(&a, "sink", None);
        assert!(
            wait_until(Duration::from_secs(30), || cb.nodes_running("sink") == ["a"]).await,
            "sink is not in the registry"
        );
        type Sent = Arc<Mutex<Vec<(String, Result<(), CallError>)>>>;
        let sent: Sent = Default::default();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut senders = Vec::new();
        for k in 0..8 {
            let (sent, stop) = (sent.clone(), stop.clone());
            let h = b
                .spawn(SpawnOptions::new(format!("sender-{k}")), move |ctx| {
                    let (sent, stop) = (sent.clone(), stop.clone());
                    async move {
                        for i in 0.. {
                            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                                break;
                            }
                            let m = format!("s{k}-{i}");
                            let r = ctx.send("sink", m.clone().into_bytes()).await;
                            if matches!(r, Err(CallError::Cancelled)) {
                                break;
                            }
                            sent.lock().push((m, r));
                        }
                        Ok::<(), CallError>(())
                    }
                })
                .unwrap();
            senders.push(h);
        }
        assert!(wait_until(Duration::from_secs(30), || sent.lock().len() >= 200).await);
        nats.kill();
        assert!(wait_until(Duration::from_secs(30), || !cb.is_connected()).await);
        nats.start_again();
        assert!(
            wait_until(Duration::from_secs(60), || ca.is_connected() && cb.is_connected()).await
        );
        let at_restart = sent.lock().len();
        assert!(
            wait_until(Duration::from_secs(60), || sent
                .lock()
                .iter()
                .skip(at_restart)
                .any(|(_, r)| r.is_ok()))
            .await,
            "no send succeeded after the restart"
        );
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for h in &senders {
            assert_eq!(wait_end(h, Duration::from_secs(60)).await, State::Stopped);
        }
        let sent = sent.lock().clone();
        let acked: Vec<&String> = sent.iter().filter(|(_, r)| r.is_ok()).map(|(m, _)| m).collect();
        let all = wait_until(Duration::from_secs(30), || {
            let got = got.lock();
            acked.iter().all(|m| got.contains_key(*m))
        })
        .await;
        let got = got.lock().clone();
        assert!(all, "a send answered ok was not delivered");
        for (m, r) in &sent {
            let n = got.get(m).copied().unwrap_or(0);
            match r {
                Ok(()) => assert_eq!(n, 1, "{m}: ok, delivered {n} times"),
                Err(CallError::OutcomeUnknown(_)) => assert!(n <= 1, "{m}: delivered {n} times"),
                Err(e) => assert_eq!(n, 0, "{m}: {e}, yet delivered {n} times"),
            }
        }
        let unknown = sent.iter().filter(|(_, r)| matches!(r, Err(CallError::OutcomeUnknown(_))));
        eprintln!(
            "{} sends: {} ok, {} outcome unknown, {} refused",
            sent.len(),
            acked.len(),
            unknown.count(),
            sent.iter()
                .filter(|(_, r)| matches!(r, Err(e) if !matches!(e, CallError::OutcomeUnknown(_))))
                .count()
        );
        leave(&b, &cb).await;
        leave(&a, &ca).await;
    });
}

/// Issue 22: with `replicas = 3` on a three-server NATS cluster, one server killed with
/// SIGKILL while 2,000 messages flow loses nothing, and the stream goes on.
#[test]
fn a_nats_server_killed_under_replicas_3_loses_nothing() {
    let _heavy = crate::common::heavy();
    let mut nats = crate::common::nats::NatsCluster::start();
    run(async {
        let join = |name: &'static str| {
            let urls = nats.urls();
            async move {
                let mut config = gorch_host::ClusterConfig::new(urls, name);
                config.replicas = 3;
                config.ack_wait = Duration::from_secs(2);
                let orch = Orchestrator::new();
                // The servers elect their JetStream leader first.
                let mut last = String::new();
                for _ in 0..600 {
                    match gorch_host::Cluster::join(&orch, config.clone()).await {
                        Ok(c) => return (orch, c),
                        Err(e) => last = e.to_string(),
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                panic!("node {name} could not join the NATS cluster: {last}");
            }
        };
        let (a, ca) = join("a").await;
        let (b, cb) = join("b").await;
        let seen = collector(&b, "consumer", "flow3");
        let publisher = a
            .spawn(SpawnOptions::new("publisher"), |ctx| async move {
                for i in 0..2000 {
                    ctx.publish("flow3", format!("m{i}").into_bytes()).await?;
                }
                Ok::<(), CallError>(())
            })
            .unwrap();
        assert!(wait_until(Duration::from_secs(120), || seen.lock().len() >= 300).await);
        nats.servers[0].kill();
        // The servers elect new stream and consumer leaders first: on a loaded 2-core
        // machine (the whole suite at once) that took over 30 s once.
        assert_eq!(wait_end(&publisher, Duration::from_secs(120)).await, State::Stopped);
        let all = wait_until(Duration::from_secs(120), || seen.lock().len() == 2000).await;
        assert!(all, "{} of 2000 delivered", seen.lock().len());
        let js =
            async_nats::jetstream::new(async_nats::connect(nats.servers[1].url()).await.unwrap());
        let mut stream = js.get_stream("GORCH_T_flow3").await.unwrap();
        assert_eq!(stream.info().await.unwrap().config.num_replicas, 3);
        leave(&b, &cb).await;
        leave(&a, &ca).await;
    });
}

/// Issue 22: a real node whose consumers are served from its prefetch window, paused with
/// SIGSTOP past the ack wait while it holds fetched messages, then resumed. What it held
/// goes to the other node after the ack wait. Nothing is lost; the copies are counted (at
/// least once allows them: what the paused node's routines and window held comes twice).
#[test]
fn a_node_paused_with_prefetched_messages_loses_none() {
    let nats = Nats::start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(gorch_artifacts::path("testkit"), dir.path().join("relay.wasm")).unwrap();
    let manifest = "instances = 2\n[wasi]\nenv = { MODE = \"batch-trap\", SOURCE = \"work\", \
                    MAX = \"1\" }\n";
    std::fs::write(dir.path().join("relay.toml"), manifest).unwrap();
    std::fs::write(dir.path().join("gorch.toml"), "[cluster]\nack-wait = \"2s\"\n").unwrap();
    let url = nats.url();
    run(async {
        let (b, cb) = node(&nats, "b").await;
        publish_all(&b, "work", "m", 1000).await;
        let out = tally(&b, "out", Some("testkit-out"));
        let (mut host, rx) = run_host(dir.path(), &["--nats", &url, "--node", "a"]);
        read_until(&mut host, &rx, "metrics: http://");
        // Pause node a mid-stream, with messages fetched ahead of its relays.
        assert!(wait_until(Duration::from_secs(60), || out.lock().len() >= 200).await);
        signal(&host, "-STOP");
        assert!(sees(&cb, "a", false).await, "a's lease did not expire");
        // The rest goes to node b once a's messages are past their ack wait.
        let late = tally(&b, "late", Some("work"));
        let processed = |out: &Copies, late: &Copies| -> BTreeSet<String> {
            let relayed = out
                .lock()
                .keys()
                .filter_map(|l| l.rsplit(' ').next())
                .map(String::from)
                .collect::<BTreeSet<_>>();
            relayed.union(&late.lock().keys().cloned().collect()).cloned().collect()
        };
        let all: BTreeSet<String> = (0..1000).map(|i| format!("m{i}")).collect();
        let done = wait_until(Duration::from_secs(60), || processed(&out, &late) == all).await;
        assert!(done, "{} of 1000 processed while a was paused", processed(&out, &late).len());
        signal(&host, "-CONT");
        assert!(sees(&cb, "a", true).await, "a did not come back");
        crate::common::host::stop_cleanly(&mut host);
        assert_eq!(processed(&out, &late), all, "lost messages");
        let copies: usize =
            out.lock().values().sum::<usize>() + late.lock().values().sum::<usize>();
        eprintln!("paused node: 1000 messages, {} copies processed", copies);
        // At most what a's routines and its window held come twice.
        assert!(copies - 1000 <= 2 + 256, "{copies} copies of 1000");
        leave(&b, &cb).await;
    });
}
