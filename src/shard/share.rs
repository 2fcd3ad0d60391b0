//! The node's share of the cluster's shared state (`cluster::state`), kept by each channel's
//! home shard: its subscriber counts and presence members in Redis, the cluster's view of a
//! channel here (the roster of members, the other nodes' counts), heartbeats, and the online
//! status of watched users. Everything is asserted again in full whenever the link comes back or
//! the node learns it was taken for dead; commands written before an outage are dropped rather
//! than replayed over that assertion (`RedisLink::state_command`).

use super::messages::ShardMsg;
use super::Shard;
use crate::channels::ChannelKey;
use crate::cluster::state::{self, Change, Snapshot};
use crate::cluster::Cluster;
use crate::protocol::channel::ChannelKind;
use crate::protocol::events::PresenceMember;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// The token of the heartbeat's reply (other tokens come from `new_id`, which never makes it).
const HEARTBEAT: u64 = u64::MAX;
/// The token of the reply listing the node's index, after a reassertion.
const INDEX: u64 = u64::MAX - 1;

/// Why a channel's view was asked of Redis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum SyncKind {
    /// The node's first subscriber: the view is taken whole, and held joins wait for it.
    First,
    /// The link came back: members who joined meanwhile are taken at once, but departures
    /// wait for `Reconcile`, because after Redis restarted empty the nodes assert their
    /// members one after the other and a member not asserted yet has not left.
    Reassert,
    /// A while after a reassertion, when every live node has asserted: the member list whole.
    Reconcile,
}

/// A signed-in user's channel (`#server-to-user-`).
fn is_user(key: &ChannelKey) -> bool {
    key.user_id().is_some()
}

impl Shard {
    /// After a counted join: the node's count in Redis, and a user's first socket on this node
    /// (`new_member`) in the channel's members.
    pub(super) fn cluster_joined(&self, key: &ChannelKey, new_member: Option<&PresenceMember>) {
        let Some(cluster) = &self.cluster else {
            return;
        };
        let total = self.subscribers_on_node(key);
        let app_id = &self.node.app(key.app).id;
        let topic = self.topic_of(cluster, key);
        let mut sent = self.write_count(cluster, key, &topic, total, total == 1);
        if let Some(m) = new_member {
            let join = cluster
                .state
                .join(&topic, app_id, &key.name, &m.user_id, &m.user_info);
            sent &= cluster.link.state_command(&join);
        }
        self.note_unsent(sent);
    }

    /// After a leave: the departure of a user's last socket on this node (`left`), then the
    /// node's count in Redis (in that order: a node killed between the two leaves no member
    /// its index does not name). True when Redis decides whether that user left the channel
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
        let mut decided = false;
        // Queued while a connection's handshake is unanswered too: otherwise the count below
        // would go in without the departure, leaving the member behind in Redis.
        if let Some(user_id) = left.filter(|_| cluster.link.is_connected()) {
            let leave = cluster.state.leave(&topic, app_id, &key.name, user_id);
            let queued = cluster.link.state_command(&leave);
            sent &= queued;
            let has_roster = {
                let channels = self.home.channels.borrow();
                channels.get(key).is_some_and(|c| c.roster.is_some())
            };
            decided = queued && has_roster;
        }
        sent &= self.write_count(cluster, key, &topic, total, total == 0);
        self.note_unsent(sent);
        decided
    }

    /// Writes the node's count of a channel (`crossed_zero`: it just went from 0 to 1 or from
    /// 1 to 0), and announces it where other nodes follow it: every change for
    /// `subscription_count`, a signed-in user's first and last connection for watchers.
    /// False: a command did not fit in the link's queue.
    fn write_count(
        &self,
        cluster: &Cluster,
        key: &ChannelKey,
        topic: &[u8],
        total: u32,
        crossed_zero: bool,
    ) -> bool {
        let app_id = &self.node.app(key.app).id;
        let count = cluster
            .state
            .count(topic, app_id, &key.name, total, crossed_zero);
        let mut sent = cluster.link.state_command(&count);
        if self.counts_announced(key) || (is_user(key) && crossed_zero) {
            let announce = cluster
                .state
                .announce_count(topic, app_id, &key.name, total);
            sent &= cluster.link.state_command(&announce);
        }
        sent
    }

    /// A state command the link refused (its queue was full) leaves Redis behind this node:
    /// everything is asserted again at the next heartbeat.
    fn note_unsent(&self, sent: bool) {
        if !sent {
            self.cluster_state_stale.set(true);
        }
    }

    /// The node needs the cluster's view of the channel before it can confirm a join: the
    /// members of a presence channel, or the other nodes' counts for `subscription_count`.
    pub(super) fn needs_snapshot(&self, key: &ChannelKey) -> bool {
        let presence = ChannelKind::of(&key.name) == ChannelKind::Presence;
        let counts = self.counts_announced(key);
        let channels = self.home.channels.borrow();
        channels.get(key).is_some_and(|c| {
            (presence && c.roster.is_none()) || (counts && c.remote_counts.is_none())
        })
    }

    /// Replaces the node's share of a channel in Redis. Where the node needs the cluster's view
    /// of the channel (presence, `subscription_count`), the reply is a snapshot (`on_snapshot`);
    /// only the reply to the latest request for the channel as it is now is taken.
    pub(super) fn sync_channel(&self, cluster: &Cluster, key: &ChannelKey, kind: SyncKind) {
        let mut channels = self.home.channels.borrow_mut();
        let Some(channel) = channels.get_mut(key) else {
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
            let sent = cluster.link.state_command_then_event(&sync, token);
            if sent {
                channel.sync_token = Some(token);
                self.syncs.borrow_mut().insert(token, (key.clone(), kind));
            }
            sent
        } else {
            cluster.link.state_command(&sync)
        };
        drop(channels);
        self.note_unsent(sent);
    }

    /// Asks Redis for a presence channel's whole member list (after a reassertion).
    fn reconcile(&self, cluster: &Cluster, key: &ChannelKey) {
        let mut channels = self.home.channels.borrow_mut();
        let Some(channel) = channels.get_mut(key).filter(|c| c.roster.is_some()) else {
            return;
        };
        let token = self.new_id();
        let ask = cluster.state.members(&self.topic_of(cluster, key));
        if cluster.link.state_command_then_event(&ask, token) {
            channel.sync_token = Some(token);
            let kind = SyncKind::Reconcile;
            self.syncs.borrow_mut().insert(token, (key.clone(), kind));
        }
    }

    /// Asserts everything this shard's home channels hold (the link is back, or the node was
    /// taken for dead): the node's registration first, then each channel's share, then where
    /// its watched users are online.
    pub(super) fn reassert(&self) {
        let Some(cluster) = &self.cluster else {
            return;
        };
        if !cluster.link.is_up() {
            return;
        }
        self.cluster_state_stale.set(false);
        let sent = cluster
            .link
            .state_command_then_event(&self.heartbeat(cluster), HEARTBEAT);
        self.note_unsent(sent);
        let keys: Vec<ChannelKey> = {
            let channels = self.home.channels.borrow();
            channels.iter().map(|(k, _)| k.clone()).collect()
        };
        let reconcile_at = Instant::now() + 2 * self.heartbeat_interval();
        for key in keys {
            self.sync_channel(cluster, &key, SyncKind::Reassert);
            if ChannelKind::of(&key.name) == ChannelKind::Presence {
                self.reconciles.borrow_mut().push((reconcile_at, key));
            }
        }
        for key in self.watched_users() {
            self.ask_user_nodes(cluster, &key);
        }
        // Channels this shard let go of while the link was away are still in Redis.
        let ask = cluster.state.index_entries();
        let sent = cluster.link.state_command_then_event(&ask, INDEX);
        self.note_unsent(sent);
    }

    /// The node's index as Redis has it, after a reassertion: the channels homed on this shard
    /// that it no longer holds (their last subscriber left while the link was away, and that
    /// departure never reached Redis) get the node's share removed, with what that announces
    /// (members gone, the channel vacated).
    fn forget_unheld(&self, cluster: &Cluster, value: &redis::Value) {
        for (app_id, channel) in state::index_of(value) {
            let Some(app) = self.node.app_by_id(&app_id) else {
                continue;
            };
            let key = ChannelKey::new(app, &channel);
            let held = self.home.channels.borrow().get(&key).is_some();
            if key.home(self.node.shards) != self.id || held {
                continue;
            }
            let topic = self.topic_of(cluster, &key);
            let announce = self.counts_announced(&key) || is_user(&key);
            let none = std::iter::empty();
            let sync = cluster
                .state
                .sync(&topic, (&app_id, &channel), 0, announce, none);
            let sent = cluster.link.state_command(&sync);
            self.note_unsent(sent);
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
        if cluster.link.state_command_then_event(&ask, token) {
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
        let mut watchers = self.home.watchers.borrow_mut();
        watchers.note_count(key, owner, count);
        drop(watchers);
        let after = self.online(key);
        if before != after {
            self.user_status(key, after);
        }
    }

    /// The link went down: answers that will not come are given up, and those waiting for
    /// them are answered with what this node knows.
    pub(super) fn forget_questions(&self) {
        self.syncs.borrow_mut().clear();
        let asked = std::mem::take(&mut *self.user_asks.borrow_mut());
        for key in asked.into_values() {
            let waiting = self.home.watchers.borrow_mut().take_waiting(&key);
            self.answer_watches(&key, waiting);
        }
    }

    /// This node's heartbeat, with its connection count of each app that has a limit.
    /// The apps it names are remembered for its answer, which gives their counts in the same
    /// order (a reload may change the apps in between).
    fn heartbeat(&self, cluster: &Cluster) -> redis::Cmd {
        let mut capped = self.node.apps.live();
        capped.retain(|(_, app)| app.max_connections > 0);
        let counts = capped.iter().map(|(slot, app)| {
            let count = self.node.app_connections[*slot as usize].load(Ordering::Relaxed);
            (app.id.as_str(), count)
        });
        let cmd = cluster.state.heartbeat(self.node_life_ms(), counts);
        let mut sent = self.heartbeat_apps.borrow_mut();
        // Answers come in order; a lost link loses its answers (at most a few are in flight).
        if sent.len() >= 8 {
            sent.pop_front();
        }
        sent.push_back(capped.into_iter().map(|(slot, _)| slot).collect());
        cmd
    }

    fn heartbeat_interval(&self) -> Duration {
        let config = self.node.config.cluster.as_ref();
        Duration::from_secs(config.map_or(2, |c| c.heartbeat_interval).into())
    }

    /// How long a heartbeat keeps the node alive: the node timeout less one interval, so that
    /// the survivors, checking once an interval, notice a death within the node timeout (the
    /// configuration keeps at least two intervals of it, so one late heartbeat is no death).
    fn node_life_ms(&self) -> u64 {
        let Some(config) = &self.node.config.cluster else {
            return 0;
        };
        let life = config
            .node_timeout
            .saturating_sub(config.heartbeat_interval);
        u64::from(life.max(1)) * 1000
    }

    /// Each shard's task: shard 0 heartbeats (each heartbeat also removes the share of dead
    /// nodes); every shard asserts again a state that fell behind, and reconciles the member
    /// lists of a reassertion once every node has had time to assert its own.
    pub(super) async fn heartbeats(&self) {
        let interval = self.heartbeat_interval();
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
                let beat = self.heartbeat(cluster);
                cluster.link.state_command_then_event(&beat, HEARTBEAT);
            }
            let now = Instant::now();
            let due: Vec<ChannelKey> = {
                let mut reconciles = self.reconciles.borrow_mut();
                let (due, later) = reconciles.drain(..).partition(|(at, _)| *at <= now);
                *reconciles = later;
                due.into_iter().map(|(_, key)| key).collect()
            };
            for key in due {
                self.reconcile(cluster, &key);
            }
            self.handle_own_messages();
        }
    }

    /// A reply to one of the shard's state commands (see `LinkEvent::Reply`). False: not one
    /// of them.
    pub(super) fn on_state_reply(
        &self,
        cluster: &Cluster,
        token: u64,
        value: &redis::Value,
    ) -> bool {
        if token == HEARTBEAT {
            self.on_heartbeat(value);
            return true;
        }
        if token == INDEX {
            self.forget_unheld(cluster, value);
            return true;
        }
        let asked = self.user_asks.borrow_mut().remove(&token);
        if let Some(key) = asked {
            self.on_user_nodes(cluster, &key, value);
            return true;
        }
        let Some((key, kind)) = self.syncs.borrow_mut().remove(&token) else {
            return false;
        };
        // A reply for a channel since dropped and made again, or overtaken by a later request.
        let current = {
            let channels = self.home.channels.borrow();
            channels
                .get(&key)
                .is_some_and(|c| c.sync_token == Some(token))
        };
        if !current {
            return true;
        }
        let snapshot = match kind {
            SyncKind::Reconcile => state::members_of(value).map(|members| Snapshot {
                members,
                counts: Vec::new(),
            }),
            SyncKind::First | SyncKind::Reassert => state::snapshot_of(value),
        };
        match snapshot {
            Some(snapshot) => self.on_snapshot(cluster, &key, snapshot, kind),
            // An error reply leaves the channel on the local rule until the next assertion.
            None => self.cluster_state_stale.set(true),
        }
        self.release_held(&self.topic_of(cluster, &key), true);
        true
    }

    /// The heartbeat's answer: the other nodes' connections of each capped app, and whether
    /// this node had been taken for dead meanwhile (then every shard asserts its state again;
    /// the answer to this shard's first heartbeat is not such news).
    fn on_heartbeat(&self, value: &redis::Value) {
        let Some((registered, elsewhere)) = state::heartbeat_of(value) else {
            return;
        };
        let apps = self
            .heartbeat_apps
            .borrow_mut()
            .pop_front()
            .unwrap_or_default();
        for (app, count) in apps.into_iter().zip(elsewhere) {
            let others = &self.node.app_connections_elsewhere[app as usize];
            others.store(count, Ordering::Relaxed);
        }
        let known_before = self.heartbeat_answered.replace(true);
        if !registered && known_before {
            crate::log_warn!("this node had been taken for dead; asserting its state again");
            for shard in 0..self.node.shards {
                self.route(shard, ShardMsg::Reassert);
            }
        }
    }

    /// Redis's view of a channel, taken in the same step as the node's own share: the members
    /// become the roster and the other nodes' counts are kept, and subscribers hear what
    /// changed.
    fn on_snapshot(&self, cluster: &Cluster, key: &ChannelKey, snapshot: Snapshot, kind: SyncKind) {
        let presence = ChannelKind::of(&key.name) == ChannelKind::Presence;
        let counts = self.counts_announced(key) && kind != SyncKind::Reconcile;
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
            let additions_only = kind == SyncKind::Reassert;
            match presence {
                true => channel.set_roster(snapshot.members, additions_only),
                false => Default::default(),
            }
        };
        self.tell_members(key, &added, &removed);
        if counts {
            self.send_subscription_count(key, Instant::now());
        }
    }

    /// A change another node (or this one) made to a channel's shared state.
    pub(super) fn on_state_change(&self, topic: &[u8], payload: &[u8]) {
        let Some(cluster) = &self.cluster else {
            return;
        };
        let Some(changed) = state::decode_change(payload) else {
            return self.skip_foreign("a state change that is not shardpush's");
        };
        let Some(app) = self.node.app_by_id(&changed.app_id) else {
            return self.skip_foreign("a state change for an app this node does not serve");
        };
        if !cluster.is_topic_of(topic, &changed.app_id, &changed.channel) {
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
}
