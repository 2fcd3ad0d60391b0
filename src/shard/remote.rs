//! The shard's side of the cluster (`crate::cluster`): what a channel's home shard does with
//! Redis. It subscribes the node to a channel's topic when the node gets its first subscriber
//! and unsubscribes after the last, publishes what is published on this node, and fans out what
//! other nodes publish exactly as a local publish. It keeps the node's share of the shared
//! state (`cluster::state`) up to date: subscriber counts and presence members, asserted again
//! in full whenever the link comes back or the node learns it was taken for dead.

use super::home::Announcement;
use super::share::SyncKind;
use super::Shard;
use crate::channels::ChannelKey;
use crate::cluster::link::LinkEvent;
use crate::cluster::state;
use crate::cluster::Cluster;
use crate::protocol::channel::is_cache_channel;
use crate::protocol::events;
use crate::protocol::ws;
use std::sync::atomic::Ordering;
use std::sync::Arc;

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
            self.sync_channel(cluster, key, SyncKind::First);
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
            self.sync_channel(cluster, key, SyncKind::First);
        }
        let token = self.new_id();
        let app_id = &self.node.app(key.app).id;
        let window_ms = (self.node.config.webhooks.cache_miss_window as u64 * 1000).max(1);
        let ask = cluster.state.cached(topic, (app_id, &key.name), window_ms);
        if !cluster.link.state_command_then_event(&ask, token) {
            return Some(announcement);
        }
        self.cache_asks.borrow_mut().insert(token, announcement);
        None
    }

    /// The node's last subscriber of the channel left: stop receiving its topic.
    pub(super) fn leave_cluster_topic(&self, key: &ChannelKey) {
        if let Some(cluster) = &self.cluster {
            cluster.link.unsubscribe(&self.topic_of(cluster, key));
        }
    }

    /// Tells the scripts what the apps' webhooks and event streams want (before this link's
    /// state goes in, so the decisions it causes are made with it, even after Redis lost it).
    fn write_webhook_settings(&self) {
        let Some(cluster) = &self.cluster else {
            return;
        };
        let config = &self.node.config;
        let live = self.node.apps.live();
        let apps = live.iter().map(|(slot, app)| {
            let webhooks = self.node.webhooks.as_ref();
            let bits = webhooks.map_or(0, |w| w.queued(*slot));
            let stream = if app.event_stream {
                app.event_stream_length
            } else {
                0
            };
            (app.id.as_str(), bits, stream)
        });
        let bound = config.webhooks.max_pending_in_redis;
        cluster
            .link
            .command(&cluster.state.webhook_settings(bound, apps));
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
                crate::metrics::here().redis_link_up.set(1);
                if self.cluster_link_up.replace(Some(true)) != Some(true) {
                    crate::log_info!(shard = self.id, "Redis link up");
                }
                self.write_webhook_settings();
                self.reassert();
            }
            LinkEvent::Down(reason) => {
                // The answers to heartbeats in flight are lost with the link.
                self.heartbeat_apps.borrow_mut().clear();
                // Nothing will confirm the held joins now: confirm them (local delivery works).
                let held = std::mem::take(&mut *self.awaiting_subscription.borrow_mut());
                for announcement in held.into_values().flatten() {
                    self.announce(announcement);
                }
                let cache_asks = std::mem::take(&mut *self.cache_asks.borrow_mut());
                for announcement in cache_asks.into_values() {
                    self.announce(announcement);
                }
                self.forget_questions();
                let metrics = crate::metrics::here();
                if metrics.redis_link_up.get() == 1 {
                    metrics.redis_link_losses.inc();
                }
                metrics.redis_link_up.set(0);
                if self.cluster_link_up.replace(Some(false)) != Some(false) {
                    crate::log_warn!(shard = self.id, "Redis link down ({reason}); retrying");
                }
            }
        }
        self.handle_own_messages();
    }

    /// Confirms the joins held for a topic: after Redis confirmed the subscription
    /// (`with_roster` false: a presence channel still waiting for its members stays held), or
    /// once the members arrived.
    pub(super) fn release_held(&self, topic: &[u8], with_roster: bool) {
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

    /// A reply to a command sent with a token: a question of the shared state, or the last
    /// event of a cache channel a join waits for.
    fn on_reply(&self, token: u64, value: &redis::Value) {
        let Some(cluster) = &self.cluster else {
            return;
        };
        if self.on_state_reply(cluster, token, value) {
            return;
        }
        let held = self.cache_asks.borrow_mut().remove(&token);
        if let Some(mut announcement) = held {
            // A reply that is not a cached event of this channel counts as none.
            let cached = state::cached_of(value).flatten();
            let frame = cached.and_then(|(payload, _)| Self::cached_frame(&payload));
            let frame = frame.unwrap_or_else(|| events::cache_miss(&announcement.key.name).into());
            announcement.cached = Some(frame);
            self.announce(announcement);
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
        if !cluster.is_topic_of(topic, remote.app_id, remote.channel) {
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
    pub(super) fn skip_foreign(&self, what: &'static str) {
        let skipped = &self.node.cluster_messages_skipped;
        if skipped.fetch_add(1, Ordering::Relaxed) == 0 {
            crate::log_warn!(shard = self.id, "skipped {what} on a cluster topic");
        }
    }
}
