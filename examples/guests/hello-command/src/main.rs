//! A plain WASI 0.2 command: gorch-host runs it as a worker, its stdout goes to the log.
fn main() {
    let who = std::env::var("WHO").unwrap_or_else(|_| "world".to_string());
    println!("hello, {who}, from a plain WASI command");
    if std::env::args().any(|a| a == "--fail") {
        std::process::exit(3);
    }
}
