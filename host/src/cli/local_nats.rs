//! `--nats local`: a `nats-server -js` child of this process, listening on loopback only,
//! its JetStream store under the data directory, so that topics survive a restart of the
//! host process or of the machine with no NATS to run by hand (wasmCloud's `wash up`
//! starts its NATS the same way). Started before the host joins, restarted if it dies,
//! stopped after the host leaves. A host killed with SIGKILL leaves its nats-server
//! behind: the next start on the same data directory stops that one first (its pid is
//! kept in the data directory). Two hosts cannot share a data directory (a lock).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio_util::sync::CancellationToken;

/// How long nats-server may take to accept connections.
const READY_WITHIN: Duration = Duration::from_secs(15);
/// How long it may take to stop on SIGTERM before it is killed.
const STOP_WITHIN: Duration = Duration::from_secs(5);

/// The running child (see the module doc).
pub(super) struct LocalNats {
    url: String,
    /// The token the server requires: made for this run, kept in a file only its owner
    /// reads (never on a command line other users can see).
    token: String,
    child: Arc<parking_lot::Mutex<Child>>,
    pid_file: PathBuf,
    stop: CancellationToken,
    watch: tokio::task::JoinHandle<()>,
    /// Held while this process runs: the data directory's lock.
    _lock: File,
}

/// The default data directory: `$XDG_DATA_HOME/gorch-host`, else
/// `~/.local/share/gorch-host`.
pub(super) fn default_data_dir() -> anyhow::Result<PathBuf> {
    if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d).join("gorch-host"));
    }
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(h) => Ok(PathBuf::from(h).join(".local/share/gorch-host")),
        None => bail!("neither XDG_DATA_HOME nor HOME is set: give --data-dir"),
    }
}

/// `nats-server` on PATH, or where Debian puts it (`/usr/sbin`, often not on a user's PATH).
fn find_server() -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/usr/local/bin"].map(PathBuf::from));
    for dir in dirs {
        let candidate = dir.join("nats-server");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "--nats local needs nats-server, which is not on PATH: install it (Debian and Ubuntu: \
         apt-get install nats-server; otherwise https://nats.io/download) or give --nats URL"
    )
}

impl LocalNats {
    /// Starts nats-server with its store in `data/nats` and waits until it accepts
    /// connections.
    pub(super) async fn start(data: &Path) -> anyhow::Result<LocalNats> {
        let server = find_server()?;
        std::fs::create_dir_all(data)
            .with_context(|| format!("cannot create the data directory {}", data.display()))?;
        let lock = lock(data)?;
        let pid_file = data.join("nats-server.pid");
        let conf = data.join("nats-server.conf");
        stop_leftover(&pid_file, &conf).await;
        let store = data.join("nats");
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let log = data.join("nats-server.log");
        let token: String = (0..32).map(|_| format!("{:x}", rand::random::<u8>() & 15)).collect();
        write_config(&conf, port, &store, &token)?;
        let spawn = {
            let (server, conf, log, pid_file) =
                (server.clone(), conf.clone(), log.clone(), pid_file.clone());
            move || spawn_server(&server, &conf, &log, &pid_file)
        };
        let child = spawn()?;
        tracing::info!(
            "started {} (pid {}) on 127.0.0.1:{port}, store {} (log {})",
            server.display(),
            child.id(),
            store.display(),
            log.display()
        );
        let child = Arc::new(parking_lot::Mutex::new(child));
        wait_ready(port, &child, &log).await?;
        let stop = CancellationToken::new();
        let watch = tokio::spawn(supervise(child.clone(), spawn, stop.clone()));
        let url = format!("nats://127.0.0.1:{port}");
        Ok(LocalNats { url, token, child, pid_file, stop, watch, _lock: lock })
    }

    /// Its URL.
    pub(super) fn url(&self) -> &str {
        &self.url
    }

    /// The token it requires.
    pub(super) fn token(&self) -> &str {
        &self.token
    }

    /// Stops it: SIGTERM, then the kill after [`STOP_WITHIN`].
    pub(super) async fn stop(mut self) {
        self.stop.cancel();
        let _ = (&mut self.watch).await;
        let pid = self.child.lock().id();
        terminate(pid);
        let deadline = tokio::time::Instant::now() + STOP_WITHIN;
        loop {
            if !matches!(self.child.lock().try_wait(), Ok(None)) {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!("nats-server did not stop within {STOP_WITHIN:?}: killing it");
                let _ = self.child.lock().kill();
                let _ = self.child.lock().wait();
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = std::fs::remove_file(&self.pid_file);
        tracing::info!("stopped nats-server (pid {pid})");
    }
}

impl Drop for LocalNats {
    /// A host that ends without [`stop`](LocalNats::stop) (an error at start) does not
    /// leave its nats-server running.
    fn drop(&mut self) {
        self.stop.cancel();
        let mut child = self.child.lock();
        if matches!(child.try_wait(), Ok(None)) {
            terminate(child.id());
            let _ = child.wait();
        }
    }
}

/// Takes the data directory's lock, or says which directory another host holds.
fn lock(data: &Path) -> anyhow::Result<File> {
    let path = data.join("gorch-host.lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    #[cfg(unix)]
    if rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
        bail!(
            "another gorch-host uses the data directory {} (give each host its own --data-dir)",
            data.display()
        );
    }
    Ok(file)
}

/// The server's configuration: loopback only, JetStream with its store, and the token,
/// in a file only its owner may read.
fn write_config(conf: &Path, port: u16, store: &Path, token: &str) -> anyhow::Result<()> {
    let text = format!(
        "# Written by gorch-host for --nats local, at each start.\n\
         listen: \"127.0.0.1:{port}\"\n\
         jetstream {{ store_dir: {store:?} }}\n\
         authorization {{ token: \"{token}\" }}\n"
    );
    let mut options = File::options();
    options.create(true).write(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut f = options.open(conf).with_context(|| format!("cannot write {}", conf.display()))?;
    // The mode applies when the file is created: a file of an earlier run is made private too.
    #[cfg(unix)]
    std::fs::set_permissions(conf, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// Starts one nats-server process with `conf`; its pid goes to `pid_file`, its output to
/// `log`. In a process group of its own: the terminal's Ctrl-C is the host's to handle (it
/// stops the server after it has left the cluster).
fn spawn_server(server: &Path, conf: &Path, log: &Path, pid_file: &Path) -> anyhow::Result<Child> {
    let out = File::options()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("cannot open {}", log.display()))?;
    let mut cmd = Command::new(server);
    cmd.arg("-c").arg(conf).stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out);
    #[cfg(unix)]
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let child = cmd.spawn().with_context(|| format!("cannot start {}", server.display()))?;
    let mut f = File::create(pid_file)?;
    writeln!(f, "{}", child.id())?;
    Ok(child)
}

/// Waits until the server accepts connections; fails with the end of its log when it
/// exits or does not within [`READY_WITHIN`].
async fn wait_ready(
    port: u16,
    child: &parking_lot::Mutex<Child>,
    log: &Path,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + READY_WITHIN;
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return Ok(());
        }
        let exited = child.lock().try_wait().ok().flatten();
        if exited.is_some() || tokio::time::Instant::now() >= deadline {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(5).collect();
            let why = match exited {
                Some(status) => format!("exited ({status})"),
                None => format!("did not accept connections within {READY_WITHIN:?}"),
            };
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!("nats-server {why}; the end of {}:\n{}", log.display(), tail.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Restarts the server when it dies, until `stop` (with a growing pause, at most 5 s).
async fn supervise(
    child: Arc<parking_lot::Mutex<Child>>,
    spawn: impl Fn() -> anyhow::Result<Child> + Send + 'static,
    stop: CancellationToken,
) {
    let mut pause = Duration::from_millis(200);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        let status = match child.lock().try_wait() {
            Ok(Some(status)) => status,
            _ => continue,
        };
        tracing::error!("nats-server exited ({status}): starting it again in {pause:?}");
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
        match spawn() {
            Ok(c) => *child.lock() = c,
            Err(e) => tracing::error!("cannot start nats-server again: {e:#}"),
        }
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

/// A nats-server left behind by a host that was killed (its pid in `pid_file`, and still a
/// nats-server running this data directory's `conf`): stopped, so that its store is free.
async fn stop_leftover(pid_file: &Path, conf: &Path) {
    let Some(pid) = std::fs::read_to_string(pid_file).ok().and_then(|s| s.trim().parse().ok())
    else {
        return;
    };
    let conf = conf.to_string_lossy().into_owned();
    let is_nats = |pid: u32| {
        std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
            let c = String::from_utf8_lossy(&c);
            c.contains("nats-server") && c.contains(conf.as_str())
        })
    };
    if !is_nats(pid) {
        return;
    }
    tracing::warn!("stopping the nats-server a previous run left behind (pid {pid})");
    terminate(pid);
    let deadline = tokio::time::Instant::now() + STOP_WITHIN;
    while is_nats(pid) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if is_nats(pid) {
        kill(pid);
        while is_nats(pid) && tokio::time::Instant::now() < deadline + STOP_WITHIN {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn terminate(pid: u32) {
    signal(pid, false);
}

fn kill(pid: u32) {
    signal(pid, true);
}

fn signal(pid: u32, hard: bool) {
    #[cfg(unix)]
    {
        use rustix::process::{Pid, Signal, kill_process};
        let sig = if hard { Signal::KILL } else { Signal::TERM };
        if let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) {
            let _ = kill_process(pid, sig);
        }
    }
    #[cfg(not(unix))]
    let _ = (pid, hard);
}
