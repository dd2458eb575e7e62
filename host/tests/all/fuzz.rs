//! Fuzz-style: generated (`wasm-smith`) and mutated (`wasm-mutate`, byte flips) components
//! fed to loading and to `gorch-host check`. Every input must give a result (a component or
//! an error), never a panic or a hang; whatever loads is spawned once, killed, and the
//! orchestrator must survive it. Seeds are deterministic: a failure names the case, and the
//! case can be rebuilt from it alone.

use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use arbitrary::Unstructured;
use gorch_host::{Orchestrator, SpawnOptions, State, WasmComponent, WasmOptions};
use wasm_encoder::{
    Alias, CanonicalFunctionSection, CanonicalOption, Component, ComponentAliasSection,
    ComponentExportKind, ComponentExportSection, ComponentSectionId, ComponentTypeSection,
    ComponentValType, ExportKind, ExportSection, FunctionSection, InstanceSection, MemorySection,
    MemoryType, Module, PrimitiveValType, RawSection, TypeSection, ValType,
};

use crate::common::host::BIN;
use crate::common::*;

/// Cases of each kind: generated components, generated modules wrapped into a worker,
/// generated modules wrapped as they are, `wasm-mutate`d guests, byte-mutated guests.
const GENERATED: u64 = 32;
const RUNNABLE: u64 = 32;
const WRAPPED: u64 = 16;
const MUTATED: u64 = 24;
const FLIPPED: u64 = 32;

/// How long one case (generation and load) may take before it counts as a hang.
const CASE_BOUND: Duration = Duration::from_secs(60);

/// splitmix64: a deterministic byte source for `arbitrary` and the mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// A small module or component configuration: every case stays quick to compile.
fn small_config() -> wasm_smith::Config {
    wasm_smith::Config {
        max_funcs: 20,
        max_types: 20,
        max_imports: 8,
        max_exports: 8,
        max_instructions: 200,
        max_globals: 10,
        max_data_segments: 4,
        max_element_segments: 4,
        max_elements: 20,
        max_memory32_bytes: 4 << 20,
        max_memory64_bytes: 4 << 20,
        max_table_elements: 100,
        max_components: 3,
        max_instances: 3,
        max_modules: 3,
        max_values: 3,
        max_aliases: 50,
        max_nesting_depth: 3,
        ..Default::default()
    }
}

/// `config` for an even `seed`; for an odd one, restricted to the proposals this engine
/// enables (no GC or reference types, exceptions, threads, memory64), so that the input
/// gets past validation to compiling, linking and the world check.
fn features(seed: u64, config: wasm_smith::Config) -> wasm_smith::Config {
    if seed.is_multiple_of(2) {
        return config;
    }
    wasm_smith::Config {
        gc_enabled: false,
        reference_types_enabled: false,
        exceptions_enabled: false,
        threads_enabled: false,
        shared_everything_threads_enabled: false,
        memory64_enabled: false,
        custom_page_sizes_enabled: false,
        wide_arithmetic_enabled: false,
        ..config
    }
}

/// A module exporting what a worker's `run` lifts: `run: () -> i32` (a pointer to the
/// result) and `memory`. wasm-smith generates modules with these exports.
fn worker_exports() -> Vec<u8> {
    let mut m = Module::new();
    let mut types = TypeSection::new();
    types.ty().function([], [ValType::I32]);
    m.section(&types);
    let mut funcs = FunctionSection::new();
    funcs.function(0);
    m.section(&funcs);
    let mut mems = MemorySection::new();
    mems.memory(MemoryType {
        minimum: 1,
        maximum: None,
        memory64: false,
        shared: false,
        page_size_log2: None,
    });
    m.section(&mems);
    let mut exports = ExportSection::new();
    exports.export("run", ExportKind::Func, 0).export("memory", ExportKind::Memory, 0);
    m.section(&exports);
    let mut code = wasm_encoder::CodeSection::new();
    let mut f = wasm_encoder::Function::new([]);
    f.instructions().i32_const(0).end();
    code.function(&f);
    m.section(&code);
    m.finish()
}

/// A component holding `module` as it is (no instance, no export): loading must refuse it.
fn wrap_module(module: &[u8]) -> Vec<u8> {
    let mut c = Component::new();
    c.section(&RawSection { id: ComponentSectionId::CoreModule as u8, data: module });
    c.finish()
}

/// A worker component around `module` (which exports `run` and `memory`, and imports
/// nothing): `run: func() -> result<_, string>` lifted from the module's `run`.
fn wrap_worker(module: &[u8]) -> Vec<u8> {
    let mut c = Component::new();
    c.section(&RawSection { id: ComponentSectionId::CoreModule as u8, data: module });
    let mut instances = InstanceSection::new();
    instances.instantiate(0, Vec::<(&str, wasm_encoder::ModuleArg)>::new());
    c.section(&instances);
    let mut aliases = ComponentAliasSection::new();
    aliases.alias(Alias::CoreInstanceExport { instance: 0, kind: ExportKind::Func, name: "run" });
    aliases.alias(Alias::CoreInstanceExport {
        instance: 0,
        kind: ExportKind::Memory,
        name: "memory",
    });
    c.section(&aliases);
    let mut types = ComponentTypeSection::new();
    types.defined_type().result(None, Some(ComponentValType::Primitive(PrimitiveValType::String)));
    types
        .function()
        .params(Vec::<(&str, ComponentValType)>::new())
        .result(Some(ComponentValType::Type(0)));
    c.section(&types);
    let mut canon = CanonicalFunctionSection::new();
    canon.lift(0, 1, [CanonicalOption::Memory(0), CanonicalOption::UTF8]);
    c.section(&canon);
    let mut exports = ComponentExportSection::new();
    exports.export("run", ComponentExportKind::Func, 0, None);
    c.section(&exports);
    c.finish()
}

/// The top-level sections of a component: `(id, contents)`.
fn sections(component: &[u8]) -> Vec<(u8, &[u8])> {
    let mut out = Vec::new();
    let mut rest = &component[8..];
    while let Some((&id, after)) = rest.split_first() {
        let (mut size, mut shift, mut used) = (0usize, 0, 0);
        for &b in after {
            size |= usize::from(b & 0x7f) << shift;
            shift += 7;
            used += 1;
            if b & 0x80 == 0 {
                break;
            }
        }
        let data = &after[used..used + size];
        out.push((id, data));
        rest = &after[used + size..];
    }
    out
}

/// `component` with its `index`th top-level section's contents replaced by `data`.
fn replace_section(component: &[u8], index: usize, data: &[u8]) -> Vec<u8> {
    let mut c = Component::new();
    for (i, (id, old)) in sections(component).into_iter().enumerate() {
        c.section(&RawSection { id, data: if i == index { data } else { old } });
    }
    c.finish()
}

/// Raw byte mutations of `input`: flips, a cut, a zeroed or duplicated run.
fn flip(input: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut b = input.to_vec();
    match rng.below(4) {
        0 => {
            for _ in 0..1 + rng.below(8) {
                let i = 8 + rng.below(b.len() - 8);
                b[i] ^= 1 << rng.below(8);
            }
        }
        1 => b.truncate(8 + rng.below(b.len() - 8)),
        2 => {
            let i = 8 + rng.below(b.len() - 8);
            let n = (1 + rng.below(64)).min(b.len() - i);
            b[i..i + n].fill(0);
        }
        _ => {
            let i = 8 + rng.below(b.len() - 8);
            let n = (1 + rng.below(256)).min(b.len() - i);
            let run = b[i..i + n].to_vec();
            b.splice(i..i, run);
        }
    }
    b
}

/// A core module of `guest`, mutated by `wasm-mutate`, put back into the component; `None`
/// when wasm-mutate finds nothing to do.
fn mutate(guest: &[u8], rng: &mut Rng, seed: u64) -> Option<Vec<u8>> {
    let modules: Vec<usize> = sections(guest)
        .iter()
        .enumerate()
        .filter(|(_, (id, _))| *id == ComponentSectionId::CoreModule as u8)
        .map(|(i, _)| i)
        .collect();
    let index = modules[rng.below(modules.len())];
    let module = sections(guest)[index].1;
    let mut m = wasm_mutate::WasmMutate::default();
    m.seed(seed).fuel(1000).preserve_semantics(rng.below(2) == 0);
    let mutated = m.run(module).ok()?.find_map(Result::ok)?;
    Some(replace_section(guest, index, &mutated))
}

/// One fuzz input: where it came from (enough to rebuild it) and its bytes.
struct Case {
    label: String,
    bytes: Vec<u8>,
}

/// Builds case `seed` of `kind`; `None` when the generator gives up on its bytes.
fn build(kind: &str, seed: u64, guests: &[Vec<u8>]) -> Option<Vec<u8>> {
    let mut rng = Rng(seed.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ kind.len() as u64);
    match kind {
        "generated" => {
            let data = rng.bytes(4096);
            let config = features(seed, small_config());
            let c = wasm_smith::Component::new(config, &mut Unstructured::new(&data));
            Some(c.ok()?.to_bytes())
        }
        "runnable" => {
            let data = rng.bytes(4096);
            // Only the memory the export asks for (the pool allows one per instance).
            let config = wasm_smith::Config {
                max_imports: 0,
                max_memories: 0,
                exports: Some(worker_exports()),
                ..small_config()
            };
            let config = features(1, config);
            let m = wasm_smith::Module::new(config, &mut Unstructured::new(&data)).ok()?;
            Some(wrap_worker(&m.to_bytes()))
        }
        "wrapped" => {
            let data = rng.bytes(4096);
            let config = features(seed, small_config());
            let m = wasm_smith::Module::new(config, &mut Unstructured::new(&data)).ok()?;
            Some(wrap_module(&m.to_bytes()))
        }
        "mutated" => mutate(&guests[seed as usize % guests.len()], &mut rng, seed),
        "flipped" => Some(flip(&guests[seed as usize % guests.len()], &mut rng)),
        _ => unreachable!("{kind}"),
    }
}

/// What the cases did.
#[derive(Default)]
struct Tally {
    /// Inputs the generator or mutator produced nothing (or panicked) for.
    skipped: usize,
    loaded: Vec<(String, Vec<u8>, WasmComponent)>,
    /// Time spent on each kind.
    took: Vec<(&'static str, Duration)>,
    /// Inputs refused, with the error.
    refused: Vec<(String, Vec<u8>, String)>,
}

/// Builds and loads every case on a thread of its own, watching each against
/// [`CASE_BOUND`]: a panic in loading or a hang fails the test naming the case.
fn load_all(guests: Vec<Vec<u8>>) -> Tally {
    let (tx, rx) = mpsc::channel::<Result<String, String>>();
    let worker = std::thread::spawn(move || {
        let mut tally = Tally::default();
        let kinds = [
            ("generated", GENERATED),
            ("runnable", RUNNABLE),
            ("wrapped", WRAPPED),
            ("mutated", MUTATED),
            ("flipped", FLIPPED),
        ];
        for (kind, n) in kinds {
            let t = Instant::now();
            for seed in 0..n {
                let label = format!("{kind} seed {seed}");
                let _ = tx.send(Ok(label.clone()));
                // A panic of the generator is not ours: skip the input.
                let built = std::panic::catch_unwind(|| build(kind, seed, &guests));
                let Ok(Some(bytes)) = built else {
                    tally.skipped += 1;
                    continue;
                };
                let case = Case { label, bytes };
                let loaded = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    engine().load_bytes("fuzz.wasm", &case.bytes)
                }));
                match loaded {
                    Ok(Ok(c)) => tally.loaded.push((case.label, case.bytes, c)),
                    Ok(Err(e)) => {
                        let e = e.to_string();
                        assert!(e.starts_with("fuzz.wasm: "), "{}: {e}", case.label);
                        tally.refused.push((case.label, case.bytes, e));
                    }
                    Err(_) => {
                        let _ = tx.send(Err(format!(
                            "{}: load_bytes panicked ({} bytes)",
                            case.label,
                            case.bytes.len()
                        )));
                        return tally;
                    }
                }
            }
            tally.took.push((kind, t.elapsed()));
        }
        tally
    });
    let mut current = String::from("start");
    loop {
        match rx.recv_timeout(CASE_BOUND) {
            Ok(Ok(label)) => current = label,
            Ok(Err(panicked)) => panic!("{panicked}"),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!("{current}: still loading after {CASE_BOUND:?}")
            }
        }
    }
    worker.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
}

/// Spawns every loaded component once, a few at a time, kills each after a short bounded
/// wait, and checks that the orchestrator still runs a good guest afterwards.
async fn spawn_loaded(loaded: &[(String, Vec<u8>, WasmComponent)]) -> Vec<(String, State)> {
    let orch = Orchestrator::new();
    let mut ends = Vec::new();
    for (batch, chunk) in loaded.chunks(8).enumerate() {
        let handles: Vec<_> = chunk
            .iter()
            .enumerate()
            .map(|(i, (label, _, c))| {
                let opts =
                    SpawnOptions::new(format!("fuzz-{batch}-{i}")).grace(Duration::from_millis(50));
                // Half with a fuel limit, half without: a `loop {}` must yield to the kill.
                let wasm = WasmOptions::default().memory(16 << 20);
                let wasm = if i.is_multiple_of(2) { wasm.fuel(50_000_000) } else { wasm };
                let h = orch.spawn_wasm(opts, c, wasm).unwrap_or_else(|e| panic!("{label}: {e}"));
                (label.clone(), h)
            })
            .collect();
        // Each either ends by itself or runs for a moment.
        let settled = || {
            handles.iter().all(|(_, h)| h.state().is_final() || h.snapshot().uptime_seconds > 0.2)
        };
        wait_until(Duration::from_secs(10), settled).await;
        for (label, h) in &handles {
            h.kill();
            let state =
                tokio::time::timeout(Duration::from_secs(10), h.wait()).await.unwrap_or_else(
                    |_| panic!("{label}: not ended 10 s after kill: {:?}", h.snapshot()),
                );
            ends.push((label.clone(), state));
        }
    }
    // The orchestrator survived: a good guest still runs to the end.
    let canary = spawn_mode(&orch, SpawnOptions::new("canary"), "ok");
    assert_eq!(wait_end(&canary, Duration::from_secs(10)).await, State::Stopped);
    shutdown(&orch).await;
    ends
}

/// Runs `gorch-host check --no-cache FILE` with a bound; returns whether it succeeded.
fn check(file: &Path) -> bool {
    let mut child = Command::new(BIN)
        .args(["check", "--no-cache"])
        .arg(file)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn gorch-host check");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(
                status.code().is_some(),
                "{}: check killed by a signal: {status}",
                file.display()
            );
            return status.success();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{}: check still running after a minute", file.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn generated_and_mutated_components_load_or_fail_without_panics_or_hangs() {
    let started = Instant::now();
    let guests: Vec<Vec<u8>> = ["echo", "ticker"]
        .iter()
        .map(|g| std::fs::read(gorch_artifacts::path(g)).unwrap())
        .collect();
    let tally = load_all(guests);
    let total = GENERATED + RUNNABLE + WRAPPED + MUTATED + FLIPPED;
    let (loaded, refused) = (tally.loaded.len(), tally.refused.len());
    assert_eq!((loaded + refused + tally.skipped) as u64, total);
    // The generators do produce: most cases reach loading, and both outcomes occur.
    assert!(tally.skipped < total as usize / 4, "{} skipped", tally.skipped);
    assert!(loaded > 0 && refused > 0, "{loaded} loaded, {refused} refused");
    let loading = started.elapsed();

    let ends = run(spawn_loaded(&tally.loaded));
    assert_eq!(ends.len(), loaded);

    // A handful through the binary: the same verdict as the library's, an exit status.
    let tmp = tempfile::tempdir().unwrap();
    // (`check` uses no instance pool: leave out what only the pool refuses.)
    let refused_anywhere: Vec<_> =
        tally.refused.iter().filter(|(_, _, e)| !e.contains("pooling")).collect();
    let some_refused = refused_anywhere.iter().step_by((refused_anywhere.len() / 4).max(1));
    let some_loaded = tally.loaded.iter().step_by((loaded / 4).max(1));
    let picks = some_refused
        .take(4)
        .map(|(l, b, _)| (l, b, false))
        .chain(some_loaded.take(4).map(|(l, b, _)| (l, b, true)));
    for (i, (label, bytes, ok)) in picks.enumerate() {
        let file = tmp.path().join(format!("case-{i}.wasm"));
        std::fs::write(&file, bytes).unwrap();
        assert_eq!(check(&file), ok, "{label}: check disagrees with load_bytes");
    }
    eprintln!(
        "fuzz: {total} cases, {loaded} loaded, {refused} refused, {} skipped; loading {:?} \
         {:?}, all {:?}; ends: {:?}",
        tally.skipped,
        loading,
        tally.took,
        started.elapsed(),
        ends.iter().map(|(_, s)| *s).collect::<Vec<_>>()
    );
}
