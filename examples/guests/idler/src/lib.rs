//! The smallest idle worker: it only loops on `mailbox::recv` (no environment, no log, no
//! topic), so its cost is the floor of an idle worker (the P2b row of the scale bench).
use gorch_guest_sdk::{self as gorch, Error, mailbox};

fn run() -> Result<(), Error> {
    loop {
        match mailbox::recv() {
            Ok(_) => {}
            Err(Error::Cancelled) => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

gorch::worker!(run);
