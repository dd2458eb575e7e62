//! Takes jobs from the `jobs` topic and panics on every Nth one (`CRASH_EVERY`, default 5),
//! to show supervision at work.
use gorch_guest_sdk::{self as gorch, Error, bus};

fn run() -> Result<(), Error> {
    let every: u64 = std::env::var("CRASH_EVERY").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let mut seen: u64 = 0;
    loop {
        gorch::beat();
        let job = match bus::recv("jobs") {
            Ok(job) => job,
            Err(Error::Cancelled) => return Ok(()),
            Err(e) => return Err(e),
        };
        seen += 1;
        if seen.is_multiple_of(every) {
            panic!("crasher: giving up on {:?} after {seen} jobs", String::from_utf8_lossy(&job));
        }
    }
}

gorch::worker!(run);
