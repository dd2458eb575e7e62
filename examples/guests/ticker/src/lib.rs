//! Beats, sleeps and logs once a second until it is stopped.
use gorch_guest_sdk as gorch;
use std::time::Duration;

fn run() -> Result<(), gorch::Error> {
    let mut n: u64 = 0;
    loop {
        gorch::beat();
        n += 1;
        gorch::info!("tick {n} (restarts: {})", gorch::restarts());
        if !gorch::sleep(Duration::from_secs(1)) {
            gorch::info!("stopping after {n} ticks");
            return Ok(());
        }
    }
}

gorch::worker!(run);
