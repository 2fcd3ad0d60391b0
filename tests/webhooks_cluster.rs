//! Webhooks of a cluster (3 nodes of 2 shards and a real redis-server): events fire once for
//! the cluster, the 3-second rule holds across nodes, a survivor delivers what a killed node
//! held, and the event stream is read by a consumer group.

mod common;

use common::webhook_receiver::{Hook, Receiver, Reply};
use common::*;
use serde_json::json;
use std::time::Duration;

const ALL_TYPES: &str = "\"channel_occupied\", \"channel_vacated\", \"member_added\", \
                         \"member_removed\", \"client_event\", \"cache_miss\"";

/// A node whose test app sends every event type to `receiver` (plus `app_extra`).
fn node(redis: &Redis, receiver: &Receiver, top: &str, app_extra: &str) -> Server {
    let app = format!(
        "{app_extra}\n[[apps.webhooks]]\nurl = \"{}\"\nevent_types = [{ALL_TYPES}]\n",
        receiver.url()
    );
    Server::with_config(&cluster_toml(&redis.url(), top, "", &app))
}

/// Every event received (2xx or not), as (name, channel, user id).
fn events(hooks: &[Hook]) -> Vec<(String, String, String)> {
    let field = |e: &serde_json::Value, f: &str| e[f].as_str().unwrap_or_default().to_string();
    hooks
        .iter()
        .flat_map(|h| h.events())
        .map(|e| {
            (
                field(&e, "name"),
                field(&e, "channel"),
                field(&e, "user_id"),
            )
        })
        .collect()
}

fn count(hooks: &[Hook], name: &str, channel: &str) -> usize {
    let all = events(hooks);
    all.iter()
        .filter(|(n, c, _)| n == name && c == channel)
        .count()
}

#[test]
fn occupancy_members_and_cache_misses_fire_once_for_the_cluster() {
    let redis = Redis::start();
    let receiver = Receiver::start();
    let nodes: Vec<Server> = (0..3).map(|_| node(&redis, &receiver, "", "")).collect();
    // A subscriber of the same channels on every node.
    let mut clients: Vec<Client> = nodes.iter().map(Server::connect).collect();
    for (i, client) in clients.iter_mut().enumerate() {
        client.subscribe("shared");
        client.subscribe("cache-empty");
        client.subscribe_presence("presence-room", &format!("u{}", i % 2), json!(null));
    }
    receiver.wait_until("the arrivals", Duration::from_secs(10), |h| {
        count(h, "member_added", "presence-room") >= 2
    });
    std::thread::sleep(Duration::from_secs(1));
    let hooks = receiver.received();
    assert!(hooks.iter().all(|h| h.is_signed_by(KEY, SECRET)));
    assert_eq!(count(&hooks, "channel_occupied", "shared"), 1, "{hooks:?}");
    assert_eq!(count(&hooks, "channel_occupied", "presence-room"), 1);
    assert_eq!(
        count(&hooks, "cache_miss", "cache-empty"),
        1,
        "one per window"
    );
    let mut added: Vec<String> = events(&hooks)
        .into_iter()
        .filter(|(n, ..)| n == "member_added")
        .map(|(.., u)| u)
        .collect();
    added.sort();
    assert_eq!(added, ["u0", "u1"], "one per user, not per connection");
    // Each request has its queue entry's id.
    for hook in &hooks {
        let id = hook.header("x-shardpush-webhook-id").unwrap_or_default();
        assert!(id.contains('-') && !id.contains(','), "an entry id: {id}");
    }

    // u0 leaves node 0 but is still on node 2: no member_removed. Everyone leaves: one
    // vacated per channel and one member_removed per user, 3 s later.
    let before = receiver.received().len();
    drop(clients.remove(0));
    std::thread::sleep(Duration::from_millis(3500));
    assert_eq!(
        receiver.received().len(),
        before,
        "nothing: u0 is still on node 2"
    );
    clients.clear();
    receiver.wait_until("the departures", Duration::from_secs(10), |h| {
        count(h, "channel_vacated", "shared") >= 1
            && count(h, "member_removed", "presence-room") >= 2
    });
    std::thread::sleep(Duration::from_secs(1));
    let hooks = receiver.received();
    assert_eq!(count(&hooks, "channel_vacated", "shared"), 1, "{hooks:?}");
    assert_eq!(count(&hooks, "channel_vacated", "presence-room"), 1);
    assert_eq!(count(&hooks, "member_removed", "presence-room"), 2);
}

#[test]
fn a_quick_return_on_another_node_sends_nothing() {
    let redis = Redis::start();
    let receiver = Receiver::start();
    let a = node(&redis, &receiver, "", "");
    let b = node(&redis, &receiver, "", "");
    let mut on_a = a.connect();
    on_a.subscribe("hop");
    on_a.subscribe_presence("presence-hop", "u", json!(null));
    receiver.wait_until("the arrivals", Duration::from_secs(10), |h| {
        count(h, "member_added", "presence-hop") == 1
    });
    // Leaves node A and is back on node B a moment later.
    drop(on_a);
    std::thread::sleep(Duration::from_millis(500));
    let mut on_b = b.connect();
    on_b.subscribe("hop");
    on_b.subscribe_presence("presence-hop", "u", json!(null));
    std::thread::sleep(Duration::from_secs(4));
    let hooks = receiver.received();
    let names: Vec<_> = events(&hooks).into_iter().map(|(n, c, _)| (n, c)).collect();
    assert_eq!(
        names
            .iter()
            .filter(|(n, _)| n == "channel_occupied")
            .count(),
        2,
        "hop and presence-hop, once each: {names:?}"
    );
    assert_eq!(
        names.iter().filter(|(n, _)| n == "member_added").count(),
        1,
        "{names:?}"
    );
    assert!(
        !names
            .iter()
            .any(|(n, _)| n == "channel_vacated" || n == "member_removed"),
        "{names:?}"
    );
}

#[test]
fn a_survivor_delivers_the_webhooks_a_killed_node_held() {
    let redis = Redis::start();
    let receiver = Receiver::start();
    // Everything fails until the node holding it is dead.
    receiver.script(&[Reply::Status(503); 200]);
    let fast = "[webhooks]\nclaim_after = 3";
    let mut a = node(&redis, &receiver, fast, "");
    let mut client = a.connect();
    let channels: Vec<String> = (0..10).map(|i| format!("held-{i}")).collect();
    for channel in &channels {
        client.subscribe(channel);
    }
    receiver.wait_until("first attempts", Duration::from_secs(10), |h| {
        count(h, "channel_occupied", "held-9") >= 1
    });
    // Node B starts only now: node A read every entry and holds them, retrying.
    let b = node(&redis, &receiver, fast, "");
    std::thread::sleep(Duration::from_secs(1));
    a.signal(libc::SIGKILL);
    a.wait_exit(Duration::from_secs(5));
    // From now on the receiver accepts.
    let failing = receiver.received().len();
    receiver.clear_script();
    let hooks = receiver.wait_until("B delivers A's webhooks", Duration::from_secs(30), |h| {
        let ok: Vec<&Hook> = h.iter().filter(|x| x.status == Some(200)).collect();
        channels.iter().all(|c| {
            ok.iter()
                .any(|x| count(std::slice::from_ref(*x), "channel_occupied", c) == 1)
        })
    });
    assert!(hooks.len() > failing);
    let delivered: Vec<&Hook> = hooks.iter().filter(|h| h.status == Some(200)).collect();
    // The same request as A's attempts: body and id.
    for hook in &delivered {
        let channel = hook.events()[0]["channel"].as_str().unwrap().to_string();
        let first = hooks
            .iter()
            .find(|h| h.events()[0]["channel"] == channel.as_str())
            .unwrap();
        assert_eq!(
            first.header("x-shardpush-webhook-id"),
            hook.header("x-shardpush-webhook-id")
        );
        assert_eq!(first.json()["time_ms"], hook.json()["time_ms"]);
    }
    drop(b);
}

#[test]
fn the_event_stream_is_read_by_a_consumer_group() {
    let redis = Redis::start();
    let receiver = Receiver::start();
    let app = "event_stream = true\nevent_stream_length = 1000";
    let a = node(&redis, &receiver, "", app);
    let b = node(&redis, &receiver, "", app);
    let mut on_a = a.connect();
    on_a.subscribe_presence("presence-s", "ua", json!({"n": 1}));
    let mut on_b = b.connect();
    on_b.subscribe_presence("presence-s", "ub", json!(null));
    on_b.send_json(json!({"event": "client-hi", "channel": "presence-s", "data": {"x": 1}}));
    // The client event is in the stream once its webhook came; the API publish after it (a
    // WebSocket message and an HTTP request are not ordered with each other otherwise).
    receiver.wait_until("the client event webhook", Duration::from_secs(10), |h| {
        count(h, "client_event", "presence-s") == 1
    });
    let (status, _) = b.trigger("presence-s", "from-api", "{\"y\":2}");
    assert_eq!(status, 200);

    // A consumer of one's own, as the README shows it.
    let client = redis::Client::open(redis.url()).unwrap();
    let mut con = client.get_connection().unwrap();
    let stream = "t:events:{test-id}";
    let _: redis::RedisResult<()> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg("mine")
        .arg("0")
        .arg("MKSTREAM")
        .query(&mut con);
    // Read until the five entries are there (the API publish's may still be on its way).
    let mut entries = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while entries.len() < 5 && std::time::Instant::now() < deadline {
        let reply: redis::Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("mine")
            .arg("c1")
            .arg("COUNT")
            .arg(100)
            .arg("BLOCK")
            .arg(1000)
            .arg("STREAMS")
            .arg(stream)
            .arg(">")
            .query(&mut con)
            .unwrap();
        entries.extend(stream_entries(&reply));
    }
    let names: Vec<&str> = entries.iter().map(|e| e["name"].as_str()).collect();
    assert_eq!(
        names,
        [
            "channel_occupied",
            "member_added",
            "member_added",
            "client_event",
            "api_event"
        ],
        "{entries:?}"
    );
    let client_event = &entries[3];
    assert_eq!(client_event["event"], "client-hi");
    assert_eq!(client_event["data"], "{\"x\":1}");
    assert_eq!(client_event["user_id"], "ub");
    let api = &entries[4];
    assert_eq!(api["event"], "from-api");
    assert_eq!(api["data"], "{\"y\":2}");
    assert!(entries.iter().all(|e| e["channel"] == "presence-s"));
    assert!(entries.iter().all(|e| e["time_ms"].parse::<u64>().is_ok()));
}

/// The entries of an XREADGROUP reply (one stream) as field maps (none when it timed out).
fn stream_entries(reply: &redis::Value) -> Vec<std::collections::HashMap<String, String>> {
    let text = |v: &redis::Value| match v {
        redis::Value::BulkString(b) => String::from_utf8(b.clone()).unwrap(),
        other => panic!("not a string: {other:?}"),
    };
    let redis::Value::Array(streams) = reply else {
        // Nil: nothing new within the BLOCK time.
        return Vec::new();
    };
    let redis::Value::Array(stream) = &streams[0] else {
        panic!()
    };
    let redis::Value::Array(entries) = &stream[1] else {
        panic!()
    };
    entries
        .iter()
        .map(|entry| {
            let redis::Value::Array(parts) = entry else {
                panic!()
            };
            let redis::Value::Array(fields) = &parts[1] else {
                panic!()
            };
            fields
                .chunks(2)
                .map(|kv| (text(&kv[0]), text(&kv[1])))
                .collect()
        })
        .collect()
}
