//! CPU profiles in pprof's protobuf format (readable by `go tool pprof`), sampled with the
//! `pprof` crate and encoded here without a protobuf compiler.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Why no profile was returned.
#[derive(Debug)]
pub(crate) enum ProfileError {
    /// Another profile is being taken: the sampler is process-wide, one at a time.
    Busy,
    /// The sampler failed.
    Failed(String),
}

/// Set while a profile is being taken (the sampler is process-wide).
static PROFILING: AtomicBool = AtomicBool::new(false);

/// The right to take the one profile of the process; released when dropped.
struct ProfileSlot;

impl ProfileSlot {
    fn take() -> Option<ProfileSlot> {
        PROFILING.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire).ok()?;
        Some(ProfileSlot)
    }
}

impl Drop for ProfileSlot {
    fn drop(&mut self) {
        PROFILING.store(false, Ordering::Release);
    }
}

/// Samples the whole process for `duration` at 100 Hz and returns `profile.proto` bytes.
/// One profile at a time: [`ProfileError::Busy`] while another is being taken. Dropping the
/// future (the client went away) ends the sampling early and frees the slot.
pub(crate) async fn cpu_profile(duration: Duration) -> Result<Vec<u8>, ProfileError> {
    let slot = ProfileSlot::take().ok_or(ProfileError::Busy)?;
    // Dropped with this future: the sampling thread stops waiting.
    let (_stop, stopped) = std::sync::mpsc::channel::<()>();
    tokio::task::spawn_blocking(move || {
        // Declared first, dropped last: the slot is free once the sampler has stopped and
        // before the caller sees the result.
        let _slot = slot;
        let started = Instant::now();
        let guard = pprof::ProfilerGuardBuilder::default()
            .frequency(FREQUENCY)
            .blocklist(&["libc", "libgcc", "pthread", "vdso"])
            .build()
            .map_err(|e| ProfileError::Failed(e.to_string()))?;
        let _ = stopped.recv_timeout(duration);
        let report = guard.report().build().map_err(|e| ProfileError::Failed(e.to_string()))?;
        Ok(encode(&report, started.elapsed()))
    })
    .await
    .map_err(|e| ProfileError::Failed(e.to_string()))?
}

const FREQUENCY: i32 = 100;

/// A minimal protobuf writer: varints and length-delimited fields.
#[derive(Default)]
struct Pb(Vec<u8>);

impl Pb {
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }
    fn uint(&mut self, field: u32, v: u64) {
        self.varint(u64::from(field << 3));
        self.varint(v);
    }
    fn int(&mut self, field: u32, v: i64) {
        self.uint(field, v as u64);
    }
    fn bytes(&mut self, field: u32, b: &[u8]) {
        self.varint(u64::from((field << 3) | 2));
        self.varint(b.len() as u64);
        self.0.extend_from_slice(b);
    }
    fn msg(&mut self, field: u32, m: Pb) {
        self.bytes(field, &m.0);
    }
}

#[derive(Default)]
struct Strings {
    table: Vec<String>,
    index: HashMap<String, i64>,
}

impl Strings {
    fn id(&mut self, s: &str) -> i64 {
        if let Some(i) = self.index.get(s) {
            return *i;
        }
        let i = self.table.len() as i64;
        self.table.push(s.to_string());
        self.index.insert(s.to_string(), i);
        i
    }
}

fn value_type(strings: &mut Strings, ty: &str, unit: &str) -> Pb {
    let mut v = Pb::default();
    v.int(1, strings.id(ty));
    v.int(2, strings.id(unit));
    v
}

/// Encodes a report as `perftools.profiles.Profile`.
fn encode(report: &pprof::Report, duration: Duration) -> Vec<u8> {
    let period = 1_000_000_000 / i64::from(FREQUENCY);
    let mut strings = Strings::default();
    strings.id("");
    let mut out = Pb::default();
    out.msg(1, value_type(&mut strings, "samples", "count"));
    out.msg(1, value_type(&mut strings, "cpu", "nanoseconds"));

    // One function per (name, file); one location per distinct frame.
    let mut functions: HashMap<(String, String), u64> = HashMap::new();
    let mut locations: HashMap<Vec<(u64, i64)>, u64> = HashMap::new();
    let mut function_msgs = Vec::new();
    let mut location_msgs = Vec::new();
    for (frames, count) in &report.data {
        let mut sample = Pb::default();
        let mut location_ids = Vec::new();
        for frame in &frames.frames {
            let lines: Vec<(u64, i64)> = frame
                .iter()
                .map(|sym| {
                    let key = (sym.name(), sym.filename().into_owned());
                    let next = functions.len() as u64 + 1;
                    let fid = *functions.entry(key.clone()).or_insert_with(|| {
                        let mut f = Pb::default();
                        f.uint(1, next);
                        f.int(2, strings.id(&key.0));
                        f.int(3, strings.id(&key.0));
                        f.int(4, strings.id(&key.1));
                        function_msgs.push(f);
                        next
                    });
                    (fid, i64::from(sym.lineno.unwrap_or(0)))
                })
                .collect();
            let next = locations.len() as u64 + 1;
            let lid = *locations.entry(lines.clone()).or_insert_with(|| {
                let mut l = Pb::default();
                l.uint(1, next);
                for (fid, line) in &lines {
                    let mut ln = Pb::default();
                    ln.uint(1, *fid);
                    ln.int(2, *line);
                    l.msg(4, ln);
                }
                location_msgs.push(l);
                next
            });
            location_ids.push(lid);
        }
        for id in location_ids {
            sample.uint(1, id);
        }
        let count = *count as i64;
        sample.int(2, count);
        sample.int(2, count * period);
        let mut label = Pb::default();
        label.int(1, strings.id("thread"));
        label.int(2, strings.id(&frames.thread_name_or_id()));
        sample.msg(3, label);
        out.msg(2, sample);
    }
    for l in location_msgs {
        out.msg(4, l);
    }
    for f in function_msgs {
        out.msg(5, f);
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0);
    let pt = value_type(&mut strings, "cpu", "nanoseconds");
    for s in &strings.table {
        out.bytes(6, s.as_bytes());
    }
    out.int(9, now - duration.as_nanos() as i64);
    out.int(10, duration.as_nanos() as i64);
    out.msg(11, pt);
    out.int(12, period);
    out.0
}
