//! Embedding gorch-host: a native routine and a wasm routine side by side, talking over the
//! bus and a mailbox, then a stats table and a bounded shutdown.
//!
//! Run it with `cargo run -p gorch-embed-example` (the example guests are built by the
//! build, like everything else).

use std::time::Duration;

use gorch_host::{CallError, Orchestrator, SpawnOptions, WasmEngine, WasmOptions};

fn main() -> anyhow::Result<()> {
    gorch_host::runtime_builder().build()?.block_on(async {
        let orch = Orchestrator::new();
        let engine = WasmEngine::new(Default::default())?;

        // A wasm guest: takes messages from its mailbox and republishes them on `echo`.
        let echo = engine.load_file(gorch_artifacts::path("echo"))?;
        orch.spawn_wasm(SpawnOptions::new("echo"), &echo, WasmOptions::default())?;

        // A native routine: sends to the guest's mailbox, reads the `echo` topic back.
        let native = orch.spawn(SpawnOptions::new("native"), |ctx| async move {
            for i in 0..5 {
                ctx.beat();
                ctx.send("echo", format!("hello {i}").into_bytes()).await?;
                if let Some(reply) = ctx.bus_recv("echo", Some(Duration::from_secs(5))).await? {
                    println!("native got back: {}", String::from_utf8_lossy(&reply));
                }
            }
            Ok::<(), CallError>(())
        })?;

        native.wait().await;
        orch.print_stats(&mut std::io::stdout())?;
        let report = orch.shutdown(Duration::from_secs(2)).await;
        println!("shutdown: {report:?}");
        Ok(())
    })
}
