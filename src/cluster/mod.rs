//! Several shardpush nodes acting as one server through Redis (issue 10). Each shard has its own
//! Redis link (`link`); a channel's home shard on each node subscribes to the channel's topic
//! while the node has subscribers to it, and publishes what is published on this node there.
//! A publish is therefore one `PUBLISH`, and a node only receives traffic for channels it serves.
//!
//! This layer knows Redis and the message format; the shard runtime decides when to use it.

pub mod link;
pub mod state;

use crate::config::ClusterConfig;
use link::RedisLink;
use state::State;
use std::time::Duration;

/// One shard's part of the cluster: its link and the names it uses. Owned by the shard.
pub struct Cluster {
    /// The shard's Redis link.
    pub link: RedisLink,
    /// The shared state's commands and replies.
    pub state: State,
    prefix: String,
}

/// A publish from another node, as read from Redis.
#[derive(Debug, PartialEq, Eq)]
pub struct RemotePublish<'a> {
    /// The node that published it.
    pub node_id: &'a str,
    /// The app's id (ids, unlike indexes, are the same on every node).
    pub app_id: &'a str,
    /// The channel.
    pub channel: &'a str,
    /// The socket id the publisher excluded (empty: none).
    pub except: &'a str,
    /// The complete WebSocket frame.
    pub frame: &'a [u8],
}

/// First bytes of every message shardpush publishes (a format version, so a change is seen).
const MAGIC: &[u8] = b"SP1";

impl Cluster {
    /// The cluster part of a shard, from the validated `[cluster]` settings; `instance` is
    /// random per start of the process (the same on all its shards).
    pub fn new(config: &ClusterConfig, redis: &redis::ConnectionInfo, instance: u32) -> Cluster {
        Cluster {
            link: RedisLink::new(
                redis,
                config.max_queued_messages,
                Duration::from_secs(config.heartbeat_interval.into()),
                Duration::from_secs(config.node_timeout.into()),
            ),
            state: State::new(&config.prefix, &config.node_id, instance),
            prefix: config.prefix.clone(),
        }
    }

    /// The channel's topic: `{prefix}:{app_id:channel}`. The braces are a Redis Cluster hash
    /// tag, so sharded pub/sub (`SPUBLISH`) would need no change of names.
    pub fn topic(&self, app_id: &str, channel: &str) -> Vec<u8> {
        format!("{}:{{{app_id}:{channel}}}", self.prefix).into_bytes()
    }

    /// Whether `topic` is the topic of this channel (`topic` without building the name: this
    /// check runs for every message another node publishes here).
    pub fn is_topic_of(&self, topic: &[u8], app_id: &str, channel: &str) -> bool {
        let parts: [&[u8]; 6] = [
            self.prefix.as_bytes(),
            b":{",
            app_id.as_bytes(),
            b":",
            channel.as_bytes(),
            b"}",
        ];
        let mut rest = topic;
        for part in parts {
            match rest.strip_prefix(part) {
                Some(tail) => rest = tail,
                None => return false,
            }
        }
        rest.is_empty()
    }

    /// Publishes a frame for the other nodes (this node delivers it itself).
    /// False: Redis is away and the link's queue is full.
    /// With `cache_ttl_ms` (a cache channel), Redis keeps it as the channel's last event for
    /// that long, in the same step as the publish.
    pub fn publish(
        &self,
        (app_id, channel): (&str, &str),
        except: &str,
        frame: &[u8],
        cache_ttl_ms: Option<u64>,
    ) -> bool {
        let topic = self.topic(app_id, channel);
        let payload = self.encode(app_id, channel, except, frame);
        match cache_ttl_ms {
            Some(ttl_ms) => {
                let publish = self.state.publish_cached(&topic, &payload, ttl_ms);
                self.link.command(&publish)
            }
            None => self
                .link
                .command(redis::cmd("PUBLISH").arg(topic).arg(payload)),
        }
    }

    /// `SP1` and length-prefixed fields: node id, app id, channel, excluded socket id, frame.
    fn encode(&self, app_id: &str, channel: &str, except: &str, frame: &[u8]) -> Vec<u8> {
        let fields: [&[u8]; 5] = [
            self.node_id().as_bytes(),
            app_id.as_bytes(),
            channel.as_bytes(),
            except.as_bytes(),
            frame,
        ];
        let size: usize = fields.iter().map(|f| f.len() + 4).sum();
        let mut out = Vec::with_capacity(MAGIC.len() + size);
        out.extend_from_slice(MAGIC);
        for field in fields {
            out.extend_from_slice(&(field.len() as u32).to_le_bytes());
            out.extend_from_slice(field);
        }
        out
    }

    /// This node's name on the wire: its id and this life's number, so that a restarted node
    /// is never taken for its former self.
    pub fn node_id(&self) -> &str {
        self.state.owner()
    }
}

/// Reads a message of `Cluster::publish`; None for anything else (a foreign publisher on the
/// topic, a truncated message).
pub fn decode(payload: &[u8]) -> Option<RemotePublish<'_>> {
    let mut rest = payload.strip_prefix(MAGIC)?;
    let mut field = || -> Option<&[u8]> {
        let (len, tail) = rest.split_first_chunk::<4>()?;
        let len = u32::from_le_bytes(*len) as usize;
        if tail.len() < len {
            return None;
        }
        let (value, tail) = tail.split_at(len);
        rest = tail;
        Some(value)
    };
    fn text(bytes: &[u8]) -> Option<&str> {
        std::str::from_utf8(bytes).ok()
    }
    let node_id = text(field()?)?;
    let app_id = text(field()?)?;
    let channel = text(field()?)?;
    let except = text(field()?)?;
    let frame = field()?;
    Some(RemotePublish {
        node_id,
        app_id,
        channel,
        except,
        frame,
    })
    .filter(|_| rest.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::IntoConnectionInfo;

    fn cluster() -> Cluster {
        let config = ClusterConfig {
            redis_url: "redis://127.0.0.1:1".into(),
            node_id: "n1".into(),
            ..ClusterConfig::default()
        };
        let info = config.redis_url.as_str().into_connection_info().unwrap();
        Cluster::new(&config, &info, 1)
    }

    #[test]
    fn topics_carry_the_channel_in_a_hash_tag() {
        let c = cluster();
        assert_eq!(c.topic("7", "news"), b"shardpush:{7:news}".to_vec());
        assert!(c.is_topic_of(&c.topic("7", "news"), "7", "news"));
        for other in [
            "shardpush:{7:new}",
            "shardpush:{7:newsx}",
            "shardpush:{7:news}x",
            "x:{7:news}",
        ] {
            assert!(!c.is_topic_of(other.as_bytes(), "7", "news"), "{other}");
        }
    }

    #[test]
    fn messages_round_trip_and_anything_else_is_refused() {
        let c = cluster();
        let payload = c.encode("7", "news", "1.2", b"\x81\x02hi");
        let read = decode(&payload).unwrap();
        assert_eq!(
            read,
            RemotePublish {
                node_id: "n1/00000001",
                app_id: "7",
                channel: "news",
                except: "1.2",
                frame: b"\x81\x02hi",
            }
        );
        for cut in 0..payload.len() {
            assert!(decode(&payload[..cut]).is_none(), "truncated at {cut}");
        }
        let mut longer = payload.clone();
        longer.push(0);
        assert!(decode(&longer).is_none());
        assert!(decode(b"hello").is_none());
    }
}
