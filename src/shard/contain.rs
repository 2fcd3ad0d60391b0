//! Panic containment. A panic while serving one connection must end that connection only, and a
//! panic anywhere else on a shard must end the process at once: a shard that died silently would
//! leave its listener queueing connections nobody serves and its peers' messages piling up.
//!
//! `contain` wraps a connection's future and catches its panics; the panic hook installed by
//! `install_panic_hook` exits the process (status 70) when a panic on a shard thread is not
//! inside such a wrapper.

use std::cell::Cell;
use std::future::Future;
use std::panic::{self, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

/// Exit status when a shard's executor dies (EX_SOFTWARE).
pub const SHARD_DIED_EXIT_CODE: i32 = 70;

/// Shard threads are named with this prefix, so the panic hook knows whose panic it sees.
pub const SHARD_THREAD_PREFIX: &str = "shard-";

/// What a contained future or call returns when it panicked (the panic was logged and counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Panicked;

thread_local! {
    /// How many `Contained` futures are being polled on this thread right now.
    static CONTAINED_DEPTH: Cell<u32> = const { Cell::new(0) };
}

/// Runs `future`, turning a panic inside it into `Err(Panicked)` (logged and counted). Whatever the
/// future held is dropped by the unwinding, which releases its `RefCell` borrows.
pub fn contain<F: Future>(future: F) -> Contained<F> {
    Contained { future }
}

/// A future whose panics are caught (see `contain`).
pub struct Contained<F> {
    future: F,
}

impl<F: Future> Future for Contained<F> {
    type Output = Result<F::Output, Panicked>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // SAFETY: `future` is structurally pinned: it is never moved out of `self`.
        let future = unsafe { self.map_unchecked_mut(|c| &mut c.future) };
        match contain_call("a connection", || future.poll(cx)) {
            Ok(Poll::Ready(output)) => Poll::Ready(Ok(output)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(panicked) => Poll::Ready(Err(panicked)),
        }
    }
}

/// Runs `f`, turning a panic inside it into `Err(Panicked)` (logged and counted): for one message from
/// another shard, whose handling is on behalf of a connection there.
pub fn contain_call<R>(what: &str, f: impl FnOnce() -> R) -> Result<R, Panicked> {
    CONTAINED_DEPTH.with(|d| d.set(d.get() + 1));
    let result = panic::catch_unwind(AssertUnwindSafe(f));
    CONTAINED_DEPTH.with(|d| d.set(d.get() - 1));
    result.map_err(|_| count_panic(what))
}

fn count_panic(what: &str) -> Panicked {
    if let Some(node) = NODE.get() {
        node.contained_panics.fetch_add(1, Ordering::Relaxed);
    }
    crate::log_error!("panic while handling {what}; only it was dropped");
    Panicked
}

static NODE: std::sync::OnceLock<std::sync::Arc<super::Node>> = std::sync::OnceLock::new();

/// Installs the process's panic hook: the default report, then, for a panic on a shard thread
/// outside any `contain`, an immediate exit with status 70 so that a supervisor restarts us.
pub fn install_panic_hook(node: std::sync::Arc<super::Node>) {
    let _ = NODE.set(node);
    panic::set_hook(Box::new(move |info| {
        // Not the default hook: it writes stderr directly and would stall this thread on a
        // full pipe. The location and the message are what an operator needs to report it.
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("unnamed");
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| info.payload().downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(no message)");
        let location = info
            .location()
            .map_or_else(String::new, |l| format!(" at {}:{}", l.file(), l.line()));
        crate::log_error!("thread '{name}' panicked{location}: {message}");
        let on_shard = name.starts_with(SHARD_THREAD_PREFIX);
        let contained = CONTAINED_DEPTH.with(|d| d.get()) > 0;
        if on_shard && !contained {
            crate::log_error!(
                "a shard's executor panicked; exiting with status {SHARD_DIED_EXIT_CODE}"
            );
            crate::log::flush_briefly(std::time::Duration::from_millis(200));
            std::process::exit(SHARD_DIED_EXIT_CODE);
        }
    }));
}

/// Whether the test-only fault injection events are honoured: debug builds started with
/// `SHARDPUSH_FAULT_INJECTION=1`. Release builds never compile them in.
#[cfg(debug_assertions)]
pub fn fault_injection() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("SHARDPUSH_FAULT_INJECTION").as_deref() == Ok("1"))
}
