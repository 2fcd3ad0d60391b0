//! The shard's side of the cluster (`crate::cluster`): what a channel's home shard does with
//! Redis. It subscribes the node to a channel's topic when the node gets its first subscriber
//! and unsubscribes after the last, publishes what is published on this node, and fans out what
//! other nodes publish exactly as a local publish.

use super::home::Announcement;
use super::Shard;
use crate::channels::ChannelKey;
use crate::cluster::link::LinkEvent;
use crate::cluster::Cluster;
use crate::protocol::ws;
use std::sync::atomic::Ordering;
use std::sync::Arc;

impl Shard {
    /// Sends a publication of this node to the other nodes (nothing to do on a single node).
    /// False: Redis is away and the link's queue is full, so the other nodes will not get it.
    pub(super) fn publish_to_cluster(
        &self,
        key: &ChannelKey,
        frame: &[u8],
        except_elsewhere: Option<&str>,
    ) -> bool {
        let Some(cluster) = &self.cluster else {
            return true;
        };
        let app_id = &self.node.app(key.app).id;
        let forwarded = cluster.publish(app_id, &key.name, except_elsewhere.unwrap_or(""), frame);
        if !forwarded {
            let refused = &self.node.cluster_publishes_refused;
            refused.fetch_add(1, Ordering::Relaxed);
        }
        forwarded
    }

    /// Keeps a join's announcement until Redis confirms the node's subscription to the channel
    /// (the node's first subscriber, or one behind it). Returns it when it can go out now.
    pub(super) fn hold_for_cluster(&self, announcement: Announcement) -> Option<Announcement> {
        let Some(cluster) = &self.cluster else {
            return Some(announcement);
        };
        let key = &announcement.key;
        let topic = self.topic_of(cluster, key);
        let mut awaiting = self.awaiting_subscription.borrow_mut();
        if let Some(waiting) = awaiting.get_mut(&topic) {
            waiting.push(announcement);
            return None;
        }
        if self.subscribers_on_node(key) == 1 {
            cluster.link.subscribe(&topic);
        }
        // Held while Redis may not have the subscription yet: the node's first subscriber, and
        // any subscriber while the link resubscribes after a reconnect. Without a link, local
        // delivery works at once and the link subscribes when it is back.
        if !cluster.link.is_up() || !cluster.link.is_subscribing(&topic) {
            return Some(announcement);
        }
        awaiting.insert(topic, vec![announcement]);
        None
    }

    /// The node's last subscriber of the channel left: stop receiving its topic.
    pub(super) fn leave_cluster_topic(&self, key: &ChannelKey) {
        if let Some(cluster) = &self.cluster {
            cluster.link.unsubscribe(&self.topic_of(cluster, key));
        }
    }

    /// The Redis topic of a channel (named by the app's id, the same on every node).
    fn topic_of(&self, cluster: &Cluster, key: &ChannelKey) -> Vec<u8> {
        cluster.topic(&self.node.app(key.app).id, &key.name)
    }

    /// What the shard's Redis link reports.
    pub(super) fn on_cluster_event(&self, event: LinkEvent) {
        match event {
            LinkEvent::Message { topic, payload } => self.deliver_remote(&topic, &payload),
            LinkEvent::Subscribed(topic) => {
                let released = self.awaiting_subscription.borrow_mut().remove(&topic);
                for announcement in released.into_iter().flatten() {
                    self.announce(announcement);
                }
            }
            LinkEvent::Up => {
                if self.cluster_link_up.replace(Some(true)) != Some(true) {
                    crate::log_info!("shard {}: Redis link up", self.id);
                }
            }
            LinkEvent::Down(reason) => {
                // Nothing will confirm the held joins now: confirm them (local delivery works).
                let held = std::mem::take(&mut *self.awaiting_subscription.borrow_mut());
                for announcement in held.into_values().flatten() {
                    self.announce(announcement);
                }
                if self.cluster_link_up.replace(Some(false)) != Some(false) {
                    crate::log_warn!("shard {}: Redis link down ({reason}); retrying", self.id);
                }
            }
        }
        self.handle_own_messages();
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

    /// Logs the first of each kind of unreadable message on a topic (never one line per message).
    fn skip_foreign(&self, what: &'static str) {
        let skipped = &self.node.cluster_messages_skipped;
        if skipped.fetch_add(1, Ordering::Relaxed) == 0 {
            crate::log_warn!("shard {}: skipped {what} on a cluster topic", self.id);
        }
    }
}
