//! What a webhook reports: one event, as the shards emit it and as Pusher's webhook body lists
//! it (reference §6.3).

use crate::config::WebhookEventType;
use crate::protocol::json::push_str_literal;

/// One webhook event of an app's channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The channel got its first subscriber.
    ChannelOccupied {
        /// The channel's name.
        channel: String,
    },
    /// The channel lost its last subscriber.
    ChannelVacated {
        /// The channel's name.
        channel: String,
    },
    /// A user's first connection joined a presence channel.
    MemberAdded {
        /// The channel's name.
        channel: String,
        /// The member's `user_id`.
        user_id: String,
    },
    /// A user's last connection left a presence channel.
    MemberRemoved {
        /// The channel's name.
        channel: String,
        /// The member's `user_id`.
        user_id: String,
    },
    /// A client sent a `client-*` event.
    ClientEvent {
        /// The channel's name.
        channel: String,
        /// The event's name.
        event: String,
        /// The event's data as a JSON string literal, quotes included (the string form a
        /// receiver gets, whatever the client sent).
        data_literal: String,
        /// The sender's socket id.
        socket_id: String,
        /// The sender's presence `user_id` (presence channels only).
        user_id: Option<String>,
    },
    /// A client subscribed to a cache channel that has no cached event.
    CacheMiss {
        /// The channel's name.
        channel: String,
    },
    /// The channel's subscription count changed.
    SubscriptionCount {
        /// The channel's name.
        channel: String,
        /// Its subscribed connections.
        count: u32,
    },
}

impl Event {
    /// Which of the configurable event types this is.
    pub fn kind(&self) -> WebhookEventType {
        match self {
            Event::ChannelOccupied { .. } => WebhookEventType::ChannelOccupied,
            Event::ChannelVacated { .. } => WebhookEventType::ChannelVacated,
            Event::MemberAdded { .. } => WebhookEventType::MemberAdded,
            Event::MemberRemoved { .. } => WebhookEventType::MemberRemoved,
            Event::ClientEvent { .. } => WebhookEventType::ClientEvent,
            Event::CacheMiss { .. } => WebhookEventType::CacheMiss,
            Event::SubscriptionCount { .. } => WebhookEventType::SubscriptionCount,
        }
    }

    /// The channel the event happened on.
    pub fn channel(&self) -> &str {
        match self {
            Event::ChannelOccupied { channel }
            | Event::ChannelVacated { channel }
            | Event::MemberAdded { channel, .. }
            | Event::MemberRemoved { channel, .. }
            | Event::ClientEvent { channel, .. }
            | Event::CacheMiss { channel }
            | Event::SubscriptionCount { channel, .. } => channel,
        }
    }

    /// Its `name` in a webhook body.
    pub fn name(&self) -> &'static str {
        match self.kind() {
            WebhookEventType::ChannelOccupied => "channel_occupied",
            WebhookEventType::ChannelVacated => "channel_vacated",
            WebhookEventType::MemberAdded => "member_added",
            WebhookEventType::MemberRemoved => "member_removed",
            WebhookEventType::ClientEvent => "client_event",
            WebhookEventType::CacheMiss => "cache_miss",
            WebhookEventType::SubscriptionCount => "subscription_count",
        }
    }

    /// The fields of its Redis stream entry besides `name`, `channel` and `time_ms` (the
    /// format the README documents for the event stream): plain strings, `data` decoded.
    pub fn entry_fields(&self) -> Vec<(&'static str, String)> {
        match self {
            Event::MemberAdded { user_id, .. } | Event::MemberRemoved { user_id, .. } => {
                vec![("user_id", user_id.clone())]
            }
            Event::ClientEvent {
                event,
                data_literal,
                socket_id,
                user_id,
                ..
            } => {
                let data = sonic_rs::from_str::<String>(data_literal).unwrap_or_default();
                let mut fields = vec![
                    ("event", event.clone()),
                    ("data", data),
                    ("socket_id", socket_id.clone()),
                ];
                if let Some(user_id) = user_id {
                    fields.push(("user_id", user_id.clone()));
                }
                fields
            }
            Event::SubscriptionCount { count, .. } => {
                vec![("subscription_count", count.to_string())]
            }
            _ => Vec::new(),
        }
    }

    /// The event of a Redis stream entry (field, value pairs), and its `time_ms`. None: not an
    /// entry shardpush writes (Redis is input too: nothing here trusts it).
    pub fn from_entry(fields: &[(String, String)]) -> Option<(Event, u64)> {
        let field = |name: &str| {
            let found = fields.iter().find(|(f, _)| f == name);
            found.map(|(_, v)| v.clone())
        };
        let channel = field("channel")?;
        let time_ms = field("time_ms")?.parse().ok()?;
        let event = match field("name")?.as_str() {
            "channel_occupied" => Event::ChannelOccupied { channel },
            "channel_vacated" => Event::ChannelVacated { channel },
            "member_added" => Event::MemberAdded {
                channel,
                user_id: field("user_id")?,
            },
            "member_removed" => Event::MemberRemoved {
                channel,
                user_id: field("user_id")?,
            },
            "client_event" => Event::ClientEvent {
                channel,
                event: field("event")?,
                data_literal: crate::protocol::json::str_literal(&field("data")?),
                socket_id: field("socket_id")?,
                user_id: field("user_id"),
            },
            "cache_miss" => Event::CacheMiss { channel },
            "subscription_count" => Event::SubscriptionCount {
                channel,
                count: field("subscription_count")?.parse().ok()?,
            },
            _ => return None,
        };
        Some((event, time_ms))
    }

    /// Appends the event as an object of the webhook body's `events` list.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"name\":\"");
        out.extend_from_slice(self.name().as_bytes());
        out.extend_from_slice(b"\",\"channel\":");
        push_str_literal(out, self.channel());
        match self {
            Event::MemberAdded { user_id, .. } | Event::MemberRemoved { user_id, .. } => {
                out.extend_from_slice(b",\"user_id\":");
                push_str_literal(out, user_id);
            }
            Event::ClientEvent {
                event,
                data_literal,
                socket_id,
                user_id,
                ..
            } => {
                out.extend_from_slice(b",\"event\":");
                push_str_literal(out, event);
                out.extend_from_slice(b",\"data\":");
                out.extend_from_slice(data_literal.as_bytes());
                out.extend_from_slice(b",\"socket_id\":");
                push_str_literal(out, socket_id);
                if let Some(user_id) = user_id {
                    out.extend_from_slice(b",\"user_id\":");
                    push_str_literal(out, user_id);
                }
            }
            Event::SubscriptionCount { count, .. } => {
                out.extend_from_slice(b",\"subscription_count\":");
                out.extend_from_slice(count.to_string().as_bytes());
            }
            _ => {}
        }
        out.push(b'}');
    }
}

/// A webhook request's body: `{"time_ms":…,"events":[…]}` around events already written as JSON.
pub fn body(time_ms: u64, events: &[Vec<u8>]) -> Vec<u8> {
    let len: usize = events.iter().map(|e| e.len() + 1).sum();
    let mut out = Vec::with_capacity(len + 40);
    out.extend_from_slice(b"{\"time_ms\":");
    out.extend_from_slice(time_ms.to_string().as_bytes());
    out.extend_from_slice(b",\"events\":[");
    for (i, event) in events.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(event);
    }
    out.extend_from_slice(b"]}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(event: &Event) -> serde_json::Value {
        let mut out = Vec::new();
        event.write_json(&mut out);
        serde_json::from_slice(&out).expect("valid JSON")
    }

    #[test]
    fn events_have_pushers_fields() {
        let channel = "presence-a\"b".to_string();
        let occupied = Event::ChannelOccupied {
            channel: channel.clone(),
        };
        assert_eq!(
            json(&occupied),
            serde_json::json!({"name": "channel_occupied", "channel": "presence-a\"b"})
        );
        let added = Event::MemberAdded {
            channel: channel.clone(),
            user_id: "u\n1".into(),
        };
        assert_eq!(
            json(&added),
            serde_json::json!({"name": "member_added", "channel": channel, "user_id": "u\n1"})
        );
        let client = Event::ClientEvent {
            channel: channel.clone(),
            event: "client-x".into(),
            data_literal: "\"{\\\"a\\\":1}\"".into(),
            socket_id: "1.2".into(),
            user_id: Some("u".into()),
        };
        assert_eq!(
            json(&client),
            serde_json::json!({"name": "client_event", "channel": channel, "event": "client-x",
                "data": "{\"a\":1}", "socket_id": "1.2", "user_id": "u"})
        );
        let count = Event::SubscriptionCount {
            channel: "c".into(),
            count: 42,
        };
        assert_eq!(
            json(&count),
            serde_json::json!({"name": "subscription_count", "channel": "c", "subscription_count": 42})
        );
    }

    #[test]
    fn stream_entries_give_back_the_event() {
        let events = [
            Event::ClientEvent {
                channel: "presence-x".into(),
                event: "client-a".into(),
                data_literal: "\"{\\\"a\\\":[1]}\"".into(),
                socket_id: "1.2".into(),
                user_id: Some("u".into()),
            },
            Event::MemberRemoved {
                channel: "presence-x".into(),
                user_id: "u".into(),
            },
            Event::SubscriptionCount {
                channel: "c".into(),
                count: 7,
            },
        ];
        for event in events {
            let mut fields = vec![
                ("name".to_string(), event.name().to_string()),
                ("channel".to_string(), event.channel().to_string()),
                ("time_ms".to_string(), "123".to_string()),
            ];
            let entry = event.entry_fields().into_iter();
            fields.extend(entry.map(|(f, v)| (f.to_string(), v)));
            assert_eq!(Event::from_entry(&fields), Some((event, 123)));
        }
        let missing = [("name".to_string(), "member_added".to_string())];
        assert_eq!(Event::from_entry(&missing), None);
    }

    #[test]
    fn body_wraps_the_events() {
        let mut one = Vec::new();
        Event::CacheMiss {
            channel: "cache-x".into(),
        }
        .write_json(&mut one);
        let body = body(1700000000123, &[one.clone(), one]);
        let value: serde_json::Value = serde_json::from_slice(&body).expect("valid JSON");
        assert_eq!(value["time_ms"], 1700000000123u64);
        assert_eq!(value["events"].as_array().map(Vec::len), Some(2));
        assert_eq!(value["events"][1]["name"], "cache_miss");
    }
}
