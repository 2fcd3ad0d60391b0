//! What shards tell each other over the lock-free mesh. Everything here is `Send`; frames are
//! complete WebSocket frames encoded once by the publisher.

use crate::channels::ChannelKey;
use std::sync::Arc;

pub enum ShardMsg {
    /// To the home shard: count a socket of `origin` in the channel (presence: with its member).
    Join(JoinRequest),
    /// From the home shard back to the socket's shard. `Ok(Some(frame))` is the presence
    /// `subscription_succeeded`; `Ok(None)` means send the plain one.
    JoinReply {
        key: ChannelKey,
        conn: u64,
        repeat: bool,
        user_id: Option<String>,
        result: Result<Option<Arc<[u8]>>, String>,
    },
    /// To the home shard: uncount a socket of `origin`.
    Leave {
        key: ChannelKey,
        origin: usize,
        user_id: Option<String>,
    },
    /// To the home shard: fan `frame` out to every subscriber except socket `except`.
    Publish {
        key: ChannelKey,
        frame: Arc<[u8]>,
        except: Option<u64>,
    },
    /// From the home shard to a shard with subscribers: write `frame` to the local ones.
    Deliver {
        key: ChannelKey,
        frame: Arc<[u8]>,
        except: Option<u64>,
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
    Channel(ChannelKey),
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
    Channel(ChannelStats),
    Users(Vec<String>),
    List(Vec<(String, ChannelStats)>),
    Barrier,
}
