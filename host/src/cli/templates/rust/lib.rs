//! {{name}}: a gorch-host worker. Logs and republishes, as JSON on the `greetings` topic,
//! every message sent to its mailbox; beats while it waits.

use std::time::Duration;

use gorch_guest_sdk::serde::Serialize;
use gorch_guest_sdk::{self as gorch, Error, bus, mailbox};

/// What goes on the `greetings` topic (serde through the SDK's re-export).
#[derive(Serialize)]
#[serde(crate = "gorch_guest_sdk::serde")]
struct Greeting {
    from: String,
    text: String,
    count: u64,
}

fn run() -> Result<(), Error> {
    gorch::info!("{} starting (restarts: {})", gorch::name(), gorch::restarts());
    let mut count = 0;
    loop {
        gorch::beat(); // resets the idle watchdog
        match mailbox::recv_timeout(Duration::from_secs(1)) {
            Ok(Some(msg)) => {
                count += 1;
                let text = String::from_utf8_lossy(&msg).into_owned();
                gorch::info!("message {count}: {text}");
                bus::publish_json("greetings", &Greeting { from: gorch::name(), text, count })?;
            }
            Ok(None) => {}                          // nothing within a second: beat again
            Err(Error::Cancelled) => return Ok(()), // the host is stopping us
            Err(e) => return Err(e),
        }
    }
}

gorch::worker!(run);
