//! Minimal JSON writing helpers for the hot path: outbound envelopes are written by hand into one
//! buffer so that a publish is encoded exactly once.

/// Appends `s` as a JSON string literal (with quotes) to `out`.
pub fn push_str_literal(out: &mut Vec<u8>, s: &str) {
    out.reserve(s.len() + 2);
    out.push(b'"');
    let mut rest = s.as_bytes();
    while let Some(i) = first_to_escape(rest) {
        out.extend_from_slice(&rest[..i]);
        push_escaped(out, rest[i]);
        rest = &rest[i + 1..];
    }
    out.extend_from_slice(rest);
    out.push(b'"');
}

fn needs_escape(b: u8) -> bool {
    b < 0x20 || b == b'"' || b == b'\\'
}

/// Index of the first byte JSON needs escaped. Whole 16-byte chunks are tested without an early
/// exit (the compiler turns that into a few vector instructions): names and ids rarely need any
/// escaping, so most strings are one scan and one copy.
fn first_to_escape(bytes: &[u8]) -> Option<usize> {
    const CHUNK: usize = 16;
    let mut offset = 0;
    for chunk in bytes.chunks_exact(CHUNK) {
        if chunk.iter().fold(false, |any, &b| any | needs_escape(b)) {
            break;
        }
        offset += CHUNK;
    }
    let at = bytes[offset..].iter().position(|&b| needs_escape(b))?;
    Some(offset + at)
}

fn push_escaped(out: &mut Vec<u8>, b: u8) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    match b {
        b'"' => out.extend_from_slice(b"\\\""),
        b'\\' => out.extend_from_slice(b"\\\\"),
        b'\n' => out.extend_from_slice(b"\\n"),
        b'\r' => out.extend_from_slice(b"\\r"),
        b'\t' => out.extend_from_slice(b"\\t"),
        0x08 => out.extend_from_slice(b"\\b"),
        0x0c => out.extend_from_slice(b"\\f"),
        _ => {
            out.extend_from_slice(b"\\u00");
            out.push(HEX[(b >> 4) as usize]);
            out.push(HEX[(b & 0xf) as usize]);
        }
    }
}

/// Returns `s` as a JSON string literal.
pub fn str_literal(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len() + 2);
    push_str_literal(&mut out, s);
    // Input was UTF-8 and only ASCII escapes were added.
    String::from_utf8(out).unwrap_or_default()
}

/// Deepest nesting of arrays and objects accepted from the network. A Pusher envelope needs three
/// levels; application `data` rarely needs more than a handful. JSON parsers recurse per level, so
/// without this bound a few kilobytes of `[[[[...` would exhaust a shard's stack.
pub const MAX_JSON_DEPTH: usize = 64;

/// Checks, in one pass without recursion, that `bytes` nests arrays and objects at most
/// `max_depth` deep (brackets inside strings do not count). It validates nothing else: the parser
/// that runs afterwards does, and can no longer recurse without bound.
pub fn check_depth(bytes: &[u8], max_depth: usize) -> Result<(), String> {
    // Fast path for every ordinary message: with no more opening brackets than the limit, it
    // cannot nest deeper. This count compiles to a vectorised loop; the scan below does not.
    if count_opening_brackets(bytes) <= max_depth {
        return Ok(());
    }
    // Strings are followed by the JSON grammar, escapes included: a parser takes `\u` and the
    // next four bytes as one escape, so a scan that read `\u000\"` differently would end the
    // string elsewhere and miss every bracket after it (found by fuzzing).
    let invalid_escape = || Err("Invalid escape in a JSON string".to_string());
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    let mut hex_due = 0u8;
    for &b in bytes {
        if in_string {
            if hex_due > 0 {
                if !b.is_ascii_hexdigit() {
                    return invalid_escape();
                }
                hex_due -= 1;
            } else if escaped {
                escaped = false;
                match b {
                    b'u' => hex_due = 4,
                    b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {}
                    _ => return invalid_escape(),
                }
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max_depth {
                    return Err(format!(
                        "JSON nested deeper than {max_depth} levels is not accepted"
                    ));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// The decoded length of a JSON string literal (quotes included in `raw`), or `None` when it is
/// not a valid one (a bad escape, a lone surrogate). A lazily parsed value is not validated
/// inside its strings, and a string forwarded as received must not break its receivers' parsers.
pub fn decoded_len(raw: &str) -> Option<usize> {
    match sonic_rs::from_str::<&str>(raw) {
        Ok(s) => Some(s.len()),
        // Borrowing fails when there are escapes: decode to know.
        Err(_) => sonic_rs::from_str::<String>(raw).ok().map(|s| s.len()),
    }
}

/// Counts `[` and `{` (`[` | 0x20 is `{`, and no other byte maps there). Byte-wide counters over
/// chunks of at most 255 bytes let the compiler compare 16 bytes per instruction.
fn count_opening_brackets(bytes: &[u8]) -> usize {
    bytes
        .chunks(255)
        .map(|chunk| {
            let in_chunk = chunk
                .iter()
                .fold(0u8, |n, &b| n + u8::from(b | 0x20 == b'{'));
            usize::from(in_chunk)
        })
        .sum()
}

/// Re-serialises any JSON text compactly (no insignificant whitespace). `None` if it is not JSON.
/// It parses recursively: `raw` must come from text that passed `check_depth` (every caller's
/// does: a client message, an HTTP body, `channel_data` or `user_data`).
pub fn compact(raw: &str) -> Option<String> {
    let value: sonic_rs::Value = sonic_rs::from_str(raw).ok()?;
    sonic_rs::to_string(&value).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_quotes_backslashes_and_controls() {
        assert_eq!(str_literal(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(str_literal("x\ny\u{1}"), "\"x\\ny\\u0001\"");
        assert_eq!(str_literal("ünï€"), "\"ünï€\"");
    }

    #[test]
    fn literal_matches_a_reference_encoder_at_every_position() {
        // Escapes before, inside and after the 16-byte chunks, and strings of every short length.
        for len in 0..40 {
            for at in 0..len {
                for special in ['"', '\\', '\n', '\u{1}', '\u{1f}', 'é'] {
                    let mut text: String = "abcdefghijklmnopqrstuvwxyz0123456789ABCD"[..len].into();
                    text.replace_range(at..at + 1, &special.to_string());
                    let reference = serde_json::to_string(&text).unwrap();
                    let ours = str_literal(&text);
                    let back: String = sonic_rs::from_str(&ours).unwrap();
                    assert_eq!(back, text, "{text:?}");
                    if special != '\u{1f}' && special != '\u{1}' {
                        assert_eq!(ours, reference, "{text:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn literal_round_trips_through_a_json_parser() {
        let s = "{\"k\":\"v\\\\\"}\t\u{7f}\u{0}end";
        let back: String = sonic_rs::from_str(&str_literal(s)).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn depth_counts_brackets_outside_strings_only() {
        assert!(check_depth(br#"{"a":[{"b":[]}]}"#, 4).is_ok());
        assert!(check_depth(br#"{"a":[{"b":[]}]}"#, 3).is_err());
        assert!(check_depth(br#"{"a":"[[[[[[\"[[[["}"#, 1).is_ok());
        let deep = "[".repeat(20_000);
        assert!(check_depth(deep.as_bytes(), MAX_JSON_DEPTH).is_err());
        // Closing brackets never take the count below zero, so they cannot buy extra depth.
        assert!(check_depth(b"]]]]]][[", 2).is_ok());
        assert!(check_depth(b"]]]]]][[[", 2).is_err());
    }

    #[test]
    fn a_malformed_unicode_escape_cannot_hide_brackets() {
        // The parser ends this string at the last quote; a scan that took `\"` as an escaped
        // quote would count none of the brackets after it.
        let mut text = br#"{"event":"x","data":["\u000\","#.to_vec();
        text.extend(std::iter::repeat_n(b'[', 60_000));
        assert!(check_depth(&text, MAX_JSON_DEPTH).is_err());
        assert!(check_depth(br#""\u0n":"{"#, 0).is_err());
        assert!(check_depth(br#"{"a":"\u00e9\n\"[[[["}"#, 1).is_ok());
        assert!(check_depth(br#"{"a":"\q"}[[[[["#, 1).is_err());
    }

    #[test]
    fn string_literals_are_validated_with_their_escapes() {
        assert_eq!(decoded_len(r#""plain""#), Some(5));
        assert_eq!(decoded_len(r#""a\"b\n""#), Some(4));
        assert_eq!(decoded_len(r#""\u00e9""#), Some(2));
        assert_eq!(decoded_len(r#""bad \x escape""#), None);
        assert_eq!(decoded_len(r#""lone \ud800 surrogate""#), None);
        assert_eq!(decoded_len("not a string"), None);
    }

    #[test]
    fn bracket_count_matches_a_plain_count() {
        let text: Vec<u8> = (0..2000u32).map(|i| (i * 7 % 256) as u8).collect();
        let plain = text.iter().filter(|&&b| b == b'[' || b == b'{').count();
        assert_eq!(count_opening_brackets(&text), plain);
        assert_eq!(count_opening_brackets(&[b'['; 600]), 600);
    }

    #[test]
    fn compact_removes_whitespace() {
        assert_eq!(
            compact("{ \"a\" : [1, 2] }").as_deref(),
            Some(r#"{"a":[1,2]}"#)
        );
        assert_eq!(compact("{oops"), None);
    }
}
