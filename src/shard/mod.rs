//! A shard: one glommio executor pinned to a core, owning the connections it accepted, the local
//! channel table, and the home view of the channels hashed to it. Shards share nothing mutable;
//! they talk only through `ShardMsg` over the channel mesh.

pub mod conn;
pub mod contain;
pub mod deadline;
mod home;
pub mod messages;
pub mod session;
pub mod user;

use crate::channels::cache::ChannelCache;
use crate::channels::home::HomeChannels;
use crate::channels::local::LocalChannels;
use crate::channels::watch::WatchCounts;
use crate::channels::ChannelKey;
use crate::config::{AppConfig, Config};
use crate::protocol::channel::ChannelKind;
use crate::protocol::{codes, events};
use ahash::AHashMap;
use conn::Conn;
use messages::{ChannelStats, JoinAck, JoinRequest, Query, QueryReply, ShardMsg};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::poll_fn;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

/// Process-wide, read-mostly state shared by all shards.
pub struct Shared {
    pub config: Config,
    pub shards: usize,
    /// First part of every socket id (random per process, so ids differ across restarts/nodes).
    pub socket_prefix: u32,
    pub app_connections: Vec<AtomicU32>,
    pub connections: AtomicUsize,
    pub shutdown: AtomicBool,
    pub slow_consumer_closes: AtomicU64,
    /// Panics caught while handling one connection (that connection was closed).
    pub contained_panics: AtomicU64,
    /// Sockets accepted whose first request head has not arrived yet.
    pub pending_connections: AtomicUsize,
    /// The drain after a shutdown request is over: shards stop waiting for connections to close.
    pub drain_over: AtomicBool,
    /// Each shard's lifecycle task (see `Shard::lifecycle`), woken from the signal thread. glommio
    /// wakes a task from another thread through its executor's eventfd, so shutdown never
    /// depends on a timer firing (issue 8: an idle shard whose timers were lost slept through
    /// SIGTERM).
    lifecycle_wakers: Mutex<Vec<Option<Waker>>>,
    /// Bytes each shard's frame readers hold for incomplete messages (one slot per shard, written
    /// only by its owner; summed only when a shard is over its fair share of the budget).
    partial_bytes: Vec<ShardCounter>,
}

/// A counter on a cache line of its own, so that shards writing their own never contend.
#[repr(align(64))]
#[derive(Default)]
struct ShardCounter(AtomicUsize);

impl Shared {
    pub fn new(config: Config, shards: usize) -> Shared {
        let apps = config.apps.len();
        Shared {
            config,
            shards,
            socket_prefix: random_u32() % 1_000_000_000,
            app_connections: (0..apps).map(|_| AtomicU32::new(0)).collect(),
            connections: AtomicUsize::new(0),
            shutdown: AtomicBool::new(false),
            slow_consumer_closes: AtomicU64::new(0),
            contained_panics: AtomicU64::new(0),
            pending_connections: AtomicUsize::new(0),
            partial_bytes: (0..shards).map(|_| ShardCounter::default()).collect(),
            drain_over: AtomicBool::new(false),
            lifecycle_wakers: Mutex::new(vec![None; shards]),
        }
    }

    /// Wakes every shard's lifecycle task, from any thread.
    pub fn wake_shards(&self) {
        let wakers: Vec<Waker> = match self.lifecycle_wakers.lock() {
            Ok(mut slots) => slots.iter_mut().filter_map(Option::take).collect(),
            Err(_) => return,
        };
        wakers.into_iter().for_each(Waker::wake);
    }

    fn wake_shard(&self, shard: usize) {
        let waker = match self.lifecycle_wakers.lock() {
            Ok(mut slots) => slots[shard].take(),
            Err(_) => return,
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    pub fn app(&self, index: u32) -> &AppConfig {
        &self.config.apps[index as usize]
    }

    pub fn app_by_key(&self, key: &str) -> Option<u32> {
        self.config
            .apps
            .iter()
            .position(|a| a.key == key)
            .map(|i| i as u32)
    }

    pub fn app_by_id(&self, id: &str) -> Option<u32> {
        self.config
            .apps
            .iter()
            .position(|a| a.id == id)
            .map(|i| i as u32)
    }

    pub fn socket_id(&self, conn_id: u64) -> String {
        format!("{}.{}", self.socket_prefix, conn_id)
    }

    /// Maps a client-supplied socket id to a connection id of this process (None: not ours).
    pub fn conn_id_of(&self, socket_id: &str) -> Option<u64> {
        let (prefix, id) = socket_id.split_once('.')?;
        (prefix.parse::<u32>().ok()? == self.socket_prefix).then_some(())?;
        id.parse().ok()
    }
}

fn random_u32() -> u32 {
    let mut buf = [0u8; 4];
    // SAFETY: getrandom writes at most buf.len() bytes into buf.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n == 4 {
        u32::from_ne_bytes(buf)
    } else {
        std::process::id() ^ (Instant::now().elapsed().subsec_nanos())
    }
}

/// Messages waiting for the mesh; a pump task per peer drains them. Receivers never block on a
/// send (that could deadlock two shards), so sends go through here.
const OUTBOX_SOFT_LIMIT: usize = 64 * 1024;

/// A reply to a cross-shard query, filled by the receiving task.
#[derive(Default)]
pub struct ReplySlot {
    reply: RefCell<Option<QueryReply>>,
    waker: RefCell<Option<Waker>>,
}

pub struct Shard {
    pub id: usize,
    pub shared: Arc<Shared>,
    pub conns: RefCell<AHashMap<u64, Rc<Conn>>>,
    /// Deadlines of sockets that are not WebSocket connections (first requests, keep-alive
    /// HTTP), enforced by the sweeper.
    pub deadlines: RefCell<AHashMap<u64, Rc<deadline::Deadline>>>,
    pub local: RefCell<LocalChannels>,
    /// Signed-in connections of this shard by the `#server-to-user-` key of each user they watch.
    pub watching: RefCell<LocalChannels>,
    pub home: RefCell<HomeChannels>,
    /// Home side: last HTTP event of each cache channel homed here.
    pub cache: RefCell<ChannelCache>,
    /// Home side: watchers per shard of each user homed here.
    pub watchers: RefCell<WatchCounts>,
    /// Home side: channels whose `subscription_count` waits for the throttle.
    pending_counts: RefCell<Vec<ChannelKey>>,
    /// Sockets with frames queued by the fanout, for the flusher; and a spare list to swap in.
    dirty: RefCell<Vec<Rc<Conn>>>,
    dirty_spare: RefCell<Vec<Rc<Conn>>>,
    flusher_waker: RefCell<Option<Waker>>,
    outbox: RefCell<Vec<VecDeque<ShardMsg>>>,
    outbox_wakers: RefCell<Vec<Option<Waker>>>,
    queries: RefCell<AHashMap<u64, Rc<ReplySlot>>>,
    next_query: Cell<u64>,
    next_conn: Cell<u64>,
    /// Receive buffer shared by every socket of the shard: reads land here and only the bytes of
    /// an incomplete frame are kept per connection.
    pub scratch: RefCell<Box<[u8]>>,
    started: Instant,
    pub shutting_down: Cell<bool>,
    shutdown_wakers: RefCell<Vec<Option<Waker>>>,
}

pub const SCRATCH_BYTES: usize = 16 * 1024;

/// Expired cache entries are dropped once a minute (sweeper ticks are 250 ms).
const CACHE_PURGE_TICKS: u32 = 240;

impl Shard {
    pub fn new(id: usize, shared: Arc<Shared>) -> Shard {
        let n = shared.shards;
        Shard {
            id,
            conns: RefCell::new(AHashMap::new()),
            deadlines: RefCell::new(AHashMap::new()),
            local: RefCell::new(LocalChannels::default()),
            watching: RefCell::new(LocalChannels::default()),
            home: RefCell::new(HomeChannels::new(n)),
            cache: RefCell::new(ChannelCache::default()),
            watchers: RefCell::new(WatchCounts::new(n)),
            pending_counts: RefCell::new(Vec::new()),
            dirty: RefCell::new(Vec::new()),
            dirty_spare: RefCell::new(Vec::new()),
            flusher_waker: RefCell::new(None),
            outbox: RefCell::new((0..n).map(|_| VecDeque::new()).collect()),
            outbox_wakers: RefCell::new((0..n).map(|_| None).collect()),
            queries: RefCell::new(AHashMap::new()),
            next_query: Cell::new(0),
            next_conn: Cell::new(0),
            scratch: RefCell::new(vec![0u8; SCRATCH_BYTES].into_boxed_slice()),
            started: Instant::now(),
            shutting_down: Cell::new(false),
            shutdown_wakers: RefCell::new(vec![None, None]),
            shared,
        }
    }

    /// Shard clock in seconds (for liveness), and in milliseconds (for rate limits).
    pub fn now_secs(&self) -> u32 {
        self.started.elapsed().as_secs() as u32
    }

    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// A process-unique connection id whose residue names this shard.
    pub fn new_conn_id(&self) -> u64 {
        let seq = self.next_conn.get() + 1;
        self.next_conn.set(seq);
        seq * self.shared.shards as u64 + self.id as u64
    }

    pub fn max_queued(&self) -> usize {
        self.shared.config.max_outbound_queue_bytes
    }

    /// Sends to a shard; to ourselves it is handled at once, in order.
    pub fn route(&self, shard: usize, msg: ShardMsg) {
        if shard == self.id {
            self.handle(msg);
            return;
        }
        self.outbox.borrow_mut()[shard].push_back(msg);
        if let Some(w) = self.outbox_wakers.borrow_mut()[shard].take() {
            w.wake();
        }
    }

    /// Records what `conn`'s frame reader now holds for incomplete messages. When the process
    /// is over `max_partial_message_bytes`, shards over their fair share close connections,
    /// longest holders first.
    pub fn account_partial(&self, conn: &Conn, held: usize, mid_message: bool) {
        let held = u32::try_from(held).unwrap_or(u32::MAX);
        let old = conn.partial_bytes.replace(held);
        if !mid_message {
            conn.partial_since.set(u32::MAX);
        } else if conn.partial_since.get() == u32::MAX {
            conn.partial_since.set(self.now_secs());
        }
        if old == held {
            return;
        }
        let total = self.own_partial_bytes().saturating_sub(old as usize) + held as usize;
        self.set_own_partial_bytes(total);
        let budget = self.shared.config.max_partial_message_bytes;
        if total > budget / self.shared.shards && self.process_partial_bytes() > budget {
            self.shed_partial_messages(budget / 10 * 9);
        }
    }

    /// This shard's slot of `Shared::partial_bytes` (only this shard writes it).
    fn own_partial_bytes(&self) -> usize {
        self.shared.partial_bytes[self.id].0.load(Ordering::Relaxed)
    }

    fn set_own_partial_bytes(&self, total: usize) {
        self.shared.partial_bytes[self.id]
            .0
            .store(total, Ordering::Relaxed);
    }

    fn process_partial_bytes(&self) -> usize {
        let slots = &self.shared.partial_bytes;
        slots.iter().map(|c| c.0.load(Ordering::Relaxed)).sum()
    }

    /// Closes (1008) this shard's connections that have held an incomplete message longest,
    /// until the process is under `target`: slow or hostile half-messages go before fresh ones.
    fn shed_partial_messages(&self, target: usize) {
        let mut holders: Vec<Rc<Conn>> = self
            .conns
            .borrow()
            .values()
            .filter(|c| c.partial_bytes.get() > 0 && !c.discard_input.get())
            .cloned()
            .collect();
        holders.sort_by_key(|c| (c.partial_since.get(), c.id));
        let now = self.now_secs();
        for conn in holders {
            if self.process_partial_bytes() <= target {
                break;
            }
            let freed = conn.partial_bytes.replace(0) as usize;
            self.set_own_partial_bytes(self.own_partial_bytes().saturating_sub(freed));
            conn.discard_input.set(true);
            conn.close_bare(
                Some(codes::POLICY_VIOLATION),
                "Server memory for incomplete messages is exhausted",
                now,
            );
        }
    }

    /// Waits while any outbox is far behind, so that a flood of client or HTTP input slows its
    /// own producer instead of growing memory.
    pub async fn backpressure(&self) {
        while self.backlogged() {
            glommio::timer::sleep(Duration::from_millis(1)).await;
        }
    }

    pub fn backlogged(&self) -> bool {
        self.outbox
            .borrow()
            .iter()
            .any(|q| q.len() > OUTBOX_SOFT_LIMIT)
    }

    pub fn handle(&self, msg: ShardMsg) {
        match msg {
            ShardMsg::Join(req) => self.home_join(req),
            ShardMsg::JoinReply {
                key,
                conn,
                repeat,
                user_id,
                result,
            } => match key.user_id() {
                Some(_) => self.on_signin_reply(key, conn, result.is_ok()),
                None => self.on_join_reply(key, conn, repeat, user_id, result),
            },
            ShardMsg::Leave {
                key,
                origin,
                user_id,
            } => self.home_leave(key, origin, user_id),
            ShardMsg::Publish {
                key,
                frame,
                except,
                cache,
            } => self.home_publish(key, frame, except, cache),
            ShardMsg::Deliver { key, frame, except } => {
                self.deliver_local(&key, Rc::from(&frame[..]), except);
            }
            ShardMsg::Watch { key, origin, conn } => self.home_watch(key, origin, conn),
            ShardMsg::WatchReply { key, conn, online } => self.on_watch_reply(&key, conn, online),
            ShardMsg::Unwatch { key, origin } => self.home_unwatch(key, origin),
            ShardMsg::UserStatus { key, online } => self.on_user_status(&key, online),
            ShardMsg::Terminate { key } => self.home_terminate(key),
            ShardMsg::CloseUser { key } => self.close_user_local(&key),
            ShardMsg::Query { origin, id, query } => {
                let reply = self.answer(query);
                self.route(origin, ShardMsg::Reply { id, reply });
            }
            ShardMsg::Reply { id, reply } => {
                if let Some(slot) = self.queries.borrow_mut().remove(&id) {
                    *slot.reply.borrow_mut() = Some(reply);
                    if let Some(w) = slot.waker.borrow_mut().take() {
                        w.wake();
                    }
                }
            }
        }
    }

    /// The hot path: one frame, many sockets, no copy and no encoding per socket. The frame is
    /// queued and the socket listed as dirty; the flusher writes every dirty socket once the
    /// current burst of messages is handled, so a socket with several pending frames gets them
    /// in one `sendmsg`, and no socket task is woken unless its kernel buffer is full.
    pub fn deliver_local(&self, key: &ChannelKey, frame: Rc<[u8]>, except: Option<u64>) {
        let max = self.max_queued();
        let slow = {
            let local = self.local.borrow();
            let mut dirty = self.dirty.borrow_mut();
            let mut slow = 0u64;
            for conn in local.subscribers(key) {
                if Some(conn.id) == except {
                    continue;
                }
                if !conn.queue(frame.clone(), max) {
                    slow += 1;
                } else if !conn.dirty.replace(true) {
                    dirty.push(conn.clone());
                }
            }
            slow
        };
        if let Some(w) = self.flusher_waker.borrow_mut().take() {
            w.wake();
        }
        if slow > 0 {
            self.shared
                .slow_consumer_closes
                .fetch_add(slow, Ordering::Relaxed);
        }
    }

    /// Publishes a complete frame to a channel, wherever its subscribers are. `cache`: keep it
    /// as the channel's cached event (HTTP API events on cache channels).
    pub fn publish(&self, key: ChannelKey, frame: Vec<u8>, except: Option<u64>, cache: bool) {
        let home = key.home(self.shared.shards);
        let msg = ShardMsg::Publish {
            key,
            frame: Arc::from(frame),
            except,
            cache,
        };
        self.route(home, msg);
    }

    fn on_join_reply(
        &self,
        key: ChannelKey,
        conn_id: u64,
        repeat: bool,
        user_id: Option<String>,
        result: Result<JoinAck, String>,
    ) {
        let conn = self.conns.borrow().get(&conn_id).cloned();
        let max = self.max_queued();
        let Some(conn) = conn.filter(|c| !c.is_closing() || repeat) else {
            if !repeat && result.is_ok() {
                self.leave(key, user_id);
            }
            return;
        };
        let (frame, then): (Rc<[u8]>, _) = match &result {
            Ok(ack) => match &ack.succeeded {
                Some(frame) => (Rc::from(&frame[..]), ack.then.as_ref()),
                None => (
                    Rc::from(events::subscription_succeeded(&key.name, "{}")),
                    ack.then.as_ref(),
                ),
            },
            Err(message) => (Rc::from(events::error(None, message)), None),
        };
        if repeat {
            conn.send(frame, max);
            return;
        }
        let mut subs = conn.subs.borrow_mut();
        let pending = conn::find_sub(&subs, &key.name)
            .ok()
            .filter(|&i| !subs[i].confirmed);
        match (pending, result.is_ok()) {
            (Some(i), true) => {
                subs[i].confirmed = true;
                drop(subs);
                if ChannelKind::of(&key.name).needs_auth() {
                    conn.authorized.set(true);
                }
                // Queue the confirmation (and the cached event) before the socket can receive
                // any channel event.
                conn.send(frame, max);
                if let Some(then) = then {
                    conn.send(Rc::from(&then[..]), max);
                }
                self.local.borrow_mut().add(key, conn);
            }
            (Some(i), false) => {
                subs.remove(i);
                drop(subs);
                conn.send(frame, max);
            }
            // Unsubscribed while the join was in flight: undo it.
            (None, true) => {
                drop(subs);
                self.leave(key, user_id);
            }
            (None, false) => {}
        }
    }

    pub fn join(&self, req: JoinRequest) {
        let home = req.key.home(self.shared.shards);
        self.route(home, ShardMsg::Join(req));
    }

    pub fn leave(&self, key: ChannelKey, user_id: Option<String>) {
        let home = key.home(self.shared.shards);
        self.route(
            home,
            ShardMsg::Leave {
                key,
                origin: self.id,
                user_id,
            },
        );
    }

    /// Asks shard `shard` (possibly this one) and waits for the answer.
    pub async fn query(&self, shard: usize, query: Query) -> QueryReply {
        if shard == self.id {
            return self.answer(query);
        }
        let id = self.next_query.get() + 1;
        self.next_query.set(id);
        let slot = Rc::new(ReplySlot::default());
        self.queries.borrow_mut().insert(id, slot.clone());
        self.route(
            shard,
            ShardMsg::Query {
                origin: self.id,
                id,
                query,
            },
        );
        poll_fn(|cx| match slot.reply.borrow_mut().take() {
            Some(reply) => Poll::Ready(reply),
            None => {
                *slot.waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }

    /// Waits until the home shards of `keys` have handled what this shard sent them so far, so
    /// that a publisher who waits for its HTTP response sees its events delivered in order even
    /// when its next request lands on another shard.
    pub async fn sequenced<'a>(&self, keys: impl Iterator<Item = &'a ChannelKey>) {
        let mut homes: Vec<usize> = keys
            .map(|k| k.home(self.shared.shards))
            .filter(|&h| h != self.id)
            .collect();
        homes.sort_unstable();
        homes.dedup();
        for home in homes {
            self.query(home, Query::Barrier).await;
        }
    }

    pub async fn channel_stats(&self, key: ChannelKey) -> ChannelStats {
        let home = key.home(self.shared.shards);
        match self.query(home, Query::Channel { key, cache: false }).await {
            QueryReply::Channel(stats, _) => stats,
            _ => ChannelStats::default(),
        }
    }

    /// Writes the sockets the fanout made dirty: one `sendmsg` each for all its pending frames.
    /// A socket whose kernel buffer is full is handed to its own task, which waits until it
    /// can write.
    pub async fn flusher(self: Rc<Self>) {
        loop {
            poll_fn(|cx| {
                if self.dirty.borrow().is_empty() {
                    *self.flusher_waker.borrow_mut() = Some(cx.waker().clone());
                    Poll::Pending
                } else {
                    Poll::Ready(())
                }
            })
            .await;
            let mut batch = std::mem::take(&mut *self.dirty_spare.borrow_mut());
            std::mem::swap(&mut batch, &mut *self.dirty.borrow_mut());
            for conn in batch.drain(..) {
                conn.dirty.set(false);
                let fd = conn.fd.get();
                if fd < 0 {
                    continue;
                }
                match conn.flush(fd) {
                    Ok(true) => {}
                    Ok(false) => conn.wake(),
                    Err(_) => conn.abort(),
                }
            }
            *self.dirty_spare.borrow_mut() = batch;
        }
    }

    /// Drains the outbox for `peer` into the mesh, in order.
    pub async fn pump(
        self: Rc<Self>,
        senders: Rc<glommio::channels::channel_mesh::Senders<ShardMsg>>,
        peer: usize,
    ) {
        loop {
            let msg = poll_fn(|cx| match self.outbox.borrow_mut()[peer].pop_front() {
                Some(msg) => Poll::Ready(msg),
                None => {
                    self.outbox_wakers.borrow_mut()[peer] = Some(cx.waker().clone());
                    Poll::Pending
                }
            })
            .await;
            if senders.send_to(peer, msg).await.is_err() {
                return;
            }
        }
    }

    /// Liveness and close deadlines, once a second; shutdown as soon as it is asked for.
    pub async fn sweep(self: Rc<Self>) {
        let mut tick = 0u32;
        loop {
            glommio::timer::sleep(Duration::from_millis(250)).await;
            tick += 1;
            if !tick.is_multiple_of(4) {
                continue;
            }
            self.flush_pending_counts();
            if tick.is_multiple_of(CACHE_PURGE_TICKS) {
                self.cache.borrow_mut().purge(Instant::now());
            }
            let now = self.now_secs();
            for deadline in self.deadlines.borrow().values() {
                deadline.expire_if_due(now);
            }
            let cfg = &self.shared.config;
            let ping = Rc::<[u8]>::from(crate::protocol::ws::encode_frame(
                crate::protocol::ws::OP_PING,
                b"",
            ));
            for conn in self.conns.borrow().values() {
                if let Some(deadline) = conn.closing_deadline.get() {
                    // u32::MAX: closed from a path without the clock (slow consumer); start the grace now.
                    if deadline == u32::MAX {
                        conn.closing_deadline
                            .set(Some(now + conn::CLOSE_GRACE_SECS));
                    } else if now >= deadline {
                        conn.abort();
                    }
                    continue;
                }
                if !conn.authorized.get() {
                    let app = self.shared.app(conn.app);
                    let timeout = app.authorization_timeout;
                    if app.enable_authorized_connections
                        && now.saturating_sub(conn.connected_at) >= timeout
                    {
                        let reason = format!("Connection not authorized within {timeout} seconds");
                        conn.close_now(codes::UNAUTHORIZED, &reason, now);
                        continue;
                    }
                }
                match conn.ping_sent.get() {
                    Some(sent) if now.saturating_sub(sent) >= cfg.pong_timeout => {
                        conn.close_now(codes::PONG_TIMEOUT, "Pong reply not received", now);
                    }
                    Some(_) => {}
                    None if now.saturating_sub(conn.last_seen.get()) >= cfg.activity_timeout => {
                        conn.ping_sent.set(Some(now));
                        conn.send(ping.clone(), usize::MAX);
                    }
                    None => {}
                }
            }
        }
    }

    fn begin_shutdown(&self) {
        self.shutting_down.set(true);
        for w in self.shutdown_wakers.borrow_mut().iter_mut() {
            if let Some(w) = w.take() {
                w.wake();
            }
        }
        let now = self.now_secs();
        for conn in self.conns.borrow().values() {
            conn.close_now(codes::SHUTTING_DOWN, "Server shutting down, reconnect", now);
        }
    }

    /// Resolves when shutdown starts; `slot` distinguishes the waiting listeners.
    pub async fn shutdown_signal(&self, slot: usize) {
        poll_fn(|cx| {
            if self.shutting_down.get() {
                Poll::Ready(())
            } else {
                self.shutdown_wakers.borrow_mut()[slot] = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }

    /// The shard's life after startup: serving until shutdown is asked for, then closing every
    /// connection (4200), until they are all gone or the drain is over. Woken only by the signal
    /// thread and by the last disconnect, never by a timer.
    pub async fn lifecycle(&self) {
        self.wait_for(|| self.shared.shutdown.load(Ordering::Acquire))
            .await;
        self.begin_shutdown();
        self.wait_for(|| {
            self.conns.borrow().is_empty() || self.shared.drain_over.load(Ordering::Acquire)
        })
        .await;
    }

    async fn wait_for(&self, done: impl Fn() -> bool) {
        poll_fn(|cx| {
            if done() {
                return Poll::Ready(());
            }
            if let Ok(mut slots) = self.shared.lifecycle_wakers.lock() {
                slots[self.id] = Some(cx.waker().clone());
            }
            // Checked again: the flag may have been set before the waker was in place.
            match done() {
                true => Poll::Ready(()),
                false => Poll::Pending,
            }
        })
        .await
    }

    /// Called when a connection is gone: the last one ends a shutdown's drain.
    pub fn on_disconnect(&self) {
        if self.shutting_down.get() && self.conns.borrow().is_empty() {
            self.shared.wake_shard(self.id);
        }
    }
}
