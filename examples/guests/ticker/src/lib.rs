//! Beats, sleeps and logs once a second until it is stopped; also drains the `echo` topic
//! (which the echo plugin fills) so that the demo runs for ever.
use gorch_guest_sdk::{self as gorch, bus};
use std::time::Duration;

fn run() -> Result<(), gorch::Error> {
    let mut n: u64 = 0;
    loop {
        gorch::beat();
        n += 1;
        gorch::info!("tick {n} (restarts: {})", gorch::restarts());
        while let Some(m) = bus::recv_timeout("echo", Duration::ZERO)? {
            let text = String::from_utf8_lossy(&m);
            if text.starts_with("job ") {
                gorch::debug!("echoed: {text}");
            } else {
                gorch::info!("echoed: {text:?}");
            }
        }
        if !gorch::sleep(Duration::from_secs(1)) {
            gorch::info!("stopping after {n} ticks");
            return Ok(());
        }
    }
}

gorch::worker!(run);
