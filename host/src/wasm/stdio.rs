//! A guest's stdout and stderr: complete lines go to the log, attributed to the routine
//! (target `guest`) and escaped (no control character reaches the log); stderr's tail is
//! also kept to explain a trap, since Rust guests print their panic message there.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use parking_lot::Mutex;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

use crate::routine::{RoutineShared, log_line};

/// How many bytes of a guest's stderr are kept to explain a trap.
pub(super) const STDERR_TAIL: usize = 4096;

/// How the line Rust's panic hook adds after a panic message starts.
const RUST_BACKTRACE_NOTE: &str = "note: run with `RUST_BACKTRACE=1`";

/// What the host logs instead: where the guest's backtrace is.
const GUEST_BACKTRACE_NOTE: &str = "note: the guest's wasm backtrace is logged at \
     debug level (RUST_LOG=info,gorch_host=debug); the routine's lastError names the guest \
     function that trapped";

/// A guest's stdout or stderr: complete lines go to the log; stderr is also kept (its
/// tail) to explain a trap, since Rust guests print their panic message there.
pub(super) struct GuestOutput {
    routine: Arc<RoutineShared>,
    stderr: Option<Arc<Mutex<String>>>,
}

impl GuestOutput {
    /// Standard output: complete lines go to the log at INFO.
    pub fn stdout(routine: &Arc<RoutineShared>) -> Self {
        GuestOutput { routine: routine.clone(), stderr: None }
    }
    /// Standard error: lines go to the log at WARN, and the last [`STDERR_TAIL`] bytes are
    /// kept in `tail` to explain a trap.
    pub fn stderr(routine: &Arc<RoutineShared>, tail: Arc<Mutex<String>>) -> Self {
        GuestOutput { routine: routine.clone(), stderr: Some(tail) }
    }
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(LineLogger::new(&self.routine, self.stderr.clone()))
    }
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(LineLogger::new(&self.routine, self.stderr.clone()))
    }
}

struct LineLogger {
    routine: Arc<RoutineShared>,
    tail: Option<Arc<Mutex<String>>>,
    buf: Vec<u8>,
}

impl LineLogger {
    fn new(routine: &Arc<RoutineShared>, tail: Option<Arc<Mutex<String>>>) -> Self {
        LineLogger { routine: routine.clone(), tail, buf: Vec::new() }
    }

    fn push(&mut self, bytes: &[u8]) {
        if let Some(tail) = &self.tail {
            let mut t = tail.lock();
            t.push_str(&String::from_utf8_lossy(bytes));
            if t.len() > STDERR_TAIL {
                let mut cut = t.len() - STDERR_TAIL;
                while !t.is_char_boundary(cut) {
                    cut += 1;
                }
                t.drain(..cut);
            }
        }
        self.buf.extend_from_slice(bytes);
        while let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=nl).collect();
            self.emit(&line[..line.len() - 1]);
        }
        // A guest that never writes a newline must not grow the host's memory.
        if self.buf.len() > 16 * 1024 {
            let line = std::mem::take(&mut self.buf);
            self.emit(&line);
        }
    }

    /// Logs one line: a CRLF ending is dropped; any other `\r` (which would move the
    /// terminal's cursor back and let the guest overwrite the line's start) and every other
    /// control character are escaped by `log_line`.
    fn emit(&self, line: &[u8]) {
        let text = String::from_utf8_lossy(line);
        let text = text.strip_suffix('\r').unwrap_or(&text);
        if text.trim().is_empty() {
            return;
        }
        let level = if self.tail.is_some() { tracing::Level::WARN } else { tracing::Level::INFO };
        // Rust's panic hook ends with how to see a backtrace, which means nothing for a guest
        // (its environment is the manifest's): say how the host shows it instead.
        let text = if self.tail.is_some() && text.starts_with(RUST_BACKTRACE_NOTE) {
            GUEST_BACKTRACE_NOTE
        } else {
            text
        };
        log_line(&self.routine, level, text);
    }
}

impl Drop for LineLogger {
    fn drop(&mut self) {
        if !self.buf.is_empty() {
            let line = std::mem::take(&mut self.buf);
            self.emit(&line);
        }
    }
}

impl OutputStream for LineLogger {
    fn write(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }
    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }
    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 * 1024)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for LineLogger {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for LineLogger {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
