//! The home shard's view of its channels: subscriber counts per shard (to route a publish only to
//! shards that have subscribers, and to answer the HTTP API exactly) and presence members.

use super::ChannelKey;
use crate::protocol::events::PresenceMember;
use crate::protocol::json::push_str_literal;
use ahash::AHashMap;
use std::collections::hash_map::Entry;

/// A user in a presence channel, however many of their sockets joined it.
pub struct Member {
    /// The presence `user_id`.
    pub user_id: String,
    /// Compact JSON of the first socket's `user_info` (kept until that user leaves).
    pub user_info: String,
    /// The user's sockets in the channel, on all shards.
    pub sockets: u32,
}

/// One channel as its home shard counts it. Owned by the home shard's `HomeChannels`.
pub struct HomeChannel {
    /// Subscribed sockets on each shard.
    pub per_shard: Vec<u32>,
    /// Subscribed sockets on all shards.
    pub total: u32,
    /// Presence channels only: the members on this node, in join order.
    pub members: Option<Vec<Member>>,
    /// In a cluster, once Redis has told this node the channel's members: every member of the
    /// cluster, as this node's subscribers were told them (user id -> info). It always holds
    /// the local members. None: the local members are all there is (a single node, or Redis
    /// not heard yet).
    pub roster: Option<AHashMap<String, String>>,
    /// In a cluster, for `subscription_count` events: the other nodes' subscriber counts, once
    /// Redis has told them (None: not yet, or not needed).
    pub remote_counts: Option<AHashMap<String, u32>>,
    /// In a cluster: the token of the latest request for this channel's view; a reply with
    /// another (for an earlier life of the channel, or overtaken) is not taken.
    pub sync_token: Option<u64>,
    /// When `pusher_internal:subscription_count` last went out, and whether a change since then
    /// is waiting for the throttle (busy channels get it at most every few seconds).
    pub count_sent: Option<std::time::Instant>,
    /// A count change waits for the throttle (the sweeper sends it).
    pub count_pending: bool,
    /// This node's own count changed since the last `subscription_count` went out (in a
    /// cluster, only that node reports the change to webhooks).
    pub count_changed_here: bool,
}

/// What a join did to a presence channel.
#[derive(Debug, PartialEq, Eq)]
pub enum Joined {
    /// Another socket of a user already in the channel (or not a presence channel).
    Socket,
    /// The user's first socket: announce `member_added`.
    NewMember,
}

impl HomeChannel {
    fn new(shards: usize) -> HomeChannel {
        HomeChannel {
            per_shard: vec![0; shards],
            total: 0,
            members: None,
            roster: None,
            remote_counts: None,
            sync_token: None,
            count_sent: None,
            count_pending: false,
            count_changed_here: false,
        }
    }

    /// Subscribed sockets on this node and, where known, on the other nodes.
    pub fn cluster_total(&self) -> u32 {
        let remote = self.remote_counts.as_ref();
        let others = remote.map_or(0, |counts| counts.values().copied().sum::<u32>());
        self.total.saturating_add(others)
    }

    /// Distinct users in a presence channel (0 for other channels).
    pub fn user_count(&self) -> u32 {
        self.view_len() as u32
    }

    /// The members as subscribers know them: the roster, or the local members.
    pub fn member_view(&self) -> impl Iterator<Item = (&str, &str)> + Clone {
        let roster = self.roster.iter().flatten();
        let roster = roster.map(|(u, i)| (u.as_str(), i.as_str()));
        let local = self.roster.is_none().then(|| self.local_members());
        roster.chain(local.into_iter().flatten())
    }

    /// The members on this node (user id, info).
    pub fn local_members(&self) -> impl Iterator<Item = (&str, &str)> + Clone {
        let members = self.members.as_deref().unwrap_or(&[]);
        members
            .iter()
            .map(|m| (m.user_id.as_str(), m.user_info.as_str()))
    }

    fn view_len(&self) -> usize {
        match &self.roster {
            Some(roster) => roster.len(),
            None => self.members.as_ref().map_or(0, Vec::len),
        }
    }

    fn in_view(&self, user_id: &str) -> bool {
        match &self.roster {
            Some(roster) => roster.contains_key(user_id),
            None => self.is_local_member(user_id),
        }
    }

    /// The user has a socket on this node in the channel.
    pub fn is_local_member(&self, user_id: &str) -> bool {
        let members = self.members.as_deref().unwrap_or(&[]);
        members.iter().any(|m| m.user_id == user_id)
    }

    /// A member joined somewhere: true when subscribers have to be told (`member_added`).
    /// Without a roster (a single node) that is the local rule, given as `new_locally`.
    pub fn add_to_view(&mut self, user_id: &str, user_info: &str, new_locally: bool) -> bool {
        match &mut self.roster {
            Some(roster) if roster.contains_key(user_id) => false,
            Some(roster) => {
                roster.insert(user_id.to_owned(), user_info.to_owned());
                true
            }
            None => new_locally,
        }
    }

    /// A member left the cluster: true when subscribers have to be told (`member_removed`).
    /// A user with a socket here has not left, whatever another node says.
    pub fn remove_from_view(&mut self, user_id: &str) -> bool {
        if self.is_local_member(user_id) {
            return false;
        }
        self.roster
            .as_mut()
            .is_some_and(|roster| roster.remove(user_id).is_some())
    }

    /// Takes Redis's member list (plus the local members, who may have joined since it was
    /// taken) as the roster, and returns what subscribers have to be told: members added (id,
    /// info) and removed. With `additions_only`, members missing from the list are kept.
    pub fn set_roster(
        &mut self,
        members: Vec<(String, String)>,
        additions_only: bool,
    ) -> (Vec<(String, String)>, Vec<String>) {
        let mut roster: AHashMap<String, String> = members.into_iter().collect();
        if additions_only {
            for (user_id, user_info) in self.member_view() {
                if !roster.contains_key(user_id) {
                    roster.insert(user_id.to_owned(), user_info.to_owned());
                }
            }
        }
        for (user_id, user_info) in self.local_members() {
            if !roster.contains_key(user_id) {
                roster.insert(user_id.to_owned(), user_info.to_owned());
            }
        }
        let told: AHashMap<&str, &str> = self.member_view().collect();
        let added = roster
            .iter()
            .filter(|(u, _)| !told.contains_key(u.as_str()))
            .map(|(u, i)| (u.clone(), i.clone()))
            .collect();
        let removed = told
            .keys()
            .filter(|u| !roster.contains_key(**u))
            .map(|u| u.to_string())
            .collect();
        self.roster = Some(roster);
        (added, removed)
    }

    /// Shards that have at least one subscriber.
    pub fn shards(&self) -> impl Iterator<Item = usize> + '_ {
        self.per_shard
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(i, _)| i)
    }

    /// `{"presence":{"ids":[..],"hash":{..},"count":n}}`: every id is a key of `hash`.
    pub fn presence_json(&self) -> String {
        let members = self.member_view();
        let count = self.view_len();
        let mut out = Vec::with_capacity(40 + count * 32);
        out.extend_from_slice(b"{\"presence\":{\"ids\":[");
        for (i, (user_id, _)) in members.clone().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            push_str_literal(&mut out, user_id);
        }
        out.extend_from_slice(b"],\"hash\":{");
        for (i, (user_id, user_info)) in members.enumerate() {
            if i > 0 {
                out.push(b',');
            }
            push_str_literal(&mut out, user_id);
            out.push(b':');
            out.extend_from_slice(user_info.as_bytes());
        }
        out.extend_from_slice(format!("}},\"count\":{count}}}}}").as_bytes());
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Counts a channel in or out of the shard's channel gauge (users' `#server-to-user-` channels
/// are not channels to an operator).
fn count_channel(key: &ChannelKey, n: i64) {
    if !key.name.starts_with('#') {
        let channels = &crate::metrics::here().channels;
        crate::metrics::ShardMetrics::app_gauge(channels, key.app, n);
    }
}

/// Every channel homed on one shard that has subscribers anywhere. Owned by that shard.
pub struct HomeChannels {
    shards: usize,
    channels: AHashMap<ChannelKey, HomeChannel>,
}

impl HomeChannels {
    /// An empty table for a process of `shards` shards.
    pub fn new(shards: usize) -> HomeChannels {
        HomeChannels {
            shards,
            channels: AHashMap::new(),
        }
    }

    /// The channel, if it has subscribers.
    pub fn get(&self, key: &ChannelKey) -> Option<&HomeChannel> {
        self.channels.get(key)
    }

    /// The channel, if it has subscribers, for changing its throttle state.
    pub fn get_mut(&mut self, key: &ChannelKey) -> Option<&mut HomeChannel> {
        self.channels.get_mut(key)
    }

    /// Counts a socket from `shard`. For presence, `member` is the socket's user and
    /// `max_members` caps distinct users: a new user over the cap is refused.
    pub fn join(
        &mut self,
        key: &ChannelKey,
        shard: usize,
        member: Option<&PresenceMember>,
        max_members: u32,
    ) -> Result<Joined, String> {
        let shards = self.shards;
        let channel = match self.channels.entry(key.clone()) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                count_channel(key, 1);
                e.insert(HomeChannel::new(shards))
            }
        };
        let mut joined = Joined::Socket;
        if let Some(joining) = member {
            // The cap counts the members of the cluster where they are known.
            let full =
                !channel.in_view(&joining.user_id) && channel.view_len() as u32 >= max_members;
            let members = channel.members.get_or_insert_with(Vec::new);
            match members.iter_mut().find(|m| m.user_id == joining.user_id) {
                Some(m) => m.sockets += 1,
                None => {
                    if full {
                        if channel.total == 0 {
                            self.channels.remove(key);
                            count_channel(key, -1);
                        }
                        return Err(format!(
                            "Presence channel {} is full: it allows {max_members} members",
                            key.name
                        ));
                    }
                    members.push(Member {
                        user_id: joining.user_id.clone(),
                        user_info: joining.user_info.clone(),
                        sockets: 1,
                    });
                    let members = &crate::metrics::here().presence_members;
                    crate::metrics::ShardMetrics::app_gauge(members, key.app, 1);
                    joined = Joined::NewMember;
                }
            }
        }
        channel.per_shard[shard] += 1;
        channel.total += 1;
        Ok(joined)
    }

    /// Uncounts a socket. Returns true when it was the user's last socket (announce `member_removed`).
    pub fn leave(&mut self, key: &ChannelKey, shard: usize, user_id: Option<&str>) -> bool {
        let Some(channel) = self.channels.get_mut(key) else {
            return false;
        };
        channel.per_shard[shard] = channel.per_shard[shard].saturating_sub(1);
        channel.total = channel.total.saturating_sub(1);
        let mut last = false;
        if let (Some(user_id), Some(members)) = (user_id, channel.members.as_mut()) {
            if let Some(i) = members.iter().position(|m| m.user_id == user_id) {
                members[i].sockets -= 1;
                if members[i].sockets == 0 {
                    members.remove(i);
                    let members = &crate::metrics::here().presence_members;
                    crate::metrics::ShardMetrics::app_gauge(members, key.app, -1);
                    last = true;
                }
            }
        }
        if channel.total == 0 {
            self.channels.remove(key);
            count_channel(key, -1);
        }
        last
    }

    /// Occupied channels of `app` whose name starts with `prefix`.
    pub fn occupied<'a>(
        &'a self,
        app: u32,
        prefix: &'a str,
    ) -> impl Iterator<Item = (&'a ChannelKey, &'a HomeChannel)> {
        self.channels
            .iter()
            .filter(move |(k, c)| k.app == app && c.total > 0 && k.name.starts_with(prefix))
    }

    /// Every channel homed here that has subscribers.
    pub fn iter(&self) -> impl Iterator<Item = (&ChannelKey, &HomeChannel)> {
        self.channels.iter()
    }

    /// Channels homed here that have subscribers.
    pub fn len(&self) -> usize {
        self.channels.len()
    }

    /// No channel homed here has subscribers.
    pub fn is_empty(&self) -> bool {
        self.channels.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(user_id: &str, user_info: &str) -> PresenceMember {
        PresenceMember {
            user_id: user_id.into(),
            user_info: user_info.into(),
        }
    }

    #[test]
    fn one_member_per_user_however_many_sockets() {
        let mut h = HomeChannels::new(2);
        let k = ChannelKey::new(0, "presence-r");
        assert_eq!(
            h.join(&k, 0, Some(&member("1", "{\"n\":1}")), 100),
            Ok(Joined::NewMember)
        );
        assert_eq!(
            h.join(&k, 1, Some(&member("1", "{\"n\":2}")), 100),
            Ok(Joined::Socket)
        );
        assert_eq!(
            h.join(&k, 1, Some(&member("2", "null")), 100),
            Ok(Joined::NewMember)
        );
        let c = h.get(&k).unwrap();
        assert_eq!(
            (c.total, c.user_count(), c.per_shard.clone()),
            (3, 2, vec![1, 2])
        );
        // The first socket's info is kept.
        assert_eq!(
            c.presence_json(),
            r#"{"presence":{"ids":["1","2"],"hash":{"1":{"n":1},"2":null},"count":2}}"#
        );
        assert!(!h.leave(&k, 0, Some("1")));
        assert!(h.leave(&k, 1, Some("1")));
        assert!(h.leave(&k, 1, Some("2")));
        assert!(h.get(&k).is_none(), "an empty channel is dropped");
    }

    #[test]
    fn member_limit_refuses_new_users_only() {
        let mut h = HomeChannels::new(1);
        let k = ChannelKey::new(0, "presence-r");
        h.join(&k, 0, Some(&member("1", "null")), 1).unwrap();
        assert!(h.join(&k, 0, Some(&member("2", "null")), 1).is_err());
        assert_eq!(
            h.join(&k, 0, Some(&member("1", "null")), 1),
            Ok(Joined::Socket)
        );
        assert_eq!(h.get(&k).unwrap().total, 2);
        let empty = ChannelKey::new(0, "presence-e");
        assert!(h.join(&empty, 0, Some(&member("1", "null")), 0).is_err());
        assert!(h.get(&empty).is_none());
    }

    #[test]
    fn shards_with_subscribers_and_prefix_listing() {
        let mut h = HomeChannels::new(3);
        let a = ChannelKey::new(0, "news");
        let b = ChannelKey::new(1, "news");
        h.join(&a, 2, None, 100).unwrap();
        h.join(&b, 0, None, 100).unwrap();
        assert_eq!(h.get(&a).unwrap().shards().collect::<Vec<_>>(), vec![2]);
        assert_eq!(h.occupied(0, "ne").count(), 1);
        assert_eq!(h.occupied(0, "x").count(), 0);
        assert!(!h.leave(&a, 2, None));
        assert_eq!(h.len(), 1);
    }
}
