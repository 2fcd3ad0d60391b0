//! What shards tell each other over the lock-free mesh. Everything here is `Send`; frames are
//! complete WebSocket frames encoded once by the publisher.

use crate::channels::ChannelKey;
use std::sync::Arc;

pub enum ShardMsg {
    /// To the home shard: count a socket of `origin` in the channel (presence: with its member).
    /// A sign-in is a join of the user's `#server-to-user-` channel.
    Join(JoinRequest),
    /// From the home shard back to the socket's shard.
    JoinReply {
        key: ChannelKey,
        conn: u64,
        repeat: bool,
        user_id: Option<String>,
        result: Result<JoinAck, String>,
    },
    /// To the home shard: uncount a socket of `origin`.
    Leave {
        key: ChannelKey,
        origin: usize,
        user_id: Option<String>,
    },
    /// To the home shard: fan `frame` out to every subscriber except socket `except`; `cache`:
    /// an HTTP API event on a cache channel, to be kept for later subscribers.
    Publish {
        key: ChannelKey,
        frame: Arc<[u8]>,
        except: Option<u64>,
        cache: bool,
    },
    /// From the home shard to a shard with subscribers: write `frame` to the local ones.
    Deliver {
        key: ChannelKey,
        frame: Arc<[u8]>,
        except: Option<u64>,
    },
    /// To the home of the user `key` stands for: connection `conn` of `origin` watches that user.
    Watch {
        key: ChannelKey,
        origin: usize,
        conn: u64,
    },
    /// The user's status when the watch was registered.
    WatchReply {
        key: ChannelKey,
        conn: u64,
        online: bool,
    },
    Unwatch {
        key: ChannelKey,
        origin: usize,
    },
    /// From a user's home to each shard with watchers: the user's first connection signed in
    /// (online) or the last one left (offline).
    UserStatus {
        key: ChannelKey,
        online: bool,
    },
    /// To a user's home: close every connection signed in as that user.
    Terminate {
        key: ChannelKey,
    },
    /// From the user's home to each shard with such connections.
    CloseUser {
        key: ChannelKey,
    },
    Query {
        origin: usize,
        id: u64,
        query: Query,
    },
    Reply {
        id: u64,
        reply: QueryReply,
    },
}

/// What the home shard sends with a successful join.
pub struct JoinAck {
    /// Presence: the `subscription_succeeded` with the member list (None: the plain one).
    pub succeeded: Option<Arc<[u8]>>,
    /// Cache channels: the cached event, or `pusher:cache_miss`, to send right after it.
    pub then: Option<Arc<[u8]>>,
}

pub struct JoinRequest {
    pub key: ChannelKey,
    pub origin: usize,
    pub conn: u64,
    /// Presence: (user id, compact user_info JSON).
    pub member: Option<(String, String)>,
    pub max_members: u32,
    /// A duplicate subscribe: count nothing, just answer with the current state.
    pub repeat: bool,
}

pub enum Query {
    /// Counts, and with `cache` the cached event of a cache channel.
    Channel {
        key: ChannelKey,
        cache: bool,
    },
    Users(ChannelKey),
    /// Occupied channels of an app homed on the asked shard.
    List {
        app: u32,
        prefix: String,
    },
    /// Answered once everything sent to that shard before it has been handled.
    Barrier,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChannelStats {
    pub subscription_count: u32,
    pub user_count: u32,
}

pub enum QueryReply {
    Channel(ChannelStats, Option<CachedEvent>),
    Users(Vec<String>),
    List(Vec<(String, ChannelStats)>),
    Barrier,
}

/// A cache channel's stored event: its complete frame and the seconds it has left.
pub struct CachedEvent {
    pub frame: Arc<[u8]>,
    pub ttl_secs: u64,
}
