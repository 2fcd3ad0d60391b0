//! WebSocket framing for the server side (RFC 6455): header parsing and formatting come from
//! tungstenite; reassembly, unmasking and the size bound are ours so that a connection holds no
//! buffer while idle and never buffers more than one message.

use std::io::Cursor;
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
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
pub fn payload_of(frame: &[u8]) -> &[u8] {
    let header = match frame.get(1).map(|b| b & 0x7f) {
        Some(126) => 4,
        Some(127) => 10,
        _ => 2,
    };
    frame.get(header..).unwrap_or(&[])
}

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
    /// A complete text message (already unmasked).
    Text(Vec<u8>),
    /// A complete binary message: not part of the Pusher protocol.
    Binary,
    Ping(Vec<u8>),
    Pong,
    /// Close frame with the peer's code, if any.
    Close(Option<u16>),
    /// A data message larger than the limit; its bytes are being skipped, not stored.
    TooLarge(u64),
    /// A violation of RFC 6455 (unmasked client frame, bad opcode, ...): close with 1002.
    ProtocolError(&'static str),
}

/// Incremental frame reader. Holds only the bytes of an incomplete frame (usually none).
#[derive(Default)]
pub struct FrameReader {
    /// Received bytes not yet consumed.
    pub buf: Vec<u8>,
    /// Payload of a fragmented message under assembly.
    fragments: Vec<u8>,
    fragment_opcode: Option<u8>,
    /// Bytes of an oversize frame still to be discarded.
    skip: u64,
    /// Discarding the remaining fragments of an oversize message.
    skipping_message: bool,
}

impl FrameReader {
    pub fn new(initial: Vec<u8>) -> FrameReader {
        FrameReader {
            buf: initial,
            ..FrameReader::default()
        }
    }

    /// Approximate heap bytes held, for memory accounting.
    pub fn held_bytes(&self) -> usize {
        self.buf.capacity() + self.fragments.capacity()
    }

    /// Appends received bytes, discarding any that belong to an oversize frame.
    pub fn feed(&mut self, mut data: &[u8]) {
        if self.skip > 0 && self.buf.is_empty() {
            let n = (self.skip.min(data.len() as u64)) as usize;
            self.skip -= n as u64;
            data = &data[n..];
        }
        if !data.is_empty() {
            self.buf.extend_from_slice(data);
        }
    }

    /// Parses the next complete event out of `buf`; `None` when more bytes are needed.
    /// `max_message` bounds a (reassembled) data message.
    pub fn next(&mut self, max_message: usize) -> Option<Inbound> {
        loop {
            if self.skip > 0 {
                let n = (self.skip.min(self.buf.len() as u64)) as usize;
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
                Err(_) => return Some(Inbound::ProtocolError("Invalid frame header")),
            };
            let header_len = cursor.position() as usize;
            let Some(mask) = header.mask else {
                return Some(Inbound::ProtocolError("Client frames must be masked"));
            };
            if header.rsv1 || header.rsv2 || header.rsv3 {
                return Some(Inbound::ProtocolError("Reserved bits must be zero"));
            }
            let is_control = matches!(header.opcode, OpCode::Control(_));
            if is_control && (len > 125 || !header.is_final) {
                return Some(Inbound::ProtocolError("Invalid control frame"));
            }
            let assembled = self.fragments.len() as u64;
            if !is_control && (self.skipping_message || len + assembled > max_message as u64) {
                // Drop the whole message without buffering it.
                let total = len + assembled;
                self.buf.drain(..header_len);
                self.skip = len;
                self.fragments = Vec::new();
                self.fragment_opcode = None;
                let first_of_message = !self.skipping_message;
                self.skipping_message = !header.is_final;
                if first_of_message {
                    return Some(Inbound::TooLarge(total));
                }
                continue;
            }
            let total = header_len + len as usize;
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
                OpCode::Control(Control::Close) => {
                    let code =
                        (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
                    return Some(Inbound::Close(code));
                }
                OpCode::Control(Control::Reserved(_)) | OpCode::Data(Data::Reserved(_)) => {
                    return Some(Inbound::ProtocolError("Reserved opcode"));
                }
                OpCode::Data(Data::Continue) => {
                    let Some(op) = self.fragment_opcode else {
                        return Some(Inbound::ProtocolError("Continuation without a start frame"));
                    };
                    self.fragments.extend_from_slice(&payload);
                    if header.is_final {
                        self.fragment_opcode = None;
                        let message = std::mem::take(&mut self.fragments);
                        return Some(finish(op, message));
                    }
                }
                OpCode::Data(data) => {
                    if self.fragment_opcode.is_some() {
                        return Some(Inbound::ProtocolError(
                            "New message inside a fragmented one",
                        ));
                    }
                    let op = if data == Data::Text {
                        OP_TEXT
                    } else {
                        OP_BINARY
                    };
                    if header.is_final {
                        return Some(finish(op, payload));
                    }
                    self.fragment_opcode = Some(op);
                    self.fragments = payload;
                }
            }
        }
    }

    fn release_if_empty(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > 0 {
            self.buf = Vec::new();
        }
    }
}

fn finish(opcode: u8, payload: Vec<u8>) -> Inbound {
    if opcode == OP_TEXT {
        Inbound::Text(payload)
    } else {
        Inbound::Binary
    }
}

fn unmask(buf: &mut [u8], mask: [u8; 4]) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A masked client frame, as a browser would send it.
    pub fn client_frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mask = [0x12, 0x34, 0x56, 0x78];
        let header = FrameHeader {
            is_final: fin,
            opcode: OpCode::from(opcode),
            mask: Some(mask),
            ..FrameHeader::default()
        };
        let mut out = Vec::new();
        header.format(payload.len() as u64, &mut out).unwrap();
        let mut body = payload.to_vec();
        unmask(&mut body, mask);
        out.extend_from_slice(&body);
        out
    }

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

    #[test]
    fn rejects_unmasked_and_bad_control_frames() {
        let mut r = FrameReader::default();
        r.feed(&text_frame(b"x"));
        assert!(matches!(r.next(1000), Some(Inbound::ProtocolError(_))));
        let mut r = FrameReader::default();
        r.feed(&client_frame(OP_PING, true, &[0; 126]));
        assert!(matches!(r.next(1000), Some(Inbound::ProtocolError(_))));
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
