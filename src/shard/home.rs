//! The home side of a shard: for the channels (and users) hashed to it, it counts subscribers
//! per shard, keeps presence members, the cache of cache channels and the watchers of users,
//! and turns each change into at most one message per shard that has subscribers.

use super::messages::{
    Answer, CachedEvent, ChannelInfo, ChannelStats, JoinAck, JoinRequest, Publication, Question,
    ShardMsg,
};
use super::Shard;
use crate::channels::cache::ChannelCache;
use crate::channels::home::{HomeChannel, HomeChannels, Joined};
use crate::channels::watch::WatchCounts;
use crate::channels::ChannelKey;
use crate::config::WebhookEventType;
use crate::feed::Note;
use crate::protocol::channel::{is_cache_channel, ChannelKind};
use crate::protocol::events::{self, PresenceMember};
use crate::webhooks::Event;
use std::cell::RefCell;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Channels with more subscribers than this get `subscription_count` at most every
/// `COUNT_INTERVAL` (reference §2.4.6).
const COUNT_THROTTLE_ABOVE: u32 = 100;
const COUNT_INTERVAL: Duration = Duration::from_secs(5);

/// Expired cache entries are dropped once a minute (by the sweeper).
const CACHE_PURGE_INTERVAL: Duration = Duration::from_secs(60);

/// A counted join whose confirmation, `member_added` and count may wait for the cluster.
pub(super) struct Announcement {
    origin: usize,
    reply: ShardMsg,
    pub(super) key: ChannelKey,
    /// Presence: the member, the joining socket, and whether it is the user's first socket on
    /// this node.
    member: Option<(PresenceMember, u64, bool)>,
    /// Cache channels in a cluster: the last event (or `cache_miss`) as read from Redis.
    pub(super) cached: Option<Arc<[u8]>>,
}

/// The tables of the channels and users homed on one shard.
pub(super) struct Home {
    pub(super) channels: RefCell<HomeChannels>,
    /// Last HTTP event of each cache channel homed here.
    cache: RefCell<ChannelCache>,
    /// When the cache was last purged of expired entries.
    cache_purged: RefCell<Instant>,
    /// Watchers per shard of each user homed here.
    pub(super) watchers: RefCell<WatchCounts>,
    /// Channels whose `subscription_count` waits for the throttle.
    pending_counts: RefCell<Vec<ChannelKey>>,
}

impl Home {
    pub(super) fn new(shards: usize) -> Home {
        Home {
            channels: RefCell::new(HomeChannels::new(shards)),
            cache: RefCell::new(ChannelCache::default()),
            cache_purged: RefCell::new(Instant::now()),
            watchers: RefCell::new(WatchCounts::new(shards)),
            pending_counts: RefCell::new(Vec::new()),
        }
    }
}

impl Shard {
    /// A publication for a channel homed here: kept when it is cacheable, sent to every shard
    /// with subscribers.
    pub(super) fn home_publish(&self, publication: Publication) {
        let Publication {
            key,
            frame,
            except,
            except_elsewhere,
            cache,
            ticket,
        } = publication;
        let forwarded = self.publish_to_cluster(&key, &frame, except_elsewhere.as_deref(), cache);
        if let (false, Some((origin, ticket))) = (forwarded, ticket) {
            self.route(origin, ShardMsg::PublishRefused { ticket });
        }
        if cache {
            let ttl = Duration::from_secs(self.node.app(key.app).cache_ttl as u64);
            let mut stored = self.home.cache.borrow_mut();
            stored.store(&key, frame.clone(), ttl, Instant::now());
        }
        let targets = self.subscriber_shards(&key);
        self.broadcast(&targets, &key, frame, except);
    }

    /// Sockets of this node subscribed to a channel homed here.
    pub(super) fn subscribers_on_node(&self, key: &ChannelKey) -> u32 {
        self.home.channels.borrow().get(key).map_or(0, |c| c.total)
    }

    pub(super) fn subscriber_shards(&self, key: &ChannelKey) -> Vec<usize> {
        self.home
            .channels
            .borrow()
            .get(key)
            .map_or_else(Vec::new, |c| c.shards().collect())
    }

    /// Sends one frame to each target shard, which writes it to its local subscribers. This
    /// shard gets it as a message too, so it stays in order with the replies already sent
    /// (a joiner's confirmation goes before the count it is part of).
    pub(super) fn broadcast(
        &self,
        targets: &[usize],
        key: &ChannelKey,
        frame: Arc<[u8]>,
        except: Option<u64>,
    ) {
        for &shard in targets {
            let msg = ShardMsg::Deliver {
                key: key.clone(),
                frame: frame.clone(),
                except,
            };
            self.route(shard, msg);
        }
    }

    /// Counts a socket in a channel homed here and answers its shard; announces a new presence
    /// member and the new count.
    pub(super) fn home_join(&self, req: JoinRequest) {
        let JoinRequest {
            key,
            origin,
            conn,
            member,
            max_members,
            duplicate,
        } = req;
        let outcome = if duplicate {
            Ok(Joined::Socket)
        } else {
            let mut channels = self.home.channels.borrow_mut();
            channels.join(&key, origin, member.as_ref(), max_members)
        };
        let user_id = member.as_ref().map(|m| m.user_id.clone());
        let joined = match outcome {
            Ok(joined) => joined,
            Err(message) => {
                let result = Err(message);
                let reply = ShardMsg::JoinReply {
                    key,
                    conn,
                    duplicate,
                    user_id,
                    result,
                };
                return self.route(origin, reply);
            }
        };
        let ack = JoinAck {
            // Filled by `announce`, which may come later (a duplicate gets this one now).
            succeeded: match (&member, duplicate) {
                (Some(_), true) => self.presence_succeeded(&key),
                _ => None,
            },
            cache_event: None,
        };
        let reply = ShardMsg::JoinReply {
            key: key.clone(),
            conn,
            duplicate,
            user_id,
            result: Ok(ack),
        };
        if duplicate {
            return self.route(origin, reply);
        }
        // (Looked up only when there are webhooks: this is every join's path.)
        if self.node.webhooks.is_some() && self.subscribers_on_node(&key) == 1 {
            let channel = || key.name.to_string();
            self.webhook(&key, WebhookEventType::ChannelOccupied, || {
                Event::ChannelOccupied { channel: channel() }
            });
        }
        let new_locally = joined == Joined::NewMember;
        self.cluster_joined(&key, member.as_ref().filter(|_| new_locally));
        let announcement = Announcement {
            origin,
            reply,
            key,
            member: member.map(|m| (m, conn, new_locally)),
            cached: None,
        };
        // A node's first subscriber is confirmed once Redis has the node's subscription, so
        // that whatever is published anywhere after the confirmation reaches it.
        if let Some(announcement) = self.hold_for_cluster(announcement) {
            self.announce(announcement);
        }
    }

    /// Tells a counted join: the joiner's confirmation first, so it precedes every event it is
    /// counted in, then `member_added` and the new count.
    pub(super) fn announce(&self, announcement: Announcement) {
        let Announcement {
            origin,
            mut reply,
            key,
            member,
            cached,
        } = announcement;
        let joined_presence = member.is_some();
        // Whether the member is news to the channel's subscribers, as they know it now.
        let member_added = member.filter(|(m, _, new_locally)| {
            let mut channels = self.home.channels.borrow_mut();
            let channel = channels.get_mut(&key);
            channel.is_some_and(|c| c.add_to_view(&m.user_id, &m.user_info, *new_locally))
        });
        // Taken now, not at the join: held for the cluster, the members and the cache may have
        // changed since.
        if let ShardMsg::JoinReply {
            result: Ok(ack), ..
        } = &mut reply
        {
            if joined_presence {
                ack.succeeded = self.presence_succeeded(&key);
            }
            if is_cache_channel(&key.name) {
                let cached = cached.unwrap_or_else(|| self.cached_or_miss(&key));
                ack.cache_event = Some(cached);
            }
        }
        self.route(origin, reply);
        if let Some((m, conn, _)) = member_added {
            self.node.console_note(key.app, || {
                Note::new("member_added", &key.name).user(&m.user_id)
            });
            self.webhook(&key, WebhookEventType::MemberAdded, || Event::MemberAdded {
                channel: key.name.to_string(),
                user_id: m.user_id.clone(),
            });
            let frame = events::member_added(&key.name, &m.user_id, &m.user_info);
            let targets = self.subscriber_shards(&key);
            self.broadcast(&targets, &key, Arc::from(frame), Some(conn));
        }
        self.count_changed(&key, true);
    }

    /// A presence channel's `subscription_succeeded`, with the members as subscribers know them.
    fn presence_succeeded(&self, key: &ChannelKey) -> Option<Arc<[u8]>> {
        let data = self.home.channels.borrow().get(key)?.presence_json();
        Some(Arc::from(events::subscription_succeeded(&key.name, &data)))
    }

    /// Tells this node's subscribers of a presence channel that members came or went.
    pub(super) fn tell_members(
        &self,
        key: &ChannelKey,
        added: &[(String, String)],
        removed: &[String],
    ) {
        let targets = self.subscriber_shards(key);
        for (user_id, user_info) in added {
            let frame = events::member_added(&key.name, user_id, user_info);
            self.broadcast(&targets, key, Arc::from(frame), None);
        }
        for user_id in removed {
            let frame = events::member_removed(&key.name, user_id);
            self.broadcast(&targets, key, Arc::from(frame), None);
        }
    }

    fn cached_or_miss(&self, key: &ChannelKey) -> Arc<[u8]> {
        match self.home.cache.borrow().get(key, Instant::now()) {
            Some((frame, _)) => frame.clone(),
            None => {
                self.webhook(key, WebhookEventType::CacheMiss, || Event::CacheMiss {
                    channel: key.name.to_string(),
                });
                Arc::from(events::cache_miss(&key.name))
            }
        }
    }

    /// Uncounts a socket; announces a presence member's departure and the new count.
    pub(super) fn home_leave(&self, key: ChannelKey, origin: usize, user_id: Option<String>) {
        let occupied_before = self.node.webhooks.is_some() && self.subscribers_on_node(&key) > 0;
        let last_of_user = {
            let mut channels = self.home.channels.borrow_mut();
            channels.leave(&key, origin, user_id.as_deref())
        };
        let left = user_id.filter(|_| last_of_user);
        // In a cluster, Redis decides whether the user left the channel everywhere.
        let decided_by_cluster = self.cluster_left(&key, left.as_deref());
        if let Some(user_id) = left.filter(|_| !decided_by_cluster) {
            let gone = {
                let mut channels = self.home.channels.borrow_mut();
                let channel = channels.get_mut(&key);
                // Without a roster the local rule holds: the last socket here was the last.
                channel.is_none_or(|c| c.roster.is_none() || c.remove_from_view(&user_id))
            };
            if gone {
                self.node.console_note(key.app, || {
                    Note::new("member_removed", &key.name).user(&user_id)
                });
                self.webhook(&key, WebhookEventType::MemberRemoved, || {
                    Event::MemberRemoved {
                        channel: key.name.to_string(),
                        user_id: user_id.clone(),
                    }
                });
                self.tell_members(&key, &[], &[user_id]);
            }
        }
        let vacated = self.home.channels.borrow().get(&key).is_none();
        if vacated && occupied_before {
            self.webhook(&key, WebhookEventType::ChannelVacated, || {
                Event::ChannelVacated {
                    channel: key.name.to_string(),
                }
            });
        }
        if vacated && !self.is_watched(&key) {
            self.leave_cluster_topic(&key);
        }
        self.count_changed(&key, false);
    }

    /// After a join or leave: a user's first/last connection changes their online status;
    /// other channels may announce their subscription count.
    fn count_changed(&self, key: &ChannelKey, joined: bool) {
        let total = self.home.channels.borrow().get(key).map_or(0, |c| c.total);
        match ChannelKind::of(&key.name) {
            ChannelKind::ServerToUser => {
                // The first connection here, or the last; in a cluster, the user's status
                // changes only if they have none on another node.
                let first_or_last = if joined { total == 1 } else { total == 0 };
                if first_or_last && !self.online_elsewhere(key) {
                    self.user_status(key, joined);
                }
            }
            _ if self.counts_announced(key) => {
                // In a cluster, only the node whose count changed reports it to webhooks.
                if self.node.webhooks.is_some() && self.cluster.is_some() {
                    if let Some(c) = self.home.channels.borrow_mut().get_mut(key) {
                        c.count_changed_here = true;
                    }
                }
                self.send_subscription_count(key, Instant::now())
            }
            _ => {}
        }
    }

    /// The channel's subscribers get `pusher_internal:subscription_count` (apps that enable
    /// it; never presence channels, which have member events, nor signed-in users).
    pub(super) fn counts_announced(&self, key: &ChannelKey) -> bool {
        let kind = ChannelKind::of(&key.name);
        self.node.app(key.app).enable_subscription_count
            && !matches!(kind, ChannelKind::ServerToUser | ChannelKind::Presence)
    }

    /// Sends the current count to every subscriber, or marks it pending while throttled.
    pub(super) fn send_subscription_count(&self, key: &ChannelKey, now: Instant) {
        let (targets, count, changed_here) = {
            let mut channels = self.home.channels.borrow_mut();
            let Some(channel) = channels.get_mut(key) else {
                return;
            };
            let recent = channel
                .count_sent
                .is_some_and(|t| now.duration_since(t) < COUNT_INTERVAL);
            let count = channel.cluster_total();
            if count > COUNT_THROTTLE_ABOVE && recent {
                if !channel.count_pending {
                    channel.count_pending = true;
                    self.home.pending_counts.borrow_mut().push(key.clone());
                }
                return;
            }
            channel.count_sent = Some(now);
            channel.count_pending = false;
            let changed_here = std::mem::take(&mut channel.count_changed_here);
            (channel.shards().collect::<Vec<_>>(), count, changed_here)
        };
        if changed_here || self.cluster.is_none() {
            self.webhook(key, WebhookEventType::SubscriptionCount, || {
                Event::SubscriptionCount {
                    channel: key.name.to_string(),
                    count,
                }
            });
        }
        let frame = events::subscription_count(&key.name, count);
        self.broadcast(&targets, key, Arc::from(frame), None);
    }

    /// From the sweeper: sends the throttled counts whose interval is over, and now and then
    /// drops expired cache entries.
    pub(super) fn home_tick(&self) {
        let now = Instant::now();
        if now.duration_since(*self.home.cache_purged.borrow()) >= CACHE_PURGE_INTERVAL {
            *self.home.cache_purged.borrow_mut() = now;
            self.home.cache.borrow_mut().purge(now);
        }
        let keys = std::mem::take(&mut *self.home.pending_counts.borrow_mut());
        let mut waiting = Vec::new();
        for key in keys {
            let state = self.home.channels.borrow().get(&key).map(|c| {
                let due = c
                    .count_sent
                    .is_none_or(|t| now.duration_since(t) >= COUNT_INTERVAL);
                (c.count_pending, due)
            });
            match state {
                Some((true, true)) => self.send_subscription_count(&key, now),
                Some((true, false)) => waiting.push(key),
                _ => {}
            }
        }
        self.home.pending_counts.borrow_mut().extend(waiting);
    }

    /// Tells the shards watching a user homed here that they came online or went offline.
    pub(super) fn user_status(&self, key: &ChannelKey, online: bool) {
        let shards = self.home.watchers.borrow().shards(key);
        for shard in shards {
            let msg = ShardMsg::UserStatus {
                key: key.clone(),
                online,
            };
            self.route(shard, msg);
        }
    }

    /// Whether a user homed here is online on another node (as far as this node knows).
    pub(super) fn online_elsewhere(&self, key: &ChannelKey) -> bool {
        let watchers = self.home.watchers.borrow();
        watchers.online_elsewhere(key).unwrap_or(false)
    }

    /// Whether a user homed here is online anywhere (as far as this node knows).
    pub(super) fn online(&self, key: &ChannelKey) -> bool {
        self.subscribers_on_node(key) > 0 || self.online_elsewhere(key)
    }

    /// Registers a watcher of a user homed here and answers with the user's status (in a
    /// cluster, once the node knows the user's other nodes).
    pub(super) fn home_watch(&self, key: ChannelKey, origin: usize, conn: u64) {
        let first = self.home.watchers.borrow_mut().watch(&key, origin);
        if self.watch_in_cluster(&key, first) {
            self.home.watchers.borrow_mut().wait(&key, origin, conn);
            return;
        }
        let online = self.online(&key);
        self.route(origin, ShardMsg::WatchReply { key, conn, online });
    }

    /// Answers watches that waited for the user's status in the cluster.
    pub(super) fn answer_watches(&self, key: &ChannelKey, waiting: Vec<(usize, u64)>) {
        let online = self.online(key);
        for (origin, conn) in waiting {
            let key = key.clone();
            self.route(origin, ShardMsg::WatchReply { key, conn, online });
        }
    }

    /// Uncounts a watcher of a user homed here.
    pub(super) fn home_unwatch(&self, key: ChannelKey, origin: usize) {
        let forgotten = self.home.watchers.borrow_mut().unwatch(&key, origin);
        if forgotten && self.subscribers_on_node(&key) == 0 {
            self.leave_cluster_topic(&key);
        }
    }

    /// Someone on this node watches a user homed here.
    pub(super) fn is_watched(&self, key: &ChannelKey) -> bool {
        self.home.watchers.borrow().is_watched(key)
    }

    /// Every user homed here that someone on this node watches.
    pub(super) fn watched_users(&self) -> Vec<ChannelKey> {
        self.home.watchers.borrow().keys().cloned().collect()
    }

    /// Closes the connections of a user homed here, on every shard that has some.
    pub(super) fn home_terminate(&self, key: ChannelKey) {
        self.terminate_in_cluster(&key);
        self.terminate_on_node(key);
    }

    /// Closes the connections of a user homed here on this node's shards.
    pub(super) fn terminate_on_node(&self, key: ChannelKey) {
        for shard in self.subscriber_shards(&key) {
            let msg = ShardMsg::CloseUser { key: key.clone() };
            self.route(shard, msg);
        }
    }

    /// The shard is stopping (its connections are closed; leaves still on their way from other
    /// shards will not be handled): every channel still counted here is reported vacated, with
    /// its members removed, and the webhook events go to the hub now. A single node only: in a
    /// cluster, Redis decides these when the node's share goes.
    pub fn report_departures_at_exit(&self) {
        if self.node.webhooks.is_none() || self.cluster.is_some() {
            return;
        }
        let channels: Vec<(ChannelKey, Vec<String>)> = {
            let channels = self.home.channels.borrow();
            let members = |c: &HomeChannel| c.local_members().map(|(u, _)| u.to_string()).collect();
            channels
                .iter()
                .map(|(k, c)| (k.clone(), members(c)))
                .collect()
        };
        for (key, members) in channels {
            for user_id in members {
                self.webhook(&key, WebhookEventType::MemberRemoved, || {
                    Event::MemberRemoved {
                        channel: key.name.to_string(),
                        user_id,
                    }
                });
            }
            self.webhook(&key, WebhookEventType::ChannelVacated, || {
                Event::ChannelVacated {
                    channel: key.name.to_string(),
                }
            });
        }
        if let Some(webhooks) = &self.node.webhooks {
            self.webhook_outbox.hand_over(webhooks);
        }
    }

    /// Answers a question about the channels homed here.
    pub(super) fn answer(&self, question: Question) -> Answer {
        let channels = self.home.channels.borrow();
        let stats = |c: &HomeChannel| ChannelStats {
            subscription_count: c.total,
            user_count: c.user_count(),
        };
        match question {
            Question::Channel { key, with_cache } => {
                let cached = with_cache.then(|| {
                    let cache = self.home.cache.borrow();
                    let (frame, left) = cache.get(&key, Instant::now())?;
                    Some(CachedEvent {
                        frame: frame.clone(),
                        ttl_secs: left.as_secs(),
                    })
                });
                Answer::Channel(ChannelInfo {
                    stats: channels.get(&key).map(stats).unwrap_or_default(),
                    cached: cached.flatten(),
                })
            }
            Question::PresenceUsers(key) => Answer::PresenceUsers(
                channels
                    .get(&key)
                    .and_then(|c| c.members.as_ref())
                    .map(|m| m.iter().map(|m| m.user_id.clone()).collect())
                    .unwrap_or_default(),
            ),
            Question::Occupied { app, prefix } => Answer::Occupied(
                channels
                    .occupied(app, &prefix)
                    .filter(|(k, _)| !k.name.starts_with('#'))
                    .map(|(k, c)| (k.name.to_string(), stats(c)))
                    .collect(),
            ),
            Question::Barrier => Answer::Barrier,
        }
    }
}
