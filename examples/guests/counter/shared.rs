// The body of the `counter` and `counter2` guests (two versions of one stateful worker):
// counts the messages it takes, publishes `VERSION:count` on the `counter` topic, and hands
// the count over across live upgrades (`save` / `restore`).
use gorch_guest_sdk::{self as gorch, Error, bus, mailbox};
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};

static COUNT: AtomicU64 = AtomicU64::new(0);

fn run() -> Result<(), Error> {
    loop {
        gorch::beat();
        match mailbox::recv() {
            Ok(_) => {
                let n = COUNT.fetch_add(1, SeqCst) + 1;
                bus::publish("counter", format!("{VERSION}:{n}").as_bytes())?;
            }
            Err(Error::Cancelled) => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

fn save() -> Vec<u8> {
    COUNT.load(SeqCst).to_le_bytes().to_vec()
}

fn restore(state: Vec<u8>) -> Result<(), String> {
    // Lets a test make an upgrade fail: the manifest sets it for the new version.
    if std::env::var("REFUSE_STATE").is_ok() {
        return Err("refusing the saved state on purpose".to_string());
    }
    let bytes: [u8; 8] =
        state.try_into().map_err(|s: Vec<u8>| format!("expected 8 bytes, got {}", s.len()))?;
    COUNT.store(u64::from_le_bytes(bytes), SeqCst);
    Ok(())
}

gorch::worker!(run, save = save, restore = restore);
