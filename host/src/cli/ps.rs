//! `gorch-host ps`: the stats table of a running host, from its JSON API.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::obs::DEFAULT_ADDR;
use crate::routine::{Snapshot, write_stats_table};

/// `gorch-host ps`.
#[derive(Debug, clap::Args)]
pub struct PsCmd {
    /// Address of the running host's observability server.
    #[arg(long, default_value = DEFAULT_ADDR)]
    pub addr: SocketAddr,
    /// Bearer token, if the host was started with `--token`.
    #[arg(long, env = "GORCH_TOKEN")]
    pub token: Option<String>,
}

impl PsCmd {
    /// Fetches the routines and prints the table.
    pub async fn run(self) -> anyhow::Result<()> {
        let body = http_get(self.addr, "/gorchestra/api/routines", self.token.as_deref())
            .await
            .with_context(|| format!("cannot reach a gorch-host at {}", self.addr))?;
        let snaps: Vec<Snapshot> = serde_json::from_slice(&body)
            .context("unexpected answer from /gorchestra/api/routines")?;
        write_stats_table(&mut std::io::stdout().lock(), &snaps)?;
        Ok(())
    }
}

/// A minimal HTTP/1.1 GET over a fresh connection (the host's own API only).
async fn http_get(addr: SocketAddr, path: &str, token: Option<&str>) -> anyhow::Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream =
        tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
            .await
            .context("connect timed out")??;
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf))
        .await
        .context("read timed out")??;
    let split = buf.windows(4).position(|w| w == b"\r\n\r\n").context("malformed HTTP response")?;
    let head = String::from_utf8_lossy(&buf[..split]).into_owned();
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        bail!("{path}: HTTP {status}: {}", String::from_utf8_lossy(&buf[split + 4..]).trim());
    }
    let body = buf[split + 4..].to_vec();
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        return Ok(dechunk(&body));
    }
    Ok(body)
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(nl) = b.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&b[..nl]).trim(), 16).unwrap_or(0);
        if size == 0 || b.len() < nl + 2 + size {
            break;
        }
        out.extend_from_slice(&b[nl + 2..nl + 2 + size]);
        b = &b[(nl + 4 + size).min(b.len())..];
    }
    out
}
