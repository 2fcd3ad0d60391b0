//! The bytes of an HTTP request as they arrive on the shared port: `http::parse_head`, the header
//! helpers the server uses (upgrade, keep-alive, Content-Length), the path and query split, then
//! `signature::parse_query`, `percent_decode` (app key of a WebSocket path, app id, channel and
//! user segments of an API path) and `signature::verify` with a fixed secret, for the body that
//! follows the head.
//!
//! Checked besides "no panic":
//! - a complete head's length is within the input, and the head alone parses to the same length;
//! - `percent_decode` inverts percent-encoding of any decoded value;
//! - signing the parsed query the way the Pusher libraries do and verifying it succeeds for any
//!   method, path, query and body (the verifier and the signer agree on the canonical form).
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardpush::auth::{hmac_sha256_hex, md5_hex};
use shardpush::http::signature::{
    canonical_query, get, parse_query, percent_decode, string_to_sign, verify, Query,
};
use shardpush::http::{parse_head, Parsed};

const SECRET: &str = "app-secret";
const NOW: i64 = 1_700_000_000;

fn percent_encode_all(s: &str) -> String {
    s.bytes().map(|b| format!("%{b:02X}")).collect()
}

/// Signs `query` (minus any auth parameters) as a Pusher server library does, then verifies it.
fn assert_sign_verify_round_trip(method: &str, path: &str, query: &Query, body: &[u8]) {
    let mut signed: Query = query
        .iter()
        .filter(|(k, _)| {
            ![
                "auth_key",
                "auth_timestamp",
                "auth_version",
                "auth_signature",
                "body_md5",
            ]
            .iter()
            .any(|a| k.eq_ignore_ascii_case(a))
        })
        .cloned()
        .collect();
    signed.push(("auth_key".into(), "app-key".into()));
    signed.push(("auth_timestamp".into(), NOW.to_string()));
    signed.push(("auth_version".into(), "1.0".into()));
    if !body.is_empty() {
        signed.push(("body_md5".into(), md5_hex(body)));
    }
    let signature = hmac_sha256_hex(
        SECRET.as_bytes(),
        string_to_sign(method, path, &signed).as_bytes(),
    );
    signed.push(("auth_signature".into(), signature));
    if let Err(e) = verify(method, path, &signed, body, SECRET, NOW + 1) {
        panic!("a correctly signed request was refused: {e:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    let head = match parse_head(data) {
        Parsed::Complete(head) => head,
        Parsed::Partial | Parsed::Invalid(_) => return,
    };
    assert!(
        head.len <= data.len(),
        "head length {} past the input",
        head.len
    );
    match parse_head(&data[..head.len]) {
        Parsed::Complete(again) => assert_eq!(again.len, head.len),
        _ => panic!("the head alone does not parse"),
    }
    let _ = head.is_websocket_upgrade();
    let _ = head.keep_alive();
    let _ = head.header("sec-websocket-key");
    let _ = head.header("sec-websocket-protocol");
    let length = match head.header("content-length").map(|v| v.parse::<usize>()) {
        None => 0,
        Some(Ok(n)) => n,
        Some(Err(_)) => return,
    };
    let rest = &data[head.len..];
    let body = &rest[..length.min(rest.len())];

    let (path, raw_query) = head.path_and_query();
    // WebSocket path: `.../app/{key}`, the key percent-decoded (session.rs `admit`).
    if let Some(i) = path.rfind("/app/") {
        let _ = percent_decode(&path[i + 5..]);
    }
    // API path segments are percent-decoded one by one (api.rs `handle`).
    for segment in path.trim_start_matches('/').split('/') {
        let decoded = percent_decode(segment);
        if !decoded.contains('\u{FFFD}') {
            assert_eq!(percent_decode(&percent_encode_all(&decoded)), decoded);
        }
    }
    // The metrics label of every request (http `serve_requests`): one of a bounded set.
    let route = shardpush::metrics::Route::of(&head.method, path);
    assert!(shardpush::metrics::Route::ALL.contains(&route));
    let query = parse_query(raw_query);
    for (k, v) in &query {
        for s in [k, v] {
            // `+` decodes to a space, so encoding everything as %XX must give the value back.
            assert_eq!(&percent_decode(&percent_encode_all(s)), s);
        }
    }
    let _ = canonical_query(&query);
    let _ = get(&query, "auth_key");
    // Verify as received, at the request's own timestamp so the signature check is reached.
    let now = get(&query, "auth_timestamp")
        .and_then(|t| t.parse::<i64>().ok())
        .unwrap_or(NOW);
    let _ = verify(&head.method, path, &query, body, SECRET, now);
    // And at the server's clock, whatever timestamp the request claims (an extreme one used to
    // overflow the expiry check).
    let _ = verify(&head.method, path, &query, body, SECRET, NOW);
    assert_sign_verify_round_trip(&head.method, path, &query, body);
});
