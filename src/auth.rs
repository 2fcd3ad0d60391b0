//! Signatures (reference §4): lowercase hex HMAC-SHA256 with the app secret, compared in
//! constant time. Used by subscription and sign-in tokens and by `http::signature`.

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The signature of `message` under `secret`, as lowercase hex: what client auth tokens and
/// HTTP API requests carry.
pub fn hmac_sha256_hex(secret: &[u8], message: &[u8]) -> String {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(message);
    to_hex(&mac.finalize().into_bytes())
}

/// The lowercase hex MD5 of an HTTP request body, for the signed `body_md5` parameter.
pub fn md5_hex(body: &[u8]) -> String {
    use md5::{Digest, Md5};
    to_hex(&Md5::digest(body))
}

/// Lowercase hex, two digits per byte.
pub fn to_hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(HEX[(b >> 4) as usize] as char);
        out.push(HEX[(b & 0xf) as usize] as char);
    }
    out
}

/// Compares two byte strings in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b) {
        diff |= x ^ y;
    }
    diff == 0
}

/// Checks a client token `"<app_key>:<hex>"` against `string_to_sign`.
/// The error text follows the hosted service's wording (reference §4.4).
pub fn verify_token(
    app_key: &str,
    secret: &str,
    token: &str,
    string_to_sign: &str,
) -> Result<(), String> {
    let (key, signature) = token.split_once(':').unwrap_or((token, ""));
    if !constant_time_eq(key.as_bytes(), app_key.as_bytes()) {
        return Err(format!("Invalid key in subscription auth data: '{key}'"));
    }
    let expected = hmac_sha256_hex(secret.as_bytes(), string_to_sign.as_bytes());
    if !constant_time_eq(expected.as_bytes(), signature.as_bytes()) {
        return Err(format!(
            "Invalid signature: Expected HMAC SHA256 hex digest of {string_to_sign}, but got {signature}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shared_vector_matches() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared/vectors/signatures.json"
        );
        let text =
            std::fs::read_to_string(path).expect("../shared/vectors/signatures.json is readable");
        use sonic_rs::{JsonContainerTrait, JsonValueTrait};
        let doc: sonic_rs::Value = sonic_rs::from_str(&text).unwrap();
        let vectors = &doc["vectors"];
        let mut checked = 0;
        for v in vectors.as_array().unwrap().iter() {
            let name = v["name"].as_str().unwrap_or("?");
            let expected = v["expected"].as_str().unwrap();
            match v["kind"].as_str().unwrap() {
                "hmac_sha256_hex" => {
                    let secret = v["secret"].as_str().unwrap();
                    let input = v["string_to_sign"].as_str().unwrap();
                    assert_eq!(
                        hmac_sha256_hex(secret.as_bytes(), input.as_bytes()),
                        expected,
                        "{name}"
                    );
                    if let Some(auth) = v["auth"].as_str() {
                        let key = auth.split(':').next().unwrap();
                        verify_token(key, secret, auth, input).unwrap();
                        assert!(verify_token(key, "wrong", auth, input).is_err());
                    }
                }
                "md5_hex" => {
                    assert_eq!(
                        md5_hex(v["input"].as_str().unwrap().as_bytes()),
                        expected,
                        "{name}"
                    );
                }
                kind if kind.starts_with("sha256_base64") => {
                    // Encrypted channels: the server never derives this key, but the vector pins
                    // the SHA-256 the client libraries use.
                    use sha2::Digest;
                    let mut input = v["channel"].as_str().unwrap().as_bytes().to_vec();
                    input.extend(base64_decode(v["master_key_base64"].as_str().unwrap()));
                    assert_eq!(base64_encode(&Sha256::digest(&input)), expected, "{name}");
                }
                other => panic!("unknown vector kind {other}"),
            }
            checked += 1;
        }
        assert_eq!(checked, vectors.as_array().unwrap().len());
    }

    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    fn base64_encode(bytes: &[u8]) -> String {
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |acc, (i, &b)| acc | (b as u32) << (16 - 8 * i));
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    fn base64_decode(text: &str) -> Vec<u8> {
        let mut bits = 0u32;
        let mut n = 0;
        let mut out = Vec::new();
        for c in text.bytes().filter(|&c| c != b'=') {
            bits = bits << 6 | B64.iter().position(|&x| x == c).unwrap() as u32;
            n += 6;
            if n >= 8 {
                n -= 8;
                out.push((bits >> n) as u8);
            }
        }
        out
    }

    #[test]
    fn token_errors_name_the_problem() {
        let err = verify_token("key", "secret", "other:abc", "1.1:private-a").unwrap_err();
        assert_eq!(err, "Invalid key in subscription auth data: 'other'");
        let err = verify_token("key", "secret", "key:abc", "1.1:private-a").unwrap_err();
        assert!(err.starts_with(
            "Invalid signature: Expected HMAC SHA256 hex digest of 1.1:private-a, but got abc"
        ));
        assert!(verify_token("key", "secret", "", "1.1:x").is_err());
    }

    #[test]
    fn constant_time_eq_basics() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
