//! Helpers shared by the fuzz targets in `fuzz_targets/`.
//!
//! - [`on_small_stack`]: runs a parser on a long-lived thread whose stack is far smaller than a
//!   shard's, so that a JSON input which slips past `check_depth` and makes the parser recurse
//!   deeply overflows *here*, at fuzzing input sizes (a few KB), instead of needing the ~20 KB
//!   inputs that overflow a real shard.
//! - [`json_depth`]: the nesting depth of a parsed JSON value, to check `check_depth` against a
//!   real parser (differential oracle).

use sonic_rs::JsonContainerTrait;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Mutex, OnceLock};

/// Stack of the parsing thread. Measured in the fuzz build (AddressSanitizer, debug assertions;
/// `SHARDPUSH_FUZZ_STACK_KIB` overrides it for such measurements): the deepest legitimate
/// messages (`data`, `channel_data` or `user_data` nested `MAX_JSON_DEPTH` = 64 deep) need between
/// 128 and 160 KiB, mostly sonic-rs building a `Value` (about 2 KiB a level); sonic-rs skipping
/// a `LazyValue` costs about 0.2 KiB a level, so a skip that got past `check_depth` overflows
/// 256 KiB somewhere between 1,000 and 1,500 levels.
pub const SMALL_STACK_BYTES: usize = 256 * 1024;

/// The stack actually used: `SMALL_STACK_BYTES`, or `SHARDPUSH_FUZZ_STACK_KIB` KiB (to measure).
fn small_stack_bytes() -> usize {
    std::env::var("SHARDPUSH_FUZZ_STACK_KIB")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .map_or(SMALL_STACK_BYTES, |kib| kib * 1024)
}

type Job = (fn(&[u8]), Vec<u8>);

struct Worker {
    jobs: SyncSender<Job>,
    done: Receiver<()>,
}

fn worker() -> &'static Mutex<Worker> {
    static WORKER: OnceLock<Mutex<Worker>> = OnceLock::new();
    WORKER.get_or_init(|| {
        let (jobs, job_rx) = sync_channel::<Job>(0);
        let (done_tx, done) = sync_channel::<()>(0);
        std::thread::Builder::new()
            .name("small-stack-parser".into())
            .stack_size(small_stack_bytes())
            .spawn(move || {
                for (f, input) in job_rx {
                    f(&input);
                    if done_tx.send(()).is_err() {
                        break;
                    }
                }
            })
            .expect("spawn the small-stack parser thread");
        Mutex::new(Worker { jobs, done })
    })
}

/// Runs `f(input)` on the small-stack thread and waits for it. A panic there aborts the process
/// (libfuzzer-sys installs an aborting panic hook), and a stack overflow is fatal, so either is
/// reported as a crash with this input.
pub fn on_small_stack(f: fn(&[u8]), input: &[u8]) {
    let worker = worker().lock().unwrap_or_else(|e| e.into_inner());
    worker
        .jobs
        .send((f, input.to_vec()))
        .expect("small-stack parser thread is alive");
    worker
        .done
        .recv()
        .expect("small-stack parser thread finished the job");
}

/// Nesting depth of arrays and objects in `value` (a scalar is 0, `[]` is 1, `[{}]` is 2).
/// Recursive: call it only on values parsed from inputs of bounded size.
pub fn json_depth(value: &sonic_rs::Value) -> usize {
    if let Some(array) = value.as_array() {
        1 + array.iter().map(json_depth).max().unwrap_or(0)
    } else if let Some(object) = value.as_object() {
        1 + object.iter().map(|(_, v)| json_depth(v)).max().unwrap_or(0)
    } else {
        0
    }
}

/// Differential check of `shardpush::protocol::json::check_depth` against sonic-rs: for any text
/// that sonic-rs parses as JSON, `check_depth(text, d)` passes exactly when `d` is at least the
/// real nesting depth. Inputs that are not JSON are not checked (the parser rejects them anyway).
pub fn assert_check_depth_agrees(text: &[u8]) {
    use shardpush::protocol::json::check_depth;
    // An upper bound on the depth that does not depend on the code under test: past it, parsing
    // recursively on this thread to get the oracle's answer could overflow the oracle itself.
    let brackets = text.iter().filter(|&&b| b == b'[' || b == b'{').count();
    if brackets > DIFFERENTIAL_MAX_BRACKETS {
        return;
    }
    let Ok(value) = sonic_rs::from_slice::<sonic_rs::Value>(text) else {
        return;
    };
    let depth = json_depth(&value);
    assert!(
        check_depth(text, depth).is_ok(),
        "check_depth refuses valid JSON of depth {depth} at limit {depth}"
    );
    if depth > 0 {
        assert!(
            check_depth(text, depth - 1).is_err(),
            "check_depth accepts valid JSON of depth {depth} at limit {}",
            depth - 1
        );
    }
}

/// Nesting depth of `text` as sonic-rs's validating skip (`skip_one`, the path that recurses
/// when it skips a `LazyValue` such as a message's `data`) delimits strings: a backslash escapes one
/// byte, except `\u`, after which the parser skips four bytes whatever they are. Brackets outside
/// strings count; a closing one never takes the depth below zero (as in `check_depth`).
pub fn depth_by_parser_string_rules(text: &[u8]) -> usize {
    let (mut depth, mut max) = (0usize, 0usize);
    let mut i = 0;
    let mut in_string = false;
    while i < text.len() {
        let b = text[i];
        i += 1;
        if in_string {
            match b {
                b'\\' if text.get(i) == Some(&b'u') => i += 5,
                b'\\' => i += 1,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// `check_depth` must bound the nesting the parser will recurse into, on any input (valid JSON
/// or not): it must refuse `text` at any limit below the depth that the parser's own string rules
/// give. Cheap enough for every input, and needs only a few brackets to show a disagreement (the
/// small-stack oracle needs a thousand).
pub fn assert_check_depth_bounds_parser(text: &[u8]) {
    use shardpush::protocol::json::check_depth;
    let depth = depth_by_parser_string_rules(text);
    if depth > 0 {
        assert!(
            check_depth(text, depth - 1).is_err(),
            "check_depth accepts this input at limit {} but the parser (sonic-rs skip_one string \
             rules) nests it {depth} deep",
            depth - 1
        );
    }
}

/// Inputs with more opening brackets than this skip the differential check.
pub const DIFFERENTIAL_MAX_BRACKETS: usize = 2000;

/// Whether `text` is JSON by the grammar of RFC 8259 (what every client's parser accepts; escapes
/// of lone surrogates are grammatical, as in JavaScript's `JSON.parse`). Iterative, so any depth
/// is fine. Used to check what the server forwards to subscribers.
pub fn is_json(text: &str) -> bool {
    let b = text.as_bytes();
    let mut i = 0usize;
    // Open containers: b'[' or b'{'.
    let mut stack: Vec<u8> = Vec::new();
    skip_ws(b, &mut i);
    loop {
        // A value is expected at `i`.
        match b.get(i) {
            Some(b'[') => {
                i += 1;
                skip_ws(b, &mut i);
                if b.get(i) == Some(&b']') {
                    i += 1;
                } else {
                    stack.push(b'[');
                    continue;
                }
            }
            Some(b'{') => {
                i += 1;
                skip_ws(b, &mut i);
                if b.get(i) == Some(&b'}') {
                    i += 1;
                } else {
                    if !member_key(b, &mut i) {
                        return false;
                    }
                    stack.push(b'{');
                    continue;
                }
            }
            Some(b'"') => {
                if !string(b, &mut i) {
                    return false;
                }
            }
            Some(b't') => {
                if !literal(b, &mut i, b"true") {
                    return false;
                }
            }
            Some(b'f') => {
                if !literal(b, &mut i, b"false") {
                    return false;
                }
            }
            Some(b'n') => {
                if !literal(b, &mut i, b"null") {
                    return false;
                }
            }
            Some(b'-' | b'0'..=b'9') => {
                if !number(b, &mut i) {
                    return false;
                }
            }
            _ => return false,
        }
        // A value ended: close containers, or find the next element.
        loop {
            skip_ws(b, &mut i);
            let Some(&open) = stack.last() else {
                return i == b.len();
            };
            let close = if open == b'[' { b']' } else { b'}' };
            match b.get(i) {
                Some(&c) if c == close => {
                    i += 1;
                    stack.pop();
                }
                Some(b',') => {
                    i += 1;
                    skip_ws(b, &mut i);
                    if open == b'{' && !member_key(b, &mut i) {
                        return false;
                    }
                    break;
                }
                _ => return false,
            }
        }
    }
}

fn skip_ws(b: &[u8], i: &mut usize) {
    while matches!(b.get(*i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        *i += 1;
    }
}

/// `"key" :` followed by optional whitespace.
fn member_key(b: &[u8], i: &mut usize) -> bool {
    if b.get(*i) != Some(&b'"') || !string(b, i) {
        return false;
    }
    skip_ws(b, i);
    if b.get(*i) != Some(&b':') {
        return false;
    }
    *i += 1;
    skip_ws(b, i);
    true
}

fn string(b: &[u8], i: &mut usize) -> bool {
    *i += 1; // the opening quote
    loop {
        match b.get(*i) {
            None => return false,
            Some(b'"') => {
                *i += 1;
                return true;
            }
            Some(b'\\') => match b.get(*i + 1) {
                Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => *i += 2,
                Some(b'u') => {
                    let hex = b.get(*i + 2..*i + 6);
                    if !hex.is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) {
                        return false;
                    }
                    *i += 6;
                }
                _ => return false,
            },
            Some(&c) if c < 0x20 => return false,
            Some(_) => *i += 1,
        }
    }
}

fn literal(b: &[u8], i: &mut usize, word: &[u8]) -> bool {
    if b.get(*i..*i + word.len()) == Some(word) {
        *i += word.len();
        true
    } else {
        false
    }
}

fn number(b: &[u8], i: &mut usize) -> bool {
    let digits = |i: &mut usize| {
        let start = *i;
        while b.get(*i).is_some_and(u8::is_ascii_digit) {
            *i += 1;
        }
        *i > start
    };
    if b.get(*i) == Some(&b'-') {
        *i += 1;
    }
    match b.get(*i) {
        Some(b'0') => *i += 1,
        Some(b'1'..=b'9') => {
            digits(i);
        }
        _ => return false,
    }
    if b.get(*i) == Some(&b'.') {
        *i += 1;
        if !digits(i) {
            return false;
        }
    }
    if matches!(b.get(*i), Some(b'e' | b'E')) {
        *i += 1;
        if matches!(b.get(*i), Some(b'+' | b'-')) {
            *i += 1;
        }
        if !digits(i) {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::{depth_by_parser_string_rules, is_json};

    #[test]
    fn parser_string_rules() {
        assert_eq!(depth_by_parser_string_rules(br#"{"a":[{}]}"#), 3);
        assert_eq!(
            depth_by_parser_string_rules(br#"["[[\"[[", "\u0041[["]"#),
            1
        );
        // `\u` swallows four bytes, a quote among them too: the string ends at the last quote.
        assert_eq!(depth_by_parser_string_rules(br#"["\u000\",[[]]]"#), 3);
    }

    #[test]
    fn json_grammar() {
        for ok in [
            "0",
            "-0.5e+3",
            "\"\"",
            "\"\\ud800\"",
            "[]",
            "{}",
            " [1, {\"a\": [true, false, null]}] ",
            "{\"a\":{\"b\":{}},\"c\":[[],[[]]]}",
            "\"é\\u00e9\\n\"",
        ] {
            assert!(is_json(ok), "{ok}");
        }
        for bad in [
            "",
            "01",
            "1.",
            "-",
            "[1,]",
            "{\"a\"}",
            "{\"a\":1,}",
            "[",
            "]",
            "\"\\x\"",
            "\"\\u12\"",
            "\"a\u{1}\"",
            "{1:2}",
            "[1 2]",
            "nul",
            "1 2",
            "{\"a\":1}}",
            "\"\\u0zz1\"",
        ] {
            assert!(!is_json(bad), "{bad}");
        }
    }
}
