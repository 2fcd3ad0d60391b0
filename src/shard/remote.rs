//! The shard's side of the cluster (`crate::cluster`): what a channel's home shard does with
//! Redis. It subscribes the node to a channel's topic when the node gets its first subscriber
//! and unsubscribes after the last, publishes what is published on this node, and fans out what
//! other nodes publish exactly as a local publish. It keeps the node's share of the shared
//! state (`cluster::state`) up to date: subscriber counts and presence members, asserted again
//! in full whenever the link comes back or the node learns it was taken for dead.

use super::home::Announcement;
use super::messages::ShardMsg;
use super::Shard;
use crate::channels::ChannelKey;
use crate::cluster::link::LinkEvent;
use crate::cluster::state::{self, Change, Snapshot};
use crate::cluster::Cluster;
use crate::protocol::channel::{is_cache_channel, ChannelKind};
use crate::protocol::events;
use crate::protocol::events::PresenceMember;
use crate::protocol::ws;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn is_user(key: &ChannelKey) -> bool {
    ChannelKind::of(&key.name) == ChannelKind::ServerToUser
}

/// The token of the heartbeat's reply (sync tokens come from `new_id`, which never makes it).
const HEARTBEAT: u64 = u64::MAX;

impl Shard {
    /// Sends a publication of this node to the other nodes (nothing to do on a single node);
    /// a cache channel's is kept in Redis too (`cache`).
    /// False: Redis is away and the link's queue is full, so the other nodes will not get it.
    pub(super) fn publish_to_cluster(
        &self,
        key: &ChannelKey,
        frame: &[u8],
        except_elsewhere: Option<&str>,
        cache: bool,
    ) -> bool {
        let Some(cluster) = &self.cluster else {
            return true;
        };
        let app = self.node.app(key.app);
        let ttl_ms = cache.then(|| u64::from(app.cache_ttl) * 1000);
        let except = except_elsewhere.unwrap_or("");
        let forwarded = cluster.publish((&app.id, &key.name), except, frame, ttl_ms);
        if !forwarded {
            let refused = &self.node.cluster_publishes_refused;
            refused.fetch_add(1, Ordering::Relaxed);
        }
        forwarded
    }

    /// After a counted join: the node's count in Redis, and a user's first socket on this node
    /// (`new_member`) in the channel's members.
    pub(super) fn cluster_joined(&self, key: &ChannelKey, new_member: Option<&PresenceMember>) {
        let Some(cluster) = &self.cluster else {
            return;
        };
        let total = self.subscribers_on_node(key);
        let app_id = &self.node.app(key.app).id;
        let topic = self.topic_of(cluster, key);
        let mut sent = true;
        for cmd in cluster
            .state
            .count(&topic, app_id, &key.name, total, total == 1)
        {
            sent &= cluster.link.command(&cmd);
        }
        if self.counts_announced(key) || (is_user(key) && total == 1) {
            let announce = cluster
                .state
                .announce_count(&topic, app_id, &key.name, total);
            sent &= cluster.link.command(&announce);
        }
        if let Some(m) = new_member.filter(|_| cluster.link.is_up()) {
            let join = cluster
                .state
                .join(&topic, app_id, &key.name, &m.user_id, &m.user_info);
            sent &= cluster.link.command(&join);
        }
        self.note_unsent(sent);
    }

    /// After a leave: the node's count in Redis, and the departure of a user's last socket on
    /// this node (`left`). True when Redis decides whether that user left the channel
    /// everywhere (its answer arrives on the topic); false when this node has to tell its
    /// subscribers itself (no cluster, Redis away, or no roster yet).
    pub(super) fn cluster_left(&self, key: &ChannelKey, left: Option<&str>) -> bool {
        let Some(cluster) = &self.cluster else {
            return false;
        };
        let total = self.subscribers_on_node(key);
        let app_id = &self.node.app(key.app).id;
        let topic = self.topic_of(cluster, key);
        let mut sent = true;
        for cmd in cluster.state.count(&topic, app_id, &key.name, total, false) {
            sent &= cluster.link.command(&cmd);
        }
        if self.counts_announced(key) || (is_user(key) && total == 0) {
            let announce = cluster
                .state
                .announce_count(&topic, app_id, &key.name, total);
            sent &= cluster.link.command(&announce);
        }
        let mut decided = false;
        if let Some(user_id) = left.filter(|_| cluster.link.is_up()) {
            let leave = cluster.state.leave(&topic, app_id, &key.name, user_id);
            let queued = cluster.link.command(&leave);
            sent &= queued;
            let has_roster = {
                let channels = self.home.channels.borrow();
                channels.get(key).is_some_and(|c| c.roster.is_some())
            };
            decided = queued && has_roster;
        }
        self.note_unsent(sent);
        decided
    }

    /// A state command the link refused (its queue was full) leaves Redis behind this node:
    /// everything is asserted again at the next heartbeat.
    fn note_unsent(&self, sent: bool) {
        if !sent {
            self.cluster_state_stale.set(true);
        }
    }

    /// `terminate_connections` on this node: the others close the user's connections too.
    pub(super) fn terminate_in_cluster(&self, key: &ChannelKey) {
        let Some(cluster) = &self.cluster else {
            return;
        };
        let app_id = &self.node.app(key.app).id;
        let topic = self.topic_of(cluster, key);
        let terminate = cluster.state.terminate(&topic, app_id, &key.name);
        if !cluster.link.command(&terminate) {
            crate::log_warn!("Redis is away: the user's connections on other nodes stay open");
        }
    }

    /// Keeps a join's announcement until the node is ready to confirm it in the cluster, and
    /// returns it when it can go out now. Ready means Redis has the node's subscription to the
    /// channel (so whatever is published anywhere afterwards reaches the joiner), and for a
    /// presence channel that the node knows the members of the whole cluster. Without a link,
    /// local delivery works at once and the node catches up when the link is back.
    pub(super) fn hold_for_cluster(&self, announcement: Announcement) -> Option<Announcement> {
        let Some(cluster) = &self.cluster else {
            return Some(announcement);
        };
        let key = &announcement.key;
        let topic = self.topic_of(cluster, key);
        if is_cache_channel(&key.name) && cluster.link.is_up() {
            return self.hold_for_cache(cluster, &topic, announcement);
        }
        let mut awaiting = self.awaiting_subscription.borrow_mut();
        if let Some(waiting) = awaiting.get_mut(&topic) {
            waiting.push(announcement);
            return None;
        }
        if self.subscribers_on_node(key) == 1 {
            cluster.link.subscribe(&topic);
        }
        if !cluster.link.is_up() {
            return Some(announcement);
        }
        let needs_snapshot = self.needs_snapshot(key);
        if needs_snapshot {
            self.sync_channel(cluster, key);
        } else if !cluster.link.is_subscribing(&topic) {
            return Some(announcement);
        }
        awaiting.insert(topic, vec![announcement]);
        None
    }

    /// A cache channel's join waits for its last event from Redis, asked after the node's
    /// subscription (and, for presence, its member list) on the same link: whatever was
    /// published before that read is in it, and whatever after reaches the node.
    fn hold_for_cache(
        &self,
        cluster: &Cluster,
        topic: &[u8],
        announcement: Announcement,
    ) -> Option<Announcement> {
        let key = &announcement.key;
        if self.subscribers_on_node(key) == 1 {
            cluster.link.subscribe(topic);
        }
        if self.needs_snapshot(key) && !self.awaiting_subscription.borrow().contains_key(topic) {
            self.sync_channel(cluster, key);
        }
        let token = self.new_id();
        if !cluster
            .link
            .command_then_event(&cluster.state.cached(topic), token)
        {
            return Some(announcement);
        }
        self.cache_asks.borrow_mut().insert(token, announcement);
        None
    }

    /// The node needs the cluster's view of the channel before it can confirm a join: the
    /// members of a presence channel, or the other nodes' counts for `subscription_count`.
    fn needs_snapshot(&self, key: &ChannelKey) -> bool {
        let presence = ChannelKind::of(&key.name) == ChannelKind::Presence;
        let counts = self.counts_announced(key);
        let channels = self.home.channels.borrow();
        channels.get(key).is_some_and(|c| {
            (presence && c.roster.is_none()) || (counts && c.remote_counts.is_none())
        })
    }

    /// Replaces the node's share of a channel in Redis. Where the node needs the cluster's view
    /// of the channel (presence, `subscription_count`), the reply is a snapshot (`on_snapshot`).
    fn sync_channel(&self, cluster: &Cluster, key: &ChannelKey) {
        let channels = self.home.channels.borrow();
        let Some(channel) = channels.get(key) else {
            return;
        };
        let app_id = &self.node.app(key.app).id;
        let topic = self.topic_of(cluster, key);
        let counts = self.counts_announced(key);
        let members = channel.local_members();
        let name = (app_id.as_str(), &*key.name);
        // Signed-in users' counts are announced for the other nodes' watchers.
        let announce = counts || is_user(key);
        let sync = cluster
            .state
            .sync(&topic, name, channel.total, announce, members);
        let sent = if channel.members.is_some() || counts {
            let token = self.new_id();
            self.syncs.borrow_mut().insert(token, key.clone());
            cluster.link.command_then_event(&sync, token)
        } else {
            cluster.link.command(&sync)
        };
        drop(channels);
        self.note_unsent(sent);
    }

    /// Asserts everything this shard's home channels hold (the link is back, or the node was
    /// taken for dead): the node's registration first, then each channel's share.
    pub(super) fn reassert(&self) {
        let Some(cluster) = &self.cluster else {
            return;
        };
        if !cluster.link.is_up() {
            return;
        }
        self.cluster_state_stale.set(false);
        let sent = cluster.link.command(&self.heartbeat(cluster));
        self.note_unsent(sent);
        let keys: Vec<ChannelKey> = {
            let channels = self.home.channels.borrow();
            channels.iter().map(|(k, _)| k.clone()).collect()
        };
        for key in keys {
            self.sync_channel(cluster, &key);
        }
        for key in self.watched_users() {
            self.ask_user_nodes(cluster, &key);
        }
    }

    /// A watch of a user homed here, in a cluster: the node's first watcher of that user
    /// subscribes to the user's topic (where other nodes announce the user's connections) and
    /// asks Redis where the user is online now. True: the answer waits for Redis.
    pub(super) fn watch_in_cluster(&self, key: &ChannelKey, first: bool) -> bool {
        let Some(cluster) = &self.cluster else {
            return false;
        };
        if first {
            cluster.link.subscribe(&self.topic_of(cluster, key));
        }
        if !cluster.link.is_up() {
            return false;
        }
        if first {
            self.ask_user_nodes(cluster, key);
        }
        self.home.watchers.borrow().online_elsewhere(key).is_none()
    }

    /// Asks Redis which nodes have a watched user's connections (the reply: `on_user_nodes`).
    fn ask_user_nodes(&self, cluster: &Cluster, key: &ChannelKey) {
        let token = self.new_id();
        let ask = cluster.state.counts(&self.topic_of(cluster, key));
        if cluster.link.command_then_event(&ask, token) {
            self.user_asks.borrow_mut().insert(token, key.clone());
        }
    }

    /// Where a watched user is online, from Redis: waiting watches get their answer, and
    /// watchers hear of a change (after Redis was away).
    fn on_user_nodes(&self, cluster: &Cluster, key: &ChannelKey, value: &redis::Value) {
        let before = self.online(key);
        let own = cluster.node_id();
        let counts = state::counts_of(value).unwrap_or_default();
        let elsewhere = counts.into_iter().filter(|(o, n)| o != own && *n > 0);
        let owners = elsewhere.map(|(o, _)| o).collect();
        let waiting = self.home.watchers.borrow_mut().set_elsewhere(key, owners);
        let after = self.online(key);
        if before != after {
            self.user_status(key, after);
        }
        self.answer_watches(key, waiting);
    }

    /// Another node's count of a watched user's connections.
    fn on_user_count(&self, cluster: &Cluster, key: &ChannelKey, owner: &str, count: u32) {
        if owner == cluster.node_id() || !self.is_watched(key) {
            return;
        }
        let before = self.online(key);
        self.home
            .watchers
            .borrow_mut()
            .note_count(key, owner, count);
        let after = self.online(key);
        if before != after {
            self.user_status(key, after);
        }
    }

    /// This node's heartbeat, with its connection count of each app that has a limit.
    fn heartbeat(&self, cluster: &Cluster) -> redis::Cmd {
        let counts = self.capped_apps().map(|(i, app)| {
            let count = self.node.app_connections[i].load(Ordering::Relaxed);
            (app.id.as_str(), count)
        });
        cluster.state.heartbeat(self.node_life_ms(), counts)
    }

    /// The apps with a `max_connections`, with their indexes.
    fn capped_apps(&self) -> impl Iterator<Item = (usize, &crate::config::AppConfig)> {
        let apps = self.node.config.apps.iter().enumerate();
        apps.filter(|(_, app)| app.max_connections > 0)
    }

    /// How long a heartbeat keeps the node alive: the node timeout less one interval, so that
    /// the survivors, checking once an interval, notice a death within the node timeout.
    fn node_life_ms(&self) -> u64 {
        let Some(config) = &self.node.config.cluster else {
            return 0;
        };
        let life = config
            .node_timeout
            .saturating_sub(config.heartbeat_interval);
        u64::from(life.max(1)) * 1000
    }

    /// Shard 0's task: heartbeats, each of which also removes the share of dead nodes; and on
    /// every shard, a state that fell behind is asserted again.
    pub(super) async fn heartbeats(&self) {
        let Some(config) = &self.node.config.cluster else {
            return;
        };
        let interval = Duration::from_secs(config.heartbeat_interval.into());
        loop {
            glommio::timer::sleep(interval).await;
            let Some(cluster) = &self.cluster else {
                return;
            };
            if !cluster.link.is_up() {
                continue;
            }
            if self.cluster_state_stale.get() {
                self.reassert();
            }
            if self.id == 0 {
                cluster
                    .link
                    .command_then_event(&self.heartbeat(cluster), HEARTBEAT);
            }
            self.handle_own_messages();
        }
    }

    /// The node's last subscriber of the channel left: stop receiving its topic.
    pub(super) fn leave_cluster_topic(&self, key: &ChannelKey) {
        if let Some(cluster) = &self.cluster {
            cluster.link.unsubscribe(&self.topic_of(cluster, key));
        }
    }

    /// The Redis topic of a channel (named by the app's id, the same on every node).
    pub(super) fn topic_of(&self, cluster: &Cluster, key: &ChannelKey) -> Vec<u8> {
        cluster.topic(&self.node.app(key.app).id, &key.name)
    }

    /// What the shard's Redis link reports.
    pub(super) fn on_cluster_event(&self, event: LinkEvent) {
        match event {
            LinkEvent::Message { topic, payload } => {
                if payload.starts_with(state::STATE_MAGIC) {
                    self.on_state_change(&topic, &payload);
                } else {
                    self.deliver_remote(&topic, &payload);
                }
            }
            LinkEvent::Subscribed(topic) => self.release_held(&topic, false),
            LinkEvent::Reply { token, value } => self.on_reply(token, &value),
            LinkEvent::Up => {
                if self.cluster_link_up.replace(Some(true)) != Some(true) {
                    crate::log_info!("shard {}: Redis link up", self.id);
                }
                self.reassert();
            }
            LinkEvent::Down(reason) => {
                // Nothing will confirm the held joins now: confirm them (local delivery works).
                let held = std::mem::take(&mut *self.awaiting_subscription.borrow_mut());
                for announcement in held.into_values().flatten() {
                    self.announce(announcement);
                }
                self.syncs.borrow_mut().clear();
                let cache_asks = std::mem::take(&mut *self.cache_asks.borrow_mut());
                for announcement in cache_asks.into_values() {
                    self.announce(announcement);
                }
                let asked = std::mem::take(&mut *self.user_asks.borrow_mut());
                for key in asked.into_values() {
                    let waiting = self.home.watchers.borrow_mut().take_waiting(&key);
                    self.answer_watches(&key, waiting);
                }
                if self.cluster_link_up.replace(Some(false)) != Some(false) {
                    crate::log_warn!("shard {}: Redis link down ({reason}); retrying", self.id);
                }
            }
        }
        self.handle_own_messages();
    }

    /// Confirms the joins held for a topic: after Redis confirmed the subscription
    /// (`with_roster` false: a presence channel still waiting for its members stays held), or
    /// once the members arrived.
    fn release_held(&self, topic: &[u8], with_roster: bool) {
        let released = {
            let mut awaiting = self.awaiting_subscription.borrow_mut();
            let Some(held) = awaiting.get(topic) else {
                return;
            };
            let waits_for_roster = held.first().is_some_and(|a| self.needs_snapshot(&a.key));
            if waits_for_roster && !with_roster {
                return;
            }
            awaiting.remove(topic)
        };
        for announcement in released.into_iter().flatten() {
            self.announce(announcement);
        }
    }

    fn on_reply(&self, token: u64, value: &redis::Value) {
        if token == HEARTBEAT {
            let Some((registered, elsewhere)) = state::heartbeat_of(value) else {
                return;
            };
            let apps = self.capped_apps().map(|(i, _)| i);
            for (app, count) in apps.zip(elsewhere) {
                let others = &self.node.app_connections_elsewhere[app];
                others.store(count, Ordering::Relaxed);
            }
            if !registered {
                crate::log_warn!("this node had been taken for dead; asserting its state again");
                for shard in 0..self.node.shards {
                    self.route(shard, ShardMsg::Reassert);
                }
            }
            return;
        }
        let Some(cluster) = &self.cluster else {
            return;
        };
        let asked = self.user_asks.borrow_mut().remove(&token);
        if let Some(key) = asked {
            return self.on_user_nodes(cluster, &key, value);
        }
        let held = self.cache_asks.borrow_mut().remove(&token);
        if let Some(mut announcement) = held {
            // A reply that is not a cached event of this channel counts as none.
            let cached = state::cached_of(value).flatten();
            let frame = cached.and_then(|(payload, _)| Self::cached_frame(&payload));
            let frame = frame.unwrap_or_else(|| events::cache_miss(&announcement.key.name).into());
            announcement.cached = Some(frame);
            return self.announce(announcement);
        }
        let Some(key) = self.syncs.borrow_mut().remove(&token) else {
            return;
        };
        // An error reply leaves the channel on the local rule until the next assertion.
        let Some(snapshot) = state::snapshot_of(value) else {
            self.cluster_state_stale.set(true);
            return self.release_held(&self.topic_of(cluster, &key), true);
        };
        self.on_snapshot(cluster, &key, snapshot);
        self.release_held(&self.topic_of(cluster, &key), true);
    }

    /// Redis's view of a channel, taken in the same step as the node's own share: the members
    /// become the roster and the other nodes' counts are kept, and subscribers hear what
    /// changed.
    fn on_snapshot(&self, cluster: &Cluster, key: &ChannelKey, snapshot: Snapshot) {
        let presence = ChannelKind::of(&key.name) == ChannelKind::Presence;
        let counts = self.counts_announced(key);
        let (added, removed) = {
            let mut channels = self.home.channels.borrow_mut();
            let Some(channel) = channels.get_mut(key) else {
                return;
            };
            if counts {
                let own = cluster.node_id();
                let others = snapshot.counts.into_iter().filter(|(o, _)| o != own);
                channel.remote_counts = Some(others.collect());
            }
            match presence {
                true => channel.set_roster(snapshot.members),
                false => Default::default(),
            }
        };
        self.tell_members(key, &added, &removed);
        if counts {
            self.send_subscription_count(key, Instant::now());
        }
    }

    /// A change another node (or this one) made to a channel's shared state.
    fn on_state_change(&self, topic: &[u8], payload: &[u8]) {
        let Some(cluster) = &self.cluster else {
            return;
        };
        let Some(changed) = state::decode_change(payload) else {
            return self.skip_foreign("a state change that is not shardpush's");
        };
        let Some(app) = self.node.app_by_id(&changed.app_id) else {
            return self.skip_foreign("a state change for an app this node does not serve");
        };
        if cluster.topic(&changed.app_id, &changed.channel) != topic {
            return self.skip_foreign("a state change naming another channel than its topic");
        }
        let key = ChannelKey::new(app, &changed.channel);
        if let (Change::Count { owner, count }, true) = (&changed.change, is_user(&key)) {
            return self.on_user_count(cluster, &key, owner, *count);
        }
        let mut channels = self.home.channels.borrow_mut();
        let Some(home) = channels.get_mut(&key) else {
            return;
        };
        match changed.change {
            // Without a roster the change is in the member list that will make it.
            Change::Added { user_id, user_info } => {
                if home.roster.is_some() && home.add_to_view(&user_id, &user_info, false) {
                    drop(channels);
                    self.tell_members(&key, &[(user_id, user_info)], &[]);
                }
            }
            Change::Removed { user_id } => {
                if home.remove_from_view(&user_id) {
                    drop(channels);
                    self.tell_members(&key, &[], &[user_id]);
                }
            }
            Change::Terminate { owner } => {
                drop(channels);
                if owner != cluster.node_id() {
                    self.terminate_on_node(key);
                }
            }
            Change::Count { owner, count } => {
                let Some(counts) = home.remote_counts.as_mut() else {
                    return;
                };
                if owner == cluster.node_id() {
                    return;
                }
                let changed = match count {
                    0 => counts.remove(&owner).is_some(),
                    n => counts.insert(owner, n) != Some(n),
                };
                drop(channels);
                if changed && self.counts_announced(&key) {
                    self.send_subscription_count(&key, Instant::now());
                }
            }
        }
    }

    /// A publish from another node: fanned out to this node's subscribers like a local one.
    fn deliver_remote(&self, topic: &[u8], payload: &[u8]) {
        let Some(cluster) = &self.cluster else {
            return;
        };
        let Some(remote) = crate::cluster::decode(payload) else {
            return self.skip_foreign("a message that is not shardpush's");
        };
        if remote.node_id == cluster.node_id() {
            return;
        }
        let Some(app) = self.node.app_by_id(remote.app_id) else {
            return self.skip_foreign("a message for an app this node does not serve");
        };
        if cluster.topic(remote.app_id, remote.channel) != topic {
            return self.skip_foreign("a message naming another channel than its topic");
        }
        if !ws::is_complete_text_frame(remote.frame) {
            return self.skip_foreign("a message whose frame is not one complete text frame");
        }
        let key = ChannelKey::new(app, remote.channel);
        let except = self.node.conn_id_of(remote.except);
        let targets = self.subscriber_shards(&key);
        self.broadcast(&targets, &key, Arc::from(remote.frame), except);
    }

    /// The frame of a cache channel's payload read from Redis (None: not a complete frame of
    /// shardpush's).
    pub(super) fn cached_frame(payload: &[u8]) -> Option<Arc<[u8]>> {
        let published = crate::cluster::decode(payload)?;
        ws::is_complete_text_frame(published.frame).then(|| Arc::from(published.frame))
    }

    /// Logs the first of each kind of unreadable message on a topic (never one line per message).
    fn skip_foreign(&self, what: &'static str) {
        let skipped = &self.node.cluster_messages_skipped;
        if skipped.fetch_add(1, Ordering::Relaxed) == 0 {
            crate::log_warn!("shard {}: skipped {what} on a cluster topic", self.id);
        }
    }
}
