//! Two nodes over a real `nats-server -js`: `cargo bench -p gorch-host --bench cluster`.
//!
//! - one way: a routine on node a publishes 64 B messages on a cluster topic, a routine on
//!   node b takes them; next to raw async-nats in the same run: JetStream with the same
//!   guarantees (publish waits for the stored ack, pull one, ack each) and core NATS
//!   publish/subscribe (no storage, no acks);
//! - round trips: mailbox ping-pong between routines on the two nodes, next to raw NATS
//!   request/reply;
//! - a same-node consumer: the cluster-wide topic (through the stream) next to the local
//!   topic of a host without `--nats`.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull};
use futures::StreamExt;
use gorch_host::{CallError, Cluster, ClusterConfig, Orchestrator, SpawnOptions};

const ONE_WAY: u64 = 5_000;
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
    let rt = gorch_host::runtime_builder().worker_threads(2).build().unwrap();
    println!("## one way, 64 B, {ONE_WAY} messages, node a → node b");
    println!(
        "| gorch-host cluster topic | raw JetStream (same guarantees) | raw core NATS pub/sub | gorch / JetStream | gorch / core |"
    );
    println!("|---|---|---|---|---|");
    let g = rt.block_on(one_way_cluster(&url, "bench-a"));
    let js = rt.block_on(raw_jetstream(&url));
    let core = rt.block_on(raw_core(&url));
    println!(
        "| {:.1} k msg/s | {:.1} k msg/s | {:.0} k msg/s | {:.2} | {:.3} |",
        g / 1e3,
        js / 1e3,
        core / 1e3,
        g / js,
        g / core
    );
    println!();
    println!("## round trips, {ROUND_TRIPS}, node a ↔ node b");
    println!("| gorch-host mailbox ping-pong | raw NATS request/reply | gorch / raw |");
    println!("|---|---|---|");
    let g = rt.block_on(ping_pong_cluster(&url));
    let raw = rt.block_on(raw_request(&url));
    println!("| {:.1} k rt/s | {:.1} k rt/s | {:.2} |", g / 1e3, raw / 1e3, g / raw);
    println!();
    println!("## same-node consumer, 64 B, {ONE_WAY} messages");
    println!("| cluster-wide topic | local topic (no --nats) | cluster / local |");
    println!("|---|---|---|");
    let c = rt.block_on(same_node(Some(&url)));
    let l = rt.block_on(same_node(None));
    println!("| {:.1} k msg/s | {:.0} k msg/s | {:.4} |", c / 1e3, l / 1e3, c / l);
}

async fn join(url: &str, node: &str) -> (Orchestrator, Cluster) {
    let orch = Orchestrator::new();
    let cluster = Cluster::join(&orch, ClusterConfig::new(url, node)).await.expect("join");
    (orch, cluster)
}

async fn leave(orch: Orchestrator, cluster: Cluster) {
    orch.shutdown(Duration::from_secs(2)).await;
    cluster.leave().await;
}

fn publisher(orch: &Orchestrator, topic: &'static str) {
    orch.spawn(SpawnOptions::new("publisher"), move |ctx| async move {
        for _ in 0..ONE_WAY {
            ctx.publish(topic, vec![7u8; PAYLOAD]).await?;
        }
        Ok::<(), CallError>(())
    })
    .unwrap();
}

fn consumer(orch: &Orchestrator, topic: &'static str) -> gorch_host::RoutineHandle {
    orch.spawn(SpawnOptions::new("consumer"), move |ctx| async move {
        for _ in 0..ONE_WAY {
            ctx.bus_recv(topic, None).await?;
        }
        Ok::<(), CallError>(())
    })
    .unwrap()
}

async fn one_way_cluster(url: &str, topic: &'static str) -> f64 {
    let (a, ca) = join(url, "a").await;
    let (b, cb) = join(url, "b").await;
    let t = Instant::now();
    let rx = consumer(&b, topic);
    publisher(&a, topic);
    rx.wait().await;
    let rate = ONE_WAY as f64 / t.elapsed().as_secs_f64();
    leave(a, ca).await;
    leave(b, cb).await;
    rate
}

async fn raw_jetstream(url: &str) -> f64 {
    let pc = async_nats::connect(url).await.unwrap();
    let cc = async_nats::connect(url).await.unwrap();
    let js = jetstream::new(pc);
    let stream = js
        .get_or_create_stream(jetstream::stream::Config {
            name: "RAW".into(),
            subjects: vec!["raw".into()],
            retention: jetstream::stream::RetentionPolicy::WorkQueue,
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
        .unwrap();
    let consumer: jetstream::consumer::Consumer<pull::Config> = stream
        .get_or_create_consumer(
            "raw",
            pull::Config { durable_name: Some("raw".into()), ..Default::default() },
        )
        .await
        .unwrap();
    let _ = cc;
    let t = Instant::now();
    let rx = tokio::spawn(async move {
        let mut got = 0;
        while got < ONE_WAY {
            let mut batch = consumer.batch().max_messages(1).messages().await.unwrap();
            if let Some(Ok(m)) = batch.next().await {
                m.ack().await.unwrap();
                got += 1;
            }
        }
    });
    for _ in 0..ONE_WAY {
        js.publish("raw", vec![7u8; PAYLOAD].into()).await.unwrap().await.unwrap();
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

async fn same_node(url: Option<&str>) -> f64 {
    let (orch, cluster) = match url {
        Some(url) => {
            let (o, c) = join(url, "solo").await;
            (o, Some(c))
        }
        None => (Orchestrator::new(), None),
    };
    let t = Instant::now();
    let rx = consumer(&orch, "same");
    publisher(&orch, "same");
    rx.wait().await;
    let rate = ONE_WAY as f64 / t.elapsed().as_secs_f64();
    orch.shutdown(Duration::from_secs(2)).await;
    if let Some(c) = cluster {
        c.leave().await;
    }
    rate
}
