//! channel -> this shard's confirmed subscribers. The fanout loop walks a plain Vec.

use super::ChannelKey;
use crate::shard::conn::Conn;
use ahash::AHashMap;
use std::rc::Rc;

#[derive(Default)]
pub struct LocalChannels {
    channels: AHashMap<ChannelKey, Vec<Rc<Conn>>>,
}

impl LocalChannels {
    pub fn add(&mut self, key: ChannelKey, conn: Rc<Conn>) {
        self.channels.entry(key).or_default().push(conn);
    }

    /// Removes one socket; drops the channel entry when it was the last. Compares addresses, so
    /// the scan of a large channel reads only the Vec, never the connections themselves.
    pub fn remove(&mut self, key: &ChannelKey, conn: &Conn) {
        if let Some(subs) = self.channels.get_mut(key) {
            if let Some(i) = subs.iter().position(|c| std::ptr::eq(Rc::as_ptr(c), conn)) {
                subs.swap_remove(i);
            }
            if subs.is_empty() {
                self.channels.remove(key);
            }
        }
    }

    pub fn subscribers(&self, key: &ChannelKey) -> &[Rc<Conn>] {
        self.channels.get(key).map_or(&[], Vec::as_slice)
    }

    pub fn len(&self) -> usize {
        self.channels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.channels.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_remove_and_cleanup() {
        let mut t = LocalChannels::default();
        let key = ChannelKey::new(0, "a");
        let (one, two) = (
            Rc::new(Conn::new(1, 0, 0, 1.0)),
            Rc::new(Conn::new(2, 0, 0, 1.0)),
        );
        let stranger = Conn::new(1, 0, 0, 1.0);
        t.add(key.clone(), one.clone());
        t.add(key.clone(), two.clone());
        assert_eq!(t.subscribers(&key).len(), 2);
        t.remove(&key, &one);
        assert_eq!(t.subscribers(&key)[0].id, 2);
        t.remove(&key, &stranger);
        assert_eq!(
            t.subscribers(&key).len(),
            1,
            "same id, other connection: kept"
        );
        t.remove(&key, &two);
        assert!(t.is_empty());
    }
}
