//! Micro-benchmarks of the server's hot paths, without sockets. Each group names what one
//! iteration does; criterion reports time per iteration (and elements/s where set).
//! Run: `cargo bench --bench hot_paths`.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use shardpush::auth::{hmac_sha256_hex, md5_hex, verify_token};
use shardpush::channels::home::HomeChannels;
use shardpush::channels::local::LocalChannels;
use shardpush::channels::ChannelKey;
use shardpush::config::Config;
use shardpush::http::signature::{parse_query, verify};
use shardpush::protocol::events::{self, ClientMessage, Data, PresenceMember};
use shardpush::protocol::json::{check_depth, str_literal, MAX_JSON_DEPTH};
use shardpush::protocol::ws::{self, FrameReader, Inbound};
use shardpush::shard::conn::Conn;
use shardpush::shard::fanout::Fanout;
use std::hint::black_box;
use std::rc::Rc;

fn payload_100() -> String {
    str_literal(&"x".repeat(98))
}

/// A masked client text frame, as a browser sends it.
fn client_frame(payload: &[u8]) -> Vec<u8> {
    ws::encode_client_frame(ws::OP_TEXT, true, payload)
}

fn encoding(c: &mut Criterion) {
    let data = payload_100();
    c.bench_function("encode publish frame (100-byte data): one frame", |b| {
        b.iter(|| {
            events::frame(
                black_box("price-update"),
                Some("market-btc"),
                Data::Raw(&data),
                None,
            )
        })
    });
}

fn parsing(c: &mut Criterion) {
    let text = br#"{"event":"client-typing","channel":"private-chat-42","data":{"user":"ann","typing":true}}"#;
    let frame = client_frame(text);
    c.bench_function(
        "read + unmask + parse a client event frame: one message",
        |b| {
            b.iter(|| {
                let mut reader = FrameReader::default();
                reader.feed(black_box(&frame));
                match reader.next(65536) {
                    Some(Inbound::Text(bytes)) => {
                        check_depth(&bytes, MAX_JSON_DEPTH).unwrap();
                        let m: ClientMessage = sonic_rs::from_slice(&bytes).unwrap();
                        black_box(m.event.len())
                    }
                    _ => unreachable!(),
                }
            })
        },
    );
    let subscribe =
        client_frame(br#"{"event":"pusher:subscribe","data":{"auth":"","channel":"news"}}"#);
    c.bench_function("read + parse a pusher:subscribe frame: one message", |b| {
        b.iter(|| {
            let mut reader = FrameReader::default();
            reader.feed(black_box(&subscribe));
            match reader.next(65536) {
                Some(Inbound::Text(bytes)) => {
                    check_depth(&bytes, MAX_JSON_DEPTH).unwrap();
                    let m: ClientMessage = sonic_rs::from_slice(&bytes).unwrap();
                    let d: events::SubscribeData = events::decode_object(m.data.as_ref()).unwrap();
                    black_box(d.channel.len())
                }
                _ => unreachable!(),
            }
        })
    });
}

fn signatures(c: &mut Criterion) {
    let (key, secret) = ("278d425bdf160c739803", "7ad3773142a6692b25b8");
    let token = format!(
        "{key}:{}",
        hmac_sha256_hex(secret.as_bytes(), b"1234.1234:private-foobar")
    );
    c.bench_function("verify a private channel auth token: one check", |b| {
        b.iter(|| verify_token(key, secret, black_box(&token), "1234.1234:private-foobar").unwrap())
    });
    let body = br#"{"name":"foo","channels":["project-3"],"data":"{\"some\":\"data\"}"}"#;
    let now = 1_353_088_179i64;
    let query = format!(
        "auth_key={key}&auth_timestamp={now}&auth_version=1.0&body_md5={}",
        md5_hex(body)
    );
    let sig = hmac_sha256_hex(
        secret.as_bytes(),
        format!("POST\n/apps/3/events\n{query}").as_bytes(),
    );
    let raw = format!("{query}&auth_signature={sig}");
    c.bench_function(
        "verify a signed HTTP API request (parse query, md5, hmac): one request",
        |b| {
            b.iter(|| {
                let q = parse_query(black_box(&raw));
                verify("POST", "/apps/3/events", &q, body, secret, now).unwrap()
            })
        },
    );
}

fn channel_tables(c: &mut Criterion) {
    let keys: Vec<ChannelKey> = (0..1000)
        .map(|i| ChannelKey::new(0, &format!("channel-{i}")))
        .collect();
    let conns: Vec<Rc<Conn>> = (0..1000)
        .map(|i| Rc::new(Conn::new(i, 0, 0, 10.0)))
        .collect();
    let mut group = c.benchmark_group("channel tables");
    group.throughput(Throughput::Elements(1000));
    group.bench_function("local: 1,000 subscribes then 1,000 unsubscribes", |b| {
        b.iter(|| {
            let mut t = LocalChannels::default();
            for (k, conn) in keys.iter().zip(&conns) {
                t.add(k.clone(), conn.clone());
            }
            for (k, conn) in keys.iter().zip(&conns) {
                t.remove(k, conn);
            }
            black_box(t.len())
        })
    });
    group.bench_function("home: 1,000 joins then 1,000 leaves", |b| {
        b.iter(|| {
            let mut h = HomeChannels::new(2);
            for k in &keys {
                h.join(k, 1, None, 100).unwrap();
            }
            for k in &keys {
                h.leave(k, 1, None);
            }
            black_box(h.len())
        })
    });
    group.finish();

    // Leaving a big channel: the scan for the leaving socket (worst case: it is last).
    let key = ChannelKey::new(0, "big");
    let big: Vec<Rc<Conn>> = (0..10_000)
        .map(|i| Rc::new(Conn::new(i, 0, 0, 10.0)))
        .collect();
    let mut table = LocalChannels::default();
    for conn in &big {
        table.add(key.clone(), conn.clone());
    }
    let last = big[9_999].clone();
    c.bench_function(
        "leave a 10,000-subscriber channel, last in the list: one leave",
        |b| {
            b.iter(|| {
                table.remove(&key, &last);
                table.add(key.clone(), last.clone());
            })
        },
    );
    let list: Vec<Rc<Conn>> = big.clone();
    c.bench_function(
        "the same scan by connection id (the old way): one scan",
        |b| b.iter(|| black_box(list.iter().position(|c| c.id == black_box(9_999)))),
    );
}

fn fanout(c: &mut Criterion) {
    const SUBSCRIBERS: u64 = 10_000;
    let max_queued = Config::default().max_outbound_queue_bytes;
    let fanout = Fanout::default();
    let key = ChannelKey::new(0, "fanout");
    let conns: Vec<Rc<Conn>> = (0..SUBSCRIBERS)
        .map(|i| Rc::new(Conn::new(i, 0, 0, 10.0)))
        .collect();
    for conn in &conns {
        fanout.add(key.clone(), conn.clone());
    }
    let frame: Rc<[u8]> = Rc::from(events::frame(
        "e",
        Some("fanout"),
        Data::Raw(&payload_100()),
        None,
    ));
    let mut group = c.benchmark_group("fanout");
    group.throughput(Throughput::Elements(SUBSCRIBERS));
    group.bench_function(
        "one publish queued on 10,000 local subscribers (no sockets)",
        |b| {
            b.iter_batched(
                || (),
                |_| {
                    fanout.deliver(&key, frame.clone(), None, max_queued);
                    // Empty the queues as a write would, outside the measured loop's allocation.
                    for conn in &conns {
                        conn.consume(conn.queued_bytes());
                    }
                },
                BatchSize::SmallInput,
            )
        },
    );
    group.finish();
}

fn presence_json(c: &mut Criterion) {
    let mut h = HomeChannels::new(1);
    let key = ChannelKey::new(0, "presence-room");
    for i in 0..100 {
        let info = format!("{{\"name\":\"User {i}\",\"avatar\":\"https://example.com/{i}.png\"}}");
        let member = PresenceMember {
            user_id: i.to_string(),
            user_info: info,
        };
        h.join(&key, 0, Some(&member), 100).unwrap();
    }
    let channel = h.get(&key).unwrap();
    c.bench_function(
        "presence subscription_succeeded payload, 100 members: one frame",
        |b| {
            b.iter(|| {
                events::subscription_succeeded("presence-room", &black_box(channel).presence_json())
            })
        },
    );
    c.bench_function("member_added frame: one frame", |b| {
        b.iter(|| events::member_added("presence-room", black_box("12345"), r#"{"name":"Ann"}"#))
    });
}

criterion_group!(
    benches,
    encoding,
    parsing,
    signatures,
    channel_tables,
    fanout,
    presence_json
);
criterion_main!(benches);
