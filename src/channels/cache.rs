//! Cache channels (reference §3.8): the home shard keeps the last event published through the
//! HTTP API to each cache channel, as the complete frame, until its TTL runs out.

use super::ChannelKey;
use ahash::AHashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Cached {
    frame: Arc<[u8]>,
    expires: Instant,
}

/// The last event of each cache channel homed on this shard, owned by the shard (`Shard::cache`)
/// and used only on its home side: stored on publish, read on subscribe and by the HTTP API.
#[derive(Default)]
pub struct ChannelCache {
    entries: AHashMap<ChannelKey, Cached>,
}

impl ChannelCache {
    /// Keeps `frame` as the channel's last event for `ttl` from `now`, replacing any earlier one.
    pub fn store(&mut self, key: &ChannelKey, frame: Arc<[u8]>, ttl: Duration, now: Instant) {
        let entry = Cached {
            frame,
            expires: now + ttl,
        };
        match self.entries.get_mut(key) {
            Some(slot) => *slot = entry,
            None => {
                self.entries.insert(key.clone(), entry);
            }
        }
    }

    /// The cached frame and its remaining lifetime, if any is still live.
    pub fn get(&self, key: &ChannelKey, now: Instant) -> Option<(&Arc<[u8]>, Duration)> {
        self.entries
            .get(key)
            .filter(|c| c.expires > now)
            .map(|c| (&c.frame, c.expires - now))
    }

    /// Drops expired entries (memory is bounded by the TTL, not by reads); the shard's sweeper
    /// calls it once a minute.
    pub fn purge(&mut self, now: Instant) {
        self.entries.retain(|_, c| c.expires > now);
    }

    /// Channels with an entry, live or expired but not yet purged.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no channel has an entry.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_event_until_the_ttl() {
        let mut cache = ChannelCache::default();
        let key = ChannelKey::new(0, "cache-a");
        let t0 = Instant::now();
        let ttl = Duration::from_secs(10);
        assert!(cache.get(&key, t0).is_none());
        cache.store(&key, Arc::from(&b"first"[..]), ttl, t0);
        cache.store(&key, Arc::from(&b"second"[..]), ttl, t0);
        let (frame, left) = cache.get(&key, t0 + Duration::from_secs(4)).unwrap();
        assert_eq!(&frame[..], b"second");
        assert_eq!(left, Duration::from_secs(6));
        assert!(cache.get(&key, t0 + ttl).is_none());
        cache.purge(t0 + ttl);
        assert!(cache.is_empty());
    }
}
