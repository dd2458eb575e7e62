//! What keeps the log readable when guests are hostile or crash in a loop: guest text is
//! escaped so that it cannot forge a host line ([`escape`]), and the lines a restart storm
//! repeats are summarized per routine ([`LogLimiter`]), as journald and syslog rate
//! limiting do. The metrics keep the exact counts.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

/// Text from a guest (or a name) made safe for a one-line log record: newlines and carriage
/// returns become `\n` and `\r`, other control characters (ANSI escapes included), line
/// and paragraph separators and bidirectional overrides become `\u{..}`. Tabs stay. What is
/// left cannot start a new visual line, so a guest cannot forge a host line.
pub(crate) fn escape(text: &str) -> Cow<'_, str> {
    if !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if needs_escape(c) => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

fn needs_escape(c: char) -> bool {
    (c.is_control() && c != '\t')
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// How long a rate-limiting window lasts.
pub(crate) const WINDOW: Duration = Duration::from_secs(10);
/// Restart lines logged in full per routine and window; the others are counted, and one
/// summary line says how many when the window ends.
pub(crate) const RESTART_BURST: u32 = 10;

/// The kinds of lines a routine's limiter tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// The driver's `<state>; restarting in <delay>`.
    Restart,
    /// Guest text: `log`, stdout, stderr (a Rust guest's panic message on each crash).
    Guest,
}

impl Kind {
    fn what(self) -> &'static str {
        match self {
            Kind::Restart => "restarts",
            Kind::Guest => "guest output",
        }
    }
}

/// One routine's log rate limiter. Restart lines: the first [`RESTART_BURST`] of each
/// [`WINDOW`] in full, then counted. Guest lines are never limited on their own, only while
/// the routine is in a restart storm (its restart lines are being suppressed): then they
/// are counted too. A window that ends with suppressed lines yields one summary line (at
/// the next line of its kind, or when the routine ends: [`LogLimiter::flush`]).
#[derive(Debug, Default)]
pub(crate) struct LogLimiter {
    restart: Mutex<Window>,
    guest: Mutex<Window>,
}

#[derive(Debug, Default)]
struct Window {
    start: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

impl Window {
    fn is_current(&self, now: Instant) -> bool {
        self.start.is_some_and(|s| now.duration_since(s) < WINDOW)
    }

    /// Starts a new window if the current one has ended; returns the summary of the ended
    /// one (lines suppressed, over how long) if it suppressed any.
    fn roll(&mut self, now: Instant) -> Option<(u64, Duration)> {
        if self.is_current(now) {
            return None;
        }
        let summary = self.take(now);
        *self = Window { start: Some(now), logged: 0, suppressed: 0 };
        summary
    }

    fn take(&mut self, now: Instant) -> Option<(u64, Duration)> {
        let start = self.start?;
        let n = std::mem::take(&mut self.suppressed);
        (n > 0).then(|| (n, now.duration_since(start).min(WINDOW)))
    }
}

impl LogLimiter {
    /// Whether a line of `kind` from `routine` is to be logged now; logs the summary of an
    /// ended window first.
    pub fn admit(&self, kind: Kind, routine: &str) -> bool {
        let now = Instant::now();
        let (summary, log) = match kind {
            Kind::Restart => {
                let mut w = self.restart.lock();
                let summary = w.roll(now);
                let log = w.logged < RESTART_BURST;
                if log {
                    w.logged += 1;
                } else {
                    w.suppressed += 1;
                }
                (summary, log)
            }
            Kind::Guest => {
                let storm = {
                    let r = self.restart.lock();
                    r.is_current(now) && r.suppressed > 0
                };
                let mut w = self.guest.lock();
                let summary = w.roll(now);
                if storm {
                    w.suppressed += 1;
                }
                (summary, !storm)
            }
        };
        if let Some((n, over)) = summary {
            log_summary(routine, kind, n, over);
        }
        log
    }

    /// Logs the summaries of the lines suppressed so far (the routine has ended).
    pub fn flush(&self, routine: &str) {
        let now = Instant::now();
        for kind in [Kind::Restart, Kind::Guest] {
            let taken = match kind {
                Kind::Restart => self.restart.lock().take(now),
                Kind::Guest => self.guest.lock().take(now),
            };
            if let Some((n, over)) = taken {
                log_summary(routine, kind, n, over);
            }
        }
    }
}

fn log_summary(routine: &str, kind: Kind, n: u64, over: Duration) {
    let over = Duration::from_secs(over.as_secs().max(1));
    tracing::warn!(
        routine = %escape(routine),
        "{n} similar lines suppressed within {} ({})",
        humantime::format_duration(over),
        kind.what()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_leaves_no_line_break_or_control() {
        let s = "a\nb\rc\x1b[31md\u{7f}e\u{85}f\u{2028}g\u{202e}h\ti";
        let e = escape(s);
        assert_eq!(e, "a\\nb\\rc\\u{1b}[31md\\u{7f}e\\u{85}f\\u{2028}g\\u{202e}h\ti");
        assert!(matches!(escape("plain text: ok"), Cow::Borrowed(_)));
    }
}
