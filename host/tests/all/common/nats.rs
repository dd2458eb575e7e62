//! A real `nats-server -js` per test (a free port, its own store directory) and the cluster
//! nodes the tests build on it.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use gorch_host::{Cluster, ClusterConfig, Orchestrator};

use super::host::free_port;
use super::{shutdown, wait_until_blocking};

const INSTALL: &str = "nats-server not found: install it with `apt-get install -y nats-server` \
                       (Debian's package; .ci/run installs it)";

/// A `nats-server -js` of its own, killed when dropped.
pub struct Nats {
    child: Child,
    port: u16,
    store: tempfile::TempDir,
}

impl Nats {
    pub fn start() -> Nats {
        let store = tempfile::tempdir().unwrap();
        let port = free_port();
        let child = Self::spawn(port, store.path());
        Nats { child, port, store }
    }

    fn spawn(port: u16, store: &std::path::Path) -> Child {
        Self::spawn_with(port, store, &[])
    }

    fn spawn_with(port: u16, store: &std::path::Path, extra: &[String]) -> Child {
        // Debian installs it in /usr/sbin, not always on a user's PATH.
        let bin = ["nats-server", "/usr/sbin/nats-server"]
            .into_iter()
            .find(|b| Command::new(b).arg("--version").output().is_ok())
            .unwrap_or_else(|| panic!("{INSTALL}"));
        let child = Command::new(bin)
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(store)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{INSTALL} ({e})"));
        let listening = wait_until_blocking(Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        assert!(listening, "nats-server did not listen on {port}");
        child
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server (its store stays).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same port with an empty store (a server that lost its disk).
    pub fn start_empty(&mut self) {
        self.store = tempfile::tempdir().unwrap();
        self.child = Self::spawn(self.port, self.store.path());
    }

    /// Starts it again on the same port and store.
    pub fn start_again(&mut self) {
        self.child = Self::spawn(self.port, self.store.path());
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Three `nats-server -js` routed into one JetStream cluster (`gorch`), each with its own
/// port and store; killed when dropped.
pub struct NatsCluster {
    pub servers: Vec<Nats>,
}

impl NatsCluster {
    pub fn start() -> NatsCluster {
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
        let routes = ports
            .iter()
            .map(|(_, c)| format!("nats://127.0.0.1:{c}"))
            .collect::<Vec<_>>()
            .join(",");
        let servers = ports
            .iter()
            .enumerate()
            .map(|(i, &(port, cluster))| {
                let store = tempfile::tempdir().unwrap();
                let extra = [
                    "--server_name".to_string(),
                    format!("n{i}"),
                    "--cluster_name".into(),
                    "gorch".into(),
                    "--cluster".into(),
                    format!("nats://127.0.0.1:{cluster}"),
                    "--routes".into(),
                    routes.clone(),
                ];
                let child = Nats::spawn_with(port, store.path(), &extra);
                Nats { child, port, store }
            })
            .collect();
        NatsCluster { servers }
    }

    /// Every server's URL, comma-separated (what a node is given).
    pub fn urls(&self) -> String {
        self.servers.iter().map(Nats::url).collect::<Vec<_>>().join(",")
    }
}

pub fn config(nats: &Nats, node: &str) -> ClusterConfig {
    let mut c = ClusterConfig::new(nats.url(), node);
    c.ack_wait = Duration::from_secs(2);
    c
}

pub async fn node(nats: &Nats, name: &str) -> (Orchestrator, Cluster) {
    let orch = Orchestrator::new();
    let cluster = Cluster::join(&orch, config(nats, name)).await.expect("join");
    (orch, cluster)
}

pub async fn leave(orch: &Orchestrator, cluster: &Cluster) {
    shutdown(orch).await;
    cluster.leave().await;
}
