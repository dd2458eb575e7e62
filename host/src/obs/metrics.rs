//! The Prometheus metrics: every `gorch_*` metric of the contract, computed from the orchestrator's
//! counters at scrape time. The hot paths only touch atomics; no label lookup happens per
//! message, and the series of a finished routine disappear with it.

use std::fmt::Write;

use prometheus::core::{Collector, Desc};
use prometheus::proto::{
    Counter, Gauge, LabelPair, Metric as ProtoMetric, MetricFamily, MetricType,
};
use prometheus::{Encoder, Registry, TextEncoder};

use crate::orchestrator::Orchestrator;
use crate::routine::State;

/// Collects the `gorch_*` metrics of one orchestrator. Register it in your own
/// [`Registry`] (see [`register`]) if your program has its own HTTP stack.
pub struct GorchCollector {
    orch: Orchestrator,
    descs: Vec<Desc>,
    routine_limit: usize,
}

/// Every `gorch_*` metric. The declaration order is the exposition order; [`Series::spec`]
/// is the table of names, help texts and labels, and [`visit`] the one place that knows what
/// each measures, so a metric cannot be in one and missing from the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
enum Series {
    Routines,
    RoutineInfo,
    RoutineUp,
    Restarts,
    Busy,
    Fuel,
    Memory,
    QueueLength,
    QueueCapacity,
    QueueBytes,
    MessagesIn,
    MessagesOut,
    Terminations,
    TopicLength,
    TopicCapacity,
    TopicBytes,
    TopicPublished,
    TopicReceived,
    TopicBlockedPublish,
    TopicBlockedRecv,
    TopicPendingAck,
    TopicRedelivered,
    TopicDeadLettered,
    TopicPrefetched,
    DeadLetters,
    Upgrades,
    PluginRoutines,
    PluginRestarts,
    PluginBusy,
    PluginFuel,
    PluginMemory,
    PluginQueueLength,
    PluginMessagesIn,
    PluginMessagesOut,
    PluginDeadLetters,
    PluginEnded,
    PerRoutine,
    ClusterNodes,
    DeadLettersDropped,
    AcksUnconfirmed,
}

/// What describes a metric family: name, help, label names (alphabetical), counter or gauge.
struct Spec {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
    counter: bool,
}

impl Series {
    const ALL: [Series; 40] = [
        Series::Routines,
        Series::RoutineInfo,
        Series::RoutineUp,
        Series::Restarts,
        Series::Busy,
        Series::Fuel,
        Series::Memory,
        Series::QueueLength,
        Series::QueueCapacity,
        Series::QueueBytes,
        Series::MessagesIn,
        Series::MessagesOut,
        Series::Terminations,
        Series::TopicLength,
        Series::TopicCapacity,
        Series::TopicBytes,
        Series::TopicPublished,
        Series::TopicReceived,
        Series::TopicBlockedPublish,
        Series::TopicBlockedRecv,
        Series::TopicPendingAck,
        Series::TopicRedelivered,
        Series::TopicDeadLettered,
        Series::TopicPrefetched,
        Series::DeadLetters,
        Series::Upgrades,
        Series::PluginRoutines,
        Series::PluginRestarts,
        Series::PluginBusy,
        Series::PluginFuel,
        Series::PluginMemory,
        Series::PluginQueueLength,
        Series::PluginMessagesIn,
        Series::PluginMessagesOut,
        Series::PluginDeadLetters,
        Series::PluginEnded,
        Series::PerRoutine,
        Series::ClusterNodes,
        Series::DeadLettersDropped,
        Series::AcksUnconfirmed,
    ];

    fn spec(self) -> Spec {
        const NAME: &[&str] = &["name"];
        const TOPIC: &[&str] = &["topic"];
        const NONE: &[&str] = &[];
        const PLUGIN: &[&str] = &["plugin"];
        let (name, help, labels, counter) = match self {
            Series::Routines => {
                ("gorch_routines", "Live routines by state.", &["state"][..], false)
            }
            Series::RoutineInfo => (
                "gorch_routine_info",
                "Routine identity (always 1).",
                &["id", "name", "plugin"][..],
                false,
            ),
            Series::RoutineUp => {
                ("gorch_routine_up", "1 while the routine is RUNNING.", NAME, false)
            }
            Series::Restarts => {
                ("gorch_routine_restarts_total", "Restarts by the supervisor.", NAME, true)
            }
            Series::Busy => (
                "gorch_routine_busy_seconds_total",
                "CPU time of the routine's task plus add-busy.",
                NAME,
                true,
            ),
            Series::Fuel => {
                ("gorch_routine_fuel_consumed_total", "Wasm fuel units used.", NAME, true)
            }
            Series::Memory => (
                "gorch_routine_memory_bytes",
                "Linear memory of the current instance.",
                NAME,
                false,
            ),
            Series::QueueLength => {
                ("gorch_routine_queue_length", "Messages in the mailbox.", NAME, false)
            }
            Series::QueueCapacity => {
                ("gorch_routine_queue_capacity", "Mailbox capacity.", NAME, false)
            }
            Series::QueueBytes => {
                ("gorch_routine_queue_bytes", "Approximate bytes in the mailbox.", NAME, false)
            }
            Series::MessagesIn => (
                "gorch_routine_messages_received_total",
                "Messages taken from the mailbox and topics.",
                NAME,
                true,
            ),
            Series::MessagesOut => (
                "gorch_routine_messages_sent_total",
                "Messages sent to mailboxes and published.",
                NAME,
                true,
            ),
            Series::Terminations => (
                "gorch_routine_terminations_total",
                "Runs ended, by end state.",
                &["name", "state"][..],
                true,
            ),
            Series::TopicLength => {
                ("gorch_topic_length", "Messages queued on the topic.", TOPIC, false)
            }
            Series::TopicCapacity => ("gorch_topic_capacity", "Topic capacity.", TOPIC, false),
            Series::TopicBytes => {
                ("gorch_topic_bytes", "Approximate bytes queued on the topic.", TOPIC, false)
            }
            Series::TopicPublished => {
                ("gorch_topic_published_total", "Messages published on the topic.", TOPIC, true)
            }
            Series::TopicReceived => {
                ("gorch_topic_received_total", "Messages received from the topic.", TOPIC, true)
            }
            Series::TopicBlockedPublish => (
                "gorch_topic_blocked_publish_seconds_total",
                "Time publishers waited for room.",
                TOPIC,
                true,
            ),
            Series::TopicBlockedRecv => (
                "gorch_topic_blocked_recv_seconds_total",
                "Time receivers waited for a message.",
                TOPIC,
                true,
            ),
            Series::TopicPendingAck => (
                "gorch_topic_pending_ack",
                "Cluster topic messages handed to a consumer and not yet acknowledged (only with --nats).",
                TOPIC,
                false,
            ),
            Series::TopicRedelivered => (
                "gorch_topic_redelivered",
                "Of the pending ones, cluster topic messages delivered more than once (only with --nats).",
                TOPIC,
                false,
            ),
            Series::TopicDeadLettered => (
                "gorch_topic_dead_lettered_total",
                "Cluster topic messages this node sent to dead-letter (only with --nats).",
                TOPIC,
                true,
            ),
            Series::TopicPrefetched => (
                "gorch_topic_prefetched",
                "Cluster topic messages this node fetched ahead and holds for its next receives (only with --nats).",
                TOPIC,
                false,
            ),
            Series::DeadLetters => (
                "gorch_dead_letters_total",
                "Messages sent to dead-letter after max-deliveries.",
                NAME,
                true,
            ),
            Series::Upgrades => {
                ("gorch_routine_upgrades_total", "Live upgrades of the routine's code.", NAME, true)
            }
            Series::PluginRoutines => {
                ("gorch_plugin_routines", "Live routines of the plugin.", PLUGIN, false)
            }
            Series::PluginRestarts => (
                "gorch_plugin_restarts_total",
                "Restarts of the plugin's routines, live and ended.",
                PLUGIN,
                true,
            ),
            Series::PluginBusy => (
                "gorch_plugin_busy_seconds_total",
                "CPU time of the plugin's routines, live and ended.",
                PLUGIN,
                true,
            ),
            Series::PluginFuel => (
                "gorch_plugin_fuel_consumed_total",
                "Fuel used by the plugin's routines, live and ended.",
                PLUGIN,
                true,
            ),
            Series::PluginMemory => (
                "gorch_plugin_memory_bytes",
                "Linear memory of the plugin's live routines.",
                PLUGIN,
                false,
            ),
            Series::PluginQueueLength => (
                "gorch_plugin_queue_length",
                "Messages queued in the mailboxes of the plugin's routines.",
                PLUGIN,
                false,
            ),
            Series::PluginMessagesIn => (
                "gorch_plugin_messages_received_total",
                "Messages received by the plugin's routines, live and ended.",
                PLUGIN,
                true,
            ),
            Series::PluginMessagesOut => (
                "gorch_plugin_messages_sent_total",
                "Messages sent or published by the plugin's routines, live and ended.",
                PLUGIN,
                true,
            ),
            Series::PluginDeadLetters => (
                "gorch_plugin_dead_letters_total",
                "Dead letters of the plugin's routines, live and ended.",
                PLUGIN,
                true,
            ),
            Series::PluginEnded => (
                "gorch_plugin_routines_ended_total",
                "Routines of the plugin that ended for good (gave up, stopped or removed), by final state.",
                &["plugin", "state"][..],
                true,
            ),
            Series::PerRoutine => (
                "gorch_metrics_routine_series",
                "1 while per-routine series are exported, 0 past --metrics-routine-limit.",
                NONE,
                false,
            ),
            Series::ClusterNodes => (
                "gorch_cluster_nodes",
                "Live nodes of the cluster, this one included (only with --nats).",
                NONE,
                false,
            ),
            Series::AcksUnconfirmed => (
                "gorch_cluster_acks_unconfirmed_total",
                "Acknowledgements of cluster topic messages the NATS server never confirmed (the message may be delivered again; only with --nats).",
                NONE,
                true,
            ),
            Series::DeadLettersDropped => (
                "gorch_dead_letters_dropped_total",
                "Dead letters that could not be stored: the local dead-letter topic was full, or the letter was larger than NATS carries.",
                NONE,
                true,
            ),
        };
        Spec { name, help, labels, counter }
    }
}

/// A metric family under construction: built directly as protobuf-model structs, without
/// the per-series hashing and locking of the prometheus vec types (this runs every scrape).
struct Family {
    mf: MetricFamily,
    labels: &'static [&'static str],
    counter: bool,
}

impl Family {
    fn new(m: Series) -> Self {
        let Spec { name, help, labels, counter } = m.spec();
        let mut mf = MetricFamily::default();
        mf.set_name(name.to_string());
        mf.set_help(help.to_string());
        mf.set_field_type(if counter { MetricType::COUNTER } else { MetricType::GAUGE });
        Family { mf, labels, counter }
    }

    /// Adds a series with these label values (in the order of the table above).
    fn set(&mut self, values: &[&str], v: f64) {
        let mut pairs: Vec<LabelPair> = self
            .labels
            .iter()
            .zip(values)
            .map(|(k, v)| {
                let mut l = LabelPair::default();
                l.set_name(k.to_string());
                l.set_value(v.to_string());
                l
            })
            .collect();
        pairs.sort_by(|a, b| a.name().cmp(b.name()));
        let mut m = ProtoMetric::default();
        m.set_label(pairs);
        if self.counter {
            let mut c = Counter::default();
            c.set_value(v);
            m.set_counter(c);
        } else {
            let mut g = Gauge::default();
            g.set_value(v);
            m.set_gauge(g);
        }
        self.mf.mut_metric().push(m);
    }
}

impl GorchCollector {
    /// A collector for `orch`.
    pub fn new(orch: Orchestrator) -> Self {
        let all = Series::ALL
            .iter()
            .map(|m| {
                let Spec { name, help, labels, .. } = m.spec();
                Desc::new(
                    name.to_string(),
                    help.to_string(),
                    labels.iter().map(|l| l.to_string()).collect(),
                    Default::default(),
                )
                .expect("valid metric")
            })
            .collect();
        GorchCollector { orch, descs: all, routine_limit: DEFAULT_ROUTINE_LIMIT }
    }

    /// Per-routine series only while at most `limit` routines live (default
    /// [`DEFAULT_ROUTINE_LIMIT`]); per-plugin series always.
    pub fn with_routine_limit(mut self, limit: usize) -> Self {
        self.routine_limit = limit;
        self
    }
}

impl Collector for GorchCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut m: Vec<Family> = Series::ALL.into_iter().map(Family::new).collect();
        visit(&self.orch, self.routine_limit, |metric, labels, v| {
            m[metric as usize].set(labels, v)
        });
        m.into_iter().map(|f| f.mf).filter(|mf| !mf.get_metric().is_empty()).collect()
    }
}

/// Default of `--metrics-routine-limit`: up to this many live routines, `/metrics` has
/// per-routine series; beyond, per-plugin series only (Prometheus' advice: keep label
/// cardinality bounded). 100,000 routines would otherwise make a scrape of ~85 MB.
pub const DEFAULT_ROUTINE_LIMIT: usize = 1000;

/// Every series of the `gorch_*` metrics: `sink(metric, label values in the order of its
/// spec, value)`. The collector and the text writer are two sinks for it. Per-routine
/// series only while at most `routine_limit` routines live; per-plugin sums always.
fn visit(orch: &Orchestrator, routine_limit: usize, mut sink: impl FnMut(Series, &[&str], f64)) {
    // A counter never goes negative, whatever the float arithmetic did.
    let mut f = |m: Series, labels: &[&str], v: f64| {
        sink(m, labels, if m.spec().counter { v.max(0.0) } else { v })
    };
    // Per plugin: the routines that have left the host, plus the live ones.
    let (routines, mut plugins) = orch.routines_and_ended();
    let mut states = [0u64; State::ALL.len()];
    for r in &routines {
        let t = r.totals();
        if let Some(k) = State::ALL.iter().position(|s| *s == t.state) {
            states[k] += 1;
        }
        match plugins.get_mut(t.plugin) {
            Some(p) => p.add_live(&t),
            None => plugins.entry(t.plugin.to_string()).or_default().add_live(&t),
        }
    }
    for (s, n) in State::ALL.iter().zip(states) {
        f(Series::Routines, &[s.as_str()], n as f64);
    }
    for (plugin, p) in &plugins {
        let l = &[plugin.as_str()][..];
        f(Series::PluginRoutines, l, p.routines as f64);
        f(Series::PluginRestarts, l, p.restarts as f64);
        f(Series::PluginBusy, l, p.busy_ns as f64 / 1e9);
        if let Some(fuel) = p.fuel {
            f(Series::PluginFuel, l, fuel as f64);
        }
        f(Series::PluginMemory, l, p.memory as f64);
        f(Series::PluginQueueLength, l, p.queue as f64);
        f(Series::PluginMessagesIn, l, p.messages_in as f64);
        f(Series::PluginMessagesOut, l, p.messages_out as f64);
        f(Series::PluginDeadLetters, l, p.dead_letters as f64);
        for (st, n) in State::TERMINAL.iter().zip(p.ended) {
            f(Series::PluginEnded, &[plugin.as_str(), st.as_str()], n as f64);
        }
    }
    let per_routine = routines.len() <= routine_limit;
    f(Series::PerRoutine, &[], if per_routine { 1.0 } else { 0.0 });
    if per_routine {
        visit_routines(&routines, &mut f);
    }
    for t in orch.topics() {
        let topic = t.name.as_str();
        f(Series::TopicLength, &[topic], t.len as f64);
        f(Series::TopicCapacity, &[topic], t.cap as f64);
        f(Series::TopicBytes, &[topic], t.bytes as f64);
        f(Series::TopicPublished, &[topic], t.published as f64);
        f(Series::TopicReceived, &[topic], t.received as f64);
        f(Series::TopicBlockedPublish, &[topic], t.blocked_publish_seconds);
        f(Series::TopicBlockedRecv, &[topic], t.blocked_recv_seconds);
        if let Some(c) = &t.cluster {
            f(Series::TopicPendingAck, &[topic], c.pending_ack as f64);
            f(Series::TopicRedelivered, &[topic], c.redelivered as f64);
            f(Series::TopicDeadLettered, &[topic], c.dead_lettered as f64);
            f(Series::TopicPrefetched, &[topic], c.prefetched as f64);
        }
    }
    let transport = orch.transport();
    if let Some(nodes) = transport.nodes() {
        f(Series::ClusterNodes, &[], nodes as f64);
    }
    f(Series::DeadLettersDropped, &[], transport.dead_letters_dropped() as f64);
    if let Some(n) = transport.unconfirmed_acks() {
        f(Series::AcksUnconfirmed, &[], n as f64);
    }
}

fn visit_routines(
    routines: &[std::sync::Arc<crate::routine::RoutineShared>],
    f: &mut impl FnMut(Series, &[&str], f64),
) {
    let mut id = String::new();
    for r in routines {
        let snap = r.snapshot();
        let name = snap.name.as_str();
        id.clear();
        let _ = write!(id, "{}", snap.id);
        f(Series::RoutineInfo, &[&id, name, &snap.plugin], 1.0);
        f(Series::RoutineUp, &[name], if snap.state == State::Running { 1.0 } else { 0.0 });
        f(Series::Restarts, &[name], snap.restarts as f64);
        f(Series::Busy, &[name], snap.busy_seconds);
        // A routine with `metering = "time"` counts no fuel: no series rather than 0.
        if let Some(fuel) = snap.fuel_consumed {
            f(Series::Fuel, &[name], fuel as f64);
        }
        f(Series::Memory, &[name], snap.memory_bytes as f64);
        f(Series::QueueLength, &[name], snap.queue_len as f64);
        f(Series::QueueCapacity, &[name], snap.queue_cap as f64);
        f(Series::QueueBytes, &[name], snap.queue_bytes as f64);
        f(Series::MessagesIn, &[name], snap.messages_in as f64);
        f(Series::MessagesOut, &[name], snap.messages_out as f64);
        for (st, n) in State::TERMINAL.iter().zip(r.terminations()) {
            f(Series::Terminations, &[name, st.as_str()], n as f64);
        }
        f(Series::DeadLetters, &[name], r.dead_letters() as f64);
        f(Series::Upgrades, &[name], snap.upgrades as f64);
    }
}

/// Writes the `gorch_*` metrics of `orch` to `out` in the Prometheus text exposition format
/// (0.0.4): the same series as [`GorchCollector`], written straight to text (about 3x faster
/// than building and encoding protobuf structs: `/metrics` with 1,000 routines is scraped
/// often). Families without series are left out.
pub fn write_text(orch: &Orchestrator, out: &mut String) {
    write_text_with(orch, DEFAULT_ROUTINE_LIMIT, out)
}

/// [`write_text`] with per-routine series only while at most `routine_limit` routines live.
pub fn write_text_with(orch: &Orchestrator, routine_limit: usize, out: &mut String) {
    let mut bodies: Vec<String> = vec![String::new(); Series::ALL.len()];
    visit(orch, routine_limit, |m, values, v| {
        let spec = m.spec();
        let body = &mut bodies[m as usize];
        body.push_str(spec.name);
        if !spec.labels.is_empty() {
            body.push('{');
            for (k, (name, value)) in spec.labels.iter().zip(values).enumerate() {
                if k > 0 {
                    body.push(',');
                }
                body.push_str(name);
                body.push_str("=\"");
                escape_label_value(body, value);
                body.push('"');
            }
            body.push('}');
        }
        body.push(' ');
        let _ = writeln!(body, "{v}");
    });
    for (m, body) in Series::ALL.into_iter().zip(&bodies) {
        if body.is_empty() {
            continue;
        }
        let Spec { name, help, counter, .. } = m.spec();
        let kind = if counter { "counter" } else { "gauge" };
        let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
        out.push_str(body);
    }
}

/// Label values escape `\`, `"` and newlines.
fn escape_label_value(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
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
    super::process::register(registry)
}

/// The Prometheus text exposition of `registry`.
pub fn render(registry: &Registry) -> String {
    let mut buf = Vec::new();
    // Encoding into a Vec cannot fail for the text format.
    let _ = TextEncoder::new().encode(&registry.gather(), &mut buf);
    String::from_utf8(buf).unwrap_or_default()
}

/// What `/metrics` serves: the `gorch_*` metrics of `orch` ([`write_text`]) followed by
/// `extra` (the `process_*` metrics, and whatever an embedder registered there).
pub fn render_with(orch: &Orchestrator, extra: &Registry, routine_limit: usize) -> String {
    let mut out = String::with_capacity(64 * 1024);
    write_text_with(orch, routine_limit, &mut out);
    out.push_str(&render(extra));
    out
}
