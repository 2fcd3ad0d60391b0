//! Operator messages, one line each. Nothing here can stop or stall the server: `eprintln!`
//! panics when stderr is a closed pipe and blocks when it is a full one, and either would be
//! fatal on a shard thread or on the signal thread. So lines written while serving go through a
//! bounded queue to a thread of their own; when the queue is full (stderr stalled), they are
//! dropped and counted, not waited for.

use std::fmt;
use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Lines waiting for stderr before new ones are dropped.
const QUEUE_LINES: usize = 1024;

static QUEUE: OnceLock<SyncSender<String>> = OnceLock::new();
static DROPPED: AtomicU64 = AtomicU64::new(0);
/// Lines queued and not yet written.
static UNWRITTEN: AtomicU64 = AtomicU64::new(0);

/// A line for stderr, from any thread, never blocking. Lines dropped while stderr was stalled
/// are reported (as a count) with the next line that gets through.
pub fn warn(args: fmt::Arguments<'_>) {
    let queue = QUEUE.get_or_init(|| {
        let (tx, rx) = sync_channel::<String>(QUEUE_LINES);
        let spawned = std::thread::Builder::new()
            .name("log".into())
            .spawn(move || {
                for line in rx {
                    let _ = writeln!(io::stderr(), "{line}");
                    UNWRITTEN.fetch_sub(1, Ordering::Relaxed);
                }
            });
        if spawned.is_err() {
            // No thread for the log: lines are dropped (and counted) rather than written inline.
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
        tx
    });
    let dropped = DROPPED.swap(0, Ordering::Relaxed);
    let line = match dropped {
        0 => format!("shardpush: {args}"),
        n => format!("shardpush: {args} ({n} earlier lines dropped: stderr was not being read)"),
    };
    UNWRITTEN.fetch_add(1, Ordering::Relaxed);
    if queue.try_send(line).is_err() {
        UNWRITTEN.fetch_sub(1, Ordering::Relaxed);
        DROPPED.fetch_add(dropped + 1, Ordering::Relaxed);
    }
}

/// Before the process exits on purpose: gives the log thread up to `max` to write what is
/// queued (it may be stuck on a full pipe, so this never waits longer).
pub fn flush_briefly(max: Duration) {
    let deadline = Instant::now() + max;
    while UNWRITTEN.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A line for stdout from the main thread (startup and exit reports); a write error is ignored.
pub fn info(args: fmt::Arguments<'_>) {
    let _ = writeln!(io::stdout(), "{args}");
}

/// `log_warn!("...", args)`: a line for stderr that never blocks or panics (see `log::warn`).
#[macro_export]
macro_rules! log_warn {
    ($($arg:tt)*) => { $crate::log::warn(format_args!($($arg)*)) };
}

/// `log_info!("...", args)`: a line for stdout from the main thread (see `log::info`).
#[macro_export]
macro_rules! log_info {
    ($($arg:tt)*) => { $crate::log::info(format_args!($($arg)*)) };
}
