//! The server's read path (frame, UTF-8, depth check, parse) for one client event and one
//! subscribe frame, N times: count its instructions with
//! `valgrind --tool=callgrind target/release/examples/read_path 20000` (see BENCHMARKS.md).
use shardpush::protocol::events::{self, ClientMessage};
use shardpush::protocol::ws::{self, FrameReader, Inbound};
use std::hint::black_box;

/// A masked client text frame, as a browser sends it.
fn client_frame(payload: &[u8]) -> Vec<u8> {
    ws::encode_client_frame(ws::OP_TEXT, true, payload)
}

fn main() {
    let n: usize = std::env::args().nth(1).unwrap().parse().unwrap();
    let ev = client_frame(br#"{"event":"client-typing","channel":"private-chat-42","data":{"user":"ann","typing":true}}"#);
    let sub = client_frame(br#"{"event":"pusher:subscribe","data":{"auth":"","channel":"news"}}"#);
    let mut total = 0usize;
    for _ in 0..n {
        for f in [&ev, &sub] {
            let mut r = FrameReader::default();
            r.feed(black_box(f));
            if let Some(Inbound::Text(bytes)) = r.next(65536) {
                shardpush::protocol::json::check_depth(&bytes, 64).unwrap();
                let m: ClientMessage = sonic_rs::from_slice(&bytes).unwrap();
                if m.event == "pusher:subscribe" {
                    let d: events::SubscribeData = events::decode_object(m.data.as_ref()).unwrap();
                    total += d.channel.len();
                } else {
                    total += shardpush::protocol::json::compact(m.data.unwrap().as_raw_str())
                        .unwrap()
                        .len();
                }
            }
        }
    }
    println!("{total}");
}
