//! Operator messages: `tracing` events (`log_info!`, `log_warn!`, ... from any thread), formatted
//! by the subscriber `init` installs, one line each, as plain text or JSON.
//!
//! Nothing here can stop or stall the server: `eprintln!` panics when stderr is a closed pipe and
//! blocks when it is a full one, and either would be fatal on a shard thread or on the signal
//! thread. So the subscriber never writes: its writer (`Queued`) hands each formatted line to a
//! bounded queue, and a thread of its own per stream writes them. When a queue is full (the
//! stream stalled), lines are dropped and counted, not waited for; the count is logged once the
//! stream moves again.
//!
//! Warnings and errors go to stderr, everything else (the startup and exit reports among them)
//! to stdout.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// The `tracing` crate, for the macros below.
#[doc(hidden)]
pub use tracing;

/// Lines waiting for one stream before new ones are dropped.
const QUEUE_LINES: usize = 1024;

/// Lines queued (for either stream) and not yet written.
static UNWRITTEN: AtomicU64 = AtomicU64::new(0);

static STDOUT: Stream = Stream::new(Target::Stdout);
static STDERR: Stream = Stream::new(Target::Stderr);

#[derive(Clone, Copy)]
enum Target {
    Stdout,
    Stderr,
}

/// One output stream: its queue, started with the first line, and its dropped lines.
struct Stream {
    target: Target,
    /// None: no thread could be started for it, so its lines are dropped (and counted).
    queue: OnceLock<Option<SyncSender<Vec<u8>>>>,
    dropped: AtomicU64,
}

impl Stream {
    const fn new(target: Target) -> Stream {
        Stream {
            target,
            queue: OnceLock::new(),
            dropped: AtomicU64::new(0),
        }
    }

    fn name(&self) -> &'static str {
        match self.target {
            Target::Stdout => "stdout",
            Target::Stderr => "stderr",
        }
    }

    /// Queues a line, never blocking: when the queue is full, the line is dropped and counted.
    fn send(&'static self, line: Vec<u8>) {
        let queue = self.queue.get_or_init(|| self.start());
        UNWRITTEN.fetch_add(1, Ordering::Relaxed);
        let sent = queue.as_ref().is_some_and(|q| q.try_send(line).is_ok());
        if !sent {
            UNWRITTEN.fetch_sub(1, Ordering::Relaxed);
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn start(&'static self) -> Option<SyncSender<Vec<u8>>> {
        let (tx, rx) = sync_channel::<Vec<u8>>(QUEUE_LINES);
        std::thread::Builder::new()
            .name(format!("log-{}", self.name()))
            .spawn(move || self.write_lines(rx))
            .ok()?;
        Some(tx)
    }

    /// The stream's thread: writes each line (a write error is ignored: a closed pipe loses the
    /// line, nothing else), then tells how many were dropped since the last line got through.
    fn write_lines(&self, lines: Receiver<Vec<u8>>) {
        for line in lines {
            let _ = match self.target {
                Target::Stdout => write_line(&mut io::stdout().lock(), &line),
                Target::Stderr => write_line(&mut io::stderr().lock(), &line),
            };
            UNWRITTEN.fetch_sub(1, Ordering::Relaxed);
            let dropped = self.dropped.swap(0, Ordering::Relaxed);
            if dropped > 0 {
                let stream = self.name();
                tracing::warn!(
                    dropped,
                    stream,
                    "{dropped} log lines dropped: {stream} was not being read"
                );
            }
        }
    }
}

fn write_line(out: &mut impl Write, line: &[u8]) -> io::Result<()> {
    out.write_all(line)?;
    out.flush()
}

/// The subscriber's writer: warnings and errors to stderr, the rest to stdout, each line through
/// its stream's queue (see the module's documentation).
#[derive(Clone, Copy, Debug, Default)]
pub struct Queued;

/// One formatted line on its way to a queue: gathered, then queued whole when dropped.
pub struct QueuedLine {
    stream: &'static Stream,
    line: Vec<u8>,
}

impl Write for QueuedLine {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.line.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for QueuedLine {
    fn drop(&mut self) {
        if !self.line.is_empty() {
            self.stream.send(std::mem::take(&mut self.line));
        }
    }
}

impl Queued {
    fn line(stream: &'static Stream) -> QueuedLine {
        QueuedLine {
            stream,
            line: Vec::new(),
        }
    }
}

impl<'a> MakeWriter<'a> for Queued {
    type Writer = QueuedLine;

    fn make_writer(&'a self) -> QueuedLine {
        Queued::line(&STDOUT)
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> QueuedLine {
        Queued::line(stream_for(*meta.level()))
    }
}

fn stream_for(level: Level) -> &'static Stream {
    // Levels compare by verbosity: ERROR < WARN < INFO < DEBUG < TRACE.
    if level <= Level::WARN {
        &STDERR
    } else {
        &STDOUT
    }
}

/// How log lines are written (`--log-format`, `SHARDPUSH_LOG_FORMAT`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Text: timestamp, level, message, fields
    #[default]
    Plain,
    /// One JSON object a line: timestamp, level, message, fields, target
    Json,
}

/// What `init` sets up, resolved from the command line and the environment (`cli::LogArgs`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogSettings {
    /// An `EnvFilter` directive: a level (`info`) or a list (`warn,shardpush::webhooks=debug`).
    pub filter: String,
    /// Plain or JSON lines.
    pub format: LogFormat,
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            filter: "info".into(),
            format: LogFormat::Plain,
        }
    }
}

/// Parses an `EnvFilter` directive (`--log-level`, `RUST_LOG`); the error says why not. A part
/// without `=` must be a level: `EnvFilter` would take a misspelt level (`inf`) for a target's
/// name and silently log nothing else.
pub fn parse_filter(directive: &str) -> Result<tracing_subscriber::EnvFilter, String> {
    use tracing_subscriber::filter::LevelFilter;
    let why_not =
        |reason: String| format!("'{directive}' is not a level or filter directive: {reason}");
    for part in directive
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        if !part.contains(['=', '[']) && part.parse::<LevelFilter>().is_err() {
            return Err(why_not(format!(
                "'{part}' is not one of off, error, warn, info, debug, trace (a target needs \
                 =LEVEL)"
            )));
        }
    }
    tracing_subscriber::EnvFilter::builder()
        .parse(directive)
        .map_err(|e| why_not(e.to_string()))
}

/// Installs the process's subscriber, once, before the server starts: events at or above the
/// filter's level, formatted as asked, written through `Queued`.
pub fn init(settings: &LogSettings) -> Result<(), String> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = parse_filter(&settings.filter)?;
    let registry = tracing_subscriber::registry().with(filter);
    let fmt = tracing_subscriber::fmt::layer().with_writer(Queued);
    let installed = match settings.format {
        LogFormat::Plain => registry.with(fmt.with_target(false)).try_init(),
        LogFormat::Json => registry
            .with(
                fmt.json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_span_list(false),
            )
            .try_init(),
    };
    installed.map_err(|e| format!("cannot install the log subscriber: {e}"))
}

/// Before the process exits on purpose: gives the log threads up to `max` to write what is
/// queued (one may be stuck on a full pipe, so this never waits longer).
pub fn flush_briefly(max: Duration) {
    let deadline = Instant::now() + max;
    while UNWRITTEN.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A URL as it may be logged: any password (`redis://user:password@host`) replaced by `***`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    // The last '@' ends the credentials: a password may hold '@', '/' or '?' of its own, so
    // this rather hides too much (an '@' in a query) than too little.
    match rest.rsplit_once('@') {
        Some((credentials, host)) => {
            let shown = match credentials.split_once(':') {
                Some((user, _)) if !user.contains(['/', '?', '#']) => format!("{user}:***"),
                // redis://password@host: the lone part is the password.
                _ => "***".into(),
            };
            format!("{scheme}://{shown}@{host}")
        }
        None => url.to_owned(),
    }
}

/// `log_error!("...", args)`: something failed and needs an operator (stderr, never blocking).
#[macro_export]
macro_rules! log_error {
    ($($arg:tt)*) => { $crate::log::tracing::error!($($arg)*) };
}

/// `log_warn!("...", args)`: something went wrong and was coped with (stderr, never blocking).
#[macro_export]
macro_rules! log_warn {
    ($($arg:tt)*) => { $crate::log::tracing::warn!($($arg)*) };
}

/// `log_info!("...", args)`: a notable event of normal operation (stdout, never blocking).
#[macro_export]
macro_rules! log_info {
    ($($arg:tt)*) => { $crate::log::tracing::info!($($arg)*) };
}

/// `log_debug!("...", args)`: detail for a developer, off unless asked for (`--log-level debug`).
#[macro_export]
macro_rules! log_debug {
    ($($arg:tt)*) => { $crate::log::tracing::debug!($($arg)*) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warnings_and_errors_go_to_stderr_the_rest_to_stdout() {
        for level in [Level::ERROR, Level::WARN] {
            assert!(std::ptr::eq(stream_for(level), &STDERR), "{level}");
        }
        for level in [Level::INFO, Level::DEBUG, Level::TRACE] {
            assert!(std::ptr::eq(stream_for(level), &STDOUT), "{level}");
        }
    }

    #[test]
    fn filters_parse_or_say_why_not() {
        for good in [
            "info",
            "warn",
            "debug,shardpush::webhooks=trace",
            "shardpush=debug",
        ] {
            assert!(parse_filter(good).is_ok(), "{good}");
        }
        let e = parse_filter("loud").unwrap_err();
        assert!(e.contains("'loud'"), "{e}");
    }

    #[test]
    fn passwords_are_redacted_from_urls() {
        assert_eq!(
            redact_url("redis://user:s3cret@h:6379/2"),
            "redis://user:***@h:6379/2"
        );
        assert_eq!(redact_url("redis://:p@ss@h:1"), "redis://:***@h:1");
        assert_eq!(redact_url("redis://token@h"), "redis://***@h");
        assert_eq!(redact_url("redis://h:6379"), "redis://h:6379");
        assert_eq!(redact_url("redis://:pa/s?s@h:1/0"), "redis://:***@h:1/0");
        assert_eq!(redact_url("redis://h/0?x=a@b"), "redis://***@b");
        assert_eq!(redact_url("not a url"), "not a url");
    }
}
