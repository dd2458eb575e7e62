//! The Prometheus collector: every metric of DESIGN.md, computed from the orchestrator's
//! counters at scrape time. The hot paths only touch atomics; no label lookup happens per
//! message, and the series of a finished routine disappear with it.

use std::sync::atomic::Ordering::Relaxed;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{CounterVec, Encoder, GaugeVec, Opts, Registry, TextEncoder};

use crate::orchestrator::Orchestrator;
use crate::routine::{State, TERMINAL_STATES};

/// Collects the `gorch_*` metrics of one orchestrator. Register it in your own
/// [`Registry`] (see [`register`]) if your program has its own HTTP stack.
pub struct GorchCollector {
    orch: Orchestrator,
    descs: Vec<Desc>,
}

/// (name, help, labels, is_counter)
const METRICS: &[(&str, &str, &[&str], bool)] = &[
    ("gorch_routines", "Live routines by state.", &["state"], false),
    ("gorch_routine_info", "Routine identity (always 1).", &["name", "id", "plugin"], false),
    ("gorch_routine_up", "1 while the routine is RUNNING.", &["name"], false),
    ("gorch_routine_restarts_total", "Restarts by the supervisor.", &["name"], true),
    (
        "gorch_routine_busy_seconds_total",
        "CPU time of the routine's task plus add-busy.",
        &["name"],
        true,
    ),
    ("gorch_routine_fuel_consumed_total", "Wasm fuel units used.", &["name"], true),
    ("gorch_routine_memory_bytes", "Linear memory of the current instance.", &["name"], false),
    ("gorch_routine_queue_length", "Messages in the mailbox.", &["name"], false),
    ("gorch_routine_queue_capacity", "Mailbox capacity.", &["name"], false),
    ("gorch_routine_queue_bytes", "Approximate bytes in the mailbox.", &["name"], false),
    (
        "gorch_routine_messages_received_total",
        "Messages taken from the mailbox and topics.",
        &["name"],
        true,
    ),
    (
        "gorch_routine_messages_sent_total",
        "Messages sent to mailboxes and published.",
        &["name"],
        true,
    ),
    ("gorch_routine_terminations_total", "Runs ended, by end state.", &["name", "state"], true),
    ("gorch_topic_length", "Messages queued on the topic.", &["topic"], false),
    ("gorch_topic_capacity", "Topic capacity.", &["topic"], false),
    ("gorch_topic_bytes", "Approximate bytes queued on the topic.", &["topic"], false),
    ("gorch_topic_published_total", "Messages published on the topic.", &["topic"], true),
    ("gorch_topic_received_total", "Messages received from the topic.", &["topic"], true),
    (
        "gorch_topic_blocked_publish_seconds_total",
        "Time publishers waited for room.",
        &["topic"],
        true,
    ),
    (
        "gorch_topic_blocked_recv_seconds_total",
        "Time receivers waited for a message.",
        &["topic"],
        true,
    ),
    (
        "gorch_dead_letters_total",
        "Messages sent to dead-letter after max-deliveries.",
        &["name"],
        true,
    ),
];

enum Vec_ {
    Gauge(GaugeVec),
    Counter(CounterVec),
}

impl Vec_ {
    fn set(&self, labels: &[&str], v: f64) {
        match self {
            Vec_::Gauge(g) => g.with_label_values(labels).set(v),
            Vec_::Counter(c) => c.with_label_values(labels).inc_by(v.max(0.0)),
        }
    }
    fn collect(&self) -> Vec<MetricFamily> {
        match self {
            Vec_::Gauge(g) => g.collect(),
            Vec_::Counter(c) => c.collect(),
        }
    }
}

fn make(i: usize) -> Vec_ {
    let (name, help, labels, counter) = METRICS[i];
    let opts = Opts::new(name, help);
    if counter {
        Vec_::Counter(CounterVec::new(opts, labels).expect("valid metric"))
    } else {
        Vec_::Gauge(GaugeVec::new(opts, labels).expect("valid metric"))
    }
}

impl GorchCollector {
    /// A collector for `orch`.
    pub fn new(orch: Orchestrator) -> Self {
        let all = METRICS
            .iter()
            .map(|(name, help, labels, _)| {
                Desc::new(
                    name.to_string(),
                    help.to_string(),
                    labels.iter().map(|l| l.to_string()).collect(),
                    Default::default(),
                )
                .expect("valid metric")
            })
            .collect();
        GorchCollector { orch, descs: all }
    }
}

impl Collector for GorchCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let m: Vec<Vec_> = (0..METRICS.len()).map(make).collect();
        let routines = self.orch.shared_list();
        for s in State::ALL {
            let n = routines.iter().filter(|r| r.state() == s).count();
            m[0].set(&[s.as_str()], n as f64);
        }
        for r in &routines {
            let snap = r.snapshot();
            let name = snap.name.as_str();
            let id = snap.id.to_string();
            m[1].set(&[name, &id, &snap.plugin], 1.0);
            m[2].set(&[name], if snap.state == State::Running { 1.0 } else { 0.0 });
            m[3].set(&[name], snap.restarts as f64);
            m[4].set(&[name], snap.busy_seconds);
            m[5].set(&[name], snap.fuel_consumed as f64);
            m[6].set(&[name], snap.memory_bytes as f64);
            m[7].set(&[name], snap.queue_len as f64);
            m[8].set(&[name], snap.queue_cap as f64);
            m[9].set(&[name], snap.queue_bytes as f64);
            m[10].set(&[name], snap.messages_in as f64);
            m[11].set(&[name], snap.messages_out as f64);
            for (i, st) in TERMINAL_STATES.iter().enumerate() {
                m[12].set(&[name, st.as_str()], r.terminations[i].load(Relaxed) as f64);
            }
            m[20].set(&[name], r.dead_letters.load(Relaxed) as f64);
        }
        for t in self.orch.topics() {
            let topic = t.name.as_str();
            m[13].set(&[topic], t.len as f64);
            m[14].set(&[topic], t.cap as f64);
            m[15].set(&[topic], t.bytes as f64);
            m[16].set(&[topic], t.published as f64);
            m[17].set(&[topic], t.received as f64);
            m[18].set(&[topic], t.blocked_publish_seconds);
            m[19].set(&[topic], t.blocked_recv_seconds);
        }
        m.iter().flat_map(Vec_::collect).collect()
    }
}

/// A registry with the `gorch_*` metrics of `orch` and the standard `process_*` metrics.
pub fn registry(orch: &Orchestrator) -> Registry {
    let r = Registry::new();
    register(orch, &r).expect("fresh registry");
    r
}

/// Registers the `gorch_*` metrics of `orch` and the `process_*` metrics in `registry`.
pub fn register(orch: &Orchestrator, registry: &Registry) -> prometheus::Result<()> {
    registry.register(Box::new(GorchCollector::new(orch.clone())))?;
    #[cfg(target_os = "linux")]
    registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;
    Ok(())
}

/// The Prometheus text exposition of `registry`.
pub fn render(registry: &Registry) -> String {
    let mut buf = Vec::new();
    // Encoding into a Vec cannot fail for the text format.
    let _ = TextEncoder::new().encode(&registry.gather(), &mut buf);
    String::from_utf8(buf).unwrap_or_default()
}
