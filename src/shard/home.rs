//! The home side of a shard: for the channels (and users) hashed to it, it counts subscribers
//! per shard, keeps presence members, the cache of cache channels and the watchers of users,
//! and turns each change into at most one message per shard that has subscribers.

use super::messages::{
    CachedEvent, ChannelStats, JoinAck, JoinRequest, Query, QueryReply, ShardMsg,
};
use super::Shard;
use crate::channels::home::{HomeChannel, Joined};
use crate::channels::ChannelKey;
use crate::protocol::channel::{is_cache_channel, ChannelKind};
use crate::protocol::events;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Channels with more subscribers than this get `subscription_count` at most every
/// `COUNT_INTERVAL` (reference §2.4.6).
const COUNT_THROTTLE_ABOVE: u32 = 100;
const COUNT_INTERVAL: Duration = Duration::from_secs(5);

impl Shard {
    pub(super) fn home_publish(
        &self,
        key: ChannelKey,
        frame: Arc<[u8]>,
        except: Option<u64>,
        cache: bool,
    ) {
        if cache {
            let ttl = Duration::from_secs(self.shared.app(key.app).cache_ttl as u64);
            self.cache
                .borrow_mut()
                .store(&key, frame.clone(), ttl, Instant::now());
        }
        let targets = self.subscriber_shards(&key);
        self.broadcast(&targets, &key, frame, except);
    }

    fn subscriber_shards(&self, key: &ChannelKey) -> Vec<usize> {
        self.home
            .borrow()
            .get(key)
            .map_or_else(Vec::new, |c| c.shards().collect())
    }

    /// Sends one frame to each target shard, which writes it to its local subscribers.
    pub(super) fn broadcast(
        &self,
        targets: &[usize],
        key: &ChannelKey,
        frame: Arc<[u8]>,
        except: Option<u64>,
    ) {
        for &shard in targets {
            if shard == self.id {
                self.deliver_local(key, std::rc::Rc::from(&frame[..]), except);
            } else {
                let msg = ShardMsg::Deliver {
                    key: key.clone(),
                    frame: frame.clone(),
                    except,
                };
                self.route(shard, msg);
            }
        }
    }

    pub(super) fn home_join(&self, req: JoinRequest) {
        let JoinRequest {
            key,
            origin,
            conn,
            member,
            max_members,
            repeat,
        } = req;
        let outcome = if repeat {
            Ok(Joined::Socket)
        } else {
            let m = member
                .as_ref()
                .map(|(id, info)| (id.as_str(), info.as_str()));
            self.home.borrow_mut().join(&key, origin, m, max_members)
        };
        let user_id = member.as_ref().map(|(id, _)| id.clone());
        let joined = match outcome {
            Ok(joined) => joined,
            Err(message) => {
                let result = Err(message);
                let reply = ShardMsg::JoinReply {
                    key,
                    conn,
                    repeat,
                    user_id,
                    result,
                };
                return self.route(origin, reply);
            }
        };
        let ack = JoinAck {
            succeeded: member.as_ref().and_then(|_| {
                let home = self.home.borrow();
                let channel = home.get(&key)?;
                let data = channel.presence_json();
                Some(Arc::from(events::subscription_succeeded(&key.name, &data)))
            }),
            then: (!repeat && is_cache_channel(&key.name)).then(|| self.cached_or_miss(&key)),
        };
        let reply = ShardMsg::JoinReply {
            key: key.clone(),
            conn,
            repeat,
            user_id,
            result: Ok(ack),
        };
        // The joiner's confirmation goes first, so it precedes every event it is counted in.
        self.route(origin, reply);
        if repeat {
            return;
        }
        if let (Some((id, info)), Joined::NewMember) = (&member, joined) {
            let frame = events::member_added(&key.name, id, info);
            let targets = self.subscriber_shards(&key);
            self.broadcast(&targets, &key, Arc::from(frame), Some(conn));
        }
        self.count_changed(&key, true);
    }

    fn cached_or_miss(&self, key: &ChannelKey) -> Arc<[u8]> {
        match self.cache.borrow().get(key, Instant::now()) {
            Some((frame, _)) => frame.clone(),
            None => Arc::from(events::cache_miss(&key.name)),
        }
    }

    pub(super) fn home_leave(&self, key: ChannelKey, origin: usize, user_id: Option<String>) {
        let last_of_user = self
            .home
            .borrow_mut()
            .leave(&key, origin, user_id.as_deref());
        if let (true, Some(user_id)) = (last_of_user, user_id) {
            let frame = events::member_removed(&key.name, &user_id);
            let targets = self.subscriber_shards(&key);
            self.broadcast(&targets, &key, Arc::from(frame), None);
        }
        self.count_changed(&key, false);
    }

    /// After a join or leave: a user's first/last connection changes their online status;
    /// other channels may announce their subscription count.
    fn count_changed(&self, key: &ChannelKey, joined: bool) {
        let total = self.home.borrow().get(key).map_or(0, |c| c.total);
        match ChannelKind::of(&key.name) {
            ChannelKind::ServerToUser if joined && total == 1 => self.user_status(key, true),
            ChannelKind::ServerToUser if !joined && total == 0 => self.user_status(key, false),
            ChannelKind::ServerToUser | ChannelKind::Presence => {}
            _ if self.shared.app(key.app).enable_subscription_count => {
                self.send_subscription_count(key, Instant::now())
            }
            _ => {}
        }
    }

    /// Sends the current count to every subscriber, or marks it pending while throttled.
    fn send_subscription_count(&self, key: &ChannelKey, now: Instant) {
        let (targets, count) = {
            let mut home = self.home.borrow_mut();
            let Some(channel) = home.get_mut(key) else {
                return;
            };
            let recent = channel
                .count_sent
                .is_some_and(|t| now.duration_since(t) < COUNT_INTERVAL);
            if channel.total > COUNT_THROTTLE_ABOVE && recent {
                if !channel.count_pending {
                    channel.count_pending = true;
                    self.pending_counts.borrow_mut().push(key.clone());
                }
                return;
            }
            channel.count_sent = Some(now);
            channel.count_pending = false;
            (channel.shards().collect::<Vec<_>>(), channel.total)
        };
        let frame = events::subscription_count(&key.name, count);
        self.broadcast(&targets, key, Arc::from(frame), None);
    }

    /// From the sweeper: sends the throttled counts whose interval is over.
    pub(super) fn flush_pending_counts(&self) {
        let now = Instant::now();
        let keys = std::mem::take(&mut *self.pending_counts.borrow_mut());
        let mut waiting = Vec::new();
        for key in keys {
            let state = self.home.borrow().get(&key).map(|c| {
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
        self.pending_counts.borrow_mut().extend(waiting);
    }

    fn user_status(&self, key: &ChannelKey, online: bool) {
        let shards = self.watchers.borrow().shards(key);
        for shard in shards {
            let msg = ShardMsg::UserStatus {
                key: key.clone(),
                online,
            };
            self.route(shard, msg);
        }
    }

    pub(super) fn home_watch(&self, key: ChannelKey, origin: usize, conn: u64) {
        self.watchers.borrow_mut().watch(&key, origin);
        let online = self.home.borrow().get(&key).is_some_and(|c| c.total > 0);
        self.route(origin, ShardMsg::WatchReply { key, conn, online });
    }

    pub(super) fn home_unwatch(&self, key: ChannelKey, origin: usize) {
        self.watchers.borrow_mut().unwatch(&key, origin);
    }

    pub(super) fn home_terminate(&self, key: ChannelKey) {
        for shard in self.subscriber_shards(&key) {
            let msg = ShardMsg::CloseUser { key: key.clone() };
            self.route(shard, msg);
        }
    }

    pub(super) fn answer(&self, query: Query) -> QueryReply {
        let home = self.home.borrow();
        let stats = |c: &HomeChannel| ChannelStats {
            subscription_count: c.total,
            user_count: c.user_count(),
        };
        match query {
            Query::Channel { key, cache } => {
                let counts = home.get(&key).map(stats).unwrap_or_default();
                let cached = cache.then(|| {
                    let cache = self.cache.borrow();
                    let (frame, left) = cache.get(&key, Instant::now())?;
                    Some(CachedEvent {
                        frame: frame.clone(),
                        ttl_secs: left.as_secs(),
                    })
                });
                QueryReply::Channel(counts, cached.flatten())
            }
            Query::Users(key) => QueryReply::Users(
                home.get(&key)
                    .and_then(|c| c.members.as_ref())
                    .map(|m| m.iter().map(|(id, _)| id.clone()).collect())
                    .unwrap_or_default(),
            ),
            Query::List { app, prefix } => QueryReply::List(
                home.occupied(app, &prefix)
                    .filter(|(k, _)| !k.name.starts_with('#'))
                    .map(|(k, c)| (k.name.to_string(), stats(c)))
                    .collect(),
            ),
            Query::Barrier => QueryReply::Barrier,
        }
    }
}
