//! A WebSocket text message from a client, parsed as the session does (src/shard/session.rs
//! `handle_text`, `subscribe`, `client_event`; src/shard/user.rs `signin`):
//! `check_depth`, then `ClientMessage`, then the `data` of subscribe / unsubscribe / signin
//! (`decode_object`), the presence `channel_data` and the sign-in `user_data`, channel names, and
//! the client-event data that is forwarded to other subscribers.
//!
//! The input is the text message itself (seeds are plain Pusher JSON). Parsing runs on a thread
//! with a small stack (`shardpush_fuzz::on_small_stack`), so an input that gets past
//! `check_depth` and still makes the parser recurse deeply is a crash here (issue 8, defect 2).
//!
//! Checked besides "no panic, no stack overflow":
//! - `check_depth` agrees with a real JSON parser on every valid JSON input, and on any input
//!   bounds the depth that sonic-rs's skipping string rules give (differentials);
//! - what the server would forward (a client event's data, a member's `user_info`) is JSON by the
//!   RFC 8259 grammar (`shardpush_fuzz::is_json`: what clients' parsers accept);
//! - accepted `channel_data` / `user_data` have a non-empty user id.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardpush::auth::verify_token;
use shardpush::protocol::channel::{is_cache_channel, validate_name, ChannelKind};
use shardpush::protocol::events::{
    self, decode_object, parse_channel_data, parse_user_data, ClientMessage, Data, SigninData,
    SubscribeData, UnsubscribeData,
};
use shardpush::protocol::json::{self, check_depth, MAX_JSON_DEPTH};
use shardpush_fuzz::{
    assert_check_depth_agrees, assert_check_depth_bounds_parser, is_json, on_small_stack,
};
use sonic_rs::JsonValueTrait;

const APP_KEY: &str = "app-key";
const APP_SECRET: &str = "app-secret";
const SOCKET_ID: &str = "123.456";
/// The default `max_channel_name_length`.
const MAX_CHANNEL_NAME: usize = 200;

fn assert_json(text: &str, what: &str) {
    assert!(is_json(text), "{what} is not valid JSON: {text:?}");
}

fn channel(name: &str) {
    let kind = ChannelKind::of(name);
    let _ = kind.needs_auth();
    let _ = kind.allows_client_events();
    let _ = is_cache_channel(name);
    let _ = validate_name(name, MAX_CHANNEL_NAME);
}

fn subscribe(data: SubscribeData) {
    channel(&data.channel);
    let to_sign = match &data.channel_data {
        Some(channel_data) => format!("{SOCKET_ID}:{}:{channel_data}", data.channel),
        None => format!("{SOCKET_ID}:{}", data.channel),
    };
    let _ = verify_token(
        APP_KEY,
        APP_SECRET,
        data.auth.as_deref().unwrap_or(""),
        &to_sign,
    );
    if let Some(text) = &data.channel_data {
        assert_check_depth_agrees(text.as_bytes());
        if let Ok(member) = parse_channel_data(text) {
            assert!(!member.user_id.is_empty(), "accepted an empty user_id");
            assert_json(&member.user_info, "user_info");
            // What the other members receive.
            let frame = events::member_added(&data.channel, &member.user_id, &member.user_info);
            let payload = shardpush::protocol::ws::payload_of(&frame);
            assert_json(std::str::from_utf8(payload).unwrap(), "member_added");
        }
    }
}

fn signin(data: Option<SigninData>) {
    let Some(SigninData {
        auth,
        user_data: Some(user_data),
    }) = data
    else {
        return;
    };
    let to_sign = format!("{SOCKET_ID}::user::{user_data}");
    let _ = verify_token(APP_KEY, APP_SECRET, auth.as_deref().unwrap_or(""), &to_sign);
    assert_check_depth_agrees(user_data.as_bytes());
    if let Ok(user) = parse_user_data(&user_data) {
        assert!(!user.id.is_empty(), "accepted an empty user id");
        assert_json(&user.info, "user_info");
        assert!(
            user.watchlist.iter().all(|id| !id.is_empty()),
            "empty id in a watchlist"
        );
        let frame = events::signin_success(&user_data);
        let payload = shardpush::protocol::ws::payload_of(&frame);
        assert_json(std::str::from_utf8(payload).unwrap(), "signin_success");
    }
}

/// The data of a client event as `client_event` forwards it, inside the envelope subscribers get.
fn client_event(event: &str, channel_name: Option<&str>, data: Option<&sonic_rs::LazyValue<'_>>) {
    if let Some(name) = channel_name {
        channel(name);
    }
    // As session.rs `client_event`: string data whose escapes do not decode is refused
    // (`pusher:error`), everything else is forwarded.
    if data.is_some_and(|v| v.is_str() && json::decoded_len(v.as_raw_str()).is_none()) {
        return;
    }
    let literal = match data {
        Some(v) if v.is_str() => v.as_raw_str().to_owned(),
        Some(v) => json::str_literal(&json::compact(v.as_raw_str()).unwrap_or_default()),
        None => json::str_literal("null"),
    };
    let envelope = events::envelope(
        event,
        Some(channel_name.unwrap_or("private-x")),
        Data::Raw(&literal),
        Some("user-1"),
    );
    assert_json(
        std::str::from_utf8(&envelope).unwrap(),
        "the client event forwarded to subscribers",
    );
}

fn handle_text(text: &[u8]) {
    if check_depth(text, MAX_JSON_DEPTH).is_err() {
        return;
    }
    let Ok(message) = sonic_rs::from_slice::<ClientMessage>(text) else {
        return;
    };
    let data = message.data.as_ref();
    // The session decodes only the type that the event names; decoding all three reaches the same
    // code without the fuzzer having to spell the event name first.
    match decode_object::<SubscribeData>(data) {
        Some(sub) => subscribe(sub),
        None => {
            let _ = events::error(None, "pusher:subscribe needs data with a channel");
        }
    }
    if let Some(unsub) = decode_object::<UnsubscribeData>(data) {
        channel(&unsub.channel);
    }
    signin(decode_object::<SigninData>(data));
    if message.event.starts_with("client-") {
        client_event(&message.event, message.channel.as_deref(), data);
    } else {
        channel(message.channel.as_deref().unwrap_or(""));
    }
}

fuzz_target!(|data: &[u8]| {
    // The frame reader hands the session only UTF-8 text messages.
    if std::str::from_utf8(data).is_err() {
        return;
    }
    assert_check_depth_agrees(data);
    assert_check_depth_bounds_parser(data);
    on_small_stack(handle_text, data);
});
