//! What the HTTP API asks of the runtime, one async method per question, each returning its own
//! type. Counts come from each channel's home shard, so they are exact across shards.

use super::messages::{ChannelInfo, ChannelStats, Publication};
use super::Shard;
use crate::channels::ChannelKey;

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
    pub async fn channel_info(&self, key: ChannelKey, with_cache: bool) -> ChannelInfo {
        let home = key.home(self.node.shards);
        self.mesh.ask_channel(self.id, home, key, with_cache).await
    }

    /// A channel's counts.
    pub async fn channel_stats(&self, key: ChannelKey) -> ChannelStats {
        self.channel_info(key, false).await.stats
    }

    /// The user ids of a presence channel, in join order.
    pub async fn presence_user_ids(&self, key: ChannelKey) -> Vec<String> {
        let home = key.home(self.node.shards);
        self.mesh.ask_presence_users(self.id, home, key).await
    }

    /// The occupied channels of `app` whose names start with `prefix`, sorted by name, from
    /// every shard.
    pub async fn occupied_channels(&self, app: u32, prefix: &str) -> Vec<(String, ChannelStats)> {
        let mut all = Vec::new();
        for shard in 0..self.node.shards {
            let list = self
                .mesh
                .ask_occupied(self.id, shard, app, prefix.to_owned());
            all.extend(list.await);
        }
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
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
