//! Channel state. `local`: which of this shard's sockets are in a channel. `home`: the cross-shard
//! view kept by the channel's home shard (per-shard subscriber counts, presence members).

pub mod home;
pub mod local;

/// An app's channel. Owned strings so it can cross shards.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ChannelKey {
    pub app: u32,
    pub name: Box<str>,
}

impl ChannelKey {
    pub fn new(app: u32, name: &str) -> ChannelKey {
        ChannelKey {
            app,
            name: name.into(),
        }
    }

    /// The shard that owns this channel's cross-shard view. Stable for the life of the process.
    pub fn home(&self, shards: usize) -> usize {
        // FNV-1a: deterministic across threads (unlike a randomly seeded hasher).
        let mut h: u64 = 0xcbf29ce484222325;
        for b in self.app.to_le_bytes().iter().chain(self.name.as_bytes()) {
            h ^= *b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
        (h % shards as u64) as usize
    }
}
