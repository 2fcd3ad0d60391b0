//! Pusher event envelopes. Server -> client `data` is a JSON-encoded string everywhere except
//! `pusher:error`, whose `data` is an object (reference §2.0).

use super::json::{check_depth, push_str_literal, MAX_JSON_DEPTH};
use super::ws::text_frame;
use serde::Deserialize;
use sonic_rs::{JsonValueTrait, LazyValue};
use std::borrow::Cow;

/// How an envelope's `data` member is written.
pub enum Data<'a> {
    /// Write this text as a JSON string (it is escaped).
    Text(&'a str),
    /// Already a JSON value (e.g. a string literal received from a client), written verbatim.
    Raw(&'a str),
    /// No `data` member at all.
    Absent,
}

/// `{"event":..,"channel":..,"data":..,"user_id":..}` as JSON bytes.
pub fn envelope(
    event: &str,
    channel: Option<&str>,
    data: Data<'_>,
    user_id: Option<&str>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + event.len() + channel.map_or(0, str::len));
    out.extend_from_slice(b"{\"event\":");
    push_str_literal(&mut out, event);
    if let Some(channel) = channel {
        out.extend_from_slice(b",\"channel\":");
        push_str_literal(&mut out, channel);
    }
    match data {
        Data::Text(text) => {
            out.extend_from_slice(b",\"data\":");
            push_str_literal(&mut out, text);
        }
        Data::Raw(raw) => {
            out.extend_from_slice(b",\"data\":");
            out.extend_from_slice(raw.as_bytes());
        }
        Data::Absent => {}
    }
    if let Some(user_id) = user_id {
        out.extend_from_slice(b",\"user_id\":");
        push_str_literal(&mut out, user_id);
    }
    out.push(b'}');
    out
}

/// A complete WebSocket frame for an event.
pub fn frame(event: &str, channel: Option<&str>, data: Data<'_>, user_id: Option<&str>) -> Vec<u8> {
    text_frame(&envelope(event, channel, data, user_id))
}

/// The first frame on every WebSocket: the socket id and the `activity_timeout` (seconds of
/// silence before the client should ping).
pub fn connection_established(socket_id: &str, activity_timeout: u32) -> Vec<u8> {
    let data = format!("{{\"socket_id\":\"{socket_id}\",\"activity_timeout\":{activity_timeout}}}");
    frame(
        "pusher:connection_established",
        None,
        Data::Text(&data),
        None,
    )
}

/// `pusher:error` with object data; `code` may be null.
pub fn error(code: Option<u16>, message: &str) -> Vec<u8> {
    let mut data = Vec::with_capacity(message.len() + 32);
    data.extend_from_slice(b"{\"code\":");
    match code {
        Some(c) => data.extend_from_slice(c.to_string().as_bytes()),
        None => data.extend_from_slice(b"null"),
    }
    data.extend_from_slice(b",\"message\":");
    push_str_literal(&mut data, message);
    data.push(b'}');
    let data = String::from_utf8(data).unwrap_or_default();
    frame("pusher:error", None, Data::Raw(&data), None)
}

/// `pusher:pong`, the reply to a client's `pusher:ping` (a protocol-level, not WebSocket, ping).
pub fn pong() -> Vec<u8> {
    frame("pusher:pong", None, Data::Text("{}"), None)
}

/// Confirms a subscription. `data` is `{}`, or for presence the member list the home shard built.
pub fn subscription_succeeded(channel: &str, data: &str) -> Vec<u8> {
    frame(
        "pusher_internal:subscription_succeeded",
        Some(channel),
        Data::Text(data),
        None,
    )
}

/// Tells a presence channel's other members that a user's first socket joined.
/// `user_info_json` must already be compact JSON (it is written verbatim).
pub fn member_added(channel: &str, user_id: &str, user_info_json: &str) -> Vec<u8> {
    let mut data = Vec::with_capacity(32 + user_id.len() + user_info_json.len());
    data.extend_from_slice(b"{\"user_id\":");
    push_str_literal(&mut data, user_id);
    data.extend_from_slice(b",\"user_info\":");
    data.extend_from_slice(user_info_json.as_bytes());
    data.push(b'}');
    let data = String::from_utf8(data).unwrap_or_default();
    frame(
        "pusher_internal:member_added",
        Some(channel),
        Data::Text(&data),
        None,
    )
}

/// Tells a presence channel's members that a user's last socket left.
pub fn member_removed(channel: &str, user_id: &str) -> Vec<u8> {
    let mut data = Vec::with_capacity(16 + user_id.len());
    data.extend_from_slice(b"{\"user_id\":");
    push_str_literal(&mut data, user_id);
    data.push(b'}');
    let data = String::from_utf8(data).unwrap_or_default();
    frame(
        "pusher_internal:member_removed",
        Some(channel),
        Data::Text(&data),
        None,
    )
}

/// `pusher:signin_success`: object data whose `user_data` is the exact string the client sent.
pub fn signin_success(user_data: &str) -> Vec<u8> {
    let mut data = Vec::with_capacity(16 + user_data.len());
    data.extend_from_slice(b"{\"user_data\":");
    push_str_literal(&mut data, user_data);
    data.push(b'}');
    let data = String::from_utf8(data).unwrap_or_default();
    frame("pusher:signin_success", None, Data::Raw(&data), None)
}

/// `pusher_internal:watchlist_events` with an `online` and an `offline` entry, empty ones left
/// out.
pub fn watchlist_events<'a>(
    online: impl Iterator<Item = &'a str>,
    offline: impl Iterator<Item = &'a str>,
) -> Vec<u8> {
    let mut data = Vec::with_capacity(96);
    data.extend_from_slice(b"{\"events\":[");
    let mut entries = 0;
    for (name, ids) in [
        ("online", online.collect::<Vec<_>>()),
        ("offline", offline.collect()),
    ] {
        if ids.is_empty() {
            continue;
        }
        if entries > 0 {
            data.push(b',');
        }
        entries += 1;
        data.extend_from_slice(format!("{{\"name\":\"{name}\",\"user_ids\":[").as_bytes());
        for (i, id) in ids.iter().enumerate() {
            if i > 0 {
                data.push(b',');
            }
            push_str_literal(&mut data, id);
        }
        data.extend_from_slice(b"]}");
    }
    data.extend_from_slice(b"]}");
    let data = String::from_utf8(data).unwrap_or_default();
    frame(
        "pusher_internal:watchlist_events",
        None,
        Data::Raw(&data),
        None,
    )
}

/// `pusher:cache_miss`, with `"data":"{}"` so that clients reading `data` find a value (§2.4.9).
pub fn cache_miss(channel: &str) -> Vec<u8> {
    frame("pusher:cache_miss", Some(channel), Data::Text("{}"), None)
}

/// `pusher_internal:subscription_count` for apps with `enable_subscription_count`.
pub fn subscription_count(channel: &str, count: u32) -> Vec<u8> {
    let data = format!("{{\"subscription_count\":{count}}}");
    frame(
        "pusher_internal:subscription_count",
        Some(channel),
        Data::Text(&data),
        None,
    )
}

/// One message from a client. Strings borrow from the frame when they hold no escapes.
#[derive(Deserialize)]
pub struct ClientMessage<'a> {
    /// `pusher:*` for protocol messages, `client-*` for client events.
    #[serde(borrow)]
    pub event: Cow<'a, str>,
    /// Set on client events; protocol messages name their channel inside `data`.
    #[serde(borrow, default)]
    pub channel: Option<Cow<'a, str>>,
    /// Left unparsed: client events forward it as received, `pusher:*` handlers decode it.
    #[serde(borrow, default)]
    pub data: Option<LazyValue<'a>>,
}

/// The `data` of `pusher:subscribe`.
#[derive(Deserialize)]
pub struct SubscribeData {
    /// The channel to join.
    pub channel: String,
    /// `"<app_key>:<signature>"` from the app's auth endpoint; needed for private and presence.
    #[serde(default)]
    pub auth: Option<String>,
    /// Kept as the exact decoded string: it is part of the signed text.
    #[serde(default)]
    pub channel_data: Option<String>,
}

/// The `data` of `pusher:unsubscribe`.
#[derive(Deserialize)]
pub struct UnsubscribeData {
    /// The channel to leave.
    pub channel: String,
}

/// The `data` of `pusher:signin`.
#[derive(Deserialize)]
pub struct SigninData {
    /// `"<app_key>:<signature>"` over `"<socket_id>::user::<user_data>"`.
    #[serde(default)]
    pub auth: Option<String>,
    /// Kept as the exact decoded string: it is part of the signed text.
    #[serde(default)]
    pub user_data: Option<String>,
}

/// The sign-in `user_data`: `id` (string, or a number taken as its text), `user_info`,
/// `watchlist`.
pub struct UserData {
    /// The user id; the connection joins `#server-to-user-{id}`.
    pub id: String,
    /// Compact JSON of `user_info`, `null` when absent.
    pub info: String,
    /// Ids of users whose online status this connection wants (`watchlist_events`).
    pub watchlist: Vec<String>,
}

/// Parses the sign-in `user_data`, depth-checked first; the error is the text sent to the client.
pub fn parse_user_data(text: &str) -> Result<UserData, &'static str> {
    check_depth(text.as_bytes(), MAX_JSON_DEPTH).map_err(|_| "user_data is nested too deeply")?;
    let value: LazyValue<'_> =
        sonic_rs::from_str(text).map_err(|_| "user_data is not valid JSON")?;
    let raw = value.as_raw_str();
    let id = sonic_rs::get(raw, ["id"]).map_err(|_| "user_data has no id")?;
    let id = user_id_text(&id).ok_or("user_data id must be a non-empty string")?;
    let info = match sonic_rs::get(raw, ["user_info"]) {
        Ok(info) => super::json::compact(info.as_raw_str()).ok_or("user_info is not valid JSON")?,
        Err(_) => "null".to_owned(),
    };
    let watchlist = match sonic_rs::get(raw, ["watchlist"]) {
        Err(_) => Vec::new(),
        Ok(list) if list.is_null() => Vec::new(),
        Ok(list) => {
            let items: Vec<LazyValue<'_>> = sonic_rs::from_str(list.as_raw_str())
                .map_err(|_| "watchlist must be an array of user ids")?;
            items
                .iter()
                .map(user_id_text)
                .collect::<Option<Vec<_>>>()
                .ok_or("watchlist must be an array of user ids")?
        }
    };
    Ok(UserData {
        id,
        info,
        watchlist,
    })
}

/// A user id as text: a non-empty string, or a number (as the docs allow for presence).
fn user_id_text(value: &LazyValue<'_>) -> Option<String> {
    let text = if let Some(s) = value.as_str() {
        s.to_owned()
    } else if value.is_number() {
        value.as_raw_str().to_owned()
    } else {
        return None;
    };
    (!text.is_empty()).then_some(text)
}

/// Presence `channel_data`: `user_id` may be a string or a number; `user_info` any JSON.
pub struct PresenceMember {
    /// The member's id as text; one member per id, however many sockets share it.
    pub user_id: String,
    /// Compact JSON of `user_info`, `null` when absent.
    pub user_info: String,
}

/// Parses a presence subscription's `channel_data`, depth-checked first; the error is the text
/// sent to the client.
pub fn parse_channel_data(text: &str) -> Result<PresenceMember, &'static str> {
    check_depth(text.as_bytes(), MAX_JSON_DEPTH)
        .map_err(|_| "channel_data is nested too deeply")?;
    let value: LazyValue<'_> =
        sonic_rs::from_str(text).map_err(|_| "channel_data is not valid JSON")?;
    let user_id = sonic_rs::get(value.as_raw_str(), ["user_id"])
        .map_err(|_| "channel_data has no user_id")?;
    let user_id = user_id_text(&user_id).ok_or("user_id must be a non-empty string or a number")?;
    let user_info = match sonic_rs::get(value.as_raw_str(), ["user_info"]) {
        Ok(info) => super::json::compact(info.as_raw_str()).ok_or("user_info is not valid JSON")?,
        Err(_) => "null".to_owned(),
    };
    Ok(PresenceMember { user_id, user_info })
}

/// Decodes the `data` of a `pusher:*` message: an object, or a string holding a JSON object
/// (some clients double-encode).
pub fn decode_object<T: serde::de::DeserializeOwned>(data: Option<&LazyValue<'_>>) -> Option<T> {
    let data = data?;
    if data.is_str() {
        let inner: String = sonic_rs::from_str(data.as_raw_str()).ok()?;
        check_depth(inner.as_bytes(), MAX_JSON_DEPTH).ok()?;
        return sonic_rs::from_str(&inner).ok();
    }
    sonic_rs::from_str(data.as_raw_str()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json_of(frame: &[u8]) -> sonic_rs::Value {
        sonic_rs::from_slice(crate::protocol::ws::payload_of(frame)).unwrap()
    }

    #[test]
    fn connection_established_has_string_data() {
        let v = json_of(&connection_established("123.456", 120));
        assert_eq!(v["event"].as_str(), Some("pusher:connection_established"));
        let data: sonic_rs::Value = sonic_rs::from_str(v["data"].as_str().unwrap()).unwrap();
        assert_eq!(data["socket_id"].as_str(), Some("123.456"));
        assert_eq!(data["activity_timeout"].as_u64(), Some(120));
    }

    #[test]
    fn error_has_object_data_and_nullable_code() {
        let v = json_of(&error(Some(4001), "App key x does not exist"));
        assert_eq!(v["data"]["code"].as_u64(), Some(4001));
        let v = json_of(&error(None, "quote \" here"));
        assert!(v["data"]["code"].is_null());
        assert_eq!(v["data"]["message"].as_str(), Some("quote \" here"));
    }

    #[test]
    fn subscription_succeeded_carries_string_data() {
        let v = json_of(&subscription_succeeded("private-a", "{}"));
        assert_eq!(v["data"].as_str(), Some("{}"));
        assert_eq!(v["channel"].as_str(), Some("private-a"));
    }

    #[test]
    fn raw_data_is_forwarded_byte_exact() {
        let env = envelope(
            "client-x",
            Some("private-a"),
            Data::Raw("\"{\\\"x\\\":1}\""),
            Some("7"),
        );
        assert_eq!(
            std::str::from_utf8(&env).unwrap(),
            r#"{"event":"client-x","channel":"private-a","data":"{\"x\":1}","user_id":"7"}"#
        );
    }

    #[test]
    fn member_events() {
        let v = json_of(&member_added("presence-r", "3", r#"{"name":"Cy"}"#));
        let data: sonic_rs::Value = sonic_rs::from_str(v["data"].as_str().unwrap()).unwrap();
        assert_eq!(data["user_id"].as_str(), Some("3"));
        assert_eq!(data["user_info"]["name"].as_str(), Some("Cy"));
        let v = json_of(&member_removed("presence-r", "3"));
        assert_eq!(v["data"].as_str(), Some(r#"{"user_id":"3"}"#));
    }

    #[test]
    fn channel_data_accepts_numeric_ids_and_missing_info() {
        let m = parse_channel_data(r#"{"user_id":10,"user_info":{"name":"Mr. Pusher"}}"#).unwrap();
        assert_eq!(m.user_id, "10");
        assert_eq!(m.user_info, r#"{"name":"Mr. Pusher"}"#);
        let m = parse_channel_data(r#"{"user_id":"a"}"#).unwrap();
        assert_eq!(m.user_info, "null");
        assert!(parse_channel_data(r#"{"user_info":{}}"#).is_err());
        assert!(parse_channel_data("nope").is_err());
        assert!(parse_channel_data(r#"{"user_id":""}"#).is_err());
    }

    #[test]
    fn client_message_parses_with_and_without_data() {
        let m: ClientMessage = sonic_rs::from_str(r#"{"event":"pusher:ping"}"#).unwrap();
        assert_eq!(m.event, "pusher:ping");
        assert!(m.data.is_none());
        let text = r#"{"event":"pusher:subscribe","data":{"channel":"a","auth":""}}"#;
        let m: ClientMessage = sonic_rs::from_str(text).unwrap();
        let sub: SubscribeData = decode_object(m.data.as_ref()).unwrap();
        assert_eq!(sub.channel, "a");
        let text = r#"{"event":"pusher:subscribe","data":"{\"channel\":\"b\"}"}"#;
        let m: ClientMessage = sonic_rs::from_str(text).unwrap();
        let sub: SubscribeData = decode_object(m.data.as_ref()).unwrap();
        assert_eq!(sub.channel, "b");
        assert!(sub.auth.is_none());
    }

    #[test]
    fn signin_success_and_watchlist_events_have_object_data() {
        let v = json_of(&signin_success(r#"{"id":"1"}"#));
        assert_eq!(v["data"]["user_data"].as_str(), Some(r#"{"id":"1"}"#));
        let v = json_of(&watchlist_events(
            ["2", "3"].into_iter(),
            std::iter::empty(),
        ));
        assert_eq!(
            v["event"].as_str(),
            Some("pusher_internal:watchlist_events")
        );
        let text = sonic_rs::to_string(&v["data"]).unwrap();
        assert_eq!(
            text,
            r#"{"events":[{"name":"online","user_ids":["2","3"]}]}"#
        );
        let v = json_of(&watchlist_events(["2"].into_iter(), ["4"].into_iter()));
        assert_eq!(v["data"]["events"][1]["name"].as_str(), Some("offline"));
    }

    #[test]
    fn cache_miss_and_subscription_count() {
        let v = json_of(&cache_miss("cache-a"));
        assert_eq!(v["data"].as_str(), Some("{}"));
        let v = json_of(&subscription_count("a", 42));
        assert_eq!(v["data"].as_str(), Some(r#"{"subscription_count":42}"#));
    }

    #[test]
    fn user_data_needs_an_id_and_reads_info_and_watchlist() {
        let u = parse_user_data(r#"{"id":"12345","user_info":{"name":"Ann"},"watchlist":["2",3]}"#)
            .unwrap();
        assert_eq!(u.id, "12345");
        assert_eq!(u.info, r#"{"name":"Ann"}"#);
        assert_eq!(u.watchlist, vec!["2", "3"]);
        let u = parse_user_data(r#"{"id":"1"}"#).unwrap();
        assert_eq!((u.info.as_str(), u.watchlist.len()), ("null", 0));
        assert!(parse_user_data(r#"{"id":""}"#).is_err());
        assert!(parse_user_data(r#"{"user_info":{}}"#).is_err());
        assert!(parse_user_data(r#"{"id":"1","watchlist":"2"}"#).is_err());
        assert!(parse_user_data("x").is_err());
    }
}
