//! One guest, many behaviours, chosen by the `MODE` environment variable: the host's test
//! suite runs it to exercise every outcome a real component can have.
use gorch_guest_sdk::{self as gorch, Error, bus, mailbox};
use std::hint::black_box;
use std::time::Duration;

fn run() -> Result<(), String> {
    let mode = std::env::var("MODE").unwrap_or_default();
    match mode.as_str() {
        "ok" => Ok(()),
        "err" => Err("testkit failed on purpose".to_string()),
        "panic" => panic!("testkit panic: kaboom"),
        "unreachable" => {
            // Do some work first, so that the accounting of a trapped instance can be checked.
            black_box(compute(2_000_000));
            core::arch::wasm32::unreachable()
        }
        "oob" => {
            let p = black_box(0xffff_fff0usize) as *const u64;
            // Out of bounds of linear memory: the host traps.
            let v = unsafe { core::ptr::read_volatile(p) };
            Err(format!("read {v} out of bounds?"))
        }
        "stack-overflow" => Err(format!("{}", recurse(black_box(1)))),
        "spin" =>
        {
            #[allow(clippy::empty_loop)]
            loop {}
        }
        "compute" => {
            let iters: u64 = env_num("ITERS", 20_000_000);
            gorch::info!("compute -> {}", compute(iters));
            Ok(())
        }
        // Compute shapes for the accounting benchmark: calls, and memory with branches.
        "fib" => {
            let n = env_num("N", 30);
            gorch::info!("fib({n}) = {}", fib(black_box(n)));
            Ok(())
        }
        "sort" => {
            let (len, rounds) = (env_num("LEN", 100_000) as usize, env_num("ROUNDS", 10));
            let mut x: u32 = 2463534242;
            let mut v = vec![0u32; len];
            for _ in 0..rounds {
                for e in v.iter_mut() {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    *e = x;
                }
                v.sort_unstable();
            }
            gorch::info!("sorted, median {}", v[len / 2]);
            Ok(())
        }
        "idle" => {
            gorch::sleep(Duration::from_millis(env_num("MILLIS", 200)));
            Ok(())
        }
        "add-busy" => {
            gorch::add_busy(Duration::from_millis(env_num("MILLIS", 1500)));
            Ok(())
        }
        "memhog" => {
            let mut chunks: Vec<Vec<u8>> = Vec::new();
            loop {
                chunks.push(black_box(vec![1u8; 1 << 20]));
                if chunks.len() > 4096 {
                    return Err("allocated 4 GiB without hitting a limit".to_string());
                }
            }
        }
        "recv" => match mailbox::recv() {
            Ok(m) => Err(format!("unexpected message {m:?}")),
            Err(e) => {
                gorch::info!("recv returned: {e}");
                Err(format!("recv: {e}"))
            }
        },
        // Announces itself on the `parked` topic, then waits in `recv` (density benchmark).
        "park" => {
            bus::publish("parked", b"").map_err(|e| e.to_string())?;
            match mailbox::recv() {
                Ok(_) | Err(Error::Cancelled) => Ok(()),
                Err(e) => Err(e.to_string()),
            }
        }
        "sleep-forever" => {
            let woke = gorch::sleep(Duration::from_secs(3600));
            Err(format!("sleep returned {woke}"))
        }
        // Takes one message, then spins without host calls: only the kill ends it.
        "take-then-spin" => {
            let _ = mailbox::recv();
            #[allow(clippy::empty_loop)]
            loop {}
        }
        // Takes one message from TOPIC and keeps it (in flight, never acknowledged) until
        // stopped: a consumer whose host may die with the message.
        "take-and-hold" => {
            let topic = std::env::var("TOPIC").unwrap_or_else(|_| "work".into());
            bus::recv(&topic).map_err(|e| e.to_string())?;
            while !gorch::cancelled() {
                gorch::beat();
                gorch::sleep(Duration::from_millis(200));
            }
            // Not processed: an error puts the message back (redelivered elsewhere).
            Err("stopped while holding a message".into())
        }
        "beat-then-hang" => {
            gorch::beat();
            // Blocks in a host call without beating again.
            let _ = mailbox::recv();
            Ok(())
        }
        "sandbox" => sandbox(),
        "identity" => {
            gorch::info!(
                "id={} name={} restarts={}",
                gorch::id(),
                gorch::name(),
                gorch::restarts()
            );
            mailbox::send("observer", format!("{}|{}", gorch::id(), gorch::name()).as_bytes())
                .map_err(|e| e.to_string())
        }
        "echo" => loop {
            match mailbox::recv() {
                Ok(m) => bus::publish("testkit-out", &m).map_err(|e| e.to_string())?,
                Err(Error::Cancelled) => return Ok(()),
                Err(e) => return Err(e.to_string()),
            }
        },
        "bus-relay" => loop {
            match bus::recv("testkit-in") {
                Ok(m) => bus::publish("testkit-out", &m).map_err(|e| e.to_string())?,
                Err(Error::Cancelled) => return Ok(()),
                Err(e) => return Err(e.to_string()),
            }
        },
        // Forwards every message to `testkit-out`, and panics on a message "poison".
        // SOURCE=mailbox (default) or a topic name.
        "poison" => {
            let source = std::env::var("SOURCE").unwrap_or_else(|_| "mailbox".into());
            loop {
                let got = if source == "mailbox" { mailbox::recv() } else { bus::recv(&source) };
                match got {
                    Ok(m) if m == b"poison" => {
                        panic!("poisoned after {} restarts", gorch::restarts())
                    }
                    Ok(m) => bus::publish("testkit-out", &m).map_err(|e| e.to_string())?,
                    Err(Error::Cancelled) => return Ok(()),
                    Err(e) => return Err(e.to_string()),
                }
            }
        }
        // Provokes every WIT error the host can answer and reports them in order.
        "errors" => {
            let mut seen = Vec::new();
            let name = |e: Error| match e {
                Error::Cancelled => "cancelled".to_string(),
                Error::Closed => "closed".to_string(),
                Error::NoSuchRoutine(n) => format!("no-such-routine({n})"),
                Error::TooLarge(l) => format!("too-large({l})"),
                Error::Limit(_) => "limit".to_string(),
                Error::InvalidName(n) => format!("invalid-name({n})"),
                Error::OutcomeUnknown(n) => format!("outcome-unknown({n})"),
                Error::Codec(c) => format!("codec({c})"),
            };
            seen.push(mailbox::send("nobody", b"x").map_err(name).err().unwrap_or_default());
            let big = vec![0u8; env_num("BIG", 2048) as usize];
            seen.push(bus::publish("t", &big).map_err(name).err().unwrap_or_default());
            seen.push(bus::publish("", b"x").map_err(name).err().unwrap_or_default());
            seen.push(bus::publish("has space", b"x").map_err(name).err().unwrap_or_default());
            // Blocks until the host removes the topic: `closed`.
            seen.push(bus::recv("doomed").map(|_| ()).map_err(name).err().unwrap_or_default());
            let mut limit = String::new();
            for i in 0..100_000 {
                if let Err(e) = bus::publish(&format!("flood-{i}"), b"x") {
                    limit = format!("{}@{i}", name(e));
                    break;
                }
            }
            seen.push(limit);
            Err(seen.join(" "))
        }
        // Publishes COUNT messages of SIZE bytes on TOPIC (or sends them to the routine TO);
        // BATCH > 1 sends that many per host call (`publish-batch`, `send-batch`). Each
        // message starts with its number (8 bytes, little-endian) when SIZE allows.
        "flood" => {
            let topic = std::env::var("TOPIC").unwrap_or_else(|_| "flood".into());
            let to = std::env::var("TO").ok();
            let size = env_num("SIZE", 64) as usize;
            let (count, batch) = (env_num("COUNT", 1000), env_num("BATCH", 1).max(1));
            let payload = |i: u64| {
                let mut p = vec![7u8; size];
                if size >= 8 {
                    p[..8].copy_from_slice(&i.to_le_bytes());
                }
                p
            };
            let mut i = 0;
            while i < count {
                let n = (count - i).min(batch);
                let msgs: Vec<Vec<u8>> = (i..i + n).map(payload).collect();
                let r = match (&to, batch) {
                    (Some(to), 1) => mailbox::send(to, &msgs[0]),
                    (Some(to), _) => mailbox::send_batch(to, &msgs),
                    (None, 1) => bus::publish(&topic, &msgs[0]),
                    (None, _) => bus::publish_batch(&topic, &msgs),
                };
                r.map_err(|e| e.to_string())?;
                i += n;
            }
            Ok(())
        }
        // Receives COUNT messages from TOPIC, then returns; BATCH > 1 receives up to that
        // many per host call (`recv-batch`).
        "drain" => {
            let topic = std::env::var("TOPIC").unwrap_or_else(|_| "flood".into());
            let (count, batch) = (env_num("COUNT", 1000), env_num("BATCH", 1).max(1));
            if batch == 1 {
                for _ in 0..count {
                    bus::recv(&topic).map_err(|e| e.to_string())?;
                }
                return Ok(());
            }
            let mut left = count;
            while left > 0 {
                let max = left.min(batch) as u32;
                let got = bus::recv_batch(&topic, max).map_err(|e| e.to_string())?;
                left -= black_box(got).len() as u64;
            }
            Ok(())
        }
        // Forwards its mailbox to `testkit-out`, received MAX at a time; returns when stopped.
        "batch-echo" => {
            for msg in mailbox::batched(env_num("MAX", 16) as u32) {
                let msg = msg.map_err(|e| e.to_string())?;
                bus::publish("testkit-out", &msg).map_err(|e| e.to_string())?;
            }
            Ok(())
        }
        // Receives batches (up to MAX) from topic SOURCE and publishes each message on
        // `testkit-out` as "r<restarts> n<batch length> <message>"; on its first run (on
        // every run with POISON=always) it panics at a message "poison".
        "batch-trap" => {
            let source = std::env::var("SOURCE").unwrap_or_else(|_| "testkit-in".into());
            let restarts = gorch::restarts();
            let always = std::env::var("POISON").is_ok_and(|v| v == "always");
            loop {
                let batch = match bus::recv_batch(&source, env_num("MAX", 16) as u32) {
                    Ok(b) => b,
                    Err(Error::Cancelled) => return Ok(()),
                    Err(e) => return Err(e.to_string()),
                };
                for m in &batch {
                    if m == b"poison" && (restarts == 0 || always) {
                        panic!("trapped mid-batch");
                    }
                    let line =
                        format!("r{restarts} n{} {}", batch.len(), String::from_utf8_lossy(m));
                    bus::publish("testkit-out", line.as_bytes()).map_err(|e| e.to_string())?;
                }
            }
        }
        // Ping-pong: "ping" sends COUNT messages to PEER and waits for each reply; "pong"
        // answers every message in its mailbox to PEER.
        "ping" => {
            let peer = std::env::var("PEER").unwrap_or_else(|_| "pong".into());
            for _ in 0..env_num("COUNT", 1000) {
                mailbox::send(&peer, b"ping").map_err(|e| e.to_string())?;
                mailbox::recv().map_err(|e| e.to_string())?;
            }
            Ok(())
        }
        "pong" => {
            let peer = std::env::var("PEER").unwrap_or_else(|_| "ping".into());
            loop {
                match mailbox::recv() {
                    Ok(m) => mailbox::send(&peer, &m).map_err(|e| e.to_string())?,
                    Err(Error::Cancelled) => return Ok(()),
                    Err(e) => return Err(e.to_string()),
                }
            }
        }
        // Allocates a 64 MiB payload and tries to publish it.
        "huge" => {
            let big = vec![1u8; 64 << 20];
            match bus::publish("huge", &big) {
                Err(e) => Err(e.to_string()),
                Ok(()) => Ok(()),
            }
        }
        "stdout" => {
            println!("line from stdout");
            eprintln!("line from stderr");
            Ok(())
        }
        // Text that tries to pass for the host's own log lines: after a newline, after a
        // lone carriage return, behind an ANSI escape, on stdout, stderr and `log`.
        "forge" => {
            let forged = "1999-12-31T23:59:59.999999Z ERROR gorch_host::cli: FORGED";
            print!("out\n{forged}\n");
            print!("out\r{forged}\n");
            eprint!("err\r{forged}\r\n");
            eprint!("err\x1b[2K\r{forged}\n");
            gorch::error!("log\n{forged}");
            gorch::error!("log\r{forged}");
            Ok(())
        }
        other => Err(format!("unknown MODE {other:?}")),
    }
}

fn env_num(key: &str, default: u64) -> u64 {
    std::env::var(key).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn fib(n: u64) -> u64 {
    if n < 2 { n } else { fib(n - 1) + fib(n - 2) }
}

fn compute(iters: u64) -> u64 {
    let mut h: u64 = 1469598103934665603;
    for i in 0..iters {
        h = (h ^ i).wrapping_mul(1099511628211).rotate_left(5);
    }
    h
}

/// Recursion that lives on the wasm call stack (no linear-memory frames), so that it hits
/// the host's `max_wasm_stack` rather than the guest's own shadow stack.
#[allow(unconditional_recursion)]
#[inline(never)]
fn recurse(n: u64) -> u64 {
    recurse(n.wrapping_add(1)) ^ recurse(n.wrapping_add(2))
}

/// Tries what a sandboxed guest must not be able to do; fails naming whatever worked.
fn sandbox() -> Result<(), String> {
    let mut escaped = Vec::new();
    if std::fs::read("/etc/passwd").is_ok() {
        escaped.push("read /etc/passwd".to_string());
    }
    if std::fs::read_dir("/").is_ok() || std::fs::read_dir(".").is_ok() {
        escaped.push("listed a directory".to_string());
    }
    if std::fs::write("escape.txt", b"x").is_ok() {
        escaped.push("wrote a file".to_string());
    }
    let vars: Vec<String> = std::env::vars().map(|(k, _)| k).filter(|k| k != "MODE").collect();
    if !vars.is_empty() {
        escaped.push(format!("saw env vars {vars:?}"));
    }
    if std::net::TcpStream::connect("127.0.0.1:9").is_ok() {
        escaped.push("opened a TCP connection".to_string());
    }
    if std::net::TcpListener::bind("127.0.0.1:0").is_ok() {
        escaped.push("bound a TCP socket".to_string());
    }
    if std::net::UdpSocket::bind("127.0.0.1:0").is_ok() {
        escaped.push("bound a UDP socket".to_string());
    }
    if escaped.is_empty() {
        gorch::info!("sandbox held");
        Ok(())
    } else {
        Err(format!("sandbox escaped: {}", escaped.join(", ")))
    }
}

gorch::worker!(run);
