//! Pusher event envelopes. Server -> client `data` is a JSON-encoded string everywhere except
//! `pusher:error`, whose `data` is an object (reference §2.0).

use super::json::push_str_literal;
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

pub fn pong() -> Vec<u8> {
    frame("pusher:pong", None, Data::Text("{}"), None)
}

pub fn subscription_succeeded(channel: &str, data: &str) -> Vec<u8> {
    frame(
        "pusher_internal:subscription_succeeded",
        Some(channel),
        Data::Text(data),
        None,
    )
}

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

/// One message from a client. Strings borrow from the frame when they hold no escapes.
#[derive(Deserialize)]
pub struct ClientMessage<'a> {
    #[serde(borrow)]
    pub event: Cow<'a, str>,
    #[serde(borrow, default)]
    pub channel: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub data: Option<LazyValue<'a>>,
}

#[derive(Deserialize)]
pub struct SubscribeData {
    pub channel: String,
    #[serde(default)]
    pub auth: Option<String>,
    /// Kept as the exact decoded string: it is part of the signed text.
    #[serde(default)]
    pub channel_data: Option<String>,
}

#[derive(Deserialize)]
pub struct UnsubscribeData {
    pub channel: String,
}

/// Presence `channel_data`: `user_id` may be a string or a number; `user_info` any JSON.
pub struct PresenceMember {
    pub user_id: String,
    /// Compact JSON of `user_info`, `null` when absent.
    pub user_info: String,
}

pub fn parse_channel_data(text: &str) -> Result<PresenceMember, &'static str> {
    let value: LazyValue<'_> =
        sonic_rs::from_str(text).map_err(|_| "channel_data is not valid JSON")?;
    let user_id = sonic_rs::get(value.as_raw_str(), ["user_id"])
        .map_err(|_| "channel_data has no user_id")?;
    let user_id = if let Some(s) = user_id.as_str() {
        s.to_owned()
    } else if user_id.is_number() {
        user_id.as_raw_str().to_owned()
    } else {
        return Err("user_id must be a string or a number");
    };
    if user_id.is_empty() {
        return Err("user_id must not be empty");
    }
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
        return sonic_rs::from_str(&inner).ok();
    }
    sonic_rs::from_str(data.as_raw_str()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json_of(frame: &[u8]) -> sonic_rs::Value {
        sonic_rs::from_slice(&frame[2..]).unwrap()
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
}
