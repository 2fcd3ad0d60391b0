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
            let opened = pool.open_ws(self.started as u32, now_ns());
            self.started += 1;
            match opened {
                Some(idx) => {
                    self.in_progress.insert(idx);
                }
                // No retry in this round: a server that refuses every connect must not keep
                // the caller from reaching its deadline check.
                None => {
                    connect_failed += 1;
                    break;
                }
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpListener};

    /// A listener on an ephemeral loopback port and a pool whose sockets connect to it.
    fn server_and_pool() -> (TcpListener, Pool) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let SocketAddr::V4(addr) = listener.local_addr().expect("address") else {
            unreachable!("bound to an IPv4 address")
        };
        (
            listener,
            Pool::new(addr, b"GET / HTTP/1.1\r\n\r\n".to_vec(), 2),
        )
    }

    /// Runs rounds (no new starts beyond `may_start`) until `enough` or 3 s; sums them.
    fn rounds(
        c: &mut Cycles,
        pool: &mut Pool,
        may_start: u64,
        enough: fn(&Round) -> bool,
    ) -> Round {
        let mut sum = Round {
            connect_failed: 0,
            finished: 0,
            dropped: Vec::new(),
            stuck: 0,
        };
        let deadline = now_ns() + 3 * SEC;
        while !enough(&sum) && now_ns() < deadline {
            let r = c.round(pool, may_start, &mut |_, _, event| {
                matches!(event, WsEvent::Text(_))
            });
            sum.connect_failed += r.connect_failed;
            sum.finished += r.finished;
            sum.dropped.extend(r.dropped);
            sum.stuck += r.stuck;
        }
        sum
    }

    #[test]
    fn a_completed_cycle_is_closed_and_replaced() {
        let (listener, mut pool) = server_and_pool();
        let server = std::thread::spawn(move || {
            // Each client gets the upgrade and one text frame, which completes its cycle.
            let mut held = Vec::new();
            for _ in 0..2 {
                let (mut s, _) = listener.accept().expect("accept");
                let mut buf = [0u8; 256];
                let _ = s.read(&mut buf);
                let _ = s.write_all(b"HTTP/1.1 101 Switching Protocols\r\n\r\n\x81\x02hi");
                held.push(s);
            }
            held
        });
        let mut c = Cycles::new(1, None);
        let sum = rounds(&mut c, &mut pool, 2, |r| r.finished == 2);
        assert_eq!((sum.finished, sum.dropped.len(), c.started), (2, 0, 2));
        assert!(c.in_progress.is_empty());
        server.join().expect("server thread");
    }

    #[test]
    fn a_socket_the_server_closes_is_dropped_with_its_close_code() {
        let (listener, mut pool) = server_and_pool();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            let _ = s.write_all(b"HTTP/1.1 101 Switching Protocols\r\n\r\n\x88\x02\x03\xe8");
            let (s2, _) = listener.accept().expect("accept");
            drop(s2); // no close frame
        });
        let mut c = Cycles::new(2, None);
        let sum = rounds(&mut c, &mut pool, 2, |r| r.dropped.len() == 2);
        let mut codes = sum.dropped;
        codes.sort();
        assert_eq!(codes, [None, Some(1000)]);
        assert_eq!((sum.finished, c.in_progress.len()), (0, 0));
        server.join().expect("server thread");
    }

    #[test]
    fn cycles_older_than_the_limit_are_closed_as_stuck() {
        let (_listener, mut pool) = server_and_pool(); // never answers
        let mut c = Cycles::new(2, Some(SEC / 10));
        let sum = rounds(&mut c, &mut pool, 2, |r| r.stuck == 2);
        assert_eq!((sum.stuck, sum.finished, c.in_progress.len()), (2, 0, 0));
    }
}
