//! Channel names and the JSON strings carried inside a subscription or sign-in, on arbitrary text:
//! `channel::validate_name`, `ChannelKind::of`, `is_cache_channel`, and
//! `events::parse_channel_data` / `events::parse_user_data` (which must depth-check before they
//! parse; they run on a small stack so that a recursion the check missed is a crash here).
//!
//! Input: byte 0 is `max_len` for `validate_name`; the rest is the text (invalid UTF-8 is
//! replaced, as `percent_decode` does for names taken from a URL).
//!
//! Checked against a reference written from the rules in the Pusher docs and README:
//! - a name is valid exactly when it has 1..=max_len bytes from `A-Za-z0-9_-=@,.;`;
//! - the kind is decided by prefix, `private-encrypted-` before `private-`;
//! - cache channels are the four `cache-` prefixes;
//! - accepted `channel_data` / `user_data` have a non-empty id and valid `user_info` JSON, and
//!   `check_depth` agrees with a real parser.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardpush::protocol::channel::{is_cache_channel, validate_name, ChannelKind};
use shardpush::protocol::events::{parse_channel_data, parse_user_data};
use shardpush_fuzz::{
    assert_check_depth_agrees, assert_check_depth_bounds_parser, is_json, on_small_stack,
};

fn reference_kind(name: &str) -> ChannelKind {
    for (prefix, kind) in [
        ("private-encrypted-", ChannelKind::PrivateEncrypted),
        ("private-", ChannelKind::Private),
        ("presence-", ChannelKind::Presence),
        ("#server-to-user-", ChannelKind::ServerToUser),
    ] {
        if name.starts_with(prefix) {
            return kind;
        }
    }
    ChannelKind::Public
}

fn parse_json_strings(bytes: &[u8]) {
    let text = std::str::from_utf8(bytes).expect("UTF-8 by construction");
    if let Ok(member) = parse_channel_data(text) {
        assert!(
            !member.user_id.is_empty(),
            "channel_data accepted with an empty user_id"
        );
        assert!(
            is_json(&member.user_info),
            "user_info {:?} is not JSON",
            member.user_info
        );
    }
    if let Ok(user) = parse_user_data(text) {
        assert!(!user.id.is_empty(), "user_data accepted with an empty id");
        assert!(is_json(&user.info), "user_info {:?} is not JSON", user.info);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&max_len, rest)) = data.split_first() else {
        return;
    };
    let max_len = max_len as usize;
    let name = String::from_utf8_lossy(rest);
    let name = name.as_ref();

    let expected_valid = !name.is_empty()
        && name.len() <= max_len
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-=@,.;".contains(&b));
    let result = validate_name(name, max_len);
    assert_eq!(
        result.is_ok(),
        expected_valid,
        "validate_name({name:?}, {max_len}) = {result:?}"
    );
    // The limits the server uses by default.
    let _ = validate_name(name, 164);
    let _ = validate_name(name, 200);

    let kind = ChannelKind::of(name);
    assert_eq!(kind, reference_kind(name), "kind of {name:?}");
    assert_eq!(
        kind.needs_auth(),
        matches!(
            kind,
            ChannelKind::Private | ChannelKind::PrivateEncrypted | ChannelKind::Presence
        )
    );
    let cache = [
        "cache-",
        "private-cache-",
        "private-encrypted-cache-",
        "presence-cache-",
    ]
    .iter()
    .any(|p| name.starts_with(p));
    assert_eq!(is_cache_channel(name), cache, "is_cache_channel({name:?})");

    assert_check_depth_agrees(name.as_bytes());
    assert_check_depth_bounds_parser(name.as_bytes());
    on_small_stack(parse_json_strings, name.as_bytes());
});
