//! WebSocket framing for the server side (RFC 6455): header parsing and formatting come from
//! tungstenite; reassembly, unmasking and the size bound are ours so that a connection holds no
//! buffer while idle and never buffers more than one message.

use super::codes::{INVALID_UTF8, PROTOCOL_ERROR};
use std::io::Cursor;
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

/// Opcode of a text frame: every Pusher message (JSON) travels in one.
pub const OP_TEXT: u8 = 0x1;
/// Opcode of a binary frame: not part of the Pusher protocol, answered with an error.
pub const OP_BINARY: u8 = 0x2;
/// Opcode of a close frame (a 2-byte code and an optional UTF-8 reason).
pub const OP_CLOSE: u8 = 0x8;
/// Opcode of a WebSocket ping, which the sweeper sends to sockets silent too long.
pub const OP_PING: u8 = 0x9;
/// Opcode of a WebSocket pong: the reply to a ping, echoing its payload.
pub const OP_PONG: u8 = 0xA;

/// Encodes one unmasked, final server frame.
pub fn encode_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 10);
    let header = FrameHeader {
        opcode: OpCode::from(opcode),
        ..FrameHeader::default()
    };
    // Writing into a Vec cannot fail.
    let _ = header.format(payload.len() as u64, &mut out);
    out.extend_from_slice(payload);
    out
}

/// The payload of a frame made by `encode_frame` (server frames are never masked).
/// Whether `frame` is exactly one complete, unfragmented server text frame with a UTF-8 payload:
/// what a frame from another node must be before it is written to sockets here.
pub fn is_complete_text_frame(frame: &[u8]) -> bool {
    let (Some(&first), Some(&second)) = (frame.first(), frame.get(1)) else {
        return false;
    };
    if first != 0x80 | OP_TEXT || second & 0x80 != 0 {
        return false;
    }
    let header = header_len(second);
    let len = match frame.get(2..header) {
        Some([a, b]) => u16::from_be_bytes([*a, *b]) as usize,
        Some(bytes) if bytes.len() == 8 => {
            let mut be = [0u8; 8];
            be.copy_from_slice(bytes);
            u64::from_be_bytes(be) as usize
        }
        Some([]) => (second & 0x7f) as usize,
        _ => return false,
    };
    frame.len() == header.saturating_add(len) && std::str::from_utf8(&frame[header..]).is_ok()
}

/// The payload of a frame this server encoded (header skipped, no validation).
pub fn payload_of(frame: &[u8]) -> &[u8] {
    let header = frame.get(1).map_or(2, |&second| header_len(second));
    frame.get(header..).unwrap_or(&[])
}

/// Bytes of an unmasked frame's header, from its second byte (the 7-bit length, or 126/127 for
/// the 16- and 64-bit lengths that follow).
fn header_len(second: u8) -> usize {
    match second & 0x7f {
        126 => 4,
        127 => 10,
        _ => 2,
    }
}

/// Encodes one masked client frame, as a browser sends it (for tests, benchmarks and fuzzing).
pub fn encode_client_frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
    let mask = [0x12, 0x34, 0x56, 0x78];
    let header = FrameHeader {
        is_final: fin,
        opcode: OpCode::from(opcode),
        mask: Some(mask),
        ..FrameHeader::default()
    };
    let mut out = Vec::with_capacity(payload.len() + 14);
    // Writing into a Vec cannot fail.
    let _ = header.format(payload.len() as u64, &mut out);
    let start = out.len();
    out.extend_from_slice(payload);
    unmask(&mut out[start..], mask);
    out
}

/// A server text frame around one JSON message; `events` wraps every envelope with it.
pub fn text_frame(json: &[u8]) -> Vec<u8> {
    encode_frame(OP_TEXT, json)
}

/// A close frame; the reason is cut at a character boundary to fit the 123-byte limit.
pub fn close_frame(code: u16, reason: &str) -> Vec<u8> {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = Vec::with_capacity(2 + end);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    encode_frame(OP_CLOSE, &payload)
}

/// The 101 response. `subprotocol` is echoed only when the client offered it.
pub fn upgrade_response(sec_key: &[u8], subprotocol: Option<&str>) -> Vec<u8> {
    let accept = tungstenite::handshake::derive_accept_key(sec_key);
    let mut out = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n"
    );
    if let Some(p) = subprotocol {
        out.push_str("Sec-WebSocket-Protocol: ");
        out.push_str(p);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    out.into_bytes()
}

/// What the reader found in the bytes received so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Inbound {
    /// A complete text message: unmasked, reassembled and valid UTF-8.
    Text(Vec<u8>),
    /// A complete binary message: not part of the Pusher protocol.
    Binary,
    /// A ping with its payload, to be echoed back in a pong.
    Ping(Vec<u8>),
    /// A pong (its payload is dropped); like any input, it shows the peer is alive.
    Pong,
    /// Close frame with the peer's code, if any (a valid one: others are a `Violation`).
    Close(Option<u16>),
    /// A data message larger than the limit; its bytes are being skipped, not stored.
    TooLarge(u64),
    /// The peer broke RFC 6455: close with `code` (1002 protocol error, 1007 invalid UTF-8).
    /// The reader has discarded what it held and ignores everything received after this.
    Violation {
        /// The close code to send: `PROTOCOL_ERROR` or `INVALID_UTF8`.
        code: u16,
        /// What was wrong, for the close frame's reason.
        reason: &'static str,
    },
}

/// Incremental frame reader. Holds only the bytes of an incomplete frame (usually none).
#[derive(Default)]
pub struct FrameReader {
    /// Received bytes not yet consumed.
    buf: Vec<u8>,
    /// Payload of a fragmented message under assembly.
    fragments: Vec<u8>,
    fragment_opcode: Option<u8>,
    /// Bytes of an oversize frame still to be discarded.
    skip: u64,
    /// Discarding the remaining fragments of an oversize message.
    skipping_message: bool,
    /// A violation was reported: the stream cannot be resynchronised, so input is dropped.
    failed: bool,
}

impl FrameReader {
    /// A reader that starts with `initial`: bytes already received after the upgrade request's
    /// head (usually none).
    pub fn new(initial: Vec<u8>) -> FrameReader {
        FrameReader {
            buf: initial,
            ..FrameReader::default()
        }
    }

    /// Heap bytes held for incomplete frames and messages, for memory accounting.
    pub fn held_bytes(&self) -> usize {
        self.buf.capacity() + self.fragments.capacity()
    }

    /// Whether a message (or a frame) has started but not finished arriving.
    pub fn is_mid_message(&self) -> bool {
        !self.buf.is_empty() || self.fragment_opcode.is_some()
    }

    /// Appends received bytes, discarding any that belong to an oversize frame.
    pub fn feed(&mut self, mut data: &[u8]) {
        if self.failed {
            return;
        }
        if self.skip > 0 && self.buf.is_empty() {
            let n = usize::try_from(self.skip).map_or(data.len(), |s| s.min(data.len()));
            self.skip -= n as u64;
            data = &data[n..];
        }
        if !data.is_empty() {
            self.buf.extend_from_slice(data);
        }
    }

    /// Drops everything held and ignores all further input (after a violation, or when the
    /// connection is being closed for another reason).
    pub fn fail(&mut self) {
        self.failed = true;
        self.buf = Vec::new();
        self.fragments = Vec::new();
        self.fragment_opcode = None;
        self.skip = 0;
    }

    fn violation(&mut self, code: u16, reason: &'static str) -> Option<Inbound> {
        self.fail();
        Some(Inbound::Violation { code, reason })
    }

    /// Parses the next complete event out of what was fed; `None` when more bytes are needed.
    /// `max_message` bounds a (reassembled) data message. Every call either consumes bytes or
    /// returns `None`, and after a `Violation` it returns `None` for good.
    pub fn next(&mut self, max_message: usize) -> Option<Inbound> {
        loop {
            if self.failed {
                return None;
            }
            if self.skip > 0 {
                let n =
                    usize::try_from(self.skip).map_or(self.buf.len(), |s| s.min(self.buf.len()));
                self.buf.drain(..n);
                self.skip -= n as u64;
                if self.skip > 0 {
                    self.release_if_empty();
                    return None;
                }
            }
            let mut cursor = Cursor::new(&self.buf[..]);
            let (header, len) = match FrameHeader::parse(&mut cursor) {
                Ok(Some(h)) => h,
                Ok(None) => {
                    self.release_if_empty();
                    return None;
                }
                Err(_) => return self.violation(PROTOCOL_ERROR, "Invalid frame header"),
            };
            let header_len = cursor.position() as usize;
            let Some(mask) = header.mask else {
                return self.violation(PROTOCOL_ERROR, "Client frames must be masked");
            };
            if header.rsv1 || header.rsv2 || header.rsv3 {
                return self.violation(PROTOCOL_ERROR, "Reserved bits must be zero");
            }
            if len >> 63 != 0 {
                return self.violation(PROTOCOL_ERROR, "Frame length has its top bit set");
            }
            let is_control = matches!(header.opcode, OpCode::Control(_));
            if is_control && (len > 125 || !header.is_final) {
                return self.violation(PROTOCOL_ERROR, "Invalid control frame");
            }
            let in_message = self.fragment_opcode.is_some() || self.skipping_message;
            match header.opcode {
                OpCode::Data(Data::Continue) if !in_message => {
                    return self.violation(PROTOCOL_ERROR, "Continuation without a start frame");
                }
                OpCode::Data(Data::Text | Data::Binary) if in_message => {
                    return self.violation(PROTOCOL_ERROR, "New message inside a fragmented one");
                }
                OpCode::Control(Control::Reserved(_)) | OpCode::Data(Data::Reserved(_)) => {
                    return self.violation(PROTOCOL_ERROR, "Reserved opcode");
                }
                _ => {}
            }
            let assembled = self.fragments.len() as u64;
            let message_len = len.saturating_add(assembled);
            if !is_control && (self.skipping_message || message_len > max_message as u64) {
                // Drop the whole message without buffering it.
                self.buf.drain(..header_len);
                self.skip = len;
                self.fragments = Vec::new();
                self.fragment_opcode = None;
                let first_of_message = !self.skipping_message;
                self.skipping_message = !header.is_final;
                if first_of_message {
                    return Some(Inbound::TooLarge(message_len));
                }
                continue;
            }
            // Below max_message (or 125 for control frames), so it fits a usize.
            let total = header_len + usize::try_from(len).unwrap_or(usize::MAX - header_len);
            if self.buf.len() < total {
                // Reserve once so the rest of the frame does not reallocate repeatedly.
                self.buf.reserve(total - self.buf.len());
                return None;
            }
            let mut payload: Vec<u8> = self.buf[header_len..total].to_vec();
            self.buf.drain(..total);
            self.release_if_empty();
            unmask(&mut payload, mask);

            match header.opcode {
                OpCode::Control(Control::Ping) => return Some(Inbound::Ping(payload)),
                OpCode::Control(Control::Pong) => return Some(Inbound::Pong),
                OpCode::Control(Control::Close) => return self.close(&payload),
                OpCode::Data(Data::Continue) => {
                    self.fragments.extend_from_slice(&payload);
                    if header.is_final {
                        let op = self.fragment_opcode.take().unwrap_or(OP_BINARY);
                        let message = std::mem::take(&mut self.fragments);
                        return self.finish(op, message);
                    }
                }
                OpCode::Data(data) => {
                    let op = if data == Data::Text {
                        OP_TEXT
                    } else {
                        OP_BINARY
                    };
                    if header.is_final {
                        return self.finish(op, payload);
                    }
                    self.fragment_opcode = Some(op);
                    self.fragments = payload;
                }
                // Rejected above.
                OpCode::Control(Control::Reserved(_)) => {}
            }
        }
    }

    fn finish(&mut self, opcode: u8, payload: Vec<u8>) -> Option<Inbound> {
        if opcode != OP_TEXT {
            return Some(Inbound::Binary);
        }
        if std::str::from_utf8(&payload).is_err() {
            return self.violation(INVALID_UTF8, "Text message is not valid UTF-8");
        }
        Some(Inbound::Text(payload))
    }

    /// A close frame: no payload, or a valid code and a UTF-8 reason (RFC 6455 §5.5.1, §7.4).
    fn close(&mut self, payload: &[u8]) -> Option<Inbound> {
        let (code, reason) = match payload {
            [] => return Some(Inbound::Close(None)),
            [_] => return self.violation(PROTOCOL_ERROR, "Close payload of one byte"),
            [hi, lo, reason @ ..] => (u16::from_be_bytes([*hi, *lo]), reason),
        };
        if !is_valid_close_code(code) {
            return self.violation(PROTOCOL_ERROR, "Invalid close code");
        }
        if std::str::from_utf8(reason).is_err() {
            return self.violation(INVALID_UTF8, "Close reason is not valid UTF-8");
        }
        Some(Inbound::Close(Some(code)))
    }

    fn release_if_empty(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > 0 {
            self.buf = Vec::new();
        }
    }
}

/// Codes a peer may send in a close frame: the defined ones (1004-1006 and 1015 are reserved for
/// reporting, never sent) and the ranges for libraries (3000-3999) and applications (4000-4999).
pub fn is_valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

fn unmask(buf: &mut [u8], mask: [u8; 4]) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn complete_text_frames_of_every_header_size() {
        for len in [0, 125, 126, 65_535, 65_536] {
            let frame = text_frame(&vec![b'a'; len]);
            assert!(is_complete_text_frame(&frame), "{len}");
            assert_eq!(payload_of(&frame).len(), len);
            assert!(
                !is_complete_text_frame(&frame[..frame.len() - 1]),
                "{len} cut"
            );
            let mut binary = frame.clone();
            binary[0] = 0x80 | OP_BINARY;
            assert!(!is_complete_text_frame(&binary), "{len} binary");
        }
        assert!(!is_complete_text_frame(&[0x81, 126, 0]));
        assert!(!is_complete_text_frame(&[0x81, 0x80]), "masked");
    }

    use super::encode_client_frame as client_frame;

    #[test]
    fn payload_of_skips_every_header_form() {
        for len in [0usize, 125, 126, 65535, 65536] {
            let payload = vec![b'x'; len];
            assert_eq!(payload_of(&text_frame(&payload)), &payload[..]);
        }
    }

    #[test]
    fn server_frames_have_the_right_length_forms() {
        assert_eq!(&text_frame(b"hi")[..2], &[0x81, 2]);
        let medium = text_frame(&[b'a'; 300]);
        assert_eq!(&medium[..4], &[0x81, 126, 1, 44]);
        let large = text_frame(&vec![b'a'; 70_000]);
        assert_eq!(large[1], 127);
        assert_eq!(large.len(), 70_000 + 10);
    }

    #[test]
    fn close_frame_carries_code_and_truncated_reason() {
        let f = close_frame(4001, &"é".repeat(100));
        assert_eq!(f[0], 0x88);
        let len = f[1] as usize;
        assert!(len <= 125);
        assert_eq!(&f[2..4], &4001u16.to_be_bytes());
        assert!(std::str::from_utf8(&f[4..]).is_ok());
    }

    #[test]
    fn reads_split_and_coalesced_frames() {
        let mut bytes = client_frame(OP_TEXT, true, b"{\"a\":1}");
        bytes.extend(client_frame(OP_PING, true, b"p"));
        let mut r = FrameReader::default();
        r.feed(&bytes[..3]);
        assert_eq!(r.next(1000), None);
        r.feed(&bytes[3..]);
        assert_eq!(r.next(1000), Some(Inbound::Text(b"{\"a\":1}".to_vec())));
        assert_eq!(r.next(1000), Some(Inbound::Ping(b"p".to_vec())));
        assert_eq!(r.next(1000), None);
        assert_eq!(r.held_bytes(), 0, "an idle reader holds no buffer");
    }

    #[test]
    fn reassembles_fragments_with_interleaved_control() {
        let mut bytes = client_frame(OP_TEXT, false, b"hel");
        bytes.extend(client_frame(OP_PING, true, b""));
        bytes.extend(client_frame(0x0, true, b"lo"));
        let mut r = FrameReader::default();
        r.feed(&bytes);
        assert_eq!(r.next(1000), Some(Inbound::Ping(vec![])));
        assert_eq!(r.next(1000), Some(Inbound::Text(b"hello".to_vec())));
    }

    #[test]
    fn skips_oversize_messages_without_buffering_them() {
        let mut bytes = client_frame(OP_TEXT, true, &[b'x'; 5000]);
        bytes.extend(client_frame(OP_TEXT, true, b"ok"));
        let mut r = FrameReader::default();
        r.feed(&bytes[..100]);
        assert_eq!(r.next(1000), Some(Inbound::TooLarge(5000)));
        assert_eq!(r.next(1000), None);
        for chunk in bytes[100..].chunks(700) {
            r.feed(chunk);
            assert!(r.buf.len() <= 700 + 8);
        }
        assert_eq!(r.next(1000), Some(Inbound::Text(b"ok".to_vec())));
    }

    fn violation_code(bytes: &[u8]) -> Option<u16> {
        let mut r = FrameReader::default();
        r.feed(bytes);
        let mut seen = None;
        // Bounded: every call consumes bytes or ends the stream.
        for _ in 0..bytes.len() + 2 {
            match r.next(1000) {
                Some(Inbound::Violation { code, .. }) => seen = Some(code),
                Some(_) => continue,
                None => break,
            }
        }
        assert_eq!(r.next(1000), None, "nothing is read after a violation");
        r.feed(&client_frame(OP_TEXT, true, b"late"));
        assert_eq!(r.next(1000), None, "input after a violation is ignored");
        assert_eq!(r.held_bytes(), 0);
        seen
    }

    fn with_header_bits(mut frame: Vec<u8>, first_byte_or: u8) -> Vec<u8> {
        frame[0] |= first_byte_or;
        frame
    }

    #[test]
    fn every_protocol_violation_closes_with_1002_once() {
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("unmasked", text_frame(b"x")),
            (
                "rsv1",
                with_header_bits(client_frame(OP_TEXT, true, b"x"), 0x40),
            ),
            (
                "rsv3",
                with_header_bits(client_frame(OP_TEXT, true, b"x"), 0x10),
            ),
            ("opcode 3", client_frame(0x3, true, b"x")),
            ("opcode 7", client_frame(0x7, true, b"x")),
            ("opcode 0xB", client_frame(0xB, true, b"x")),
            ("opcode 0xF", client_frame(0xF, true, b"x")),
            ("ping of 126 bytes", client_frame(OP_PING, true, &[0; 126])),
            ("fragmented ping", client_frame(OP_PING, false, b"p")),
            ("lone continuation", client_frame(0x0, true, b"x")),
            ("close of one byte", client_frame(OP_CLOSE, true, &[3])),
            (
                "close code 0",
                client_frame(OP_CLOSE, true, &0u16.to_be_bytes()),
            ),
            (
                "close code 999",
                client_frame(OP_CLOSE, true, &999u16.to_be_bytes()),
            ),
            (
                "close code 1005",
                client_frame(OP_CLOSE, true, &1005u16.to_be_bytes()),
            ),
            (
                "close code 5000",
                client_frame(OP_CLOSE, true, &5000u16.to_be_bytes()),
            ),
        ];
        for (name, bytes) in cases {
            assert_eq!(violation_code(&bytes), Some(1002), "{name}");
        }
        let mut nested = client_frame(OP_TEXT, false, b"a");
        nested.extend(client_frame(OP_TEXT, true, b"b"));
        assert_eq!(
            violation_code(&nested),
            Some(1002),
            "new message inside a fragmented one"
        );
    }

    #[test]
    fn invalid_utf8_closes_with_1007() {
        assert_eq!(
            violation_code(&client_frame(OP_TEXT, true, b"\xff\xfe")),
            Some(1007)
        );
        // A character split across fragments is fine; only the whole message counts.
        let euro = "€".as_bytes();
        let mut split = client_frame(OP_TEXT, false, &euro[..1]);
        split.extend(client_frame(0x0, true, &euro[1..]));
        let mut r = FrameReader::default();
        r.feed(&split);
        assert_eq!(r.next(1000), Some(Inbound::Text(euro.to_vec())));
        let mut reason = 1000u16.to_be_bytes().to_vec();
        reason.push(0xff);
        assert_eq!(
            violation_code(&client_frame(OP_CLOSE, true, &reason)),
            Some(1007)
        );
    }

    /// A 64-bit length field with `len`, on a masked continuation frame.
    fn continuation_header(len: u64) -> Vec<u8> {
        let mut out = vec![0x80, 0x80 | 127];
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&[1, 2, 3, 4]);
        out
    }

    #[test]
    fn huge_continuation_lengths_do_not_overflow() {
        let mut bytes = client_frame(OP_TEXT, false, b"small");
        bytes.extend(continuation_header(u64::MAX >> 1));
        let mut r = FrameReader::default();
        r.feed(&bytes);
        assert!(matches!(r.next(1000), Some(Inbound::TooLarge(_))));
        assert_eq!(r.next(1000), None);
        let mut bytes = client_frame(OP_TEXT, false, b"small");
        bytes.extend(continuation_header(u64::MAX - 2));
        assert_eq!(violation_code(&bytes), Some(1002));
    }

    #[test]
    fn byte_by_byte_input_ends_in_the_same_events() {
        let mut bytes = client_frame(OP_TEXT, false, b"hel");
        bytes.extend(client_frame(OP_PING, true, b"p"));
        bytes.extend(client_frame(0x0, true, b"lo"));
        bytes.extend(client_frame(OP_CLOSE, true, &4000u16.to_be_bytes()));
        let mut r = FrameReader::default();
        let mut events = Vec::new();
        for b in &bytes {
            r.feed(std::slice::from_ref(b));
            while let Some(e) = r.next(1000) {
                events.push(e);
            }
        }
        assert_eq!(
            events,
            vec![
                Inbound::Ping(b"p".to_vec()),
                Inbound::Text(b"hello".to_vec()),
                Inbound::Close(Some(4000))
            ]
        );
        assert!(!r.is_mid_message());
    }

    #[test]
    fn close_code_and_binary() {
        let mut r = FrameReader::default();
        r.feed(&client_frame(OP_BINARY, true, b"\x00\x01"));
        r.feed(&client_frame(OP_CLOSE, true, &1000u16.to_be_bytes()));
        assert_eq!(r.next(1000), Some(Inbound::Binary));
        assert_eq!(r.next(1000), Some(Inbound::Close(Some(1000))));
    }

    #[test]
    fn accept_key_matches_rfc_example() {
        let resp = upgrade_response(
            b"dGhlIHNhbXBsZSBub25jZQ==",
            Some("pusher-channels-protocol-7"),
        );
        let text = String::from_utf8(resp).unwrap();
        assert!(text.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(text.contains("Sec-WebSocket-Protocol: pusher-channels-protocol-7\r\n"));
    }
}
