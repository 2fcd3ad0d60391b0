//! The body of a signed HTTP API request, through `http::api::parse_events` (every check of a
//! `POST /apps/{id}/events` or `/batch_events` body, without a shard), and the deprecated
//! `POST .../channels/{name}/events` body (the event data itself) through `json::str_literal`.
//!
//! Input: byte 0 bit 0 chooses `/events` or `/batch_events`; the rest is the body (any bytes:
//! `parse_events` must refuse non-UTF-8 itself).
//!
//! Checked besides "no panic, no stack overflow" (parsing runs on a small stack):
//! - every frame the API would publish is JSON by the RFC 8259 grammar, whatever `data` was
//!   (a string forwarded as received, or any JSON value compacted);
//! - a refusal is a 4xx with a JSON `{"error":...}` body;
//! - the deprecated endpoint's body (any UTF-8 text) always becomes a JSON string that decodes
//!   back to the same text;
//! - `check_depth` agrees with a real parser, and bounds the parser's own nesting.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardpush::config::{AppConfig, Config};
use shardpush::http::api::parse_events;
use shardpush::protocol::events::{self, Data};
use shardpush::protocol::json;
use shardpush::shard::Node;
use shardpush_fuzz::{
    assert_check_depth_agrees, assert_check_depth_bounds_parser, is_json, on_small_stack,
};
use sonic_rs::LazyValue;
use std::sync::OnceLock;

/// The server state `parse_events` reads (app limits, socket ids): the development app.
fn node() -> &'static Node {
    static NODE: OnceLock<Node> = OnceLock::new();
    NODE.get_or_init(|| {
        let mut config = Config::default();
        config.apps.push(AppConfig {
            id: "app-id".into(),
            key: "app-key".into(),
            secret: "app-secret".into(),
            ..AppConfig::default()
        });
        Node::new(config, 2)
    })
}

fn parse_body(input: &[u8]) {
    let (batch, body) = match input.split_first() {
        Some((&selector, body)) => (selector & 1 == 1, body),
        None => return,
    };
    let node = node();
    match parse_events(node, &node.app(0), body, batch) {
        Ok(events) => {
            for event in &events {
                for channel in &event.channels {
                    let frame =
                        events::frame(&event.name, Some(channel), Data::Raw(&event.data), None);
                    let payload = shardpush::protocol::ws::payload_of(&frame);
                    let text = std::str::from_utf8(payload).expect("frames are UTF-8");
                    assert!(is_json(text), "published frame is not valid JSON: {text:?}");
                }
            }
        }
        Err(error) => {
            assert!(
                (400..500).contains(&error.status),
                "refused with {}",
                error.status
            );
            let body = error.body();
            assert!(is_json(&body), "error body is not JSON: {body:?}");
        }
    }
    // The deprecated endpoint: the body is the event data, as text.
    if let Ok(text) = std::str::from_utf8(body) {
        let literal = json::str_literal(text);
        let value = sonic_rs::from_str::<LazyValue<'_>>(&literal);
        assert!(value.is_ok(), "str_literal({text:?}) is not a JSON string");
        let decoded: String = sonic_rs::from_str(&literal).expect("a JSON string");
        assert_eq!(decoded, text, "str_literal does not round-trip");
    }
}

fuzz_target!(|data: &[u8]| {
    if let Some((_, body)) = data.split_first() {
        assert_check_depth_agrees(body);
        assert_check_depth_bounds_parser(body);
    }
    on_small_stack(parse_body, data);
});
