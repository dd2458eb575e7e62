//! Takes jobs from the `jobs` topic and does some real computing on each.
//!
//! It logs what it takes so that the demo shows it: every job that did not come from the
//! producer (such as `gorch-host publish jobs 'job from outside'`) at once, and the
//! producer's own jobs one line in every [`SUMMARY_EVERY`] (ten a second would drown the log).
use gorch_guest_sdk::{self as gorch, Error, bus};

/// One summary line per this many of the producer's jobs.
const SUMMARY_EVERY: u64 = 50;

fn run() -> Result<(), Error> {
    let mut taken: u64 = 0;
    loop {
        gorch::beat();
        let job = match bus::recv("jobs") {
            Ok(job) => job,
            Err(Error::Cancelled) => return Ok(()),
            Err(e) => return Err(e),
        };
        let digest = work(&job);
        let text = String::from_utf8_lossy(&job);
        taken += 1;
        if !from_producer(&text) {
            gorch::info!("took {text:?} -> {digest:016x}");
        } else if taken % SUMMARY_EVERY == 1 {
            gorch::info!("took {text:?} ({taken} jobs taken so far)");
        } else {
            gorch::debug!("{text} -> {digest:016x}");
        }
    }
}

/// The producer's jobs read `job N`.
fn from_producer(text: &str) -> bool {
    text.strip_prefix("job ").is_some_and(|n| n.parse::<u64>().is_ok())
}

/// A few hundred thousand rounds of FNV-1a: enough to show up as fuel and CPU.
fn work(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for round in 0..200_000u64 {
        for &b in data {
            h ^= u64::from(b) ^ round;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

gorch::worker!(run);
