//! Channel features against the real server (2 shards): cache channels, subscription counts and
//! the deprecated HTTP endpoints.

mod common;

use common::*;
use serde_json::json;
use shardpush::channels::ChannelKey;
use std::time::{Duration, Instant};

const QUIET: Duration = Duration::from_millis(300);

/// A channel name starting with `prefix` whose home is shard `home` (the test app is app 0).
fn homed_on(prefix: &str, home: usize) -> String {
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .find(|name| ChannelKey::new(0, name).home(2) == home)
        .unwrap()
}

fn channel_info(server: &Server, channel: &str, info: &str) -> serde_json::Value {
    let (status, body) = server.api(
        "GET",
        &format!("/apps/{APP_ID}/channels/{channel}"),
        &[("info", info)],
        "",
    );
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

#[test]
fn cache_channels_send_the_last_http_event_or_a_cache_miss_on_every_shard() {
    let server = Server::start();
    for home in [0, 1] {
        for subscriber_shard in [0, 1] {
            let channel = homed_on(&format!("cache-h{home}s{subscriber_shard}-"), home);
            let mut first = server.connect_on_shard(subscriber_shard);
            let ok = first.subscribe(&channel);
            assert_eq!(ok["event"], "pusher_internal:subscription_succeeded");
            let miss = first.recv();
            assert_eq!(miss["event"], "pusher:cache_miss");
            assert_eq!(miss["channel"], channel.as_str());
            assert_eq!(miss["data"], "{}");
            assert_eq!(
                channel_info(&server, &channel, "cache")["cache"],
                json!(null)
            );

            for i in 0..3 {
                assert_eq!(server.trigger(&channel, "pos", &format!("p{i}")).0, 200);
                assert_eq!(first.recv()["data"], format!("p{i}"));
            }

            let mut late = server.connect_on_shard(1 - subscriber_shard);
            assert_eq!(
                late.subscribe(&channel)["event"],
                "pusher_internal:subscription_succeeded"
            );
            let cached = late.recv();
            assert_eq!(cached["event"], "pos");
            assert_eq!(cached["channel"], channel.as_str());
            assert_eq!(cached["data"], "p2", "the last event");
            assert!(late.try_recv(QUIET).is_none());

            let info = channel_info(&server, &channel, "cache,subscription_count");
            assert_eq!(info["occupied"], true);
            assert_eq!(info["subscription_count"], 2);
            assert_eq!(info["cache"]["event"], "pos");
            assert_eq!(info["cache"]["data"], "p2");
            let ttl = info["cache"]["ttl"].as_u64().unwrap();
            assert!((1790..=1800).contains(&ttl), "ttl {ttl}");
        }
    }
}

#[test]
fn cache_survives_without_subscribers_ignores_client_events_and_expires() {
    let server = Server::with_config(&config_toml("", "cache_ttl = 2", ""));
    let channel = "private-cache-room";
    // Published while nobody listens: still kept.
    assert_eq!(server.trigger(channel, "state", "v1").0, 200);
    let mut a = server.connect();
    assert_eq!(
        a.subscribe_private(channel)["event"],
        "pusher_internal:subscription_succeeded"
    );
    assert_eq!(a.recv()["data"], "v1");

    let mut b = server.connect();
    b.subscribe_private(channel);
    assert_eq!(b.recv()["data"], "v1");
    a.send_json(json!({"event":"client-move","channel":channel,"data":{"x":1}}));
    assert_eq!(b.recv()["event"], "client-move");

    let mut c = server.connect();
    c.subscribe_private(channel);
    assert_eq!(c.recv()["data"], "v1", "client events are never cached");

    std::thread::sleep(Duration::from_millis(2300));
    let mut d = server.connect();
    d.subscribe_private(channel);
    assert_eq!(
        d.recv()["event"],
        "pusher:cache_miss",
        "expired after the TTL"
    );
    assert_eq!(
        channel_info(&server, channel, "cache")["cache"],
        json!(null)
    );

    // Other channel types are not cached.
    server.trigger("plain", "e", "x");
    let mut e = server.connect();
    e.subscribe("plain");
    assert!(e.try_recv(QUIET).is_none());
}

fn count_of(m: &serde_json::Value) -> u64 {
    assert_eq!(m["event"], "pusher_internal:subscription_count", "{m}");
    data_of(m)["subscription_count"].as_u64().unwrap()
}

#[test]
fn subscription_count_goes_to_every_subscriber_on_each_change() {
    let server = Server::with_config(&config_toml("", "enable_subscription_count = true", ""));
    let mut a = server.connect_on_shard(0);
    let mut b = server.connect_on_shard(1);
    a.subscribe("counted");
    assert_eq!(count_of(&a.recv()), 1);
    b.subscribe("counted");
    assert_eq!(count_of(&a.recv()), 2);
    assert_eq!(
        count_of(&b.recv()),
        2,
        "the joiner gets it after its confirmation"
    );
    b.send_json(json!({"event":"pusher:unsubscribe","data":{"channel":"counted"}}));
    assert_eq!(count_of(&a.recv()), 1);
    drop(a);
    assert!(b.try_recv(QUIET).is_none());

    // Presence channels report members instead.
    let mut p = server.connect();
    p.subscribe_presence("presence-c", "1", json!(null));
    assert!(p.try_recv(QUIET).is_none());

    let off = Server::start();
    let mut c = off.connect();
    c.subscribe("counted");
    assert!(c.try_recv(QUIET).is_none(), "off unless the app enables it");
}

#[test]
fn busy_channels_get_the_count_at_most_every_five_seconds() {
    let server = Server::with_config(&config_toml("", "enable_subscription_count = true", ""));
    let mut clients: Vec<Client> = (0..103).map(|_| server.connect()).collect();
    let started = Instant::now();
    assert_eq!(
        clients[0].subscribe("busy")["event"],
        "pusher_internal:subscription_succeeded"
    );
    for c in clients.iter_mut().skip(1) {
        c.send_json(json!({"event":"pusher:subscribe","data":{"channel":"busy"}}));
    }
    // The first subscriber sees every count up to 100; above that the change waits for the
    // 5 s interval and then comes as one count of all 103.
    let first = &mut clients[0];
    let mut counts = Vec::new();
    let mut hundred_at = None;
    while counts.last() != Some(&103) {
        assert!(started.elapsed() < Duration::from_secs(10), "{counts:?}");
        if let Some(m) = first.try_recv(Duration::from_secs(1)) {
            counts.push(count_of(&m));
            if counts.last() == Some(&100) {
                hundred_at = Some(Instant::now());
            }
        }
    }
    let mut expected: Vec<u64> = (1..=100).collect();
    expected.push(103);
    assert_eq!(counts, expected);
    let gap = hundred_at.unwrap().elapsed();
    assert!(gap >= Duration::from_secs(4), "throttled for {gap:?}");
    assert!(first.try_recv(Duration::from_millis(500)).is_none());
}

#[test]
fn deprecated_trigger_and_stats_endpoints_work() {
    let server = Server::start();
    let mut c = server.connect();
    let mut sender = server.connect();
    c.subscribe("legacy");
    sender.subscribe("legacy");
    let path = format!("/apps/{APP_ID}/channels/legacy/events");
    let (status, body) = server.api(
        "POST",
        &path,
        &[("name", "old-style"), ("socket_id", &sender.socket_id)],
        "raw \"body\" text",
    );
    assert_eq!((status, body.as_str()), (200, "{}"));
    let m = c.recv();
    assert_eq!(m["event"], "old-style");
    assert_eq!(m["data"], "raw \"body\" text");
    assert!(sender.try_recv(QUIET).is_none(), "socket_id is excluded");
    let (status, _) = server.api("POST", &path, &[], "x");
    assert_eq!(status, 400, "name is required");

    let (status, body) = server.api(
        "GET",
        &format!("/apps/{APP_ID}/channels/legacy/stats"),
        &[],
        "",
    );
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v, json!({"occupied": true, "connection_count": 2}));
}

#[test]
fn frames_in_one_read_see_what_the_frame_before_them_did() {
    // When the channel is homed on the socket's own shard, a subscribe is confirmed before the
    // next frame of the same read is handled, so a client event right behind it is accepted.
    let server = Server::start();
    let channel = homed_on("private-pipelined-", 0);
    let mut receiver = server.connect_on_shard(0);
    receiver.subscribe_private(&channel);
    let mut sender = server.connect_on_shard(0);
    let auth = sender.auth_for(&channel, None);
    let subscribe = json!({"event":"pusher:subscribe","data":{"auth":auth,"channel":channel}});
    let event = json!({"event":"client-hi","channel":channel,"data":{"n":1}});
    // Both frames leave in one write.
    for frame in [subscribe, event] {
        let text = tungstenite::Message::text(frame.to_string());
        sender.socket.write(text).unwrap();
    }
    sender.socket.flush().unwrap();
    assert_eq!(
        sender.recv()["event"],
        "pusher_internal:subscription_succeeded"
    );
    assert!(
        sender.try_recv(QUIET).is_none(),
        "no 4009 for the client event"
    );
    let got = receiver.recv_event("client-hi");
    assert_eq!(got["channel"], channel.as_str());
}
