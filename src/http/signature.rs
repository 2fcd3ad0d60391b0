//! HTTP API request signing (reference §5.1-5.2), matching the `pusher-signature` gem:
//! lower-cased keys, stable byte-order sort, values unescaped, 600 s window, body_md5.

use crate::auth::{constant_time_eq, hmac_sha256_hex, md5_hex};

/// Decoded query pairs in their original order (duplicates kept).
pub type Query = Vec<(String, String)>;

/// How far `auth_timestamp` may be from the server's clock, either way, before a request is
/// refused as expired (bounds how long a captured request can be replayed).
pub const TIMESTAMP_WINDOW_SECS: i64 = 600;
const MD5_OF_EMPTY: &str = "d41d8cd98f00b204e9800998ecf8427e";

/// Splits and form-decodes a raw query string (`+` is a space).
pub fn parse_query(raw: &str) -> Query {
    raw.split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// Decodes `%XX` escapes and `+` (a space); a malformed escape is kept as written, and bytes
/// that are not UTF-8 become U+FFFD.
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex_val(bytes[i + 1]), hex_val(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex_val(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// The first value of `key` (case-insensitive). Also reads the WebSocket path's `protocol`.
pub fn get<'a>(query: &'a Query, key: &str) -> Option<&'a str> {
    query
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(key))
        .map(|(_, v)| v.as_str())
}

/// `k=v&k=v` of every pair except `auth_signature`, keys lower-cased, sorted by key.
pub fn canonical_query(query: &Query) -> String {
    let mut pairs: Vec<(String, &str)> = query
        .iter()
        .filter(|(k, _)| !k.eq_ignore_ascii_case("auth_signature"))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.as_str()))
        .collect();
    pairs.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out = String::new();
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(k);
        out.push('=');
        out.push_str(v);
    }
    out
}

/// The text an HTTP API request is signed over: `METHOD\npath\ncanonical query`.
pub fn string_to_sign(method: &str, path: &str, query: &Query) -> String {
    format!(
        "{}\n{}\n{}",
        method.to_ascii_uppercase(),
        path,
        canonical_query(query)
    )
}

/// Why a request was refused: always a 401 with this text.
#[derive(Debug, PartialEq, Eq)]
pub struct Unauthorized(pub String);

/// Verifies a signed request for an app whose key and secret are given.
/// `now` is Unix seconds. The key must already have been matched to pick the app.
pub fn verify(
    method: &str,
    path: &str,
    query: &Query,
    body: &[u8],
    secret: &str,
    now: i64,
) -> Result<(), Unauthorized> {
    let missing = |name: &str| Unauthorized(format!("Missing required parameter: {name}"));
    let timestamp = get(query, "auth_timestamp").ok_or_else(|| missing("auth_timestamp"))?;
    let version = get(query, "auth_version").ok_or_else(|| missing("auth_version"))?;
    let signature = get(query, "auth_signature").ok_or_else(|| missing("auth_signature"))?;
    if version != "1.0" {
        return Err(Unauthorized(format!("Version not supported: {version}")));
    }
    let ts: i64 = timestamp
        .parse()
        .map_err(|_| Unauthorized(format!("Invalid auth_timestamp: {timestamp}")))?;
    if now.abs_diff(ts) >= TIMESTAMP_WINDOW_SECS.unsigned_abs() {
        return Err(Unauthorized(format!(
            "Timestamp expired: Given timestamp ({ts}) not within {TIMESTAMP_WINDOW_SECS}s of server time ({now})"
        )));
    }
    // Python signs GETs with the md5 of the empty body; accept that, and require a match otherwise.
    let body_md5_ok = match get(query, "body_md5") {
        Some(given) if body.is_empty() => given == MD5_OF_EMPTY,
        Some(given) => constant_time_eq(given.as_bytes(), md5_hex(body).as_bytes()),
        None if !body.is_empty() => return Err(missing("body_md5")),
        None => true,
    };
    if !body_md5_ok {
        return Err(Unauthorized("body_md5 does not match the body".into()));
    }
    let to_sign = string_to_sign(method, path, query);
    let expected = hmac_sha256_hex(secret.as_bytes(), to_sign.as_bytes());
    if !constant_time_eq(expected.as_bytes(), signature.as_bytes()) {
        return Err(Unauthorized(format!(
            "Invalid signature: you should have sent HmacSHA256Hex({:?}, your_secret_key), but you sent \"{signature}\"",
            to_sign
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signed(method: &str, path: &str, params: &str, secret: &str) -> Query {
        let mut q = parse_query(params);
        let sig = hmac_sha256_hex(
            secret.as_bytes(),
            string_to_sign(method, path, &q).as_bytes(),
        );
        q.push(("auth_signature".into(), sig));
        q
    }

    #[test]
    fn docs_worked_example() {
        let body = br#"{"name":"foo","channels":["project-3"],"data":"{\"some\":\"data\"}"}"#;
        // As the Go library sends it: auth_signature second, not last.
        let q = parse_query("auth_key=278d425bdf160c739803&auth_signature=da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c&auth_timestamp=1353088179&auth_version=1.0&body_md5=ec365a775a4cd0599faeb73354201b6f");
        assert_eq!(
            verify(
                "POST",
                "/apps/3/events",
                &q,
                body,
                "7ad3773142a6692b25b8",
                1353088179 + 5
            ),
            Ok(())
        );
        let err = verify(
            "POST",
            "/apps/3/events",
            &q,
            b"{}",
            "7ad3773142a6692b25b8",
            1353088179,
        )
        .unwrap_err();
        assert!(err.0.contains("body_md5"));
    }

    #[test]
    fn go_library_vectors() {
        let q = parse_query("auth_key=d41a439c438a100756f5&auth_timestamp=1427034994&auth_version=1.0&filter_by_prefix=presence-&info=user_count");
        let s = string_to_sign("GET", "/apps/102015/channels", &q);
        assert_eq!(
            hmac_sha256_hex(b"4bf35003e819bb138249", s.as_bytes()),
            "4d8a02edcc8a758b0162cd6da690a9a45fb8ae326a276dca1e06a0bc42796c11"
        );
    }

    #[test]
    fn gem_rules_upper_case_keys_arrays_and_unescaped_values() {
        let lower =
            parse_query("auth_key=key&auth_timestamp=1234&auth_version=1.0&go=here&query=params");
        let upper =
            parse_query("auth_key=key&auth_timestamp=1234&auth_version=1.0&GO=here&Query=params");
        assert_eq!(canonical_query(&lower), canonical_query(&upper));
        assert_eq!(
            hmac_sha256_hex(
                b"secret",
                string_to_sign("post", "/some/path", &upper).as_bytes()
            ),
            "3b237953a5ba6619875cbb2a2d43e8da9ef5824e8a2c689f6284ac85bc1ea0db"
        );
        let arrays = parse_query("things%5B%5D=thing1&things%5B%5D=thing2&key%3B=value%40&nil");
        assert_eq!(
            canonical_query(&arrays),
            "key;=value@&nil=&things[]=thing1&things[]=thing2"
        );
    }

    #[test]
    fn php_percent_encoded_values_verify() {
        // PHP (Guzzle) percent-encodes the comma but signs the raw value.
        let mut q = parse_query(
            "auth_key=k&auth_timestamp=1000&auth_version=1.0&info=user_count,subscription_count",
        );
        let sig = hmac_sha256_hex(
            b"s",
            string_to_sign("GET", "/apps/1/channels/presence-a", &q).as_bytes(),
        );
        q = parse_query(&format!("auth_key=k&auth_timestamp=1000&auth_version=1.0&info=user_count%2Csubscription_count&auth_signature={sig}"));
        assert_eq!(
            verify("GET", "/apps/1/channels/presence-a", &q, b"", "s", 1000),
            Ok(())
        );
    }

    #[test]
    fn python_get_with_md5_of_empty_body() {
        let q = signed("GET", "/apps/1/channels", "auth_key=k&auth_timestamp=1000&auth_version=1.0&body_md5=d41d8cd98f00b204e9800998ecf8427e", "s");
        assert_eq!(
            verify("GET", "/apps/1/channels", &q, b"", "s", 1000),
            Ok(())
        );
    }

    #[test]
    fn timestamp_window_is_600_seconds() {
        let q = signed(
            "GET",
            "/x",
            "auth_key=k&auth_timestamp=1234&auth_version=1.0",
            "s",
        );
        assert_eq!(verify("GET", "/x", &q, b"", "s", 1234 + 599), Ok(()));
        assert!(verify("GET", "/x", &q, b"", "s", 1234 + 600)
            .unwrap_err()
            .0
            .starts_with("Timestamp expired"));
        assert!(verify("GET", "/x", &q, b"", "s", 1234 - 600).is_err());
    }

    #[test]
    fn rejects_wrong_secret_version_and_missing_params() {
        let q = signed(
            "GET",
            "/x",
            "auth_key=k&auth_timestamp=1234&auth_version=1.0",
            "s",
        );
        assert!(verify("GET", "/x", &q, b"", "other", 1234)
            .unwrap_err()
            .0
            .starts_with("Invalid signature"));
        assert!(verify("GET", "/y", &q, b"", "s", 1234).is_err());
        let q = signed(
            "GET",
            "/x",
            "auth_key=k&auth_timestamp=1234&auth_version=2.0",
            "s",
        );
        assert!(verify("GET", "/x", &q, b"", "s", 1234).is_err());
        let q = parse_query("auth_key=k&auth_version=1.0&auth_signature=x");
        assert!(verify("GET", "/x", &q, b"", "s", 1234)
            .unwrap_err()
            .0
            .contains("auth_timestamp"));
        let q = signed(
            "POST",
            "/x",
            "auth_key=k&auth_timestamp=1234&auth_version=1.0",
            "s",
        );
        assert!(verify("POST", "/x", &q, b"{}", "s", 1234)
            .unwrap_err()
            .0
            .contains("body_md5"));
    }

    #[test]
    fn percent_decoding_edge_cases() {
        assert_eq!(percent_decode("a%2Cb+c"), "a,b c");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }

    #[test]
    fn extreme_timestamps_are_expired_not_an_overflow() {
        for ts in [i64::MIN, i64::MAX] {
            let q = parse_query(&format!(
                "auth_key=k&auth_timestamp={ts}&auth_version=1.0&auth_signature=00"
            ));
            for now in [0, 1_700_000_000] {
                let err = verify("GET", "/x", &q, b"", "s", now).unwrap_err();
                assert!(
                    err.0.contains("Timestamp expired"),
                    "{ts} at {now}: {}",
                    err.0
                );
            }
        }
    }
}
