//! `Channel<T>` against `tokio::sync::mpsc` with the same capacity, 1 producer / 1 consumer
//! and 4 / 4, side by side in one run: `cargo bench -p gorch-host --bench channel`.
//! (mpsc has a single consumer: for 4/4 its consumer side is shared behind a mutex, which is
//! what a user would have to do to get competing consumers from it.)

#![allow(missing_docs)] // criterion's macros generate undocumented items

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use gorch_host::Channel;

const CAP: usize = 1024;
const MSGS: u64 = 100_000;

fn rt() -> tokio::runtime::Runtime {
    gorch_host::runtime_builder().worker_threads(2).build().unwrap()
}

async fn ours(producers: u64, consumers: u64) {
    let ch: Channel<u64> = Channel::new(CAP);
    let per_p = MSGS / producers;
    let per_c = MSGS / consumers;
    let mut tasks = Vec::new();
    for _ in 0..producers {
        let ch = ch.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..per_p {
                ch.send(i).await.unwrap();
            }
        }));
    }
    for _ in 0..consumers {
        let ch = ch.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..per_c {
                ch.recv().await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

async fn mpsc(producers: u64, consumers: u64) {
    let (tx, rx) = tokio::sync::mpsc::channel::<u64>(CAP);
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let per_p = MSGS / producers;
    let per_c = MSGS / consumers;
    let mut tasks = Vec::new();
    for _ in 0..producers {
        let tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..per_p {
                tx.send(i).await.unwrap();
            }
        }));
    }
    drop(tx);
    for _ in 0..consumers {
        let rx = rx.clone();
        tasks.push(tokio::spawn(async move {
            if consumers == 1 {
                let mut rx = rx.lock().await;
                for _ in 0..per_c {
                    rx.recv().await.unwrap();
                }
            } else {
                for _ in 0..per_c {
                    rx.lock().await.recv().await.unwrap();
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

fn bench(c: &mut Criterion) {
    let rt = rt();
    for (p, q) in [(1u64, 1u64), (4, 4)] {
        let mut g = c.benchmark_group(format!("channel_{p}p{q}c"));
        g.throughput(Throughput::Elements(MSGS));
        g.measurement_time(Duration::from_secs(4)).sample_size(20);
        g.bench_function("gorch Channel", |b| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                for _ in 0..iters {
                    rt.block_on(ours(p, q));
                }
                t.elapsed()
            })
        });
        g.bench_function("tokio mpsc", |b| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                for _ in 0..iters {
                    rt.block_on(mpsc(p, q));
                }
                t.elapsed()
            })
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
