//! `FrameReader` (RFC 6455 frames from clients) fed in arbitrary chunks.
//!
//! Input layout (so that seeds are plain WebSocket byte streams behind a 1-byte header):
//! - byte 0: bits 0-2 pick `max_message` from `LIMITS`; bits 3-5 give `k`, the number of
//!   chunk-size bytes that follow (0 = the stream arrives in one read);
//! - the next `k` bytes: chunk sizes, each `b + 1` (1..=256 bytes), used in a cycle;
//! - the rest: the bytes received from the client after the handshake.
//!
//! Checked:
//! - no panic, no overflow (built with debug assertions);
//! - termination: every `next` that returns an event consumed input, so the number of events is
//!   bounded by the bytes fed (a reader that re-reports the same bytes is an infinite loop in the
//!   server's read loop: issue 8, defect 1);
//! - after a violation the reader holds nothing and reports nothing, whatever arrives later;
//! - events are well-formed: text is UTF-8 and within `max_message`, a ping payload fits a control
//!   frame, a close code is a valid one, `TooLarge` is larger than the limit;
//! - memory: `held_bytes()` stays within a bound set by `max_message` and the read size;
//! - segmentation independence: the same stream in one read and in chunks gives the same events.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardpush::protocol::ws::{is_valid_close_code, FrameReader, Inbound};

const LIMITS: [usize; 8] = [0, 1, 2, 125, 126, 1000, 4096, 65536];

/// Largest frame header: 2 bytes, 8 bytes of extended length, 4 bytes of mask.
const MAX_HEADER: usize = 14;

struct Run {
    events: Vec<Inbound>,
    mid_message: bool,
}

fn run(stream: &[u8], max_message: usize, chunk_sizes: &[u8]) -> Run {
    let mut reader = FrameReader::default();
    let mut events = Vec::new();
    let mut fed = 0usize;
    let mut calls = 0usize;
    let mut feeds = 0usize;
    let mut failed = false;
    let mut largest_chunk = 0usize;
    let mut rest = stream;
    let mut sizes = chunk_sizes.iter().cycle();
    // A control frame may be held whole even when max_message is smaller.
    let frame_bound = max_message.max(125);
    while !rest.is_empty() {
        let n = match sizes.next() {
            Some(&b) => (b as usize + 1).min(rest.len()),
            None => rest.len(),
        };
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        reader.feed(chunk);
        fed += n;
        feeds += 1;
        largest_chunk = largest_chunk.max(n);
        loop {
            calls += 1;
            // One `None` per read, and each event consumes at least a 2-byte header (6 when
            // masked): more calls than that mean an event was reported without consuming input.
            assert!(
                calls <= feeds + fed / 2 + 1,
                "next() called {calls} times for {fed} bytes in {feeds} reads: it reports events without consuming input"
            );
            let Some(event) = reader.next(max_message) else {
                break;
            };
            assert!(!failed, "an event after a violation: {event:?}");
            match &event {
                Inbound::Text(text) => {
                    assert!(
                        std::str::from_utf8(text).is_ok(),
                        "text message is not UTF-8"
                    );
                    assert!(
                        text.len() <= max_message,
                        "text of {} bytes passed the {max_message}-byte limit",
                        text.len()
                    );
                }
                Inbound::Ping(payload) => assert!(payload.len() <= 125, "ping payload > 125"),
                Inbound::Close(Some(code)) => {
                    assert!(
                        is_valid_close_code(*code),
                        "close code {code} reported as valid"
                    )
                }
                Inbound::TooLarge(size) => assert!(
                    *size > max_message as u64,
                    "TooLarge({size}) within the {max_message}-byte limit"
                ),
                Inbound::Violation { code, .. } => {
                    assert!(
                        *code == 1002 || *code == 1007,
                        "violation with close code {code}"
                    );
                    failed = true;
                }
                Inbound::Binary | Inbound::Pong | Inbound::Close(None) => {}
            }
            events.push(event);
        }
        if failed {
            assert_eq!(
                reader.held_bytes(),
                0,
                "the reader holds bytes after a violation"
            );
        }
        // buf: the unfinished frame (< MAX_HEADER + frame_bound) plus one read, with Vec's
        // doubling growth; fragments: one message under assembly (<= max_message), doubled.
        let bound = 2 * (MAX_HEADER + frame_bound + largest_chunk) + 2 * max_message;
        assert!(
            reader.held_bytes() <= bound,
            "held_bytes() = {} exceeds {bound} (max_message {max_message}, largest read {largest_chunk})",
            reader.held_bytes()
        );
    }
    if failed {
        // Whatever arrives after a violation is ignored.
        reader.feed(&[0x81, 0x80, 0, 0, 0, 0]);
        assert!(
            reader.next(max_message).is_none(),
            "an event after a violation"
        );
        assert_eq!(reader.held_bytes(), 0);
    }
    Run {
        events,
        mid_message: reader.is_mid_message(),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let max_message = LIMITS[(selector & 7) as usize];
    let k = ((selector >> 3) & 7) as usize;
    if rest.len() < k {
        return;
    }
    let (chunk_sizes, stream) = rest.split_at(k);
    let chunked = run(stream, max_message, chunk_sizes);
    if !chunk_sizes.is_empty() {
        let whole = run(stream, max_message, &[]);
        assert_eq!(
            whole.events, chunked.events,
            "events depend on how the stream was split into reads"
        );
        assert_eq!(whole.mid_message, chunked.mid_message);
    }
});
