//! The operations kit in `deploy/`: every metric name the alert rules and the Grafana
//! dashboard use is on a live host's `/metrics`; promtool checks the rules and runs their
//! unit tests; a real Prometheus scrapes a running host with the scrape config of
//! `deploy/prometheus/prometheus.yml` (the README's), loads the rules and runs every
//! dashboard query; the systemd unit names its reload and stop signals (and verifies, where
//! `systemd-analyze` is installed). promtool and prometheus are required: without them these
//! tests fail with the install command, they are never skipped.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use gorch_host::{CallError, ObsConfig, ObsServer, Orchestrator, SpawnOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::fs::repo_root;
use crate::common::host::{BIN, free_port};
use crate::common::*;

/// What to do when promtool or prometheus is missing.
const INSTALL: &str = "install it: apt-get install -y prometheus";

/// A file of the repository.
fn repo_file(rel: &str) -> PathBuf {
    repo_root().join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo_file(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The path of a program of the `prometheus` package; fails the test when it is missing.
fn prometheus_tool(name: &str) -> PathBuf {
    which(name)
        .or_else(|()| Some(Path::new("/usr/bin").join(name)).filter(|p| p.is_file()).ok_or(()))
        .unwrap_or_else(|()| panic!("{name} not found: {INSTALL}"))
}

/// `name` on the PATH.
fn which(name: &str) -> Result<PathBuf, ()> {
    let path = std::env::var_os("PATH").ok_or(())?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file()).ok_or(())
}

/// The PromQL expressions of `deploy/prometheus/alerts.yml` (each rule's `expr`, inline or
/// a block scalar).
fn alert_exprs() -> Vec<String> {
    let text = read("deploy/prometheus/alerts.yml");
    let lines: Vec<&str> = text.lines().collect();
    let mut exprs = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        let Some(rest) = trimmed.strip_prefix("expr:") else { continue };
        let rest = rest.trim();
        if !rest.starts_with(['|', '>']) {
            exprs.push(rest.to_string());
            continue;
        }
        let indent = line.len() - trimmed.len();
        let body: Vec<&str> = lines[i + 1..]
            .iter()
            .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
            .map(|l| l.trim())
            .collect();
        exprs.push(body.join("\n"));
    }
    exprs
}

/// The PromQL of `deploy/grafana/gorch-host.json`: each target's `expr` and each template
/// variable's query.
fn dashboard_exprs() -> Vec<String> {
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr" | "definition", serde_json::Value::String(s)) => {
                            out.push(s.clone())
                        }
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let dash: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/gorch-host.json")).expect("valid JSON");
    let mut out = Vec::new();
    walk(&dash, &mut out);
    out
}

/// The `gorch_*` and `process_*` metric names in PromQL text.
fn metric_names(expr: &str) -> BTreeSet<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|t| t.starts_with("gorch_") || t.starts_with("process_"))
        .map(str::to_string)
        .collect()
}

/// The names a text exposition exports: sample names and the families of `# TYPE` lines
/// (so that a suffix-free family name counts as well as its `_total` samples).
fn exported_names(metrics: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in metrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            names.extend(rest.split_whitespace().next().map(str::to_string));
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_string());
        }
    }
    names
}

/// A host with every family of series present: one routine (routine series), one topic with
/// a message (topic series), the process metrics. Serves on a free loopback port.
async fn live_host() -> (Orchestrator, ObsServer) {
    let orch = Orchestrator::new();
    let config = ObsConfig { addr: "127.0.0.1:0".parse().unwrap(), ..ObsConfig::default() };
    let server = ObsServer::start(&orch, &config).expect("bind");
    let worker = orch
        .spawn(SpawnOptions::new("worker"), |ctx| async move {
            ctx.beat();
            ctx.publish("jobs", b"job".to_vec()).await?;
            ctx.cancelled().await;
            Ok::<(), CallError>(())
        })
        .unwrap();
    assert!(wait_until(Duration::from_secs(10), || worker.snapshot().messages_out == 1).await);
    (orch, server)
}

async fn stop_host(orch: Orchestrator, server: ObsServer) {
    shutdown(&orch).await;
    server.shutdown().await;
}

/// `GET path` (HTTP/1.0) from `addr`: the status line's code and the body, or `None` when
/// nothing answers (yet).
async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut buf)).await.ok()?.ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_string()))
}

/// Percent-encodes a query parameter.
fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn alerts_and_dashboard_use_only_metric_names_a_live_host_exports() {
    let alerts: BTreeSet<String> = alert_exprs().iter().flat_map(|e| metric_names(e)).collect();
    let dash: BTreeSet<String> = dashboard_exprs().iter().flat_map(|e| metric_names(e)).collect();
    // The parsers found the expressions (not an empty set that trivially passes).
    assert!(alert_exprs().len() >= 8, "{:?}", alert_exprs());
    for name in
        ["gorch_plugin_routines_ended_total", "gorch_dead_letters_total", "gorch_topic_length"]
    {
        assert!(alerts.contains(name), "{name} not in the alerts: {alerts:?}");
    }
    for name in ["gorch_routine_info", "gorch_plugin_fuel_consumed_total", "gorch_routines"] {
        assert!(dash.contains(name), "{name} not in the dashboard: {dash:?}");
    }
    let metrics = run(async {
        let (orch, server) = live_host().await;
        let (code, metrics) = http_get(server.local_addr(), "/metrics").await.expect("GET");
        assert_eq!(code, 200, "{metrics}");
        stop_host(orch, server).await;
        metrics
    });
    let exported = exported_names(&metrics);
    for (file, used) in [("alerts.yml", &alerts), ("gorch-host.json", &dash)] {
        let missing: Vec<&String> = used.iter().filter(|n| !exported.contains(*n)).collect();
        assert!(missing.is_empty(), "{file} uses {missing:?}, not on /metrics:\n{metrics}");
    }
}

#[test]
fn promtool_checks_the_rules_runs_their_unit_tests_and_checks_the_config() {
    let promtool = prometheus_tool("promtool");
    let dir = repo_file("deploy/prometheus");
    for args in [
        &["check", "rules", "alerts.yml"][..],
        &["test", "rules", "alerts_test.yml"],
        &["check", "config", "prometheus.yml"],
    ] {
        let out = Command::new(&promtool).args(args).current_dir(&dir).output().unwrap();
        assert!(
            out.status.success(),
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn every_alert_has_a_firing_and_a_quiet_unit_test() {
    let rules = read("deploy/prometheus/alerts.yml");
    let tests = read("deploy/prometheus/alerts_test.yml");
    let alerts: Vec<&str> =
        rules.lines().filter_map(|l| l.trim().strip_prefix("- alert: ")).collect();
    assert!(alerts.len() >= 8, "{alerts:?}");
    // Each test case is `alertname: X` followed by `exp_alerts: []` (quiet) or a list.
    let cases: Vec<(&str, bool)> = tests
        .lines()
        .zip(tests.lines().skip(1))
        .filter_map(|(a, b)| {
            let name = a.trim().strip_prefix("alertname: ")?;
            Some((name, b.trim() == "exp_alerts: []"))
        })
        .collect();
    for alert in alerts {
        for quiet in [true, false] {
            assert!(
                cases.contains(&(alert, quiet)),
                "alerts_test.yml has no {} case for {alert}",
                if quiet { "quiet" } else { "firing" }
            );
        }
    }
}

#[test]
fn the_readme_shows_the_scrape_config_of_deploy() {
    let config = read("deploy/prometheus/prometheus.yml");
    let scrape = &config[config.find("scrape_configs:").expect("scrape_configs")..];
    assert!(read("README.md").contains(scrape.trim_end()), "README lacks:\n{scrape}");
}

/// A process killed (and reaped) when the test ends, also when it fails half-way.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `GET path` on `addr` until `ok(body)` holds, failing the test after `within`.
async fn poll_until(
    addr: SocketAddr,
    path: &str,
    within: Duration,
    ok: impl Fn(&str) -> bool,
) -> String {
    let mut last = None;
    let found = tokio::time::timeout(within, async {
        loop {
            if let Some((200, body)) = http_get(addr, path).await {
                if ok(&body) {
                    return body;
                }
                last = Some(body);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    found.unwrap_or_else(|_| panic!("GET {path} on {addr}: not there within {within:?}: {last:?}"))
}

#[test]
fn a_real_prometheus_scrapes_a_running_host_and_runs_the_rules_and_dashboard_queries() {
    let prometheus = prometheus_tool("prometheus");
    run(async {
        let (orch, server) = live_host().await;
        let host = server.local_addr();
        // deploy/prometheus/prometheus.yml (the README's scrape config), aimed at this host,
        // scraping and evaluating every second, with alerts.yml beside it.
        let dir = tempfile::tempdir().unwrap();
        let config = read("deploy/prometheus/prometheus.yml");
        assert!(config.contains("\"127.0.0.1:9090\"") && config.contains("scrape_interval: 5s"));
        let config = config
            .replace("\"127.0.0.1:9090\"", &format!("\"{host}\""))
            .replace("scrape_interval: 5s", "scrape_interval: 1s")
            .replace("evaluation_interval: 30s", "evaluation_interval: 1s");
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        std::fs::copy(repo_file("deploy/prometheus/alerts.yml"), dir.path().join("alerts.yml"))
            .unwrap();
        let port = free_port();
        let api: SocketAddr = ([127, 0, 0, 1], port).into();
        let storage = dir.path().join("data");
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new(&prometheus)
            .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", storage.display()))
            .arg(format!("--web.listen-address={api}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}; {INSTALL}", prometheus.display()));
        let child = Killed(child);

        // The scrape worked: the query API has the host's gorch_routines.
        let q = format!("/api/v1/query?query={}", urlencode("gorch_routines{state=\"RUNNING\"}"));
        let within = Duration::from_secs(120);
        let body = poll_until(api, &q, within, |b| b.contains("\"__name__\":\"gorch_routines\""))
            .await
            .replace(' ', "");
        assert!(body.contains("\"job\":\"gorch-host\""), "{body}");
        assert!(body.contains(&format!("\"instance\":\"{host}\"")), "{body}");
        assert!(body.contains(",\"1\"]"), "one routine RUNNING: {body}");

        // The rules loaded (every alert of alerts.yml), and were evaluated.
        let evaluated = |b: &str| b.contains("\"health\":\"ok\"") && !b.contains("\"unknown\"");
        let rules = poll_until(api, "/api/v1/rules", within, evaluated).await;
        for alert in read("deploy/prometheus/alerts.yml")
            .lines()
            .filter_map(|l| l.trim().strip_prefix("- alert: "))
        {
            assert!(rules.contains(&format!("\"name\":\"{alert}\"")), "{alert}: {rules}");
        }
        assert!(!rules.contains("\"health\":\"err\""), "a rule failed: {rules}");

        // Every dashboard query runs (the variables set as Grafana would).
        for expr in dashboard_exprs() {
            if expr.starts_with("label_values(") {
                continue; // Grafana's own function, not PromQL
            }
            let promql = expr
                .replace("$instance", ".*")
                .replace("$plugin", ".*")
                .replace("$__rate_interval", "1m");
            let path = format!("/api/v1/query?query={}", urlencode(&promql));
            let (code, body) = http_get(api, &path).await.expect("query API");
            assert!(code == 200 && body.contains("\"status\":\"success\""), "{promql}: {body}");
        }
        drop(child);
        stop_host(orch, server).await;
    });
}

#[test]
fn the_systemd_unit_reloads_with_sighup_and_outwaits_the_shutdown_timeout() {
    let unit = read("deploy/systemd/gorch-host.service");
    let lines: Vec<&str> = unit.lines().map(str::trim).collect();
    for want in [
        "ExecReload=/bin/kill -HUP $MAINPID",
        "KillSignal=SIGTERM",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
    ] {
        assert!(lines.contains(&want), "{want} missing:\n{unit}");
    }
    let secs = |key: &str| -> u64 {
        let v = unit.split(key).nth(1).unwrap_or_else(|| panic!("no {key}"));
        let v = v.split_whitespace().next().unwrap();
        humantime::parse_duration(v).unwrap_or_else(|e| panic!("{key}{v}: {e}")).as_secs()
    };
    assert!(secs("TimeoutStopSec=") > secs("--shutdown-timeout "), "{unit}");
    // systemd's own check, with ExecStart pointing at this build's binary (it must exist).
    let Ok(analyze) = which("systemd-analyze") else { return };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gorch-host.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/gorch-host", BIN)).unwrap();
    let out = Command::new(analyze).arg("verify").arg(&path).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !err.contains(&*path.to_string_lossy()), "{err}");
}
