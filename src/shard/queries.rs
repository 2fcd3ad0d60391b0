//! What the HTTP API asks of the runtime, one async method per question, each returning its own
//! type. Counts come from each channel's home shard, so they are exact across shards; in a
//! cluster they come from Redis, where every node keeps its share (`cluster::state`).

use super::messages::{CachedEvent, ChannelInfo, ChannelStats, ClusterUnavailable, Publication};
use super::Shard;
use crate::channels::ChannelKey;
use crate::cluster::state::{self, ClusterStats};

impl From<ClusterStats> for ChannelStats {
    fn from(stats: ClusterStats) -> ChannelStats {
        ChannelStats {
            subscription_count: stats.subscription_count,
            user_count: stats.user_count,
        }
    }
}

/// The tickets of one `publish_all`, closed when it ends, however it ends (a request dropped at
/// its deadline too), so that a late refusal finds no ticket and nothing is kept for it.
struct Tickets<'a> {
    shard: &'a Shard,
    ids: Vec<u64>,
}

impl Drop for Tickets<'_> {
    fn drop(&mut self) {
        let mut open = self.shard.open_tickets.borrow_mut();
        for id in &self.ids {
            open.remove(id);
        }
    }
}

impl Shard {
    /// Publishes every publication, then waits until the channels' home shards have handled
    /// them, so that a publisher who waits for its HTTP response sees its events delivered in
    /// order even when its next request lands on another shard. Returns how many could not be
    /// passed on to the other nodes of a cluster (0 on a single node).
    pub async fn publish_all(&self, publications: Vec<Publication>) -> usize {
        let mut homes: Vec<usize> = publications
            .iter()
            .map(|p| p.key.home(self.node.shards))
            .collect();
        let mut tickets = Tickets {
            shard: self,
            ids: Vec::new(),
        };
        for mut publication in publications {
            // Only a cluster can refuse a publication: a single node takes no ticket.
            if self.cluster.is_some() {
                let ticket = self.new_id();
                publication.ticket = Some((self.id, ticket));
                self.open_tickets.borrow_mut().insert(ticket, false);
                tickets.ids.push(ticket);
            }
            self.publish(publication);
        }
        self.handle_own_messages();
        self.barriers(&mut homes).await;
        // A refusal arrives before its home's barrier answer (one queue per pair of shards).
        let open = self.open_tickets.borrow();
        let refused = tickets.ids.iter().filter(|t| open.get(t) == Some(&true));
        refused.count()
    }

    /// Waits until each of `homes` has handled everything this shard sent it so far.
    async fn barriers(&self, homes: &mut Vec<usize>) {
        homes.sort_unstable();
        homes.dedup();
        for &home in homes.iter() {
            self.mesh.barrier(self.id, home).await;
        }
    }

    /// A channel's counts and, with `with_cache`, its cached event (cache channels).
    pub async fn channel_info(
        &self,
        key: ChannelKey,
        with_cache: bool,
    ) -> Result<ChannelInfo, ClusterUnavailable> {
        let home = key.home(self.node.shards);
        let Some(cluster) = &self.cluster else {
            return Ok(self.mesh.ask_channel(self.id, home, key, with_cache).await);
        };
        let topic = self.topic_of(cluster, &key);
        let reply = cluster.link.ask(&cluster.state.channel_stats(&topic)).await;
        let stats = reply.as_ref().and_then(state::stats_of);
        let stats = stats.ok_or(ClusterUnavailable)?;
        let cached = match with_cache {
            true => {
                let app = self.node.apps.get_full(key.app);
                let app_id = &app.id;
                let ask = cluster.state.cached(&topic, (app_id, &key.name), 0);
                let reply = cluster.link.ask(&ask).await;
                let cached = reply.as_ref().and_then(state::cached_of);
                let cached = cached.ok_or(ClusterUnavailable)?;
                cached.and_then(|(payload, ttl_ms)| {
                    Some(CachedEvent {
                        frame: Self::cached_frame(&payload)?,
                        ttl_secs: ttl_ms / 1000,
                    })
                })
            }
            false => None,
        };
        Ok(ChannelInfo {
            stats: stats.into(),
            cached,
        })
    }

    /// A channel's counts.
    pub async fn channel_stats(&self, key: ChannelKey) -> Result<ChannelStats, ClusterUnavailable> {
        Ok(self.channel_info(key, false).await?.stats)
    }

    /// The user ids of a presence channel (in join order on a single node).
    pub async fn presence_user_ids(
        &self,
        key: ChannelKey,
    ) -> Result<Vec<String>, ClusterUnavailable> {
        let Some(cluster) = &self.cluster else {
            let home = key.home(self.node.shards);
            return Ok(self.mesh.ask_presence_users(self.id, home, key).await);
        };
        let topic = self.topic_of(cluster, &key);
        let reply = cluster.link.ask(&cluster.state.members(&topic)).await;
        let members = reply.as_ref().and_then(state::members_of);
        let members = members.ok_or(ClusterUnavailable)?;
        Ok(members.into_iter().map(|(user_id, _)| user_id).collect())
    }

    /// The occupied channels of `app` whose names start with `prefix`, sorted by name, from
    /// every shard (every node in a cluster).
    pub async fn occupied_channels(
        &self,
        app: u32,
        prefix: &str,
    ) -> Result<Vec<(String, ChannelStats)>, ClusterUnavailable> {
        let mut all = Vec::new();
        if let Some(cluster) = &self.cluster {
            let app = self.node.apps.get_full(app);
            let app_id = &app.id;
            let reply = cluster
                .link
                .ask(&cluster.state.channels(app_id, prefix))
                .await;
            let channels = reply.as_ref().and_then(state::channels_of);
            let channels = channels.ok_or(ClusterUnavailable)?;
            // Signed-in users are channels inside, never listed.
            let listed = channels
                .into_iter()
                .filter(|(name, _)| !name.starts_with('#'));
            all.extend(listed.map(|(name, stats)| (name, stats.into())));
        } else {
            for shard in 0..self.node.shards {
                let list = self
                    .mesh
                    .ask_occupied(self.id, shard, app, prefix.to_owned());
                all.extend(list.await);
            }
        }
        all.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(all)
    }

    /// Closes every connection signed in as the user, on every shard, and waits until the
    /// user's home has sent the closes out.
    pub async fn terminate_user_connections(&self, key: ChannelKey) {
        let mut home = vec![key.home(self.node.shards)];
        self.terminate_user(key);
        self.handle_own_messages();
        self.barriers(&mut home).await;
    }
}
