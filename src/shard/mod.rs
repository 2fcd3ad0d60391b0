//! The shard runtime: one glommio executor pinned to a core, owning the connections it
//! accepted, the fanout table of their subscriptions, and the home view of the channels hashed
//! to it. Shards share nothing mutable; they talk only through `ShardMsg`s over the mesh.
//!
//! The rooms of a shard, each with one job:
//! - `mesh`: queues to other shards (and to itself), pumps, questions waiting for answers;
//! - `fanout`: local subscribers, the delivery of one frame to many sockets, the flusher;
//! - `home`: the channels (and users) homed here, and how each change is announced;
//! - `users`: the shard side of signed-in users and watchlists;
//! - `queries`: the typed interface the HTTP API uses (publish, channel info, terminate);
//! - `budget`: the process-wide memory budget for incomplete messages;
//! - `sweeper`: liveness, close deadlines and throttled counts, once a second;
//! - `lifecycle`: serving, then draining on shutdown;
//! - `outbox`: webhook events on their way to the webhooks' hub thread;
//! - `conn`, `deadline`, `contain`: one connection, socket deadlines, panic containment.

mod budget;
pub mod conn;
pub mod contain;
pub mod deadline;
pub mod fanout;
mod home;
mod lifecycle;
mod mesh;
pub mod messages;
mod node;
mod outbox;
mod queries;
mod remote;
mod share;
mod sweeper;
pub mod users;

pub use lifecycle::Phase;
pub use node::{Node, NotReady};

use crate::channels::ChannelKey;
use crate::config::WebhookEventType;
use crate::feed::Note;
use crate::webhooks::Event;
use ahash::AHashMap;
use conn::Conn;
use deadline::Deadline;
use fanout::Fanout;
use home::Home;
use lifecycle::Lifecycle;
use mesh::Mesh;
use messages::{JoinRequest, Publication, ShardMsg};
use std::cell::{Cell, RefCell, RefMut};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One shard: created by the server on its executor thread and shared (`Rc`) by every task of
/// that executor. Its parts are private; sessions and the server use the methods below.
pub struct Shard {
    id: usize,
    node: Arc<Node>,
    started: Instant,
    next_id: Cell<u64>,
    /// The WebSocket connections this shard serves, by connection id.
    conns: RefCell<AHashMap<u64, Rc<Conn>>>,
    /// Deadlines of sockets that are not WebSocket connections (first requests, keep-alive
    /// HTTP), enforced by the sweeper.
    deadlines: RefCell<AHashMap<u64, Rc<Deadline>>>,
    mesh: Mesh,
    fanout: Fanout,
    home: Home,
    /// Signed-in connections of this shard by the `#server-to-user-` key of each user they watch.
    watching: Fanout,
    lifecycle: Lifecycle,
    /// This shard's part of the cluster (None: a single node).
    cluster: Option<crate::cluster::Cluster>,
    /// Join announcements waiting for Redis to confirm the node's subscription, by topic.
    awaiting_subscription: RefCell<AHashMap<Vec<u8>, Vec<home::Announcement>>>,
    /// Tickets of this shard's publications still waiting for their barriers: true once a home
    /// reported that the other nodes could not be told.
    open_tickets: RefCell<AHashMap<u64, bool>>,
    /// Presence channels whose member list was asked of Redis, by the token of the reply.
    syncs: RefCell<AHashMap<u64, (ChannelKey, share::SyncKind)>>,
    /// Presence channels whose member lists are asked of Redis again once every node has had
    /// time to reassert its members (after the link came back), with when.
    reconciles: RefCell<Vec<(Instant, ChannelKey)>>,
    /// Watched users whose nodes were asked of Redis, by the token of the reply.
    user_asks: RefCell<AHashMap<u64, ChannelKey>>,
    /// Joins of cache channels waiting for the last event from Redis, by the token of the reply.
    cache_asks: RefCell<AHashMap<u64, home::Announcement>>,
    /// A heartbeat this shard sent was answered (a later answer that the node is unknown means
    /// it was taken for dead meanwhile; per shard, because each link's answers come in order).
    heartbeat_answered: Cell<bool>,
    /// A state command could not be queued: Redis is behind this node until it asserts its
    /// state again.
    cluster_state_stale: Cell<bool>,
    /// The link's state as last logged (None: not yet).
    cluster_link_up: Cell<Option<bool>>,
    /// The slots of the apps whose counts the last heartbeat gave, in its order.
    heartbeat_apps: RefCell<std::collections::VecDeque<Vec<u32>>>,
    /// `handle_own_messages` is running (it never nests).
    handling_own: Cell<bool>,
    /// Webhook events waiting to be handed to the hub (a single node).
    webhook_outbox: outbox::Outbox,
    /// Receive buffer shared by every socket of the shard: reads land here and only the bytes of
    /// an incomplete frame are kept per connection.
    read_buffer: RefCell<Box<[u8]>>,
}

/// Counts a confirmed subscription in or out of the shard's gauge (a signed-in user's
/// `#server-to-user-` channel is not a subscription).
fn count_subscription(key: &ChannelKey, n: i64) {
    if !key.name.starts_with('#') {
        let subscriptions = &crate::metrics::here().subscriptions;
        crate::metrics::ShardMetrics::app_gauge(subscriptions, key.app, n);
    }
}

/// This shard's ends of the glommio channel mesh, for sending to each peer.
pub type MeshSenders = glommio::channels::channel_mesh::Senders<ShardMsg>;
/// This shard's ends of the glommio channel mesh, for receiving from each peer.
pub type MeshReceivers = glommio::channels::channel_mesh::Receivers<ShardMsg>;

/// Bytes of the shard's shared receive buffer.
pub const READ_BUFFER_BYTES: usize = 16 * 1024;

impl Shard {
    /// Shard `id` of `node`. Its tasks are started by `start`.
    pub fn new(id: usize, node: Arc<Node>) -> Shard {
        let n = node.shards;
        // Shards are created on their own executor thread: its metrics are these from now on.
        crate::metrics::enter(node.metrics[id]);
        Shard {
            id,
            started: Instant::now(),
            next_id: Cell::new(0),
            conns: RefCell::new(AHashMap::new()),
            deadlines: RefCell::new(AHashMap::new()),
            mesh: Mesh::new(n),
            fanout: Fanout::default(),
            home: Home::new(n),
            watching: Fanout::default(),
            lifecycle: Lifecycle::default(),
            handling_own: Cell::new(false),
            cluster: node.config.cluster.as_ref().and_then(|cluster| {
                let redis = node.config.redis()?;
                Some(crate::cluster::Cluster::new(
                    cluster,
                    &redis,
                    node.socket_prefix,
                ))
            }),
            awaiting_subscription: RefCell::new(AHashMap::new()),
            syncs: RefCell::new(AHashMap::new()),
            reconciles: RefCell::new(Vec::new()),
            user_asks: RefCell::new(AHashMap::new()),
            cache_asks: RefCell::new(AHashMap::new()),
            cluster_state_stale: Cell::new(false),
            heartbeat_answered: Cell::new(false),
            cluster_link_up: Cell::new(None),
            heartbeat_apps: RefCell::new(std::collections::VecDeque::new()),
            open_tickets: RefCell::new(AHashMap::new()),
            webhook_outbox: outbox::Outbox::default(),
            read_buffer: RefCell::new(vec![0u8; READ_BUFFER_BYTES].into_boxed_slice()),
            node,
        }
    }

    /// Starts the shard's own tasks: a receiver per peer, the pump of each outgoing queue (to
    /// peers through the mesh, to itself by handling), the flusher and the sweeper.
    pub fn start(self: &Rc<Self>, senders: MeshSenders, receivers: MeshReceivers) {
        let (senders, receivers) = (Rc::new(senders), Rc::new(receivers));
        for peer in 0..self.node.shards {
            let (shard, senders) = (self.clone(), senders.clone());
            glommio::spawn_local(async move { shard.pump(&senders, peer).await }).detach();
            if peer == self.id {
                continue;
            }
            let (shard, receivers) = (self.clone(), receivers.clone());
            glommio::spawn_local(async move {
                while let Ok(Some(msg)) = receivers.recv_from(peer).await {
                    let what = "a message from another shard";
                    let _ = contain::contain_call(what, || shard.handle(msg));
                    shard.handle_own_messages();
                }
            })
            .detach();
        }
        let shard = self.clone();
        glommio::spawn_local(async move { shard.fanout.flusher().await }).detach();
        if self.cluster.is_some() {
            let shard = self.clone();
            glommio::spawn_local(async move {
                if let Some(cluster) = &shard.cluster {
                    // A panic while handling one event loses that event only.
                    let on_event = |event| {
                        let what = "an event of the Redis link";
                        let _ = contain::contain_call(what, || shard.on_cluster_event(event));
                    };
                    cluster.link.run(&on_event).await;
                }
            })
            .detach();
            let shard = self.clone();
            glommio::spawn_local(async move { shard.heartbeats().await }).detach();
        }
        if self.node.webhooks.is_some() && self.cluster.is_none() {
            let shard = self.clone();
            glommio::spawn_local(async move {
                if let Some(webhooks) = &shard.node.webhooks {
                    shard.webhook_outbox.pump(webhooks).await;
                }
            })
            .detach();
        }
        glommio::spawn_local(self.clone().sweep()).detach();
    }

    /// This shard's index.
    pub fn id(&self) -> usize {
        self.id
    }

    /// The process this shard belongs to.
    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// Hands a webhook event to the webhooks when one of the app's webhooks (or its event
    /// stream) may want its kind; `event` is only built then. In a cluster, Redis decides the
    /// events of the whole cluster (occupancy, members, cache misses) in the scripts that
    /// change its state; a node reports only what it alone sees, into the app's queue there.
    #[inline]
    pub fn webhook(&self, key: &ChannelKey, kind: WebhookEventType, event: impl FnOnce() -> Event) {
        let Some(webhooks) = &self.node.webhooks else {
            return;
        };
        // Signed-in users' channels are the server's own, never reported.
        if !webhooks.wants(key.app, kind) || key.user_id().is_some() {
            return;
        }
        let Some(cluster) = &self.cluster else {
            return self.webhook_outbox.push(key.app, event());
        };
        if matches!(
            kind,
            WebhookEventType::ClientEvent | WebhookEventType::SubscriptionCount
        ) {
            let event = event();
            let app_id = &self.node.app(key.app).id;
            let fields = event.entry_fields();
            let fields: Vec<(&str, &str)> = fields.iter().map(|(f, v)| (*f, v.as_str())).collect();
            let cmd = cluster
                .state
                .event(app_id, event.name(), event.channel(), &fields);
            if !cluster.link.command(&cmd) {
                webhooks
                    .stats
                    .drop_events(1, "the Redis link's queue was full");
            }
        }
    }

    /// In a cluster, appends an accepted HTTP API publish to the app's event stream (`data` as
    /// a JSON string literal; `socket_id` empty when none was excluded).
    pub fn stream_api_event(&self, key: &ChannelKey, event: &str, data: &str, socket_id: &str) {
        let (Some(cluster), Some(webhooks)) = (&self.cluster, &self.node.webhooks) else {
            return;
        };
        let app_id = &self.node.app(key.app).id;
        let data = sonic_rs::from_str::<String>(data).unwrap_or_default();
        let mut fields = vec![("event", event), ("data", data.as_str())];
        if !socket_id.is_empty() {
            fields.push(("socket_id", socket_id));
        }
        let cmd = cluster.state.event(app_id, "api_event", &key.name, &fields);
        if !cluster.link.command(&cmd) {
            webhooks
                .stats
                .drop_events(1, "the Redis link's queue was full");
        }
    }

    /// Shard clock in seconds (for liveness).
    pub fn now_secs(&self) -> u32 {
        self.started.elapsed().as_secs() as u32
    }

    /// Shard clock in milliseconds (for rate limits).
    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// A process-unique id whose residue names this shard (connections and deadlines).
    pub fn new_id(&self) -> u64 {
        let seq = self.next_id.get() + 1;
        self.next_id.set(seq);
        seq * self.node.shards as u64 + self.id as u64
    }

    /// Bytes a socket may have queued before it counts as a slow consumer.
    pub fn max_queued(&self) -> usize {
        self.node.config.max_outbound_queue_bytes
    }

    /// The shared receive buffer (borrowed only for one read and its parsing).
    pub fn read_buffer(&self) -> RefMut<'_, Box<[u8]>> {
        self.read_buffer.borrow_mut()
    }

    /// Registers an admitted WebSocket connection.
    pub fn add_conn(&self, conn: Rc<Conn>) {
        self.conns.borrow_mut().insert(conn.id, conn);
    }

    /// Forgets a connection that is gone: its subscriptions and sign-in are undone (the home
    /// shards uncount it), and the last one ends a shutdown's drain.
    pub fn remove_conn(&self, conn: &Rc<Conn>) {
        // The descriptor is closed with the stream and may be reused: nothing may write to it now.
        conn.fd.set(-1);
        self.account_partial(conn, 0, false);
        self.conns.borrow_mut().remove(&conn.id);
        let subs = std::mem::take(&mut *conn.subs.borrow_mut());
        for sub in subs.into_iter().filter(|s| s.confirmed) {
            let key = ChannelKey {
                app: conn.app,
                name: sub.name,
            };
            self.unsubscribe_confirmed(key, conn, sub.user_id.map(String::from));
        }
        self.sign_out(conn);
        // Pending joins are undone when their reply finds the connection gone.
        let node = &self.node;
        node.connections.fetch_sub(1, Ordering::Relaxed);
        node.app_connections[conn.app as usize].fetch_sub(1, Ordering::Relaxed);
        let closed = &crate::metrics::here().connections_closed;
        closed[crate::metrics::close_slot(conn.close_code())].inc();
        node.console_note(conn.app, || {
            let note = Note::new("disconnected", "").socket(node.socket_id(conn.id));
            note.event(&format!("close code {}", conn.close_code()), "")
        });
        self.on_disconnect();
    }

    /// Notes a (un)subscription for the debug console (a user's sign-in channel is none).
    fn console_note_subscription(&self, kind: &'static str, key: &ChannelKey, conn: &Conn) {
        if !key.name.starts_with('#') {
            let socket_id = || self.node.socket_id(conn.id);
            self.node
                .console_note(key.app, || Note::new(kind, &key.name).socket(socket_id()));
        }
    }

    fn conn(&self, id: u64) -> Option<Rc<Conn>> {
        self.conns.borrow().get(&id).cloned()
    }

    /// Sends a message to a shard, this one included; every shard handles its messages in the
    /// order they were sent, and never inside another handler.
    fn route(&self, shard: usize, msg: ShardMsg) {
        self.mesh.send(shard, msg);
    }

    /// Drains the queue for `peer`: into the mesh for another shard, into `handle` for this one
    /// (messages a task sent itself are usually handled before it yields, see
    /// `handle_own_messages`; this catches the rest).
    async fn pump(&self, senders: &MeshSenders, peer: usize) {
        loop {
            self.mesh.queued(peer).await;
            if peer == self.id {
                self.handle_own_messages();
                continue;
            }
            while let Some(msg) = self.mesh.pop(peer) {
                if senders.send_to(peer, msg).await.is_err() {
                    return;
                }
            }
        }
    }

    /// Handles the messages this shard sent itself, in order, now. Tasks call it between their
    /// steps, where they hold no borrow: after each frame of a socket (so the next frame sees a
    /// join homed here confirmed, as with one shard it always was), after a message from a peer,
    /// after an HTTP request's sends, after a disconnect and after a sweep. A reply is thus
    /// written in the same turn as its request: no task switch, no extra readiness wait. Never
    /// nested: a handler that sends to this shard only queues, and the outermost call handles it.
    pub fn handle_own_messages(&self) {
        if self.handling_own.replace(true) {
            return;
        }
        while let Some(msg) = self.mesh.pop(self.id) {
            let _ = contain::contain_call("a message to its own shard", || self.handle(msg));
        }
        self.handling_own.set(false);
    }

    /// Handles one message from another shard or from itself.
    fn handle(&self, msg: ShardMsg) {
        match msg {
            ShardMsg::Join(req) => self.home_join(req),
            ShardMsg::JoinReply {
                key,
                conn,
                duplicate,
                user_id,
                result,
            } => match key.user_id() {
                Some(_) => self.on_signin_reply(key, conn, result.is_ok()),
                None => self.on_join_reply(key, conn, duplicate, user_id, result),
            },
            ShardMsg::Leave {
                key,
                origin,
                user_id,
            } => self.home_leave(key, origin, user_id),
            ShardMsg::Publish(publication) => self.home_publish(publication),
            ShardMsg::Deliver { key, frame, except } => {
                self.deliver_local(&key, Rc::from(&frame[..]), except);
            }
            ShardMsg::Watch { key, origin, conn } => self.home_watch(key, origin, conn),
            ShardMsg::WatchReply { key, conn, online } => self.on_watch_reply(&key, conn, online),
            ShardMsg::Unwatch { key, origin } => self.home_unwatch(key, origin),
            ShardMsg::UserStatus { key, online } => self.on_user_status(&key, online),
            ShardMsg::Terminate { key } => self.home_terminate(key),
            ShardMsg::CloseUser { key } => self.close_user_local(&key),
            ShardMsg::Ask {
                origin,
                id,
                question,
            } => {
                let answer = self.answer(question);
                self.route(origin, ShardMsg::Answer { id, answer });
            }
            ShardMsg::Answer { id, answer } => self.mesh.answered(id, answer),
            ShardMsg::Reassert => self.reassert(),
            ShardMsg::PublishRefused { ticket } => {
                if let Some(refused) = self.open_tickets.borrow_mut().get_mut(&ticket) {
                    *refused = true;
                }
            }
        }
    }

    /// Writes `frame` to this shard's subscribers of `key` (see `Fanout::deliver`).
    fn deliver_local(&self, key: &ChannelKey, frame: Rc<[u8]>, except: Option<u64>) {
        let slow = self.fanout.deliver(key, frame, except, self.max_queued());
        if slow > 0 {
            let closes = &self.node.slow_consumer_closes;
            closes.fetch_add(slow, Ordering::Relaxed);
        }
    }

    /// Publishes a complete frame to a channel, wherever its subscribers are: its home shard
    /// fans it out.
    pub fn publish(&self, publication: Publication) {
        let home = publication.key.home(self.node.shards);
        self.route(home, ShardMsg::Publish(publication));
    }

    /// Asks the channel's home shard to count a socket; the reply confirms or refuses it.
    pub fn join(&self, req: JoinRequest) {
        let home = req.key.home(self.node.shards);
        self.route(home, ShardMsg::Join(req));
    }

    /// Uncounts a socket of this shard in a channel.
    fn leave(&self, key: ChannelKey, user_id: Option<String>) {
        let home = key.home(self.node.shards);
        let origin = self.id;
        self.route(
            home,
            ShardMsg::Leave {
                key,
                origin,
                user_id,
            },
        );
    }

    /// Ends a confirmed subscription: the socket leaves the fanout and the home uncounts it.
    pub fn unsubscribe_confirmed(&self, key: ChannelKey, conn: &Conn, user_id: Option<String>) {
        self.fanout.remove(&key, conn);
        count_subscription(&key, -1);
        self.console_note_subscription("unsubscribed", &key, conn);
        self.leave(key, user_id);
    }

    /// The home shard answered a join: confirm the subscription (first its
    /// `subscription_succeeded`, then the cached event, then the channel's events) or refuse it.
    fn on_join_reply(
        &self,
        key: ChannelKey,
        conn_id: u64,
        duplicate: bool,
        user_id: Option<String>,
        result: Result<messages::JoinAck, String>,
    ) {
        let max = self.max_queued();
        let conn = self.conn(conn_id);
        let Some(conn) = conn.filter(|c| !c.is_closing() || duplicate) else {
            if !duplicate && result.is_ok() {
                self.leave(key, user_id);
            }
            return;
        };
        let (frame, cache_event): (Rc<[u8]>, _) = match &result {
            Ok(ack) => match &ack.succeeded {
                Some(frame) => (Rc::from(&frame[..]), ack.cache_event.as_ref()),
                None => (
                    Rc::from(crate::protocol::events::subscription_succeeded(
                        &key.name, "{}",
                    )),
                    ack.cache_event.as_ref(),
                ),
            },
            Err(message) => (
                Rc::from(crate::protocol::events::error(None, message)),
                None,
            ),
        };
        if duplicate {
            conn.send(frame, max);
            return;
        }
        let pending = {
            let subs = conn.subs.borrow();
            conn::find_sub(&subs, &key.name)
                .ok()
                .filter(|&i| !subs[i].confirmed)
        };
        match (pending, result.is_ok()) {
            (Some(i), true) => {
                conn.subs.borrow_mut()[i].confirmed = true;
                if crate::protocol::channel::ChannelKind::of(&key.name).needs_auth() {
                    conn.authorized.set(true);
                }
                // Queue the confirmation (and the cached event) before the socket can receive
                // any channel event.
                conn.send(frame, max);
                if let Some(event) = cache_event {
                    conn.send(Rc::from(&event[..]), max);
                }
                count_subscription(&key, 1);
                self.console_note_subscription("subscribed", &key, &conn);
                self.fanout.add(key, conn);
            }
            (Some(i), false) => {
                conn.subs.borrow_mut().remove(i);
                conn.send(frame, max);
            }
            // Unsubscribed while the join was in flight: undo it.
            (None, true) => self.leave(key, user_id),
            (None, false) => {}
        }
    }

    /// Waits while any outgoing queue is far behind, so that a flood of client or HTTP input
    /// slows its own producer instead of growing memory.
    pub async fn backpressure(&self) {
        while self.backlogged() {
            glommio::timer::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Some outgoing queue is far behind (see `backpressure`).
    pub fn backlogged(&self) -> bool {
        self.mesh.backlogged()
    }
}
