//! One WebSocket connection as its shard sees it: identity, subscriptions, liveness, and the
//! outbound queue. Frames are shared (`Rc<[u8]>`) so a fanout never copies per socket; all the
//! frames pending for a socket leave in one `sendmsg` with an iovec per frame.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};
use std::os::fd::RawFd;
use std::rc::Rc;
use std::task::Waker;

use crate::protocol::{codes, events, ws};
use crate::tls::{FdWriter, TlsSession};

/// A subscription as the connection knows it.
pub struct Sub {
    /// The channel name.
    pub name: Box<str>,
    /// The channel's home shard counted the socket (the socket then receives its events).
    pub confirmed: bool,
    /// The presence user id this socket joined as.
    pub user_id: Option<Box<str>>,
}

/// Where `name` is in a connection's subscriptions, which are kept sorted by name: `Ok(index)`,
/// or `Err(insertion point)`.
pub fn find_sub(subs: &[Sub], name: &str) -> Result<usize, usize> {
    subs.binary_search_by(|s| (*s.name).cmp(name))
}

#[derive(Default)]
struct OutQueue {
    frames: VecDeque<Rc<[u8]>>,
    /// Bytes of the front frame already written.
    offset: usize,
    bytes: usize,
}

/// Where a connection is in its life. Only moves forward: Open -> Closing -> Aborted, or
/// Open -> Aborted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnState {
    /// Serving.
    Open,
    /// Our close frame is queued and no more frames are. The socket is dropped once the queue is
    /// flushed and the peer has answered, or at the deadline anyway.
    Closing {
        /// Shard-clock second by which the socket is dropped anyway. None: closed from a path
        /// without the clock (a slow consumer); the sweeper starts the grace period.
        deadline: Option<u32>,
        /// The peer's close frame has arrived.
        peer_closed: bool,
    },
    /// To be dropped at once, unflushed (a write error, the grace period over, a panic).
    Aborted,
}

/// One WebSocket connection as its shard sees it. Created by the WebSocket session when it
/// admits a socket, owned (`Rc`) by the shard's connection table, its subscriptions in the
/// shard's fanout table and its task; touched only on its shard.
pub struct Conn {
    /// Unique in the process; the part after the dot of the socket id.
    pub id: u64,
    /// The socket, so an over-full queue can be flushed before it counts as slow (-1: none).
    pub fd: Cell<RawFd>,
    /// The app the connection belongs to (index into the configured apps).
    pub app: u32,
    out: RefCell<OutQueue>,
    waker: RefCell<Option<Waker>>,
    state: Cell<ConnState>,
    /// The channels it subscribed to, sorted by name (see `find_sub`).
    pub subs: RefCell<Vec<Sub>>,
    /// Shard clock seconds of the last inbound frame.
    pub last_seen: Cell<u32>,
    /// Shard-clock second the server pinged it, while no answer has arrived.
    pub ping_sent: Cell<Option<u32>>,
    /// Client-event token bucket: (last refill, shard-clock ms; tokens).
    pub rate: Cell<(u64, f32)>,
    /// Listed in the shard's dirty list: frames are queued for the flusher to write.
    pub dirty: Cell<bool>,
    /// Shard-clock second the connection was admitted (for the authorization timeout).
    pub connected_at: u32,
    /// Signed in, or confirmed on a private/presence channel (authorized connections, §3.6).
    pub authorized: Cell<bool>,
    /// The user this connection signed in as (`pusher:signin`).
    pub user: RefCell<Option<Box<super::users::SignedIn>>>,
    /// Bytes its frame reader holds for incomplete frames and messages (the shard's budget).
    pub partial_bytes: Cell<u32>,
    /// Shard-clock second since when it has held an incomplete message.
    pub partial_since: Cell<Option<u32>>,
    /// Closed to free the partial-message budget: its reader drops what it holds and all input.
    pub discard_input: Cell<bool>,
    /// The close code that ended the connection: ours, or the peer's when it closed first
    /// (0: none yet).
    close_code: Cell<u16>,
    /// TLS (`tls_cert`): frames are encrypted on their way out, reads decrypted on their way
    /// in. None for plain TCP, whose path is untouched.
    tls: Option<Box<TlsSession>>,
}

/// Seconds a closing connection gets to flush and see the peer's close before it is dropped.
pub const CLOSE_GRACE_SECS: u32 = 3;

impl Conn {
    /// A connection of `app` admitted at shard-clock second `now`, with `burst` client-event
    /// tokens.
    pub fn new(id: u64, app: u32, now: u32, burst: f32) -> Conn {
        Conn {
            id,
            fd: Cell::new(-1),
            app,
            out: RefCell::new(OutQueue::default()),
            waker: RefCell::new(None),
            state: Cell::new(ConnState::Open),
            subs: RefCell::new(Vec::new()),
            last_seen: Cell::new(now),
            ping_sent: Cell::new(None),
            rate: Cell::new((0, burst)),
            dirty: Cell::new(false),
            connected_at: now,
            authorized: Cell::new(false),
            user: RefCell::new(None),
            partial_bytes: Cell::new(0),
            partial_since: Cell::new(None),
            discard_input: Cell::new(false),
            close_code: Cell::new(0),
            tls: None,
        }
    }

    /// The connection over TLS, with the session its handshake established.
    pub fn with_tls(mut self, tls: Option<Box<TlsSession>>) -> Conn {
        self.tls = tls;
        self
    }

    /// The connection's TLS, if it has any.
    pub fn tls(&self) -> Option<&TlsSession> {
        self.tls.as_deref()
    }

    /// The close code that ended the connection, for the metrics: 1006 (closed without a close
    /// frame) when neither side sent one.
    pub fn close_code(&self) -> u16 {
        match self.close_code.get() {
            0 => codes::ABNORMAL_CLOSURE,
            code => code,
        }
    }

    /// Where the connection is in its life.
    pub fn state(&self) -> ConnState {
        self.state.get()
    }

    /// Closing or aborted: nothing more is queued for it.
    pub fn is_closing(&self) -> bool {
        self.state.get() != ConnState::Open
    }

    /// The peer's close frame arrived (after or with ours).
    pub fn mark_peer_closed(&self) {
        if let ConnState::Closing { deadline, .. } = self.state.get() {
            let peer_closed = true;
            self.state.set(ConnState::Closing {
                deadline,
                peer_closed,
            });
        }
    }

    /// Sets the close deadline of a connection closed without the clock (see `ConnState`).
    pub fn start_close_grace(&self, now: u32) {
        if let ConnState::Closing {
            deadline: None,
            peer_closed,
        } = self.state.get()
        {
            let deadline = Some(now.saturating_add(CLOSE_GRACE_SECS));
            self.state.set(ConnState::Closing {
                deadline,
                peer_closed,
            });
        }
    }

    /// Queues a frame and wakes the socket's task to write it; returns false (and starts a 4100
    /// close) when the socket is a slow consumer.
    pub fn send(&self, frame: Rc<[u8]>, max_queued: usize) -> bool {
        if !self.is_closing() {
            crate::metrics::here().frames_delivered.inc();
        }
        let ok = self.queue(frame, max_queued);
        self.wake();
        ok
    }

    /// Queues a frame without waking the task: the shard's flusher writes it (the fanout path).
    pub fn queue(&self, frame: Rc<[u8]>, max_queued: usize) -> bool {
        if self.is_closing() {
            return true;
        }
        if self.queued_bytes() + frame.len() > max_queued && self.fd.get() >= 0 {
            // A burst, not necessarily a slow reader: give the kernel what it takes now.
            let _ = self.flush(self.fd.get());
        }
        let over = {
            let mut q = self.out.borrow_mut();
            if q.bytes + frame.len() > max_queued {
                true
            } else {
                q.bytes += frame.len();
                q.frames.push_back(frame);
                false
            }
        };
        if over {
            self.drop_backlog();
            self.close_with_error(
                codes::OVER_CAPACITY,
                "Slow consumer: too many messages queued",
                None,
            );
            return false;
        }
        true
    }

    /// `send` for a frame just encoded for this socket alone.
    pub fn send_vec(&self, frame: Vec<u8>, max_queued: usize) -> bool {
        self.send(Rc::from(frame), max_queued)
    }

    /// Discards queued frames except a partly written one (the stream must stay well-formed).
    fn drop_backlog(&self) {
        let mut q = self.out.borrow_mut();
        let keep = if q.offset > 0 {
            q.frames.pop_front()
        } else {
            None
        };
        q.frames = VecDeque::new();
        q.bytes = 0;
        if let Some(front) = keep {
            q.bytes = front.len();
            q.frames.push_back(front);
        }
    }

    /// Gracefully closes with `pusher:error` + a close frame with `code` (the rejection form of
    /// reference §1.5). The socket is dropped once the peer answers the close, or at the
    /// deadline. `now` is the shard clock; None lets the sweeper start the grace period.
    pub fn close_with_error(&self, code: u16, reason: &str, now: Option<u32>) {
        self.close_with(
            Some(events::error(Some(code), reason)),
            ws::close_frame(code, reason),
            code,
            now,
        );
    }

    /// Gracefully closes with a close frame only, for WebSocket-level errors (1002) and replies
    /// to the peer's close.
    pub fn close_without_error(&self, code: Option<u16>, reason: &str, now: u32) {
        let frame = match code {
            Some(c) if c != codes::NO_STATUS && c != codes::ABNORMAL_CLOSURE => {
                ws::close_frame(c, reason)
            }
            _ => ws::encode_frame(ws::OP_CLOSE, &[]),
        };
        self.close_with(None, frame, code.unwrap_or(codes::NO_STATUS), Some(now));
    }

    fn close_with(&self, error: Option<Vec<u8>>, close: Vec<u8>, code: u16, now: Option<u32>) {
        if self.is_closing() {
            return;
        }
        self.close_code.set(code);
        {
            let mut q = self.out.borrow_mut();
            for frame in error.into_iter().chain([close]) {
                q.bytes += frame.len();
                q.frames.push_back(Rc::from(frame));
            }
        }
        self.state.set(ConnState::Closing {
            deadline: now.map(|now| now.saturating_add(CLOSE_GRACE_SECS)),
            peer_closed: false,
        });
        self.wake();
    }

    /// Drops the connection at once, without flushing: its task ends it.
    pub fn abort(&self) {
        self.state.set(ConnState::Aborted);
        self.wake();
    }

    /// The connection's task, to be woken when there is something to write or it must end.
    pub fn set_waker(&self, waker: &Waker) {
        let mut slot = self.waker.borrow_mut();
        match &*slot {
            Some(w) if w.will_wake(waker) => {}
            _ => *slot = Some(waker.clone()),
        }
    }

    /// Wakes the connection's task.
    pub fn wake(&self) {
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// Bytes queued and not written yet.
    pub fn queued_bytes(&self) -> usize {
        self.out.borrow().bytes
    }

    /// Writes as much of the queue as the socket takes, many frames per syscall.
    /// `Ok(true)` when the queue is empty afterwards, `Ok(false)` when the socket is full.
    pub fn flush(&self, fd: RawFd) -> io::Result<bool> {
        if let Some(tls) = &self.tls {
            return self.flush_tls(tls, fd);
        }
        let mut q = self.out.borrow_mut();
        while !q.frames.is_empty() {
            // One frame, the usual fanout case, is a `send`; several, one `sendmsg`.
            let written = {
                let mut slices = [IoSlice::new(&[]); MAX_SLICES];
                let count = q.pending(&mut slices);
                FdWriter::new(fd).write_vectored(&slices[..count])
            };
            match written {
                Ok(n) => {
                    crate::metrics::here().bytes_sent.add(n as u64);
                    q.consume(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        q.shrink_when_empty();
        Ok(true)
    }

    /// `flush` over TLS: the records rustls holds go out first; then the next frames (as many
    /// as its buffer limit takes, coalesced into full records) are encrypted, and so on until
    /// the queue is empty or the socket full. A frame handed to rustls in part keeps its place
    /// (`offset`), as a partly written one does on plain TCP, and its bytes stay counted in the
    /// queue until rustls has them.
    fn flush_tls(&self, tls: &TlsSession, fd: RawFd) -> io::Result<bool> {
        let mut q = self.out.borrow_mut();
        loop {
            let mut out = FdWriter::new(fd);
            let done = tls.write_to(&mut out);
            crate::metrics::here().bytes_sent.add(out.written as u64);
            if !done? {
                return Ok(false);
            }
            if q.frames.is_empty() {
                break;
            }
            let taken = {
                let mut slices = [IoSlice::new(&[]); MAX_SLICES];
                let count = q.pending(&mut slices);
                tls.encrypt(&slices[..count])?
            };
            if taken == 0 {
                // rustls holds nothing unwritten, so it takes no more only once it is closed.
                return Err(io::Error::other("TLS connection closed for writing"));
            }
            q.consume(taken);
        }
        q.shrink_when_empty();
        Ok(true)
    }

    /// The unwritten part of the front frame, for the readiness wait when the socket is full.
    pub fn with_front<R>(&self, f: impl FnOnce(&[u8]) -> R) -> Option<R> {
        let q = self.out.borrow();
        q.frames.front().map(|front| f(&front[q.offset..]))
    }

    /// Marks `n` queued bytes as written (by a write outside `flush`).
    pub fn consume(&self, n: usize) {
        self.out.borrow_mut().consume(n);
    }
}

/// Frames handed to one write at most (an iovec each).
const MAX_SLICES: usize = 64;

impl OutQueue {
    /// The unwritten bytes of the first frames, in order (the front one from `offset`), in
    /// `slices`; returns how many.
    fn pending<'a>(&'a self, slices: &mut [IoSlice<'a>; MAX_SLICES]) -> usize {
        let mut count = 0;
        for (i, frame) in self.frames.iter().take(MAX_SLICES).enumerate() {
            let start = if i == 0 { self.offset } else { 0 };
            slices[i] = IoSlice::new(&frame[start..]);
            count += 1;
        }
        count
    }

    /// An idle socket keeps room for a few frames (no allocation per delivery), not a burst's.
    fn shrink_when_empty(&mut self) {
        if self.frames.is_empty() && self.frames.capacity() > 4 {
            self.frames = VecDeque::with_capacity(4);
        }
    }

    fn consume(&mut self, mut n: usize) {
        self.bytes -= n;
        while n > 0 {
            let Some(front) = self.frames.front() else {
                break;
            };
            let left = front.len() - self.offset;
            if n >= left {
                n -= left;
                self.offset = 0;
                self.frames.pop_front();
            } else {
                self.offset += n;
                n = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn coalesces_queued_frames_into_one_write_and_keeps_order() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let conn = Conn::new(1, 0, 0, 10.0);
        for i in 0..100u8 {
            assert!(conn.send(Rc::from(vec![i; 3]), 1 << 20));
        }
        assert_eq!(conn.queued_bytes(), 300);
        assert!(conn.flush(a.as_raw_fd()).unwrap());
        assert_eq!(conn.queued_bytes(), 0);
        let mut got = vec![0u8; 300];
        b.read_exact(&mut got).unwrap();
        let expected: Vec<u8> = (0..100u8).flat_map(|i| [i; 3]).collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn partial_writes_resume_mid_frame() {
        let mut q = OutQueue::default();
        for f in [vec![1u8, 2, 3], vec![4, 5]] {
            q.bytes += f.len();
            q.frames.push_back(Rc::from(f));
        }
        q.consume(2);
        assert_eq!(q.offset, 2);
        q.consume(2);
        assert_eq!(q.offset, 1);
        assert_eq!(q.frames.len(), 1);
        q.consume(1);
        assert!(q.frames.is_empty());
        assert_eq!(q.bytes, 0);
    }

    #[test]
    fn slow_consumer_is_closed_with_4100_and_backlog_dropped() {
        let conn = Conn::new(1, 0, 0, 10.0);
        assert!(conn.send(Rc::from(vec![0u8; 900]), 1000));
        assert!(!conn.send(Rc::from(vec![0u8; 200]), 1000));
        assert!(conn.is_closing());
        // Only the error and close frames remain queued.
        assert!(conn.queued_bytes() < 200);
        let (a, mut b) = UnixStream::pair().unwrap();
        conn.flush(a.as_raw_fd()).unwrap();
        let mut buf = vec![0u8; conn_bytes_hint()];
        let n = b.read(&mut buf).unwrap();
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(text.contains("\"code\":4100"));
        assert!(buf[..n].windows(2).any(|w| w == [0x88, w[1]] && w[1] > 2));
    }

    fn conn_bytes_hint() -> usize {
        4096
    }
}
