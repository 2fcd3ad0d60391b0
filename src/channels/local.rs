//! One shard's table of which of its own sockets are in each channel: the list the fanout walks.
//! Generic over the subscriber type so that this layer does not depend on the shard runtime that
//! owns the connections (the runtime uses `LocalChannels<Conn>`).

use super::ChannelKey;
use ahash::AHashMap;
use std::rc::Rc;

/// channel -> this shard's confirmed subscribers, in a plain `Vec` for the fanout loop. Owned by
/// one shard and touched only by it.
pub struct LocalChannels<S> {
    channels: AHashMap<ChannelKey, Vec<Rc<S>>>,
}

impl<S> Default for LocalChannels<S> {
    fn default() -> Self {
        LocalChannels {
            channels: AHashMap::new(),
        }
    }
}

impl<S> LocalChannels<S> {
    /// Adds a subscriber (the caller makes sure it is not in the channel yet).
    pub fn add(&mut self, key: ChannelKey, subscriber: Rc<S>) {
        self.channels.entry(key).or_default().push(subscriber);
    }

    /// Removes one subscriber; drops the channel entry when it was the last. Compares addresses,
    /// so the scan of a large channel reads only the Vec, never the subscribers themselves.
    pub fn remove(&mut self, key: &ChannelKey, subscriber: &S) {
        if let Some(subs) = self.channels.get_mut(key) {
            if let Some(i) = subs
                .iter()
                .position(|c| std::ptr::eq(Rc::as_ptr(c), subscriber))
            {
                subs.swap_remove(i);
            }
            if subs.is_empty() {
                self.channels.remove(key);
            }
        }
    }

    /// The channel's subscribers on this shard (empty when it has none).
    pub fn subscribers(&self, key: &ChannelKey) -> &[Rc<S>] {
        self.channels.get(key).map_or(&[], Vec::as_slice)
    }

    /// Channels with at least one subscriber on this shard.
    pub fn len(&self) -> usize {
        self.channels.len()
    }

    /// No channel has a subscriber on this shard.
    pub fn is_empty(&self) -> bool {
        self.channels.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Socket(u64);

    #[test]
    fn add_remove_and_cleanup() {
        let mut t = LocalChannels::default();
        let key = ChannelKey::new(0, "a");
        let (one, two) = (Rc::new(Socket(1)), Rc::new(Socket(2)));
        let stranger = Socket(1);
        t.add(key.clone(), one.clone());
        t.add(key.clone(), two.clone());
        assert_eq!(t.subscribers(&key).len(), 2);
        t.remove(&key, &one);
        assert_eq!(t.subscribers(&key)[0].0, 2);
        t.remove(&key, &stranger);
        assert_eq!(
            t.subscribers(&key).len(),
            1,
            "same id, other subscriber: kept"
        );
        t.remove(&key, &two);
        assert!(t.is_empty());
    }
}
