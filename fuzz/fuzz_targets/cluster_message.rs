//! What arrives from Redis, on arbitrary bytes: the RESP3 stream of a shard's link
//! (`cluster::link::RespReader`, fed in pieces cut where byte 0 says), each value read as every
//! kind of reply the shared state expects (`cluster::state`), the message formats of
//! `cluster::decode` and `state::decode_change`, the webhook queue's stream entries
//! (`webhooks::entries`, `Event::from_entry`), and `ws::is_complete_text_frame`, which
//! stands between another node's frame and the sockets here.
//!
//! Checked: no panic; the stream parses to the same values however it is cut; a decoded
//! message's fields lie inside the input; a frame the server itself encodes is accepted and
//! any cut-off or extended copy of it is refused.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardpush::cluster::{decode, link::RespReader, state};
use shardpush::protocol::ws;
use shardpush::webhooks::{entries, Event};

fn values(pieces: &[&[u8]]) -> Result<Vec<String>, String> {
    let mut reader = RespReader::default();
    let mut out = Vec::new();
    for piece in pieces {
        reader.feed(piece, &mut |v| {
            let _ = state::snapshot_of(&v);
            let _ = state::members_of(&v);
            let _ = state::stats_of(&v);
            let _ = state::counts_of(&v);
            let _ = state::cached_of(&v);
            let _ = state::channels_of(&v);
            let _ = state::heartbeat_of(&v);
            let _ = state::index_of(&v);
            // The webhook queue's replies: new entries, claimed entries, consumers.
            for (_, entries) in entries::streams_of(&v) {
                for (_, fields) in entries {
                    let _ = Event::from_entry(&fields);
                }
            }
            for (_, fields) in entries::claimed_of(&v).1 {
                let _ = Event::from_entry(&fields);
            }
            let _ = entries::pairs_of(&v);
            out.push(format!("{v:?}"));
            Ok(())
        })?;
    }
    Ok(out)
}

fuzz_target!(|input: &[u8]| {
    let Some((&cut, data)) = input.split_first() else {
        return;
    };
    let cut = (cut as usize).min(data.len());
    let whole = values(&[data]);
    let split = values(&[&data[..cut], &data[cut..]]);
    if let (Ok(a), Ok(b)) = (&whole, &split) {
        assert_eq!(a, b, "the same stream cut at {cut} parsed differently");
    }
    if let Some(message) = decode(data) {
        assert!(message.frame.len() <= data.len());
        let _ = ws::is_complete_text_frame(message.frame);
    }
    if let Some(changed) = state::decode_change(data) {
        assert!(changed.app_id.len() + changed.channel.len() <= data.len());
    }
    let _ = ws::is_complete_text_frame(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let frame = ws::text_frame(text.as_bytes());
        assert!(ws::is_complete_text_frame(&frame));
        assert!(!ws::is_complete_text_frame(&frame[..frame.len() - 1]));
        let mut longer = frame.clone();
        longer.push(b'x');
        assert!(!ws::is_complete_text_frame(&longer));
    }
});
