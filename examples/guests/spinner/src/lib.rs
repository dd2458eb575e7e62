//! Spins in `loop {}` without ever calling the host: only epoch interruption can stop it.
use gorch_guest_sdk as gorch;

fn run() {
    gorch::info!("spinning; only the host's epoch interruption can stop me");
    #[allow(clippy::empty_loop)]
    loop {}
}

gorch::worker!(run);
