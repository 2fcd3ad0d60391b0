//! A shard's life after startup: serving until a shutdown is asked for, then draining until its
//! connections are all gone or the drain is over. A drain closes the connections with 4200
//! spread evenly over `shutdown_grace_period`, so that their clients do not all reconnect to the
//! remaining nodes in the same moment. The signal thread wakes each shard directly
//! (`Node::wake_shards`, every few milliseconds while the closes are spread), so shutdown never
//! waits for an executor's timer.

use super::Shard;
use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::sync::atomic::Ordering;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

/// Where a shard is in its life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Phase {
    /// Accepting and serving connections.
    #[default]
    Serving,
    /// Shutting down: no new connections, the open ones are being closed.
    Draining,
}

/// The shard's phase and the tasks waiting for the drain to start (the accept loops).
#[derive(Default)]
pub(super) struct Lifecycle {
    phase: Cell<Phase>,
    drain_waiters: RefCell<Vec<Waker>>,
}

impl Shard {
    /// The shard's phase.
    pub fn phase(&self) -> Phase {
        self.lifecycle.phase.get()
    }

    /// Resolves when the shard starts draining (the accept loops stop then).
    pub async fn draining(&self) {
        poll_fn(|cx| match self.phase() {
            Phase::Draining => Poll::Ready(()),
            Phase::Serving => {
                // A task polls this again on each of its wakes: keep one waker per task.
                let mut waiters = self.lifecycle.drain_waiters.borrow_mut();
                if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
                    waiters.push(cx.waker().clone());
                }
                Poll::Pending
            }
        })
        .await
    }

    /// Serves until shutdown is asked for, then drains. Returns when the shard is done: all its
    /// connections are gone or the drain is over. Woken only by the signal thread and by the
    /// last disconnect, never by a timer.
    pub async fn lifecycle(&self) {
        let generation = || self.node.apps_generation.load(Ordering::Acquire);
        let mut apps_seen = generation();
        loop {
            self.wait_for(|| {
                self.node.shutdown.load(Ordering::Acquire) || generation() != apps_seen
            })
            .await;
            if self.node.shutdown.load(Ordering::Acquire) {
                break;
            }
            apps_seen = generation();
            self.close_connections_of_disabled_apps();
        }
        // The signal thread's clock, so that its last wake-up of the spread finds every share due.
        let started = self
            .node
            .drain_started
            .get()
            .copied()
            .unwrap_or_else(Instant::now);
        self.begin_drain();
        let grace = Duration::from_secs(self.node.config.shutdown_grace_period.into());
        // The connections of the moment, closed in this order, a share at each wake-up: by
        // `t` into the grace period, the first `n * t / grace` of them.
        let mut to_close: Vec<u64> = self.conns.borrow().keys().copied().collect();
        let total = to_close.len();
        self.wait_for(|| {
            let elapsed = started.elapsed();
            let over = elapsed >= grace || self.node.spread_over.load(Ordering::Acquire);
            let due = match over {
                true => total,
                false => (total as u128 * elapsed.as_micros() / grace.as_micros()) as usize,
            };
            let closed = total - to_close.len();
            if due > closed {
                self.close_for_shutdown(to_close.drain(..due - closed));
            }
            if over {
                // Sockets admitted while the drain began (their upgrade was under way) too.
                let late: Vec<u64> = self.conns.borrow().keys().copied().collect();
                self.close_for_shutdown(late.into_iter());
            }
            self.conns.borrow().is_empty() || self.node.drain_over.load(Ordering::Acquire)
        })
        .await;
        // This shard's connections are gone, but other shards' may still publish to channels
        // homed here, join them, or wait for its barriers: it goes on serving the mesh until
        // every shard is done (or the drain is over).
        let done = self.node.shards_drained.fetch_add(1, Ordering::AcqRel) + 1;
        if done == self.node.shards {
            self.node.wake_shards();
        }
        self.wait_for(|| {
            self.node.shards_drained.load(Ordering::Acquire) >= self.node.shards
                || self.node.drain_over.load(Ordering::Acquire)
        })
        .await;
    }

    fn begin_drain(&self) {
        self.lifecycle.phase.set(Phase::Draining);
        let waiters = std::mem::take(&mut *self.lifecycle.drain_waiters.borrow_mut());
        waiters.into_iter().for_each(Waker::wake);
    }

    /// After a reload: the connections of apps now disabled or removed are closed with 4003.
    fn close_connections_of_disabled_apps(&self) {
        let now = Some(self.now_secs());
        for conn in self.conns.borrow().values() {
            if !self.node.app(conn.app).enabled {
                let reason = "Application disabled";
                conn.close_with_error(crate::protocol::codes::APP_DISABLED, reason, now);
            }
        }
    }

    /// Closes these connections with 4200 (those already closing are left as they are).
    fn close_for_shutdown(&self, ids: impl Iterator<Item = u64>) {
        let now = Some(self.now_secs());
        for id in ids {
            if let Some(conn) = self.conn(id) {
                let reason = "Server shutting down, reconnect";
                conn.close_with_error(crate::protocol::codes::SHUTTING_DOWN, reason, now);
            }
        }
    }

    /// Waits until `done`, woken through the node's lifecycle waker of this shard.
    async fn wait_for(&self, mut done: impl FnMut() -> bool) {
        poll_fn(|cx| {
            if done() {
                return Poll::Ready(());
            }
            self.node.set_lifecycle_waker(self.id, cx.waker());
            // Checked again: the flag may have been set before the waker was in place.
            match done() {
                true => Poll::Ready(()),
                false => Poll::Pending,
            }
        })
        .await
    }

    /// Called when a connection is gone: the last one ends a drain.
    pub(super) fn on_disconnect(&self) {
        if self.phase() == Phase::Draining && self.conns.borrow().is_empty() {
            self.node.wake_shard(self.id);
        }
    }
}
