//! Deadlines for sockets that are not (yet) WebSocket connections: the first request of every
//! socket, and keep-alive HTTP connections between requests. The shard's sweeper checks them
//! once a second, which costs far less than an io_uring timer armed and cancelled per read.

use super::Shard;
use std::cell::{Cell, RefCell};
use std::future::{poll_fn, Future};
use std::rc::Rc;
use std::task::{Poll, Waker};

/// One socket's deadline, in shard-clock seconds.
pub struct Deadline {
    at: Cell<u32>,
    expired: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl Deadline {
    /// Moves the deadline to `secs` seconds from now.
    pub fn extend(&self, shard: &Shard, secs: u32) {
        self.at.set(shard.now_secs().saturating_add(secs));
    }

    /// Called by the sweeper: wakes whoever waits in `expired`.
    pub(super) fn expire_if_due(&self, now: u32) {
        if now >= self.at.get() && !self.expired.replace(true) {
            if let Some(w) = self.waker.borrow_mut().take() {
                w.wake();
            }
        }
    }

    /// Runs `work` until it ends (`Some`) or the deadline passes (`None`, and `work` is dropped).
    pub async fn within<T>(&self, work: impl Future<Output = T>) -> Option<T> {
        futures_lite::future::or(async { Some(work.await) }, async {
            self.expired().await;
            None
        })
        .await
    }

    /// Resolves once the deadline has passed.
    async fn expired(&self) {
        poll_fn(|cx| {
            if self.expired.get() {
                Poll::Ready(())
            } else {
                *self.waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }
}

/// A deadline registered with the shard's sweeper for as long as this guard lives.
pub struct DeadlineGuard {
    shard: Rc<Shard>,
    id: u64,
    deadline: Rc<Deadline>,
}

impl DeadlineGuard {
    /// Registers a deadline `secs` seconds from now.
    pub fn new(shard: &Rc<Shard>, secs: u32) -> DeadlineGuard {
        let deadline = Rc::new(Deadline {
            at: Cell::new(shard.now_secs().saturating_add(secs)),
            expired: Cell::new(false),
            waker: RefCell::new(None),
        });
        let id = shard.new_id();
        shard.deadlines.borrow_mut().insert(id, deadline.clone());
        DeadlineGuard {
            shard: shard.clone(),
            id,
            deadline,
        }
    }
}

impl std::ops::Deref for DeadlineGuard {
    type Target = Deadline;
    fn deref(&self) -> &Deadline {
        &self.deadline
    }
}

impl Drop for DeadlineGuard {
    fn drop(&mut self) {
        self.shard.deadlines.borrow_mut().remove(&self.id);
    }
}
