//! Takes jobs from the `jobs` topic and does some real computing on each.
use gorch_guest_sdk::{self as gorch, Error, bus};

fn run() -> Result<(), Error> {
    loop {
        gorch::beat();
        let job = match bus::recv("jobs") {
            Ok(job) => job,
            Err(Error::Cancelled) => return Ok(()),
            Err(e) => return Err(e),
        };
        let digest = work(&job);
        gorch::debug!("{} -> {digest:016x}", String::from_utf8_lossy(&job));
    }
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
