//! One shard's link to Redis: a glommio socket speaking RESP3 (`HELLO 3`), so that one link
//! carries both commands and pub/sub pushes. Commands are queued and written back to back,
//! without waiting for replies (pipelined); replies are parsed with the `redis` crate's incremental parser
//! (which keeps its state between reads, so no byte is read twice). The link reconnects by
//! itself, resubscribes its topics, and holds a bounded queue of commands while Redis is away
//! or slow.

use ahash::{AHashMap, AHashSet};
use futures_lite::io::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;
use redis::{ConnectionAddr, ConnectionInfo, PushKind, Value};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::poll_fn;
use std::io::{self, Read};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::Duration;

/// What the link tells its shard.
pub enum LinkEvent {
    /// A message on a subscribed topic.
    Message {
        /// The topic.
        topic: Vec<u8>,
        /// The message as published.
        payload: Vec<u8>,
    },
    /// Redis confirmed a subscription: messages published from now on reach this link.
    Subscribed(Vec<u8>),
    /// The link is connected and its topics are (being) resubscribed.
    Up,
    /// The link lost Redis; it keeps trying.
    Down(String),
    /// The reply to a command sent with `state_command_then_event(.., token)`.
    Reply {
        /// The token the command was sent with.
        token: u64,
        /// Redis's reply (an error reply included).
        value: Value,
    },
}

/// Who gets the reply of a command.
#[derive(Clone)]
enum ReplyTo {
    /// Nobody: a reply is read and dropped (an error is logged once).
    Nobody,
    /// The handshake: an error means the link cannot work.
    Handshake,
    /// The shard, as `LinkEvent::Reply` with this token.
    Event(u64),
    /// A task waiting in `RedisLink::ask`.
    Caller(Rc<ReplySlot>),
}

/// Where `ask` waits for its reply. None after the link went down: the reply will never come.
#[derive(Default)]
struct ReplySlot {
    value: RefCell<Option<Option<Value>>>,
    waker: RefCell<Option<Waker>>,
}

impl ReplySlot {
    fn fill(&self, value: Option<Value>) {
        *self.value.borrow_mut() = Some(value);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }
}

/// A command waiting to be written, and who gets its reply (None: it gets no regular reply).
struct Queued {
    bytes: Vec<u8>,
    reply_to: Option<ReplyTo>,
    /// Connection state (handshake, SUBSCRIBE, UNSUBSCRIBE, the shard's share of the shared
    /// state), rebuilt from scratch on each connect: unwritten ones are dropped then, so
    /// retries never pile them up, a stale SUBSCRIBE never follows the topic set, and stale
    /// state never follows the shard's fresh assertion.
    state: bool,
}

/// One shard's Redis link. Owned by the shard; its task is `run`.
pub struct RedisLink {
    host: String,
    port: u16,
    db: i64,
    username: Option<String>,
    password: Option<String>,
    /// Commands not yet written, in order; `written` bytes of the front one are out.
    queue: RefCell<VecDeque<Queued>>,
    written: Cell<usize>,
    /// For each command written and not yet answered, in order: who gets the reply.
    replies_due: RefCell<VecDeque<ReplyTo>>,
    /// Seconds of silence after which the link pings, and after which it gives Redis up.
    ping_after: Duration,
    dead_after: Duration,
    /// Errors Redis answered to ordinary commands (logged the first time).
    command_errors: Cell<u64>,
    max_queued: usize,
    /// A connection exists (from its setup until it fails): commands queued now go out on it.
    connected: Cell<bool>,
    /// The connection's handshake was answered.
    up: Cell<bool>,
    waker: RefCell<Option<Waker>>,
    /// Topics this shard wants: subscribed again on every (re)connect.
    topics: RefCell<AHashSet<Vec<u8>>>,
    /// SUBSCRIBEs sent or queued on this connection and not yet confirmed, per topic: only the
    /// confirmation of the last one says Redis has the subscription now.
    unconfirmed: RefCell<AHashMap<Vec<u8>, u32>>,
}

const READ_CHUNK: usize = 16 * 1024;
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

impl RedisLink {
    /// A link to the Redis of `info` (TCP only), keeping at most `max_queued` commands unwritten.
    /// It pings after `ping_after` of silence and counts Redis as gone after `dead_after`.
    pub fn new(
        info: &ConnectionInfo,
        max_queued: usize,
        ping_after: Duration,
        dead_after: Duration,
    ) -> RedisLink {
        let (host, port) = match info.addr() {
            ConnectionAddr::Tcp(host, port) => (host.clone(), *port),
            other => (other.to_string(), 6379),
        };
        let settings = info.redis_settings();
        RedisLink {
            host,
            port,
            db: settings.db(),
            username: settings.username().map(str::to_owned),
            password: settings.password().map(str::to_owned),
            queue: RefCell::new(VecDeque::new()),
            written: Cell::new(0),
            replies_due: RefCell::new(VecDeque::new()),
            ping_after,
            dead_after,
            command_errors: Cell::new(0),
            max_queued,
            connected: Cell::new(false),
            up: Cell::new(false),
            waker: RefCell::new(None),
            topics: RefCell::new(AHashSet::new()),
            unconfirmed: RefCell::new(AHashMap::new()),
        }
    }

    /// Connected to Redis right now.
    pub fn is_up(&self) -> bool {
        self.up.get()
    }

    /// Has a connection that state commands are queued for (its handshake may be unanswered
    /// yet): they will be written, in order, after the handshake.
    pub fn is_connected(&self) -> bool {
        self.connected.get()
    }

    /// Queues a command that gets a regular reply (the reply is read and dropped; errors are
    /// logged). Returns false when the queue is full (Redis away, or not keeping up): the
    /// command is refused rather than held without bound.
    pub fn command(&self, cmd: &redis::Cmd) -> bool {
        self.queue(cmd, ReplyTo::Nobody, false)
    }

    /// Sends a command and waits for its reply. None: the link is down (nothing is queued for
    /// a caller who waits), the queue is full, or the link went down before the reply came.
    pub async fn ask(&self, cmd: &redis::Cmd) -> Option<Value> {
        if !self.up.get() {
            return None;
        }
        let slot = Rc::new(ReplySlot::default());
        if !self.queue(cmd, ReplyTo::Caller(slot.clone()), false) {
            return None;
        }
        poll_fn(|cx| match slot.value.borrow_mut().take() {
            Some(value) => Poll::Ready(value),
            None => {
                *slot.waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }

    /// Queues a command that writes this node's share of the shared state. It belongs to the
    /// connection: while there is none it is not queued (true: the shard asserts its whole
    /// state when the link is up again), and what is still unwritten when a connection fails is
    /// dropped, so an outage never replays stale state over the fresh assertion. False: the
    /// queue is full.
    pub fn state_command(&self, cmd: &redis::Cmd) -> bool {
        if !self.connected.get() {
            return true;
        }
        self.queue(cmd, ReplyTo::Nobody, true)
    }

    /// Like `state_command`, and its reply comes back as `LinkEvent::Reply` with `token`. False:
    /// not queued (no connection, or the queue is full), so no reply will come.
    pub fn state_command_then_event(&self, cmd: &redis::Cmd, token: u64) -> bool {
        self.connected.get() && self.queue(cmd, ReplyTo::Event(token), true)
    }

    /// Queues a command unless the queue is full (false then). `state`: see `Queued::state`.
    fn queue(&self, cmd: &redis::Cmd, reply_to: ReplyTo, state: bool) -> bool {
        if self.queue.borrow().len() >= self.max_queued {
            return false;
        }
        self.push(cmd, Some(reply_to), state);
        true
    }

    fn push(&self, cmd: &redis::Cmd, reply_to: Option<ReplyTo>, state: bool) {
        let mut bytes = Vec::new();
        cmd.write_packed_command(&mut bytes);
        self.queue.borrow_mut().push_back(Queued {
            bytes,
            reply_to,
            state,
        });
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// Subscribes to `topic` (now if connected, else on connect); `LinkEvent::Subscribed`
    /// follows once Redis has it.
    pub fn subscribe(&self, topic: &[u8]) {
        // On a connection whose handshake is still unanswered too: its SUBSCRIBEs were taken
        // from `topics` when it was set up, so a topic added since must be sent now.
        if self.topics.borrow_mut().insert(topic.to_vec()) && self.connected.get() {
            *self
                .unconfirmed
                .borrow_mut()
                .entry(topic.to_vec())
                .or_default() += 1;
            self.push(redis::cmd("SUBSCRIBE").arg(topic), None, true);
        }
    }

    /// Redis may not have this topic's subscription yet (a SUBSCRIBE is unconfirmed).
    pub fn is_subscribing(&self, topic: &[u8]) -> bool {
        self.unconfirmed.borrow().contains_key(topic)
    }

    /// Unsubscribes from `topic`.
    pub fn unsubscribe(&self, topic: &[u8]) {
        if self.topics.borrow_mut().remove(topic) && self.connected.get() {
            self.push(redis::cmd("UNSUBSCRIBE").arg(topic), None, true);
        }
    }

    /// The link's task: connects, serves, and reconnects for the life of the shard. Events go to
    /// `on_event`, never while a borrow of the link is held.
    pub async fn run(&self, on_event: &dyn Fn(LinkEvent)) {
        let mut retry = RETRY_MIN;
        loop {
            match self.connect().await {
                Ok(stream) => {
                    let reason = self.serve(stream, on_event).await;
                    // Back off from the start only after a link that worked.
                    if self.up.get() {
                        retry = RETRY_MIN;
                    }
                    self.went_down();
                    on_event(LinkEvent::Down(reason));
                }
                Err(e) => on_event(LinkEvent::Down(e.to_string())),
            }
            glommio::timer::sleep(retry).await;
            retry = (retry * 2).min(RETRY_MAX);
        }
    }

    async fn connect(&self) -> io::Result<TcpStream> {
        // Every address of the host in turn (a name may resolve to ::1 and 127.0.0.1), each
        // bounded in time; glommio's own resolution takes only the first address.
        let addresses = std::net::ToSocketAddrs::to_socket_addrs(&(self.host.as_str(), self.port))?;
        let mut last = io::Error::new(io::ErrorKind::NotFound, "the host has no address");
        let mut connected = None;
        for addr in addresses {
            match TcpStream::connect_timeout(addr, self.dead_after).await {
                Ok(stream) => {
                    connected = Some(stream);
                    break;
                }
                Err(e) => last = io::Error::other(e.to_string()),
            }
        }
        let stream = connected.ok_or(last)?;
        stream.set_nodelay(true)?;
        // Silence wakes the link to ping; it never waits longer than that for a read.
        stream
            .set_read_timeout(Some(self.ping_after))
            .map_err(|e| io::Error::other(e.to_string()))?;
        // The handshake and the resubscriptions go before anything queued while away.
        let state = |bytes: Vec<u8>, reply_to: Option<ReplyTo>| Queued {
            bytes,
            reply_to,
            state: true,
        };
        let handshake = Some(ReplyTo::Handshake);
        let mut first = vec![state(self.hello().get_packed_command(), handshake.clone())];
        if self.db != 0 {
            let select = redis::cmd("SELECT").arg(self.db).get_packed_command();
            first.push(state(select, handshake));
        }
        // Commands name the scripts by their SHA-1 only; a refused load (an ACL without
        // SCRIPT, say) is refused handshake, with Redis's reason.
        for load in crate::cluster::state::load_scripts() {
            first.push(state(load.get_packed_command(), Some(ReplyTo::Handshake)));
        }
        let mut unconfirmed = self.unconfirmed.borrow_mut();
        unconfirmed.clear();
        for topic in self.topics.borrow().iter() {
            let subscribe = redis::cmd("SUBSCRIBE").arg(&topic[..]).get_packed_command();
            first.push(state(subscribe, None));
            unconfirmed.insert(topic.clone(), 1);
        }
        drop(unconfirmed);
        let mut queue = self.queue.borrow_mut();
        // Nothing of the queue is written yet (`went_down`), so any of it may go.
        queue.retain(|q| !q.state);
        for q in first.into_iter().rev() {
            queue.push_front(q);
        }
        self.connected.set(true);
        Ok(stream)
    }

    fn hello(&self) -> redis::Cmd {
        let mut hello = redis::cmd("HELLO");
        hello.arg(3);
        if let Some(password) = &self.password {
            let user = self.username.as_deref().unwrap_or("default");
            hello.arg("AUTH").arg(user).arg(password);
        }
        hello
    }

    /// A command half written when the link broke is sent again whole; replies in flight are
    /// gone with the connection, and so is anything queued for a caller who waits.
    fn went_down(&self) {
        self.up.set(false);
        self.connected.set(false);
        self.written.set(0);
        let lost = std::mem::take(&mut *self.replies_due.borrow_mut());
        let unsent: VecDeque<Queued> = {
            let mut queue = self.queue.borrow_mut();
            let (callers, kept) = std::mem::take(&mut *queue)
                .into_iter()
                .partition(|q| matches!(q.reply_to, Some(ReplyTo::Caller(_))));
            *queue = kept;
            callers
        };
        let callers = lost
            .into_iter()
            .chain(unsent.into_iter().filter_map(|q| q.reply_to));
        for reply_to in callers {
            if let ReplyTo::Caller(slot) = reply_to {
                slot.fill(None);
            }
        }
    }

    /// Writes what is queued and handles what arrives until the connection fails; returns why.
    async fn serve(&self, mut stream: TcpStream, on_event: &dyn Fn(LinkEvent)) -> String {
        let mut reader = RespReader::default();
        let mut buf = vec![0u8; READ_CHUNK];
        let mut last_heard = std::time::Instant::now();
        loop {
            glommio::yield_if_needed().await;
            let read = poll_fn(|cx| {
                *self.waker.borrow_mut() = Some(cx.waker().clone());
                if let Err(e) = self.poll_write(&mut stream, cx) {
                    return Poll::Ready(Err(e));
                }
                Pin::new(&mut stream).poll_read(cx, &mut buf)
            })
            .await;
            let n = match read {
                Ok(0) => return "Redis closed the connection".into(),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                    if last_heard.elapsed() >= self.dead_after {
                        let secs = self.dead_after.as_secs();
                        return format!("no answer from Redis in {secs} s");
                    }
                    self.push(&redis::cmd("PING"), Some(ReplyTo::Nobody), false);
                    continue;
                }
                Err(e) => return e.to_string(),
            };
            last_heard = std::time::Instant::now();
            let handled = reader.feed(&buf[..n], &mut |value| self.on_value(value, on_event));
            if let Err(reason) = handled {
                return reason;
            }
        }
    }

    /// Writes as much of the queue as the socket takes.
    fn poll_write(
        &self,
        stream: &mut TcpStream,
        cx: &mut std::task::Context<'_>,
    ) -> io::Result<()> {
        loop {
            let mut queue = self.queue.borrow_mut();
            let Some(front) = queue.front() else {
                return Ok(());
            };
            let offset = self.written.get();
            match Pin::new(&mut *stream).poll_write(cx, &front.bytes[offset..]) {
                Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) if offset + n < front.bytes.len() => {
                    self.written.set(offset + n)
                }
                Poll::Ready(Ok(_)) => {
                    self.written.set(0);
                    if let Some(reply_to) = queue.pop_front().and_then(|q| q.reply_to) {
                        self.replies_due.borrow_mut().push_back(reply_to);
                    }
                }
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => return Ok(()),
            }
        }
    }

    fn on_value(&self, value: Value, on_event: &dyn Fn(LinkEvent)) -> Result<(), String> {
        match value {
            Value::Push { kind, data } => {
                let mut data = data.into_iter();
                match (kind, data.next(), data.next()) {
                    (
                        PushKind::Message,
                        Some(Value::BulkString(topic)),
                        Some(Value::BulkString(payload)),
                    ) => on_event(LinkEvent::Message { topic, payload }),
                    (PushKind::Subscribe, Some(Value::BulkString(topic)), _) => {
                        let confirmed = {
                            let mut unconfirmed = self.unconfirmed.borrow_mut();
                            match unconfirmed.get_mut(&topic) {
                                Some(1) => unconfirmed.remove(&topic).is_some(),
                                Some(n) => {
                                    *n -= 1;
                                    false
                                }
                                None => false,
                            }
                        };
                        if confirmed && self.topics.borrow().contains(&topic) {
                            on_event(LinkEvent::Subscribed(topic));
                        }
                    }
                    _ => {}
                }
                Ok(())
            }
            reply => {
                let reply_to = self.replies_due.borrow_mut().pop_front();
                if let Value::ServerError(e) = &reply {
                    if matches!(reply_to, Some(ReplyTo::Handshake)) {
                        return Err(format!("Redis refused the handshake: {e}"));
                    }
                    if e.code() == "NOSCRIPT" {
                        // Flushed since this connection loaded them: a new one loads them again
                        // and the shard asserts its state again.
                        return Err("Redis lost the scripts (SCRIPT FLUSH?); reconnecting".into());
                    }
                    // One refused command (a PUBLISH, say) does not end the link.
                    let errors = self.command_errors.get();
                    self.command_errors.set(errors + 1);
                    if errors == 0 {
                        crate::log_warn!("Redis refused a command: {e}");
                    }
                }
                match reply_to {
                    None => return Err("Redis sent a reply nobody asked for".into()),
                    Some(ReplyTo::Nobody) => {}
                    Some(ReplyTo::Handshake) => {
                        // `up` is false from connect until the handshake's first answer.
                        if !self.up.replace(true) {
                            on_event(LinkEvent::Up);
                        }
                    }
                    Some(ReplyTo::Event(token)) => on_event(LinkEvent::Reply {
                        token,
                        value: reply,
                    }),
                    Some(ReplyTo::Caller(slot)) => slot.fill(Some(reply)),
                }
                Ok(())
            }
        }
    }
}

/// Turns the bytes of a RESP3 stream, as they arrive in pieces, into values. The `redis` crate's
/// parser keeps its state between pieces, so no byte is read twice; it bounds nesting (100
/// levels) but not the size of a value, so the reader does: a broken or hostile Redis cannot make
/// a shard buffer more than `MAX_VALUE_BYTES` for one unfinished value.
#[derive(Default)]
pub struct RespReader {
    parser: redis::Parser,
    /// Bytes fed since the last complete value (counted per piece, so it may over-count by the
    /// tail of the piece that completed a value: never under).
    unfinished: usize,
}

/// Largest value accepted from Redis: far above any message a node publishes (an HTTP body is
/// at most `max_request_body_bytes`, 1 MiB by default).
pub const MAX_VALUE_BYTES: usize = 64 << 20;

impl RespReader {
    /// Parses `bytes` (the next piece of the stream), handing each complete value to `each`;
    /// a value cut at the end of the piece is completed by the next one. Err: bytes that are not
    /// RESP, a value over `MAX_VALUE_BYTES`, or what `each` refused.
    pub fn feed(
        &mut self,
        bytes: &[u8],
        each: &mut dyn FnMut(Value) -> Result<(), String>,
    ) -> Result<(), String> {
        let mut input = Chunk(bytes);
        let mut completed = false;
        loop {
            match self.parser.parse_value(&mut input) {
                Ok(value) => {
                    completed = true;
                    each(value)?
                }
                Err(e) if e.kind() == redis::ErrorKind::Io => break,
                Err(e) => return Err(format!("unreadable reply from Redis: {e}")),
            }
        }
        // After a complete value only the rest of this piece can belong to an unfinished one.
        self.unfinished = match completed {
            true => bytes.len(),
            false => self.unfinished.saturating_add(bytes.len()),
        };
        if self.unfinished > MAX_VALUE_BYTES {
            return Err(format!(
                "a reply from Redis is larger than {MAX_VALUE_BYTES} bytes"
            ));
        }
        Ok(())
    }
}

/// Newly read bytes as a reader that says "would block" when they are used up, so the parser
/// keeps its state for the next read.
struct Chunk<'a>(&'a [u8]);

impl Read for Chunk<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.0.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = out.len().min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_parse_across_pieces_and_an_endless_one_is_refused() {
        let mut reader = RespReader::default();
        let mut seen = Vec::new();
        let mut each = |v: Value| {
            seen.push(format!("{v:?}"));
            Ok(())
        };
        reader.feed(b"+OK\r\n:4", &mut each).unwrap();
        reader.feed(b"2\r\n", &mut each).unwrap();
        assert_eq!(seen.len(), 2);
        // A bulk string announced far larger than anything published: the reader gives up
        // before holding more than the bound.
        let mut reader = RespReader::default();
        let header = format!("${}\r\n", MAX_VALUE_BYTES * 2);
        reader.feed(header.as_bytes(), &mut |_| Ok(())).unwrap();
        let piece = vec![b'x'; 1 << 20];
        let mut fed = 0;
        let refused = loop {
            if let Err(e) = reader.feed(&piece, &mut |_| Ok(())) {
                break e;
            }
            fed += piece.len();
            assert!(fed <= MAX_VALUE_BYTES, "still buffering past the bound");
        };
        assert!(refused.contains("larger than"), "{refused}");
    }
}
