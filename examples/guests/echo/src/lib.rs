//! Takes every message from its mailbox and publishes it on the `echo` topic.
use gorch_guest_sdk::{self as gorch, Error, bus, mailbox};

fn run() -> Result<(), Error> {
    loop {
        gorch::beat();
        match mailbox::recv() {
            Ok(msg) => bus::publish("echo", &msg)?,
            Err(Error::Cancelled) => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

gorch::worker!(run);
