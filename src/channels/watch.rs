//! Watchlists (reference §3.7), on the home shard of each watched user: how many connections on
//! each shard watch that user, so a change of online status costs one message per such shard.

use super::ChannelKey;
use ahash::AHashMap;

/// Watchers per shard of each user homed on this shard, owned by the shard (`Shard::watchers`)
/// and changed only by watch/unwatch messages from the shards where the watchers are.
pub struct WatchCounts {
    shards: usize,
    /// The watched user's `#server-to-user-` key -> watchers per shard.
    watched: AHashMap<ChannelKey, Vec<u32>>,
}

impl WatchCounts {
    /// An empty registry for a server of `shards` shards.
    pub fn new(shards: usize) -> WatchCounts {
        WatchCounts {
            shards,
            watched: AHashMap::new(),
        }
    }

    /// One more connection on `shard` watches the user `key`.
    pub fn watch(&mut self, key: &ChannelKey, shard: usize) {
        let shards = self.shards;
        self.watched
            .entry(key.clone())
            .or_insert_with(|| vec![0; shards])[shard] += 1;
    }

    /// One fewer connection on `shard` watches the user; a user nobody watches is forgotten.
    pub fn unwatch(&mut self, key: &ChannelKey, shard: usize) {
        if let Some(counts) = self.watched.get_mut(key) {
            counts[shard] = counts[shard].saturating_sub(1);
            if counts.iter().all(|&n| n == 0) {
                self.watched.remove(key);
            }
        }
    }

    /// Shards with at least one connection watching the user.
    pub fn shards(&self, key: &ChannelKey) -> Vec<usize> {
        self.watched.get(key).map_or_else(Vec::new, |counts| {
            counts
                .iter()
                .enumerate()
                .filter(|(_, n)| **n > 0)
                .map(|(i, _)| i)
                .collect()
        })
    }

    /// Users watched by at least one connection.
    pub fn len(&self) -> usize {
        self.watched.len()
    }

    /// Whether no user is watched.
    pub fn is_empty(&self) -> bool {
        self.watched.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_watchers_per_shard_and_forgets_unwatched_users() {
        let mut w = WatchCounts::new(3);
        let k = ChannelKey::new(0, "#server-to-user-7");
        w.watch(&k, 2);
        w.watch(&k, 2);
        w.watch(&k, 0);
        assert_eq!(w.shards(&k), vec![0, 2]);
        w.unwatch(&k, 2);
        w.unwatch(&k, 0);
        assert_eq!(w.shards(&k), vec![2]);
        w.unwatch(&k, 2);
        assert!(w.is_empty());
        w.unwatch(&k, 1);
        assert!(w.shards(&k).is_empty());
    }
}
