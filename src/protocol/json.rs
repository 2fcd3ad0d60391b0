//! Minimal JSON writing helpers for the hot path: outbound envelopes are written by hand into one
//! buffer so that a publish is encoded exactly once.

/// Appends `s` as a JSON string literal (with quotes) to `out`.
pub fn push_str_literal(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0..=0x1f => {
                out.extend_from_slice(&bytes[start..i]);
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX[(b >> 4) as usize]);
                out.push(HEX[(b & 0xf) as usize]);
                start = i + 1;
                continue;
            }
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        out.extend_from_slice(escape);
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// Returns `s` as a JSON string literal.
pub fn str_literal(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len() + 2);
    push_str_literal(&mut out, s);
    // Input was UTF-8 and only ASCII escapes were added.
    String::from_utf8(out).unwrap_or_default()
}

/// Re-serialises any JSON text compactly (no insignificant whitespace). `None` if it is not JSON.
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
    fn literal_round_trips_through_a_json_parser() {
        let s = "{\"k\":\"v\\\\\"}\t\u{7f}\u{0}end";
        let back: String = sonic_rs::from_str(&str_literal(s)).unwrap();
        assert_eq!(back, s);
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
