//! The public Pusher protocol, as much as a load generator needs: the upgrade request, signed
//! HTTP API requests, channel signatures, and recognising messages without parsing JSON.

use crate::net::Ws;
use hmac::{Hmac, Mac};
use memchr::memmem;
use sha2::Sha256;

pub struct App {
    pub id: String,
    pub key: String,
    pub secret: String,
}

pub fn hmac_hex(secret: &str, text: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(text.as_bytes());
    hex(&mac.finalize().into_bytes())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn upgrade_request(host: &str, key: &str) -> Vec<u8> {
    format!(
        "GET /app/{key}?protocol=7&client=loadtest&version=1.0 HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .into_bytes()
}

/// A signed `POST /apps/{id}/events` for the `pusher-signature` scheme, keep-alive.
pub fn trigger_request(
    app: &App,
    host: &str,
    channel: &str,
    event: &str,
    data: &str,
    unix_secs: u64,
) -> Vec<u8> {
    let body = format!("{{\"name\":\"{event}\",\"channel\":\"{channel}\",\"data\":\"{data}\"}}");
    use md5::Digest;
    let body_md5 = hex(&md5::Md5::digest(body.as_bytes()));
    let path = format!("/apps/{}/events", app.id);
    let query = format!(
        "auth_key={}&auth_timestamp={unix_secs}&auth_version=1.0&body_md5={body_md5}",
        app.key
    );
    let signature = hmac_hex(&app.secret, &format!("POST\n{path}\n{query}"));
    format!(
        "POST {path}?{query}&auth_signature={signature} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// `pusher:subscribe`, signed when the channel is private or presence.
pub fn subscribe(app: &App, socket_id: &str, channel: &str, channel_data: Option<&str>) -> String {
    let needs_auth = channel.starts_with("private-") || channel.starts_with("presence-");
    if !needs_auth {
        return format!(
            "{{\"event\":\"pusher:subscribe\",\"data\":{{\"channel\":\"{channel}\"}}}}"
        );
    }
    let mut to_sign = format!("{socket_id}:{channel}");
    let mut extra = String::new();
    if let Some(data) = channel_data {
        to_sign.push(':');
        to_sign.push_str(data);
        extra = format!(",\"channel_data\":{}", json_string(data));
    }
    let auth = format!("{}:{}", app.key, hmac_hex(&app.secret, &to_sign));
    format!("{{\"event\":\"pusher:subscribe\",\"data\":{{\"channel\":\"{channel}\",\"auth\":\"{auth}\"{extra}}}}}")
}

pub fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

/// True when a server message is the event `name` (key order differs between servers).
pub fn is_event(message: &[u8], name: &[u8]) -> bool {
    let Some(at) = memmem::find(message, b"\"event\":\"") else {
        return false;
    };
    message[at + 9..].starts_with(name) && message.get(at + 9 + name.len()) == Some(&b'"')
}

/// The socket id inside `pusher:connection_established` (its data is a JSON string).
pub fn socket_id(message: &[u8]) -> Option<&str> {
    let at = memmem::find(message, b"socket_id\\\":\\\"")? + 14;
    let len = memchr::memchr(b'\\', &message[at..])?;
    std::str::from_utf8(&message[at..at + len]).ok()
}

/// Steps a client through `connection_established` -> `pusher:subscribe` ->
/// `subscription_succeeded` (`ws.step` 0, 1, 2). `subscribe` builds the subscribe message from
/// the socket's tag and id. Returns true when `message` confirmed the subscription.
pub fn advance_subscription(
    ws: &mut Ws,
    message: &[u8],
    subscribe: impl FnOnce(u32, &str) -> String,
) -> bool {
    if ws.step == 0 && is_event(message, b"pusher:connection_established") {
        if let Some(id) = socket_id(message) {
            let text = subscribe(ws.tag, id);
            ws.step = 1;
            ws.send_text(text.as_bytes());
        }
        false
    } else if ws.step == 1 && is_event(message, b"pusher_internal:subscription_succeeded") {
        ws.step = 2;
        true
    } else {
        false
    }
}

/// Timestamped payloads: `T` + 20 digits of CLOCK_MONOTONIC ns + `|` + padding to `size` bytes.
/// Plain text is a valid Pusher `data` string and needs no JSON escaping anywhere.
pub fn stamped_data(sent_ns: u64, size: usize) -> String {
    let mut s = format!("T{sent_ns:020}|");
    while s.len() < size {
        s.push('x');
    }
    s
}

/// The send time in a delivered event, if it carries one.
pub fn stamp_of(message: &[u8]) -> Option<u64> {
    let at = memmem::find(message, b"\"data\":\"T")? + 9;
    let digits = message.get(at..at + 20)?;
    let mut v = 0u64;
    for d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        v = v * 10 + (d - b'0') as u64;
    }
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_events_and_ids_in_any_key_order() {
        let hello = br#"{"event":"pusher:connection_established","data":"{\"socket_id\":\"123.456\",\"activity_timeout\":120}"}"#;
        assert!(is_event(hello, b"pusher:connection_established"));
        assert!(!is_event(hello, b"pusher:connection"));
        assert_eq!(socket_id(hello), Some("123.456"));
        let sockudo =
            br#"{"channel":"c","data":"{}","event":"pusher_internal:subscription_succeeded"}"#;
        assert!(is_event(sockudo, b"pusher_internal:subscription_succeeded"));
    }

    #[test]
    fn stamps_round_trip_at_the_requested_size() {
        let data = stamped_data(1_234_567_890_123, 100);
        assert_eq!(data.len(), 100);
        let frame = format!("{{\"event\":\"e\",\"channel\":\"c\",\"data\":\"{data}\"}}");
        assert_eq!(stamp_of(frame.as_bytes()), Some(1_234_567_890_123));
        assert_eq!(stamp_of(br#"{"data":"{}"}"#), None);
    }

    #[test]
    fn signs_like_the_pusher_docs() {
        // reference §8.1: private-foobar for socket 1234.1234
        let app = App {
            id: "3".into(),
            key: "278d425bdf160c739803".into(),
            secret: "7ad3773142a6692b25b8".into(),
        };
        let sub = subscribe(&app, "1234.1234", "private-foobar", None);
        assert!(sub.contains("58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4"));
    }
}
