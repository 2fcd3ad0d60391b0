//! Channel state. `local`: which of this shard's sockets are in a channel. `home`: the cross-shard
//! view kept by the channel's home shard (per-shard subscriber counts, presence members), with
//! the cache of cache channels and the watchers of signed-in users (a user is the channel
//! `#server-to-user-{id}`, so a user's home shard is that channel's).

pub mod cache;
pub mod home;
pub mod local;
pub mod watch;

/// An app's channel. Owned strings so it can cross shards.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ChannelKey {
    /// The app (index into the configured apps).
    pub app: u32,
    /// The channel name, as clients and the HTTP API spell it.
    pub name: Box<str>,
}

impl ChannelKey {
    /// The channel `name` of `app`.
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

impl ChannelKey {
    /// The channel that stands for a signed-in user: its subscribers are the user's connections.
    pub fn user(app: u32, user_id: &str) -> ChannelKey {
        let mut name = String::with_capacity(
            crate::protocol::channel::SERVER_TO_USER_PREFIX.len() + user_id.len(),
        );
        name.push_str(crate::protocol::channel::SERVER_TO_USER_PREFIX);
        name.push_str(user_id);
        ChannelKey {
            app,
            name: name.into(),
        }
    }

    /// The user id of a `#server-to-user-` key.
    pub fn user_id(&self) -> Option<&str> {
        self.name
            .strip_prefix(crate::protocol::channel::SERVER_TO_USER_PREFIX)
    }
}
