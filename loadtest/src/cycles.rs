//! Sockets that cycle: connect, subscribe, leave, close, then the next one, with at most
//! `parallel` cycles in progress. The churn and presence workloads and the soak's churn and
//! presence parts all run their loop with `Cycles::round`; what a socket does with each message
//! (and which message completes its cycle) stays with the caller.

use crate::net::{now_ns, Pool, Ws, WsEvent};
use std::collections::HashSet;

const SEC: u64 = 1_000_000_000;

/// What one round did.
pub struct Round {
    /// Connects that failed at once (each still counts as a start).
    pub connect_failed: u64,
    /// Cycles finished (their sockets are closed now).
    pub finished: u64,
    /// Cycles the server ended by closing the socket first: the close code of each
    /// (`Ws::close_code`).
    pub dropped: Vec<Option<u16>>,
    /// Cycles closed because they took too long.
    pub stuck: u64,
}

pub struct Cycles {
    parallel: usize,
    /// Pool indices of the sockets whose cycle is in progress.
    in_progress: HashSet<usize>,
    /// Cycles started so far; each socket's tag is its start number (as u32).
    started: u64,
    /// Sockets whose cycle finished during the current poll.
    finished: Vec<usize>,
    /// A cycle taking longer is closed (checked once a second); None: never.
    stuck_after: Option<u64>,
    last_scan: u64,
}

impl Cycles {
    /// At most `parallel` cycles at once; with `stuck_after` (ns), a cycle that takes longer is
    /// closed and counted as stuck.
    pub fn new(parallel: usize, stuck_after: Option<u64>) -> Cycles {
        Cycles {
            parallel,
            in_progress: HashSet::new(),
            started: 0,
            finished: Vec::new(),
            stuck_after,
            last_scan: now_ns(),
        }
    }

    /// One turn of the loop: starts cycles (opens sockets, tagged with their start number) until
    /// `parallel` are in progress or `may_start` have started, waits up to 5 ms and hands every
    /// event to `on_ws`, which returns true when a message completed its socket's cycle, then
    /// closes the sockets that completed and, once a second, the stuck ones. A socket the server
    /// closes before its cycle is complete counts as dropped.
    pub fn round(
        &mut self,
        pool: &mut Pool,
        may_start: u64,
        on_ws: &mut dyn FnMut(&mut Ws, usize, WsEvent<'_>) -> bool,
    ) -> Round {
        let mut connect_failed = 0;
        while self.in_progress.len() < self.parallel && self.started < may_start {
            match pool.open_ws(self.started as u32, now_ns()) {
                Some(idx) => {
                    self.in_progress.insert(idx);
                }
                None => connect_failed += 1,
            }
            self.started += 1;
        }
        let (in_progress, finished) = (&mut self.in_progress, &mut self.finished);
        let mut dropped = Vec::new();
        pool.poll(
            5,
            &mut |ws, idx, event| {
                let closed = matches!(event, WsEvent::Closed);
                let complete = on_ws(ws, idx, event);
                if closed {
                    if in_progress.remove(&idx) {
                        dropped.push(ws.close_code);
                    }
                } else if complete && in_progress.remove(&idx) {
                    finished.push(idx);
                }
            },
            &mut |_, _, _| {},
        );
        let done = self.finished.len() as u64;
        for idx in self.finished.drain(..) {
            pool.close_ws(idx);
        }
        Round {
            connect_failed,
            finished: done,
            dropped,
            stuck: self.close_stuck(pool),
        }
    }

    /// Once a second, closes the sockets whose cycle started more than `stuck_after` ago.
    fn close_stuck(&mut self, pool: &mut Pool) -> u64 {
        let Some(limit) = self.stuck_after else {
            return 0;
        };
        let now = now_ns();
        if now - self.last_scan <= SEC {
            return 0;
        }
        self.last_scan = now;
        let before = self.in_progress.len();
        self.in_progress.retain(|&idx| {
            let stuck = now - pool.ws[idx].since > limit;
            if stuck {
                pool.close_ws(idx);
            }
            !stuck
        });
        (before - self.in_progress.len()) as u64
    }
}
