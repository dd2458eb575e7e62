//! Publishes a numbered job on the `jobs` topic every 100 ms, and every tenth one to the
//! `echo` routine's mailbox.
use gorch_guest_sdk::{self as gorch, Error, bus, mailbox};
use std::time::Duration;

fn run() -> Result<(), Error> {
    let mut n: u64 = 0;
    while gorch::sleep(Duration::from_millis(100)) {
        gorch::beat();
        n += 1;
        let job = format!("job {n}");
        bus::publish("jobs", job.as_bytes())?;
        if n.is_multiple_of(10) {
            match mailbox::send("echo", job.as_bytes()) {
                // The echo plugin is optional.
                Ok(()) | Err(Error::NoSuchRoutine(_)) => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

gorch::worker!(run);
