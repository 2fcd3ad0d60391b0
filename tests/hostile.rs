//! Hostile clients (issue 8), against the real binary with 2 shards on an ephemeral loopback
//! port: malformed frames, deep JSON, huge lengths, subscription floods, slowloris, conflicting
//! Content-Length, bad UTF-8 and close codes, partial-message floods and panics.
//!
//! Each test checks (a) the attacker's outcome (close code from the server's close frame,
//! `pusher:error`, HTTP status, or the socket closed at its deadline), (b) that the server's CPU
//! settles after the attack, (c) that fresh clients on both shards connect, subscribe and receive a
//! trigger, and (d) where it applies, that clients connected before the attack on the same shard
//! still receive events.

mod common;
use common::*;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// WebSocket at the byte level, so that tests can send frames no real client would.
mod raw {
    use crate::common::{Server, KEY};
    use serde_json::Value;
    use std::io::{ErrorKind, Read, Write};
    use std::net::TcpStream;
    use std::time::{Duration, Instant};

    pub const FIN: u8 = 0x80;
    pub const RSV1: u8 = 0x40;
    pub const RSV2: u8 = 0x20;
    pub const RSV3: u8 = 0x10;
    pub const OP_CONT: u8 = 0x0;
    pub const OP_TEXT: u8 = 0x1;
    pub const OP_CLOSE: u8 = 0x8;
    pub const OP_PING: u8 = 0x9;
    pub const OP_PONG: u8 = 0xA;

    const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    /// A frame header: `b0` is the first byte as sent (FIN, RSV bits, opcode), the length takes
    /// its shortest form, and the mask bit is set when `mask` is given.
    pub fn header(b0: u8, mask: Option<[u8; 4]>, len: u64) -> Vec<u8> {
        let m = if mask.is_some() { 0x80 } else { 0 };
        let mut out = vec![b0];
        if len < 126 {
            out.push(m | len as u8);
        } else if len <= 0xFFFF {
            out.push(m | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            out.push(m | 127);
            out.extend_from_slice(&len.to_be_bytes());
        }
        if let Some(k) = mask {
            out.extend_from_slice(&k);
        }
        out
    }

    /// A masked header that always uses the 64-bit length field, whatever `len` is.
    pub fn header_len64(b0: u8, len: u64) -> Vec<u8> {
        let mut out = vec![b0, 0x80 | 127];
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&MASK);
        out
    }

    /// A masked frame, as a browser sends it, with the first byte as given.
    pub fn masked(b0: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = header(b0, Some(MASK), payload.len() as u64);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i & 3]));
        out
    }

    /// An unmasked frame (only servers may send these).
    pub fn unmasked(b0: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = header(b0, None, payload.len() as u64);
        out.extend_from_slice(payload);
        out
    }

    pub fn text(s: &str) -> Vec<u8> {
        masked(FIN | OP_TEXT, s.as_bytes())
    }

    pub fn close(payload: &[u8]) -> Vec<u8> {
        masked(FIN | OP_CLOSE, payload)
    }

    #[derive(Debug)]
    pub struct Frame {
        pub opcode: u8,
        pub payload: Vec<u8>,
    }

    /// How reading from the server ended.
    #[derive(Debug, PartialEq, Eq)]
    pub enum End {
        /// A close frame with this code (None: empty close payload).
        Close(Option<u16>),
        /// TCP closed without a close frame.
        Eof,
        /// Connection reset or another I/O error.
        Reset(String),
        /// Still open at the deadline.
        Timeout,
    }

    pub struct Ws {
        pub stream: TcpStream,
        buf: Vec<u8>,
        pub socket_id: String,
    }

    impl Ws {
        /// TCP connect and the upgrade by hand; panics unless the server answers 101.
        pub fn handshake(port: u16) -> Ws {
            let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
            stream.set_nodelay(true).unwrap();
            let req = format!(
                "GET /app/{KEY}?protocol=7 HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            );
            stream.write_all(req.as_bytes()).unwrap();
            let mut ws = Ws {
                stream,
                buf: Vec::new(),
                socket_id: String::new(),
            };
            let deadline = Instant::now() + Duration::from_secs(5);
            let end = loop {
                if let Some(i) = ws.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
                if let Err(e) = ws.fill(deadline) {
                    panic!("no upgrade response: {e:?}");
                }
            };
            let head = String::from_utf8_lossy(&ws.buf[..end]).into_owned();
            assert!(head.starts_with("HTTP/1.1 101"), "upgrade refused: {head}");
            ws.buf.drain(..end);
            ws
        }

        /// Handshake and `pusher:connection_established`.
        pub fn connect(server: &Server) -> Ws {
            let mut ws = Ws::handshake(server.port);
            let hello = ws
                .next_text(Duration::from_secs(5))
                .expect("connection_established");
            assert_eq!(hello["event"], "pusher:connection_established");
            let data: Value = serde_json::from_str(hello["data"].as_str().unwrap()).unwrap();
            ws.socket_id = data["socket_id"].as_str().unwrap().to_owned();
            ws
        }

        /// Connects until the kernel puts the socket on `shard` (see `Client::connect_on_shard`).
        pub fn on_shard(server: &Server, shard: u64) -> Ws {
            for _ in 0..200 {
                let ws = Ws::connect(server);
                if ws.shard() == shard {
                    return ws;
                }
            }
            panic!("no raw connection landed on shard {shard} in 200 tries");
        }

        pub fn shard(&self) -> u64 {
            crate::common::shard_of(&self.socket_id)
        }

        pub fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
            self.stream.write_all(bytes)
        }

        /// Reads whatever arrives next into the buffer.
        fn fill(&mut self, deadline: Instant) -> Result<(), End> {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(End::Timeout);
            }
            self.stream
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            let mut chunk = [0u8; 16384];
            match self.stream.read(&mut chunk) {
                Ok(0) => Err(End::Eof),
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    Ok(())
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    Err(End::Timeout)
                }
                Err(e) => Err(End::Reset(e.to_string())),
            }
        }

        /// One complete server frame (server frames are unmasked; a mask is removed anyway).
        pub fn read_frame(&mut self, deadline: Instant) -> Result<Frame, End> {
            loop {
                if let Some((frame, used)) = parse_frame(&self.buf) {
                    self.buf.drain(..used);
                    return Ok(frame);
                }
                self.fill(deadline)?;
            }
        }

        /// The next text message as JSON (a non-JSON text becomes a JSON string); other frames
        /// are skipped. A close frame, EOF or the deadline ends it with `Err`.
        pub fn next_text(&mut self, wait: Duration) -> Result<Value, End> {
            let deadline = Instant::now() + wait;
            loop {
                let frame = self.read_frame(deadline)?;
                match frame.opcode {
                    OP_TEXT => return Ok(to_json(&frame.payload)),
                    OP_CLOSE => return Err(End::Close(close_code(&frame.payload))),
                    _ => {}
                }
            }
        }

        /// Reads until the connection ends; returns the text messages seen before, and how it
        /// ended.
        pub fn until_close(&mut self, wait: Duration) -> (Vec<Value>, End) {
            let deadline = Instant::now() + wait;
            let mut texts = Vec::new();
            loop {
                match self.read_frame(deadline) {
                    Ok(f) if f.opcode == OP_TEXT => texts.push(to_json(&f.payload)),
                    Ok(f) if f.opcode == OP_CLOSE => {
                        return (texts, End::Close(close_code(&f.payload)))
                    }
                    Ok(_) => {}
                    Err(end) => return (texts, end),
                }
            }
        }

        /// Sends a WebSocket ping and waits for its pong (other frames are skipped).
        pub fn ping_pong(&mut self, wait: Duration) -> Result<(), End> {
            self.send(&masked(FIN | OP_PING, b"sync"))
                .map_err(|e| End::Reset(e.to_string()))?;
            let deadline = Instant::now() + wait;
            loop {
                let frame = self.read_frame(deadline)?;
                match frame.opcode {
                    OP_PONG if frame.payload == b"sync" => return Ok(()),
                    OP_CLOSE => return Err(End::Close(close_code(&frame.payload))),
                    _ => {}
                }
            }
        }
    }

    fn close_code(payload: &[u8]) -> Option<u16> {
        (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]))
    }

    fn to_json(payload: &[u8]) -> Value {
        let text = String::from_utf8_lossy(payload);
        serde_json::from_str(&text).unwrap_or(Value::String(text.into_owned()))
    }

    /// Parses one frame at the start of `buf`: (frame, bytes used), or None if incomplete.
    fn parse_frame(buf: &[u8]) -> Option<(Frame, usize)> {
        if buf.len() < 2 {
            return None;
        }
        let opcode = buf[0] & 0x0F;
        let masked = buf[1] & 0x80 != 0;
        let (len, mut pos) = match buf[1] & 0x7F {
            126 => (
                u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?) as u64,
                4,
            ),
            127 => (u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?), 10),
            n => (n as u64, 2),
        };
        let mask = if masked {
            let m: [u8; 4] = buf.get(pos..pos + 4)?.try_into().ok()?;
            pos += 4;
            Some(m)
        } else {
            None
        };
        let end = pos.checked_add(usize::try_from(len).ok()?)?;
        let mut payload = buf.get(pos..end)?.to_vec();
        if let Some(m) = mask {
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= m[i & 3];
            }
        }
        Some((Frame { opcode, payload }, end))
    }
}

use raw::{End, Ws, FIN, OP_CONT, OP_PING, OP_TEXT, RSV1, RSV2, RSV3};

/// The channel the bystanders (clients connected before the attack) listen on.
const BEFORE: &str = "before-attack";

fn start(top: &str, app_extra: &str) -> Server {
    Server::with_config(&config_toml(top, app_extra, ""))
}

/// One client per shard, connected and subscribed to `BEFORE` before the attack.
fn bystanders(server: &Server) -> Vec<Client> {
    (0..2)
        .map(|shard| {
            let mut c = server.connect_on_shard(shard);
            assert_eq!(
                c.subscribe(BEFORE)["event"],
                "pusher_internal:subscription_succeeded"
            );
            c
        })
        .collect()
}

/// The server's (user + system CPU seconds, state letter) from /proc/<pid>/stat.
fn cpu_and_state(pid: u32) -> (f64, char) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/pid/stat");
    // The command name is in parentheses and may hold spaces: fields start after the last ')'.
    let rest = &stat[stat.rfind(')').expect("stat format") + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields[0].chars().next().unwrap();
    // Fields 14 (utime) and 15 (stime) of proc(5); fields[0] is field 3.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks as f64 / hz, state)
}

fn assert_alive(server: &Server) {
    let (_, state) = cpu_and_state(server.pid());
    assert_ne!(state, 'Z', "the server process has exited");
}

/// (b) The server's CPU settles after the attack.
///
/// This is a liveness check, not a performance threshold: a shard stuck re-reading the same bytes
/// (issue 8, defect 1) burns a whole core, about 2 s of CPU in this 2 s idle window, while an idle
/// server needs milliseconds (one sweep per shard per second). 0.5 s separates the two with a
/// wide margin on any machine.
fn assert_cpu_settles(server: &Server) {
    assert_alive(server);
    let (before, _) = cpu_and_state(server.pid());
    std::thread::sleep(Duration::from_secs(2));
    let (after, state) = cpu_and_state(server.pid());
    assert_ne!(state, 'Z', "the server process exited after the attack");
    let used = after - before;
    assert!(
        used < 0.5,
        "the server used {used:.2} s of CPU in a 2 s idle window after the attack: a shard is spinning"
    );
}

/// (d) Clients connected before the attack still receive events: the next message each gets is
/// this trigger (so nothing from the attack leaked into their channel either).
fn assert_bystanders_receive(server: &Server, bystanders: &mut [Client]) {
    let (status, body) = server.trigger(BEFORE, "after-attack", "still-here");
    assert_eq!(status, 200, "trigger after the attack: {body}");
    for c in bystanders.iter_mut() {
        let shard = c.shard();
        let m = c.recv();
        assert_eq!(
            m["event"], "after-attack",
            "bystander on shard {shard} got {m}"
        );
        assert_eq!(m["data"], "still-here");
    }
}

/// (c) A fresh client on each shard connects, subscribes and receives a trigger.
fn assert_fresh_clients_work(server: &Server) {
    for shard in 0..2 {
        let mut c = server.connect_on_shard(shard);
        let channel = format!("fresh-{shard}");
        assert_eq!(
            c.subscribe(&channel)["event"],
            "pusher_internal:subscription_succeeded",
            "fresh client on shard {shard}"
        );
        let (status, body) = server.trigger(&channel, "fresh", &format!("hello-{shard}"));
        assert_eq!(status, 200, "{body}");
        let m = c.recv();
        assert_eq!(m["event"], "fresh", "fresh client on shard {shard} got {m}");
        assert_eq!(m["data"], format!("hello-{shard}"));
    }
}

/// (b), (d) and (c), in that order.
fn assert_recovered(server: &Server, bystanders: &mut [Client]) {
    assert_cpu_settles(server);
    assert_bystanders_receive(server, bystanders);
    assert_fresh_clients_work(server);
}

/// A client that got a `pusher:error` for a hostile message is still fully usable.
fn assert_still_usable(server: &Server, c: &mut Client) {
    c.send_json(json!({"event":"pusher:ping","data":{}}));
    let pong = c.recv();
    assert_eq!(pong["event"], "pusher:pong", "{pong}");
    let channel = format!("usable-{}", c.socket_id);
    assert_eq!(
        c.subscribe(&channel)["event"],
        "pusher_internal:subscription_succeeded"
    );
    let (status, body) = server.trigger(&channel, "usable", "yes");
    assert_eq!(status, 200, "{body}");
    let m = c.recv();
    assert_eq!(m["event"], "usable", "{m}");
}

// ---------------------------------------------------------------------------------------------
// Defect 1: an invalid frame closes its connection with 1002, and nothing re-reads its bytes.
// ---------------------------------------------------------------------------------------------

/// Sends `bad`, followed in the same write by a valid `pusher:ping` that must never be answered
/// (the reader stops at the error), from an attacker on `shard`; expects a bare close 1002.
fn frame_error_closes_1002(shard: u64, bad: Vec<u8>) {
    let server = start("", "");
    let mut bystanders = bystanders(&server);
    let mut attacker = Ws::on_shard(&server, shard);
    let mut bytes = bad;
    bytes.extend(raw::text(r#"{"event":"pusher:ping","data":{}}"#));
    attacker.send(&bytes).unwrap();
    let (texts, end) = attacker.until_close(Duration::from_secs(5));
    assert_eq!(
        end,
        End::Close(Some(1002)),
        "attacker outcome (texts before it: {texts:?})"
    );
    assert!(
        texts.is_empty(),
        "a protocol error is a bare close (no pusher:error), and nothing after the bad frame is read: {texts:?}"
    );
    assert_recovered(&server, &mut bystanders);
}

const PING_JSON: &[u8] = br#"{"event":"pusher:ping","data":{}}"#;

#[test]
fn d1_unmasked_frame_closes_1002() {
    frame_error_closes_1002(0, raw::unmasked(FIN | OP_TEXT, PING_JSON));
}

#[test]
fn d1_rsv1_bit_closes_1002() {
    frame_error_closes_1002(1, raw::masked(FIN | RSV1 | OP_TEXT, PING_JSON));
}

#[test]
fn d1_rsv2_bit_closes_1002() {
    frame_error_closes_1002(0, raw::masked(FIN | RSV2 | OP_TEXT, PING_JSON));
}

#[test]
fn d1_rsv3_bit_closes_1002() {
    frame_error_closes_1002(1, raw::masked(FIN | RSV3 | OP_TEXT, PING_JSON));
}

#[test]
fn d1_reserved_opcode_3_closes_1002() {
    frame_error_closes_1002(0, raw::masked(FIN | 0x3, b"x"));
}

#[test]
fn d1_reserved_opcode_7_closes_1002() {
    frame_error_closes_1002(1, raw::masked(FIN | 0x7, b"x"));
}

#[test]
fn d1_reserved_opcode_0xb_closes_1002() {
    frame_error_closes_1002(0, raw::masked(FIN | 0xB, b""));
}

#[test]
fn d1_reserved_opcode_0xf_closes_1002() {
    frame_error_closes_1002(1, raw::masked(FIN | 0xF, b"x"));
}

#[test]
fn d1_ping_with_126_byte_payload_closes_1002() {
    frame_error_closes_1002(0, raw::masked(FIN | OP_PING, &[b'p'; 126]));
}

#[test]
fn d1_fragmented_ping_closes_1002() {
    frame_error_closes_1002(1, raw::masked(OP_PING, b"p"));
}

#[test]
fn d1_continuation_without_a_start_closes_1002() {
    frame_error_closes_1002(0, raw::masked(FIN | OP_CONT, b"x"));
}

#[test]
fn d1_new_message_inside_a_fragmented_one_closes_1002() {
    let mut bytes = raw::masked(OP_TEXT, b"{\"event\":");
    bytes.extend(raw::masked(FIN | OP_TEXT, PING_JSON));
    frame_error_closes_1002(1, bytes);
}

// ---------------------------------------------------------------------------------------------
// Defect 2: deep JSON is refused before any recursive parsing.
// ---------------------------------------------------------------------------------------------

/// Far beyond the depth that overflowed a shard's stack (about 18,500 over WebSocket, 10,000 over
/// HTTP), and still inside the 64 KiB message limit.
const DEEP: usize = 20_000;

fn nested(depth: usize) -> String {
    "[".repeat(depth) + &"]".repeat(depth)
}

/// Sends `message` from a client on `shard`; expects `pusher:error` and a connection that stays
/// usable.
fn deep_ws_message_is_refused(shard: u64, message: &str) {
    let server = start("", "");
    let mut bystanders = bystanders(&server);
    let mut attacker = server.connect_on_shard(shard);
    attacker.send_text(message);
    let e = attacker.recv();
    assert_eq!(e["event"], "pusher:error", "{e}");
    assert_still_usable(&server, &mut attacker);
    assert_recovered(&server, &mut bystanders);
}

/// Found by fuzzing: a malformed `\u` escape used to end the depth check's idea of a string
/// elsewhere than the parser's, so the brackets after it went uncounted and one 60 KB message
/// overflowed a shard's stack (the process aborted).
#[test]
fn d2_deep_json_behind_a_malformed_unicode_escape_gets_pusher_error() {
    let message = format!(r#"{{"event":"x","data":["\u000\",{}"#, "[".repeat(60_000));
    deep_ws_message_is_refused(1, &message);
}

#[test]
fn d2_deep_json_at_top_level_gets_pusher_error() {
    deep_ws_message_is_refused(0, &nested(DEEP));
}

#[test]
fn d2_deep_json_inside_data_gets_pusher_error() {
    let message = format!(r#"{{"event":"pusher:subscribe","data":{}}}"#, nested(DEEP));
    deep_ws_message_is_refused(1, &message);
}

#[test]
fn d2_deep_json_under_an_unknown_key_gets_pusher_error() {
    // The unknown key comes first, so a parser has to skip it before it finds the event.
    let message = format!(r#"{{"zzz":{},"event":"pusher:ping"}}"#, nested(DEEP));
    deep_ws_message_is_refused(0, &message);
}

#[test]
fn d2_deep_json_in_presence_channel_data_gets_pusher_error() {
    let server = start("", "");
    let mut bystanders = bystanders(&server);
    let mut attacker = server.connect_on_shard(1);
    let channel = "presence-deep";
    let channel_data = format!(r#"{{"user_id":"u1","user_info":{}}}"#, nested(DEEP));
    let auth = attacker.auth_for(channel, Some(&channel_data));
    attacker.send_json(json!({"event":"pusher:subscribe","data":{"auth":auth,"channel":channel,"channel_data":channel_data}}));
    let e = attacker.recv();
    assert_eq!(e["event"], "pusher:error", "{e}");
    assert_still_usable(&server, &mut attacker);
    assert_recovered(&server, &mut bystanders);
}

#[test]
fn d2_deep_json_in_signin_user_data_gets_pusher_error() {
    let server = start("", "");
    let mut bystanders = bystanders(&server);
    let mut attacker = server.connect_on_shard(0);
    let user_data = format!(r#"{{"id":"u1","user_info":{}}}"#, nested(DEEP));
    let e = attacker.signin(&user_data);
    assert_eq!(e["event"], "pusher:error", "{e}");
    let user_data = format!(r#"{{"id":"u1","watchlist":{}}}"#, nested(DEEP));
    let e = attacker.signin(&user_data);
    assert_eq!(e["event"], "pusher:error", "{e}");
    assert_still_usable(&server, &mut attacker);
    assert_recovered(&server, &mut bystanders);
}

#[test]
fn d2_deep_json_in_http_api_bodies_is_400() {
    let server = start("", "");
    let mut bystanders = bystanders(&server);
    let deep = nested(DEEP);
    let events = format!("/apps/{APP_ID}/events");
    let batch = format!("/apps/{APP_ID}/batch_events");
    let cases = [
        (
            &events,
            format!(r#"{{"name":"e","channels":["{BEFORE}"],"data":{deep}}}"#),
        ),
        (
            &events,
            format!(r#"{{"zzz":{deep},"name":"e","channels":["{BEFORE}"],"data":"x"}}"#),
        ),
        (&events, deep.clone()),
        (
            &batch,
            format!(r#"{{"batch":[{{"name":"e","channel":"{BEFORE}","data":{deep}}}]}}"#),
        ),
    ];
    for (path, body) in &cases {
        let (status, reply) = server.api("POST", path, &[], body);
        assert_eq!(
            status,
            400,
            "POST {path} with {} bytes: {reply}",
            body.len()
        );
        let error: Value = serde_json::from_str(&reply).expect("a JSON error body");
        assert!(error["error"].is_string(), "{reply}");
    }
    assert_recovered(&server, &mut bystanders);
}

#[test]
fn d2_moderate_nesting_and_brackets_inside_strings_are_accepted() {
    let server = start("", "");
    let mut a = server.connect();
    let mut b = server.connect();
    a.subscribe_private("private-nest");
    b.subscribe_private("private-nest");
    // 20 levels inside data (21 with the envelope): well under the limit of 64.
    let data: Value = serde_json::from_str(&nested(20)).unwrap();
    a.send_json(json!({"event":"client-nested","channel":"private-nest","data":data}));
    let got = b.recv();
    assert_eq!(got["event"], "client-nested", "{got}");
    // Brackets inside strings are not nesting.
    let brackets = "[".repeat(4000);
    a.send_json(json!({"event":"client-str","channel":"private-nest","data":brackets}));
    let got = b.recv();
    assert_eq!(got["event"], "client-str", "{got}");
    assert_eq!(got["data"], brackets);
    let (status, reply) = server.trigger("private-nest", "http-str", &brackets);
    assert_eq!(status, 200, "{reply}");
    assert_eq!(a.recv()["data"], brackets);
}

// ---------------------------------------------------------------------------------------------
// Defect 3: a continuation frame with a 64-bit length near 2^64 after a small first fragment.
// ---------------------------------------------------------------------------------------------

fn huge_continuation(len: u64) -> Vec<u8> {
    let mut bytes = raw::masked(OP_TEXT, b"{\"event\":");
    bytes.extend(raw::header_len64(FIN | OP_CONT, len));
    bytes.extend_from_slice(&[b'x'; 16]);
    bytes
}

#[test]
fn d3_continuation_with_length_near_2_pow_64_is_too_large() {
    let server = start("", "");
    let mut bystanders = bystanders(&server);
    let mut attacker = Ws::on_shard(&server, 0);
    attacker
        .send(&huge_continuation(0x7FFF_FFFF_FFFF_FFF0))
        .unwrap();
    let e = attacker
        .next_text(Duration::from_secs(5))
        .expect("a pusher:error for the oversize message");
    assert_eq!(e["event"], "pusher:error", "{e}");
    assert!(e["data"]["message"].is_string(), "{e}");
    assert_recovered(&server, &mut bystanders);
}

#[test]
fn d3_continuation_length_with_top_bit_set_closes_1002() {
    let server = start("", "");
    let mut bystanders = bystanders(&server);
    let mut attacker = Ws::on_shard(&server, 1);
    attacker
        .send(&huge_continuation(0xFFFF_FFFF_FFFF_FFF0))
        .unwrap();
    let (texts, end) = attacker.until_close(Duration::from_secs(5));
    assert_eq!(end, End::Close(Some(1002)), "texts before it: {texts:?}");
    assert!(
        texts.is_empty(),
        "a protocol error is a bare close: {texts:?}"
    );
    assert_recovered(&server, &mut bystanders);
}

// ---------------------------------------------------------------------------------------------
// Defect 4: subscriptions per connection are capped.
// ---------------------------------------------------------------------------------------------

#[test]
fn d4_subscriptions_beyond_the_cap_get_pusher_error_and_earlier_ones_keep_working() {
    let server = start("", "max_subscriptions_per_connection = 5");
    let mut bystanders = bystanders(&server);
    let mut c = server.connect_on_shard(0);
    for i in 0..5 {
        let ok = c.subscribe(&format!("cap-{i}"));
        assert_eq!(
            ok["event"], "pusher_internal:subscription_succeeded",
            "{ok}"
        );
    }
    let e = c.subscribe("cap-5");
    assert_eq!(e["event"], "pusher:error", "{e}");
    assert!(e["data"]["code"].is_null(), "{e}");
    let message = e["data"]["message"].as_str().unwrap_or_default();
    assert!(message.contains('5'), "the message names the limit: {e}");
    for i in 0..5 {
        let (status, _) = server.trigger(&format!("cap-{i}"), "tick", &i.to_string());
        assert_eq!(status, 200);
        let m = c.recv();
        assert_eq!(m["channel"], format!("cap-{i}"), "{m}");
        assert_eq!(m["data"], i.to_string());
    }
    server.trigger("cap-5", "tick", "refused");
    assert!(
        c.try_recv(Duration::from_millis(300)).is_none(),
        "the refused channel delivers nothing"
    );
    // A freed slot can be used again.
    c.send_json(json!({"event":"pusher:unsubscribe","data":{"channel":"cap-0"}}));
    let ok = c.subscribe("cap-5");
    assert_eq!(
        ok["event"], "pusher_internal:subscription_succeeded",
        "{ok}"
    );
    server.trigger("cap-0", "tick", "left");
    server.trigger("cap-5", "tick", "joined");
    let m = c.recv();
    assert_eq!(m["data"], "joined", "{m}");
    assert_still_usable_at_cap(&mut c);
    assert_recovered(&server, &mut bystanders);
}

/// At the cap, the connection still answers pings (its only free slot is taken).
fn assert_still_usable_at_cap(c: &mut Client) {
    c.send_json(json!({"event":"pusher:ping","data":{}}));
    assert_eq!(c.recv()["event"], "pusher:pong");
}

#[test]
fn d4_default_cap_is_256_subscriptions() {
    let server = start("", "");
    let mut c = server.connect();
    for i in 0..256 {
        c.send_json(json!({"event":"pusher:subscribe","data":{"channel":format!("many-{i}")}}));
    }
    for _ in 0..256 {
        let ok = c.recv();
        assert_eq!(
            ok["event"], "pusher_internal:subscription_succeeded",
            "{ok}"
        );
    }
    let e = c.subscribe("many-256");
    assert_eq!(e["event"], "pusher:error", "{e}");
    assert_still_usable_at_cap(&mut c);
}

// ---------------------------------------------------------------------------------------------
// Defect 5: slowloris and the cap on connections that have not finished their first head.
// ---------------------------------------------------------------------------------------------

/// Sends `fast` at once, then `slow` one byte every 500 ms; returns how long after connecting the
/// server closed the socket, or None if it was still open after 8 s.
fn trickle(port: u16, fast: Vec<u8>, slow: Vec<u8>) -> Option<Duration> {
    let start = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    if s.write_all(&fast).is_err() {
        return Some(start.elapsed());
    }
    let mut next = slow.into_iter();
    let mut buf = [0u8; 4096];
    while start.elapsed() < Duration::from_secs(8) {
        match s.read(&mut buf) {
            Ok(0) => return Some(start.elapsed()),
            // A response (e.g. 408) before the close: keep reading until the close.
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return Some(start.elapsed()),
        }
        if let Some(b) = next.next() {
            if s.write_all(&[b]).is_err() {
                return Some(start.elapsed());
            }
        }
    }
    None
}

#[test]
fn d5_slowloris_heads_and_bodies_are_closed_at_request_timeout() {
    let server = start("request_timeout = 2", "");
    let mut bystanders = bystanders(&server);
    let port = server.port;
    let upgrade = format!(
        "GET /app/{KEY}?protocol=7 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    let http =
        "GET /health HTTP/1.1\r\nHost: x\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let body_head = format!(
        "POST /apps/{APP_ID}/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    );
    let cases: Vec<(&str, Vec<u8>, Vec<u8>)> = vec![
        ("WebSocket upgrade head", Vec::new(), upgrade.into_bytes()),
        ("HTTP head", Vec::new(), http.as_bytes().to_vec()),
        ("HTTP body", body_head.into_bytes(), vec![b' '; 100]),
    ];
    let threads: Vec<_> = cases
        .into_iter()
        .map(|(name, fast, slow)| (name, std::thread::spawn(move || trickle(port, fast, slow))))
        .collect();
    for (name, t) in threads {
        let closed = t.join().unwrap();
        let Some(after) = closed else {
            panic!(
                "{name} sent one byte per 500 ms was still open after 8 s (request_timeout = 2)"
            );
        };
        assert!(
            after >= Duration::from_secs(1) && after <= Duration::from_millis(4500),
            "{name} sent one byte per 500 ms was closed after {after:?}; the deadline is 2 s (give or take 1 s)"
        );
    }
    assert_recovered(&server, &mut bystanders);
}

#[test]
fn d5_connections_beyond_max_pending_connections_get_503() {
    let server = start("max_pending_connections = 8", "");
    let mut bystanders = bystanders(&server);
    let silent: Vec<TcpStream> = (0..8)
        .map(|_| TcpStream::connect(("127.0.0.1", server.port)).unwrap())
        .collect();
    // Let both shards accept them.
    std::thread::sleep(Duration::from_millis(500));
    for i in 0..3 {
        let mut s = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // Nothing is sent, so the server's close cannot turn into a reset that loses the reply.
        let mut resp = Vec::new();
        let _ = s.read_to_end(&mut resp);
        let (status, body) = parse_response(&resp);
        assert_eq!(
            status,
            503,
            "extra connection {i} beyond 8 pending: {:?} {body}",
            String::from_utf8_lossy(&resp)
        );
    }
    drop(silent);
    // The server sees them go; then new connections are served again.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let (status, _) = raw_http(server.port, "GET", "/health", "");
        if status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "GET /health after the pending sockets closed: {status}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_recovered(&server, &mut bystanders);
}

// ---------------------------------------------------------------------------------------------
// Defect 6: conflicting Content-Length.
// ---------------------------------------------------------------------------------------------

#[test]
fn d6_conflicting_content_length_is_400() {
    let server = start("", "");
    let mut bystanders = bystanders(&server);
    let path = format!("/apps/{APP_ID}/events");
    // Were it accepted, bystanders would get "smuggled" before the trigger of assert_recovered.
    let body = json!({"name":"smuggled","channel":BEFORE,"data":"x"}).to_string();
    let query = signed_query("POST", &path, &[], &body, KEY, SECRET);
    let n = body.len();
    let variants = [
        format!("Content-Length: {n}\r\nContent-Length: {}\r\n", n + 1),
        format!("Content-Length: {}\r\nContent-Length: {n}\r\n", n + 3),
        format!("Content-Length: {n}, {}\r\n", n + 1),
    ];
    for lengths in &variants {
        let mut s = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // One write: the whole request reaches the server together, so nothing is left unread
        // when it answers and closes.
        let req = format!(
            "POST {path}?{query} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{lengths}Connection: close\r\n\r\n{body}"
        );
        s.write_all(req.as_bytes()).unwrap();
        let mut resp = Vec::new();
        let _ = s.read_to_end(&mut resp);
        let (status, reply) = parse_response(&resp);
        assert_eq!(status, 400, "{lengths:?}: {reply}");
    }
    assert_recovered(&server, &mut bystanders);
}

// ---------------------------------------------------------------------------------------------
// Defect 7: UTF-8, close codes, and the budget for partially received messages.
// ---------------------------------------------------------------------------------------------

/// Sends `bytes` from an attacker on `shard` and expects the server's close frame with `code`.
fn closes_with(shard: u64, bytes: Vec<u8>, code: u16) {
    let server = start("", "");
    let mut bystanders = bystanders(&server);
    let mut attacker = Ws::on_shard(&server, shard);
    attacker.send(&bytes).unwrap();
    let (texts, end) = attacker.until_close(Duration::from_secs(5));
    assert_eq!(end, End::Close(Some(code)), "texts before it: {texts:?}");
    assert_recovered(&server, &mut bystanders);
}

#[test]
fn d7_invalid_utf8_text_closes_1007() {
    closes_with(
        0,
        raw::masked(FIN | OP_TEXT, b"{\"event\":\"\xff\xfe\"}"),
        1007,
    );
}

#[test]
fn d7_invalid_utf8_close_reason_closes_1007() {
    closes_with(1, raw::close(b"\x03\xe8bad \xff reason"), 1007);
}

#[test]
fn d7_close_code_0_gets_1002() {
    closes_with(0, raw::close(&0u16.to_be_bytes()), 1002);
}

#[test]
fn d7_close_code_999_gets_1002() {
    closes_with(1, raw::close(&999u16.to_be_bytes()), 1002);
}

#[test]
fn d7_one_byte_close_payload_gets_1002() {
    closes_with(0, raw::close(&[0x03]), 1002);
}

#[test]
fn d7_valid_close_codes_are_echoed_then_the_connection_drops() {
    let server = start("", "");
    let mut bystanders = bystanders(&server);
    for (shard, code) in [(0u64, 1000u16), (1, 4000)] {
        let mut peer = Ws::on_shard(&server, shard);
        let mut payload = code.to_be_bytes().to_vec();
        payload.extend_from_slice(b"bye");
        peer.send(&raw::close(&payload)).unwrap();
        let (texts, end) = peer.until_close(Duration::from_secs(5));
        assert_eq!(end, End::Close(Some(code)), "texts before it: {texts:?}");
        let (_, after) = peer.until_close(Duration::from_secs(3));
        assert!(
            matches!(after, End::Eof | End::Reset(_)),
            "the server drops TCP after echoing {code}: {after:?}"
        );
    }
    assert_recovered(&server, &mut bystanders);
}

/// Current resident set of `pid`, in bytes.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS");
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

const PARTIAL_BUDGET: usize = 200_000;
const PARTIAL: usize = 60_000;

/// An attacker that sent the first 60 KB fragment of a text message it never finishes. Its pong
/// proves that the server has read the fragment; panics if the server closed it instead.
fn partial_holder(server: &Server, shard: u64, id: usize) -> Ws {
    let mut ws = Ws::on_shard(server, shard);
    ws.send(&raw::masked(OP_TEXT, &vec![b'a'; PARTIAL]))
        .unwrap();
    if let Err(end) = ws.ping_pong(Duration::from_secs(5)) {
        panic!("attacker {id}, the newest holder of a partial message, was closed: {end:?}");
    }
    ws
}

/// Holders of partial messages on shard 0, oldest first, and what the server closed so far.
#[derive(Default)]
struct Holders {
    open: VecDeque<(usize, Ws)>,
    next_id: usize,
    newest_closed: Option<usize>,
}

impl Holders {
    /// Adds `count` holders, then checks which ones the server closed: with 1008, the longest
    /// holders first, and no more than the budget still held.
    fn round(&mut self, server: &Server, count: usize) {
        for _ in 0..count {
            let id = self.next_id;
            self.open.push_back((id, partial_holder(server, 0, id)));
            self.next_id += 1;
        }
        // A closed holder has its 1008 queued before any pong.
        let mut still = VecDeque::new();
        for (id, mut ws) in self.open.drain(..) {
            match ws.ping_pong(Duration::from_secs(5)) {
                Ok(()) => still.push_back((id, ws)),
                Err(end) => {
                    assert_eq!(end, End::Close(Some(1008)), "attacker {id}");
                    self.newest_closed = self.newest_closed.max(Some(id));
                }
            }
        }
        self.open = still;
        let open_ids: Vec<usize> = self.open.iter().map(|(id, _)| *id).collect();
        let closed = self.newest_closed;
        assert!(
            closed.is_none_or(|c| open_ids.iter().all(|&o| c < o)),
            "the longest holders go first: attacker {closed:?} was closed while older ones are open: {open_ids:?}"
        );
        assert!(
            open_ids.len() * PARTIAL <= PARTIAL_BUDGET,
            "{} partial messages of {PARTIAL} bytes are held with a budget of {PARTIAL_BUDGET}: {open_ids:?}",
            open_ids.len()
        );
    }
}

#[test]
fn d7_partial_messages_beyond_the_budget_close_the_oldest_with_1008() {
    let server = start(&format!("max_partial_message_bytes = {PARTIAL_BUDGET}"), "");
    let mut bystanders = bystanders(&server);
    // All on one shard, one after the other: "oldest" is unambiguous.
    let mut holders = Holders::default();
    holders.round(&server, 6);
    assert!(
        holders.newest_closed.is_some(),
        "6 partial messages of 60 KB in 200 KB"
    );
    // Warm-up: the allocator takes its memory in steps of megabytes, the first time this many
    // connections and buffers come and go.
    for _ in 0..2 {
        holders.round(&server, 10);
    }
    let rss_before = rss_bytes(server.pid());
    for _ in 0..10 {
        holders.round(&server, 10);
    }
    let rss_after = rss_bytes(server.pid());
    // 100 more partial messages would hold 6 MB if closing them did not free their memory;
    // allow half of that for the allocator's steps.
    let grew = rss_after.saturating_sub(rss_before);
    assert!(
        grew < (100 * PARTIAL / 2) as u64,
        "RSS grew by {grew} bytes over 100 more partial messages (from {rss_before} to {rss_after})"
    );
    assert_recovered(&server, &mut bystanders);
}

#[test]
fn d7_partial_message_budget_is_for_the_whole_process() {
    // 3 x 60 KB fit in 200 KB. Two of them are on shard 0, so a budget split evenly between the
    // 2 shards (100 KB each) would close one; the spec and README say "per process".
    let server = start(&format!("max_partial_message_bytes = {PARTIAL_BUDGET}"), "");
    let mut holders: Vec<Ws> = [0u64, 1, 0]
        .iter()
        .enumerate()
        .map(|(id, &shard)| partial_holder(&server, shard, id))
        .collect();
    for (id, ws) in holders.iter_mut().enumerate() {
        if let Err(end) = ws.ping_pong(Duration::from_secs(2)) {
            panic!("attacker {id} (of 3 within the 200 KB budget) was closed: {end:?}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Panics (issue 8, "What to build"): fault injection in debug builds.
// ---------------------------------------------------------------------------------------------

const FAULTS: [(&str, &str); 1] = [("SHARDPUSH_FAULT_INJECTION", "1")];

#[test]
fn d8_a_panic_in_a_connection_closes_only_that_connection() {
    let server = Server::with_config_env(&config_toml("", "", ""), &FAULTS);
    let mut bystanders = bystanders(&server);
    let mut attacker = Ws::on_shard(&server, 0);
    attacker
        .send(&raw::text(
            r#"{"event":"pusher:subscribe","data":{"channel":"panic-room"}}"#,
        ))
        .unwrap();
    let ok = attacker.next_text(Duration::from_secs(5)).unwrap();
    assert_eq!(ok["event"], "pusher_internal:subscription_succeeded");
    let mut neighbour = server.connect_on_shard(0);
    assert_eq!(
        neighbour.subscribe("panic-room")["event"],
        "pusher_internal:subscription_succeeded"
    );
    attacker
        .send(&raw::text(r#"{"event":"shardpush:test_panic","data":{}}"#))
        .unwrap();
    let (texts, end) = attacker.until_close(Duration::from_secs(5));
    assert_ne!(
        end,
        End::Timeout,
        "the panicking connection is closed (texts: {texts:?})"
    );
    assert_alive(&server);
    // Its subscription is gone with it: the channel counts only the neighbour.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let (status, body) = server.api(
            "GET",
            &format!("/apps/{APP_ID}/channels/panic-room"),
            &[("info", "subscription_count")],
            "",
        );
        assert_eq!(status, 200, "{body}");
        let info: Value = serde_json::from_str(&body).unwrap();
        if info["subscription_count"] == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the panicked connection still counts as a subscriber: {info}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (status, _) = server.trigger("panic-room", "after-panic", "ok");
    assert_eq!(status, 200);
    let m = neighbour.recv();
    assert_eq!(m["event"], "after-panic", "{m}");
    assert_recovered(&server, &mut bystanders);
}

#[test]
fn d8_a_panic_outside_any_connection_exits_70() {
    let mut server = Server::with_config_env(&config_toml("", "", ""), &FAULTS);
    let mut attacker = Ws::on_shard(&server, 1);
    attacker
        .send(&raw::text(
            r#"{"event":"shardpush:test_panic_shard","data":{}}"#,
        ))
        .unwrap();
    let status = server
        .wait_exit(Duration::from_secs(2))
        .expect("the process exits within 2 s of a shard's death");
    assert_eq!(status.code(), Some(70), "{status:?}");
}

#[test]
fn d8_fault_injection_is_off_without_the_env_var() {
    let server = start("", "");
    let mut bystanders = bystanders(&server);
    let mut c = server.connect_on_shard(0);
    c.send_text(r#"{"event":"shardpush:test_panic","data":{}}"#);
    c.send_text(r#"{"event":"shardpush:test_panic_shard","data":{}}"#);
    c.send_json(json!({"event":"pusher:ping","data":{}}));
    let pong = c.recv();
    assert_eq!(pong["event"], "pusher:pong", "{pong}");
    assert_recovered(&server, &mut bystanders);
}

// ---------------------------------------------------------------------------------------------
// Issue 8, defect 8: SIGTERM after a workload is never lost.
// ---------------------------------------------------------------------------------------------

#[test]
fn sigterm_after_a_workload_always_stops_the_server() {
    for attempt in 0..5 {
        let mut server = Server::start();
        let mut clients: Vec<Client> = (0..4).map(|_| server.connect()).collect();
        for c in clients.iter_mut() {
            c.subscribe("work");
        }
        for i in 0..10 {
            server.trigger("work", "tick", &i.to_string());
        }
        for c in clients.iter_mut() {
            for _ in 0..10 {
                assert_eq!(c.recv()["event"], "tick");
            }
        }
        drop(clients);
        std::thread::sleep(Duration::from_millis(300));
        server.signal(libc::SIGTERM);
        let status = server
            .wait_exit(Duration::from_secs(5))
            .unwrap_or_else(|| panic!("attempt {attempt}: the first SIGTERM was lost"));
        assert!(status.success(), "attempt {attempt}: {status:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Found by fuzzing: input that parses lazily but is not what it claims to be.
// ---------------------------------------------------------------------------------------------

/// A string with a bad escape inside a client event's `data` would reach every other member
/// verbatim and break their JSON parsers: the sender gets `pusher:error`, nobody else anything.
#[test]
fn client_event_string_with_a_bad_escape_reaches_nobody() {
    let server = start("", "");
    let mut a = server.connect();
    let mut b = server.connect();
    a.subscribe_private("private-chat");
    b.subscribe_private("private-chat");
    for bad in [r#""bad \x escape""#, r#""lone \ud800 surrogate""#] {
        a.send_text(&format!(
            r#"{{"event":"client-x","channel":"private-chat","data":{bad}}}"#
        ));
        let reply = a.recv();
        assert_eq!(reply["event"], "pusher:error", "{bad}: {reply}");
    }
    assert!(
        b.try_recv(Duration::from_millis(300)).is_none(),
        "no other member received the malformed event"
    );
    a.send_json(json!({"event":"client-ok","channel":"private-chat","data":"fine"}));
    assert_eq!(b.recv_event("client-ok")["data"], "fine");
    assert_still_usable(&server, &mut a);
}

#[test]
fn http_event_data_with_a_bad_escape_or_a_non_utf8_body_is_400() {
    let server = start("", "");
    let mut c = server.connect();
    c.subscribe("news");
    let path = format!("/apps/{APP_ID}/events");
    let bad_escape = r#"{"name":"e","channel":"news","data":"bad \x escape"}"#;
    let (status, body) = server.api("POST", &path, &[], bad_escape);
    assert_eq!(status, 400, "{body}");
    let mut not_utf8 = br#"{"name":"e","channel":"news","data":""#.to_vec();
    not_utf8.extend_from_slice(&[0xff, 0xfe]);
    not_utf8.extend_from_slice(br#""}"#);
    let query = signed_query_bytes("POST", &path, &[], &not_utf8, KEY, SECRET);
    let (status, body) = raw_http_bytes(server.port, "POST", &format!("{path}?{query}"), &not_utf8);
    assert_eq!(status, 400, "{body}");
    assert!(
        c.try_recv(Duration::from_millis(300)).is_none(),
        "nothing was published"
    );
    let (status, body) = server.trigger("news", "e", "good");
    assert_eq!(status, 200, "{body}");
    assert_eq!(c.recv_event("e")["data"], "good");
}
