//! Takes every message from its mailbox and publishes it on the `echo` topic.
//!
//! Messages that did not come from the producer (such as `gorch-host send echo hi`) are
//! logged, so that the demo shows them arrive.
use gorch_guest_sdk::{self as gorch, Error, bus, mailbox};

fn run() -> Result<(), Error> {
    loop {
        gorch::beat();
        match mailbox::recv() {
            Ok(msg) => {
                let text = String::from_utf8_lossy(&msg);
                if !text.starts_with("job ") {
                    gorch::info!("republishing {text:?} on the echo topic");
                }
                bus::publish("echo", &msg)?
            }
            Err(Error::Cancelled) => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

gorch::worker!(run);
