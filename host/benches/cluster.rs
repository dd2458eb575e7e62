//! Two nodes over a real `nats-server -js`: `cargo bench -p gorch-host --bench cluster`.
//!
//! - one way: a routine on node a publishes 64 B messages on a cluster topic, a routine on
//!   node b takes them, with single calls and with `publish-batch` / `recv-batch`; next to
//!   raw async-nats in the same run: JetStream with the same guarantees in its fastest
//!   pattern (a window of publishes whose acks are awaited together, batch fetches, an ack
//!   per message) and in the synchronous one (publish, await its ack; pull one, ack), and
//!   core NATS publish/subscribe (no storage, no acks);
//! - mailboxes: one-way sends and ping-pong between routines on the two nodes, next to raw
//!   NATS request/reply;
//! - a same-node consumer: the cluster-wide topic (through the stream), a node-local topic
//!   (`local-topics`), and the topic of a host without `--nats`.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull};
use futures::StreamExt;
use gorch_host::{CallError, Cluster, ClusterConfig, Orchestrator, SpawnOptions};

const ONE_WAY: u64 = 20_000;
const ROUND_TRIPS: u64 = 2_000;
const PAYLOAD: usize = 64;

/// The server, its port, and its store directory (removed when dropped).
struct Nats(Child, u16, #[allow(dead_code)] tempfile::TempDir);

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn nats() -> Nats {
    let store = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let bin = ["nats-server", "/usr/sbin/nats-server"]
        .into_iter()
        .find(|b| Command::new(b).arg("--version").output().is_ok())
        .expect("nats-server not found: apt-get install -y nats-server");
    let child = Command::new(bin)
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(store.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nats-server");
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        std::thread::sleep(Duration::from_millis(20));
    }
    Nats(child, port, store)
}

fn main() {
    let server = nats();
    let url = format!("nats://127.0.0.1:{}", server.1);
    // `GORCH_BENCH_THREADS=1`: one worker thread (a profile without cross-thread wake-ups).
    let threads = std::env::var("GORCH_BENCH_THREADS").ok().and_then(|t| t.parse().ok());
    let rt = gorch_host::runtime_builder().worker_threads(threads.unwrap_or(2)).build().unwrap();
    // `cargo bench --bench cluster -- mailbox` runs the sections named (one-way, mailbox,
    // same-node); none named: all.
    let named: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let run = |section: &str| named.is_empty() || named.iter().any(|n| n == section);
    if run("one-way") {
        one_way(&rt, &url);
    }
    if run("mailbox") {
        mailbox(&rt, &url);
    }
    if run("same-node") {
        same_node_rows(&rt, &url);
    }
}

fn one_way(rt: &tokio::runtime::Runtime, url: &str) {
    let url = url.to_string();
    println!("## one way, 64 B, {ONE_WAY} messages, node a → node b (rates in msg/s)");
    println!(
        "| raw JetStream, fastest same guarantees (async publish window {WINDOW}, fetch {WINDOW}, ack each) | raw JetStream, synchronous publish, pull 1 | raw synchronous publish, fetching consumer | raw synchronous publish, no consumer | gorch single calls | gorch publish-batch / recv-batch ({WINDOW}) | raw core NATS | (b) / sync | (c) / fastest |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let fast = rt.block_on(raw_jetstream_fast(&url));
    let sync = rt.block_on(raw_jetstream(&url, "RAW", RawConsumer::PullOne));
    let sync_fetching = rt.block_on(raw_jetstream(&url, "RAWF", RawConsumer::Fetching));
    let sync_alone = rt.block_on(raw_jetstream(&url, "RAWN", RawConsumer::None));
    let single = rt.block_on(one_way_cluster(&url, "bench-single", false));
    let batch = rt.block_on(one_way_cluster(&url, "bench-batch", true));
    let core = rt.block_on(raw_core(&url));
    println!(
        "| {:.1} k | {:.1} k | {:.1} k | {:.1} k | {:.1} k | {:.1} k | {:.0} k | {:.2} | {:.2} |",
        fast / 1e3,
        sync / 1e3,
        sync_fetching / 1e3,
        sync_alone / 1e3,
        single / 1e3,
        batch / 1e3,
        core / 1e3,
        single / sync,
        batch / fast
    );
}

fn mailbox(rt: &tokio::runtime::Runtime, url: &str) {
    let url = url.to_string();
    println!("## mailbox, node a → node b, {ROUND_TRIPS} sends / round trips");
    println!(
        "| gorch one way (send) | gorch one way (send-batch, {WINDOW}) | gorch ping-pong | raw NATS request/reply | ping-pong / raw |"
    );
    println!("|---|---|---|---|---|");
    let one_way = rt.block_on(mailbox_one_way(&url, false));
    let batched = rt.block_on(mailbox_one_way(&url, true));
    let g = rt.block_on(ping_pong_cluster(&url));
    let raw = rt.block_on(raw_request(&url));
    println!(
        "| {:.1} k msg/s | {:.1} k msg/s | {:.1} k rt/s | {:.1} k rt/s | {:.2} |",
        one_way / 1e3,
        batched / 1e3,
        g / 1e3,
        raw / 1e3,
        g / raw
    );
}

fn same_node_rows(rt: &tokio::runtime::Runtime, url: &str) {
    let url = url.to_string();
    println!(
        "## same-node consumer, 64 B: {ONE_WAY} through the stream; {LOCAL} through memory, \
         three rounds alternating (medians)"
    );
    println!(
        "| cluster-wide topic | node-local topic (`local-topics`) | topic without --nats | cluster / no nats | node-local / no nats |"
    );
    println!("|---|---|---|---|---|");
    let c = rt.block_on(same_node(Some(&url), "same", ONE_WAY));
    let (mut nl, mut l) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        nl.push(rt.block_on(same_node(Some(&url), "local.same", LOCAL)));
        l.push(rt.block_on(same_node(None, "same", LOCAL)));
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (nl, l) = (median(&mut nl), median(&mut l));
    println!(
        "| {:.1} k msg/s | {:.0} k msg/s | {:.0} k msg/s | {:.4} | {:.2} |",
        c / 1e3,
        nl / 1e3,
        l / 1e3,
        c / l,
        nl / l
    );
}

/// Messages of the in-memory same-node rows.
const LOCAL: u64 = 1_000_000;

/// Publishes in flight at once / messages per fetch, for the batch rows.
const WINDOW: usize = 256;

async fn join(url: &str, node: &str) -> (Orchestrator, Cluster) {
    let orch = Orchestrator::new();
    let mut config = ClusterConfig::new(url, node);
    config.local_topics = vec!["local.*".into()];
    let cluster = Cluster::join(&orch, config).await.expect("join");
    (orch, cluster)
}

async fn leave(orch: Orchestrator, cluster: Cluster) {
    orch.shutdown(Duration::from_secs(2)).await;
    cluster.leave().await;
}

fn publisher(orch: &Orchestrator, topic: &'static str, batch: bool, n: u64) {
    orch.spawn(SpawnOptions::new("publisher"), move |ctx| async move {
        if batch {
            for _ in 0..n as usize / WINDOW {
                ctx.publish_batch(topic, vec![vec![7u8; PAYLOAD]; WINDOW]).await?;
            }
            return Ok(());
        }
        for _ in 0..n {
            ctx.publish(topic, vec![7u8; PAYLOAD]).await?;
        }
        Ok::<(), CallError>(())
    })
    .unwrap();
}

fn consumer(
    orch: &Orchestrator,
    topic: &'static str,
    batch: bool,
    n: u64,
) -> gorch_host::RoutineHandle {
    let want = if batch { (n as usize / WINDOW * WINDOW) as u64 } else { n };
    orch.spawn(SpawnOptions::new("consumer"), move |ctx| async move {
        let mut got = 0;
        while got < want {
            if batch {
                got += ctx.bus_recv_batch(topic, WINDOW, None).await?.len() as u64;
            } else {
                ctx.bus_recv(topic, None).await?;
                got += 1;
            }
        }
        Ok::<(), CallError>(())
    })
    .unwrap()
}

async fn one_way_cluster(url: &str, topic: &'static str, batch: bool) -> f64 {
    let (a, ca) = join(url, "a").await;
    let (b, cb) = join(url, "b").await;
    let t = Instant::now();
    let rx = consumer(&b, topic, batch, ONE_WAY);
    publisher(&a, topic, batch, ONE_WAY);
    rx.wait().await;
    let sent = if batch { (ONE_WAY as usize / WINDOW * WINDOW) as u64 } else { ONE_WAY };
    let rate = sent as f64 / t.elapsed().as_secs_f64();
    leave(a, ca).await;
    leave(b, cb).await;
    rate
}

/// Raw async-nats with the fastest pattern that keeps the guarantees: publishes sent in a
/// window whose acknowledgements are awaited together, a durable pull consumer fetching in
/// batches, an explicit ack per message.
async fn raw_jetstream_fast(url: &str) -> f64 {
    let pc = async_nats::connect(url).await.unwrap();
    let cc = async_nats::connect(url).await.unwrap();
    let js = jetstream::new(pc);
    let stream = js
        .get_or_create_stream(jetstream::stream::Config {
            name: "RAWFAST".into(),
            subjects: vec!["rawfast".into()],
            retention: jetstream::stream::RetentionPolicy::WorkQueue,
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
        .unwrap();
    let consumer: jetstream::consumer::Consumer<pull::Config> = jetstream::new(cc)
        .get_stream("RAWFAST")
        .await
        .unwrap()
        .get_or_create_consumer(
            "rawfast",
            pull::Config { durable_name: Some("rawfast".into()), ..Default::default() },
        )
        .await
        .unwrap();
    drop(stream);
    let t = Instant::now();
    let rx = tokio::spawn(async move {
        let mut got = 0;
        while got < ONE_WAY {
            let mut batch = consumer
                .batch()
                .max_messages(WINDOW)
                .expires(Duration::from_millis(100))
                .messages()
                .await
                .unwrap();
            while let Some(Ok(m)) = batch.next().await {
                m.ack().await.unwrap();
                got += 1;
            }
        }
    });
    let mut sent = 0;
    while sent < ONE_WAY {
        let n = (ONE_WAY - sent).min(WINDOW as u64);
        let mut acks = Vec::with_capacity(n as usize);
        for _ in 0..n {
            acks.push(js.publish("rawfast", vec![7u8; PAYLOAD].into()).await.unwrap());
        }
        for a in acks {
            a.await.unwrap();
        }
        sent += n;
    }
    rx.await.unwrap();
    ONE_WAY as f64 / t.elapsed().as_secs_f64()
}

/// The consumer beside a synchronous raw publisher.
#[derive(Clone, Copy, PartialEq)]
enum RawConsumer {
    /// Pulls one message at a time, acks each (awaiting the ack's publish).
    PullOne,
    /// Fetches what the stream has (up to the window), acks each.
    Fetching,
    /// None: the publisher alone (what one synchronous publisher can do here).
    None,
}

/// A publisher that awaits each stored acknowledgement, beside `consumer`.
async fn raw_jetstream(url: &str, name: &str, consumer: RawConsumer) -> f64 {
    let pc = async_nats::connect(url).await.unwrap();
    let cc = async_nats::connect(url).await.unwrap();
    let js = jetstream::new(pc);
    let subject = name.to_lowercase();
    let stream = jetstream::new(cc)
        .get_or_create_stream(jetstream::stream::Config {
            name: name.into(),
            subjects: vec![subject.clone()],
            retention: jetstream::stream::RetentionPolicy::WorkQueue,
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
        .unwrap();
    let pull: jetstream::consumer::Consumer<pull::Config> = stream
        .get_or_create_consumer(
            &subject,
            pull::Config { durable_name: Some(subject.clone()), ..Default::default() },
        )
        .await
        .unwrap();
    let t = Instant::now();
    let rx = tokio::spawn(async move {
        let mut got = 0;
        while consumer != RawConsumer::None && got < ONE_WAY {
            let batch = match consumer {
                RawConsumer::PullOne => pull.batch().max_messages(1).messages().await,
                _ => {
                    pull.batch()
                        .max_messages(WINDOW)
                        .expires(Duration::from_millis(100))
                        .messages()
                        .await
                }
            };
            let mut batch = batch.unwrap();
            while let Some(Ok(m)) = batch.next().await {
                m.ack().await.unwrap();
                got += 1;
            }
        }
    });
    for _ in 0..ONE_WAY {
        js.publish(subject.clone(), vec![7u8; PAYLOAD].into()).await.unwrap().await.unwrap();
    }
    rx.await.unwrap();
    ONE_WAY as f64 / t.elapsed().as_secs_f64()
}

async fn raw_core(url: &str) -> f64 {
    let pc = async_nats::connect(url).await.unwrap();
    let cc = async_nats::connect(url).await.unwrap();
    let mut sub = cc.subscribe("core").await.unwrap();
    cc.flush().await.unwrap();
    let t = Instant::now();
    let rx = tokio::spawn(async move {
        for _ in 0..ONE_WAY {
            sub.next().await.unwrap();
        }
    });
    for _ in 0..ONE_WAY {
        pc.publish("core", vec![7u8; PAYLOAD].into()).await.unwrap();
    }
    pc.flush().await.unwrap();
    rx.await.unwrap();
    ONE_WAY as f64 / t.elapsed().as_secs_f64()
}

async fn ping_pong_cluster(url: &str) -> f64 {
    let (a, ca) = join(url, "a").await;
    let (b, cb) = join(url, "b").await;
    b.spawn(SpawnOptions::new("pong"), |ctx| async move {
        while let Some(m) = ctx.recv(None).await? {
            ctx.send("a/ping", m).await?;
        }
        Ok::<(), CallError>(())
    })
    .unwrap();
    // The registry learns of `pong` through a watch: wait until a sees it.
    while ca.nodes_running("pong").is_empty() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let t = Instant::now();
    let ping = a
        .spawn(SpawnOptions::new("ping"), |ctx| async move {
            for _ in 0..ROUND_TRIPS {
                ctx.send("pong", vec![1u8; PAYLOAD]).await?;
                ctx.recv(None).await?;
            }
            Ok::<(), CallError>(())
        })
        .unwrap();
    ping.wait().await;
    let rate = ROUND_TRIPS as f64 / t.elapsed().as_secs_f64();
    leave(a, ca).await;
    leave(b, cb).await;
    rate
}

async fn raw_request(url: &str) -> f64 {
    let server = async_nats::connect(url).await.unwrap();
    let client = async_nats::connect(url).await.unwrap();
    let mut sub = server.subscribe("rr").await.unwrap();
    server.flush().await.unwrap();
    let responder = tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            if let Some(reply) = m.reply {
                server.publish(reply, m.payload).await.unwrap();
            }
        }
    });
    let t = Instant::now();
    for _ in 0..ROUND_TRIPS {
        client.request("rr", vec![1u8; PAYLOAD].into()).await.unwrap();
    }
    let rate = ROUND_TRIPS as f64 / t.elapsed().as_secs_f64();
    responder.abort();
    rate
}

/// One way through mailboxes: a routine on node a sends to one on node b (`batch`: with
/// `send-batch`, [`WINDOW`] at a time; the receiver takes them with single receives).
async fn mailbox_one_way(url: &str, batch: bool) -> f64 {
    let (a, ca) = join(url, "a").await;
    let (b, cb) = join(url, "b").await;
    let n =
        if batch { (ROUND_TRIPS * 10) as usize / WINDOW * WINDOW } else { ROUND_TRIPS as usize };
    let rx = b
        .spawn(SpawnOptions::new("sink"), move |ctx| async move {
            for _ in 0..n {
                ctx.recv(None).await?;
            }
            Ok::<(), CallError>(())
        })
        .unwrap();
    while ca.nodes_running("sink").is_empty() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let t = Instant::now();
    a.spawn(SpawnOptions::new("source"), move |ctx| async move {
        if batch {
            for _ in 0..n / WINDOW {
                ctx.send_batch("sink", vec![vec![1u8; PAYLOAD]; WINDOW]).await?;
            }
            return Ok(());
        }
        for _ in 0..n {
            ctx.send("sink", vec![1u8; PAYLOAD]).await?;
        }
        Ok::<(), CallError>(())
    })
    .unwrap();
    rx.wait().await;
    let rate = n as f64 / t.elapsed().as_secs_f64();
    leave(a, ca).await;
    leave(b, cb).await;
    rate
}

/// Messages a same-node consumer takes before the clock starts (the routines' registration
/// in the cluster and the runtime's warm-up are not what the rows compare).
const WARM_UP: u64 = 10_000;

async fn same_node(url: Option<&str>, topic: &'static str, n: u64) -> f64 {
    let (orch, cluster) = match url {
        Some(url) => {
            let (o, c) = join(url, "solo").await;
            (o, Some(c))
        }
        None => (Orchestrator::new(), None),
    };
    let started = std::sync::Arc::new(std::sync::Mutex::new(None));
    let s = started.clone();
    let rx = orch
        .spawn(SpawnOptions::new("consumer"), move |ctx| {
            let s = s.clone();
            async move {
                for i in 0..n {
                    if i == WARM_UP {
                        *s.lock().unwrap() = Some(Instant::now());
                    }
                    ctx.bus_recv(topic, None).await?;
                }
                Ok::<(), CallError>(())
            }
        })
        .unwrap();
    publisher(&orch, topic, false, n);
    rx.wait().await;
    let t = started.lock().unwrap().expect("warmed up");
    let rate = (n - WARM_UP) as f64 / t.elapsed().as_secs_f64();
    orch.shutdown(Duration::from_secs(2)).await;
    if let Some(c) = cluster {
        c.leave().await;
    }
    rate
}
