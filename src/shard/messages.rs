//! What shards tell each other over the lock-free mesh. Everything here is `Send`; frames are
//! complete WebSocket frames encoded once by the publisher. A shard sends messages to itself
//! the same way (through its own queue), so handling a message never runs inside another.

use crate::channels::ChannelKey;
use crate::protocol::events::PresenceMember;
use std::sync::Arc;

/// One message between shards. Most go to a channel's home shard (`ChannelKey::home`), which
/// answers or fans out to the shards with subscribers.
pub enum ShardMsg {
    /// To the home shard: count a socket of `origin` in the channel (presence: with its member).
    /// A sign-in is a join of the user's `#server-to-user-` channel.
    Join(JoinRequest),
    /// From the home shard back to the socket's shard.
    JoinReply {
        /// The channel joined.
        key: ChannelKey,
        /// The joining connection.
        conn: u64,
        /// Answer to a duplicate subscribe: nothing was counted.
        duplicate: bool,
        /// The presence user the socket joined as.
        user_id: Option<String>,
        /// What the socket is sent, or why the join was refused.
        result: Result<JoinAck, String>,
    },
    /// To the home shard: uncount a socket of `origin`.
    Leave {
        /// The channel left.
        key: ChannelKey,
        /// The shard of the leaving socket.
        origin: usize,
        /// The presence user the socket had joined as.
        user_id: Option<String>,
    },
    /// To the home shard: fan `frame` out to every subscriber except socket `except`.
    Publish(Publication),
    /// From the home shard to a shard with subscribers: write `frame` to the local ones.
    Deliver {
        /// The channel whose local subscribers get the frame.
        key: ChannelKey,
        /// The complete WebSocket frame.
        frame: Arc<[u8]>,
        /// A connection that must not get it (the publisher's own socket).
        except: Option<u64>,
    },
    /// From a channel's home to the publishing shard: the publication with this ticket could
    /// not be passed on to the other nodes (Redis away, queue full).
    PublishRefused {
        /// The ticket of the publication.
        ticket: u64,
    },
    /// To the home of the user `key` stands for: connection `conn` of `origin` watches that user.
    Watch {
        /// The watched user's `#server-to-user-` key.
        key: ChannelKey,
        /// The watcher's shard.
        origin: usize,
        /// The watching connection.
        conn: u64,
    },
    /// The user's status when the watch was registered.
    WatchReply {
        /// The watched user's key.
        key: ChannelKey,
        /// The watching connection.
        conn: u64,
        /// The user has at least one signed-in connection.
        online: bool,
    },
    /// To the user's home: one connection of `origin` no longer watches the user.
    Unwatch {
        /// The watched user's key.
        key: ChannelKey,
        /// The watcher's shard.
        origin: usize,
    },
    /// From a user's home to each shard with watchers: the user's first connection signed in
    /// (online) or the last one left (offline).
    UserStatus {
        /// The watched user's key.
        key: ChannelKey,
        /// The user's new status.
        online: bool,
    },
    /// To a user's home: close every connection signed in as that user.
    Terminate {
        /// The user's key.
        key: ChannelKey,
    },
    /// From the user's home to each shard with such connections.
    CloseUser {
        /// The user's key.
        key: ChannelKey,
    },
    /// A question for the receiving shard's home tables; answered with `Answer`.
    Ask {
        /// The asking shard.
        origin: usize,
        /// The asker's id for the question, echoed in the answer.
        id: u64,
        /// What is asked.
        question: Question,
    },
    /// The answer to `Ask`.
    Answer {
        /// The id of the question.
        id: u64,
        /// The answer.
        answer: Answer,
    },
    /// This node had been taken for dead by the cluster: assert the home channels' state again.
    Reassert,
}

/// An event for one channel, encoded once: the home shard fans it out.
pub struct Publication {
    /// The channel.
    pub key: ChannelKey,
    /// The complete WebSocket frame.
    pub frame: Arc<[u8]>,
    /// A connection that must not get it (the publisher's `socket_id`).
    pub except: Option<u64>,
    /// The publisher's `socket_id` when it is not a connection of this node (another node
    /// excludes it).
    pub except_elsewhere: Option<Box<str>>,
    /// An HTTP API event on a cache channel: kept for later subscribers.
    pub cache: bool,
    /// Set by `Shard::publish_all`: (publishing shard, ticket). If the other nodes cannot be
    /// told, the home answers `PublishRefused` with the ticket before the publisher's barrier.
    pub ticket: Option<(usize, u64)>,
}

/// What the home shard sends with a successful join.
pub struct JoinAck {
    /// Presence: the `subscription_succeeded` with the member list (None: the plain one).
    pub succeeded: Option<Arc<[u8]>>,
    /// Cache channels: the cached event, or `pusher:cache_miss`, to send right after it.
    pub cache_event: Option<Arc<[u8]>>,
}

/// A socket asks a channel's home shard to count it.
pub struct JoinRequest {
    /// The channel.
    pub key: ChannelKey,
    /// The socket's shard.
    pub origin: usize,
    /// The socket's connection id.
    pub conn: u64,
    /// Presence: the user the socket joins as.
    pub member: Option<PresenceMember>,
    /// Presence: the app's member limit.
    pub max_members: u32,
    /// The socket already has the subscription: count nothing, just answer with the current
    /// state (presence clients expect the member list again).
    pub duplicate: bool,
}

/// A question a shard answers from the channels homed on it.
pub enum Question {
    /// A channel's counts, and with `with_cache` the cached event of a cache channel.
    Channel {
        /// The channel.
        key: ChannelKey,
        /// Include the cached event.
        with_cache: bool,
    },
    /// The user ids of a presence channel.
    PresenceUsers(ChannelKey),
    /// Occupied channels of an app homed on the asked shard.
    Occupied {
        /// The app.
        app: u32,
        /// Only channels whose name starts with this.
        prefix: String,
    },
    /// Answered once everything sent to that shard before it has been handled.
    Barrier,
}

/// The answer to a `Question`, variant for variant.
pub enum Answer {
    /// To `Question::Channel`.
    Channel(ChannelInfo),
    /// To `Question::PresenceUsers`.
    PresenceUsers(Vec<String>),
    /// To `Question::Occupied`: (channel name, counts).
    Occupied(Vec<(String, ChannelStats)>),
    /// To `Question::Barrier`.
    Barrier,
}

/// A channel's counts across all shards, as its home shard keeps them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChannelStats {
    /// Subscribed sockets.
    pub subscription_count: u32,
    /// Distinct users (presence channels; 0 for others).
    pub user_count: u32,
}

/// A channel's counts and, when asked for, its cached event.
#[derive(Default)]
pub struct ChannelInfo {
    /// The counts.
    pub stats: ChannelStats,
    /// The cache channel's stored event, if asked for and still live.
    pub cached: Option<CachedEvent>,
}

/// A cache channel's stored event: its complete frame and the seconds it has left.
pub struct CachedEvent {
    /// The complete WebSocket frame of the event.
    pub frame: Arc<[u8]>,
    /// Seconds until it expires.
    pub ttl_secs: u64,
}

/// Redis could not be asked (the link is down, or it did not answer): cluster-wide numbers
/// cannot be given right now.
#[derive(Debug)]
pub struct ClusterUnavailable;
