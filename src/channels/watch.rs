//! Watchlists (reference §3.7), on the home shard of each watched user: how many connections on
//! each shard watch that user, so a change of online status costs one message per such shard.

use super::ChannelKey;
use ahash::{AHashMap, AHashSet};

/// Watchers per shard of each user homed on this shard, owned by the shard (`Shard::watchers`)
/// and changed only by watch/unwatch messages from the shards where the watchers are.
pub struct WatchCounts {
    shards: usize,
    /// The watched user's `#server-to-user-` key -> its watchers.
    watched: AHashMap<ChannelKey, Watched>,
}

/// One watched user.
struct Watched {
    /// Watching connections on each shard.
    per_shard: Vec<u32>,
    /// In a cluster: the other nodes where the user is online, once Redis has said (None: not
    /// yet, or a single node).
    elsewhere: Option<AHashSet<String>>,
    /// Watches (shard, connection) whose answer waits for `elsewhere`.
    waiting: Vec<(usize, u64)>,
}

impl WatchCounts {
    /// An empty registry for a server of `shards` shards.
    pub fn new(shards: usize) -> WatchCounts {
        WatchCounts {
            shards,
            watched: AHashMap::new(),
        }
    }

    /// One more connection on `shard` watches the user `key`. True for the node's first.
    pub fn watch(&mut self, key: &ChannelKey, shard: usize) -> bool {
        let shards = self.shards;
        let mut first = false;
        let watched = self.watched.entry(key.clone()).or_insert_with(|| {
            first = true;
            Watched {
                per_shard: vec![0; shards],
                elsewhere: None,
                waiting: Vec::new(),
            }
        });
        watched.per_shard[shard] += 1;
        first
    }

    /// One fewer connection on `shard` watches the user; a user nobody watches is forgotten
    /// (true then).
    pub fn unwatch(&mut self, key: &ChannelKey, shard: usize) -> bool {
        let Some(watched) = self.watched.get_mut(key) else {
            return false;
        };
        watched.per_shard[shard] = watched.per_shard[shard].saturating_sub(1);
        let forgotten = watched.per_shard.iter().all(|&n| n == 0);
        if forgotten {
            self.watched.remove(key);
        }
        forgotten
    }

    /// Someone on this node watches the user.
    pub fn is_watched(&self, key: &ChannelKey) -> bool {
        self.watched.contains_key(key)
    }

    /// Shards with at least one connection watching the user.
    pub fn shards(&self, key: &ChannelKey) -> Vec<usize> {
        self.watched.get(key).map_or_else(Vec::new, |w| {
            w.per_shard
                .iter()
                .enumerate()
                .filter(|(_, n)| **n > 0)
                .map(|(i, _)| i)
                .collect()
        })
    }

    /// Whether the user is online on another node: None while unknown.
    pub fn online_elsewhere(&self, key: &ChannelKey) -> Option<bool> {
        let elsewhere = self.watched.get(key)?.elsewhere.as_ref()?;
        Some(!elsewhere.is_empty())
    }

    /// Keeps a watch's answer until `online_elsewhere` is known.
    pub fn wait(&mut self, key: &ChannelKey, shard: usize, conn: u64) {
        if let Some(watched) = self.watched.get_mut(key) {
            watched.waiting.push((shard, conn));
        }
    }

    /// Sets the nodes where the user is online; returns the watches that waited for it.
    pub fn set_elsewhere(
        &mut self,
        key: &ChannelKey,
        owners: AHashSet<String>,
    ) -> Vec<(usize, u64)> {
        let Some(watched) = self.watched.get_mut(key) else {
            return Vec::new();
        };
        watched.elsewhere = Some(owners);
        std::mem::take(&mut watched.waiting)
    }

    /// The watches still waiting for `online_elsewhere` (answered with what is known now).
    pub fn take_waiting(&mut self, key: &ChannelKey) -> Vec<(usize, u64)> {
        let watched = self.watched.get_mut(key);
        watched.map_or_else(Vec::new, |w| std::mem::take(&mut w.waiting))
    }

    /// Another node's count of the user's connections changed (where it is known).
    pub fn note_count(&mut self, key: &ChannelKey, owner: &str, count: u32) {
        let Some(elsewhere) = self.watched.get_mut(key).and_then(|w| w.elsewhere.as_mut()) else {
            return;
        };
        match count {
            0 => elsewhere.remove(owner),
            _ => elsewhere.insert(owner.to_owned()),
        };
    }

    /// Every watched user.
    pub fn keys(&self) -> impl Iterator<Item = &ChannelKey> {
        self.watched.keys()
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
        assert!(w.watch(&k, 2), "the node's first watcher");
        assert!(!w.watch(&k, 2));
        w.watch(&k, 0);
        assert_eq!(w.shards(&k), vec![0, 2]);
        assert!(!w.unwatch(&k, 2));
        w.unwatch(&k, 0);
        assert_eq!(w.shards(&k), vec![2]);
        assert!(w.unwatch(&k, 2), "the last watcher");
        assert!(w.is_empty());
        w.unwatch(&k, 1);
        assert!(w.shards(&k).is_empty());
    }

    #[test]
    fn status_elsewhere_is_unknown_until_set_then_follows_counts() {
        let mut w = WatchCounts::new(1);
        let k = ChannelKey::new(0, "#server-to-user-7");
        w.watch(&k, 0);
        assert_eq!(w.online_elsewhere(&k), None);
        w.wait(&k, 0, 11);
        w.note_count(&k, "n2", 1);
        assert_eq!(
            w.online_elsewhere(&k),
            None,
            "counts before the snapshot are in it"
        );
        let waiting = w.set_elsewhere(&k, ["n1".to_owned()].into_iter().collect());
        assert_eq!(waiting, vec![(0, 11)]);
        assert_eq!(w.online_elsewhere(&k), Some(true));
        w.note_count(&k, "n1", 0);
        assert_eq!(w.online_elsewhere(&k), Some(false));
        w.note_count(&k, "n3", 2);
        assert_eq!(w.online_elsewhere(&k), Some(true));
    }
}
