//! The cluster's shared state through a real `redis-server` of the test's own (nodes of 2
//! shards): presence members and counts are cluster-wide on every node, a dead node's share
//! disappears, a restarted node inherits no ghosts, and Redis restarted empty is rebuilt.

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const QUIET: Duration = Duration::from_millis(300);
const ROOM: &str = "presence-room";

fn node(redis: &Redis) -> Server {
    cluster_node(redis, "", "")
}

fn unsubscribe(client: &mut Client, channel: &str) {
    client.send_json(json!({"event":"pusher:unsubscribe","data":{"channel":channel}}));
}

/// Sorted ids of a `subscription_succeeded`.
fn ids_of(succeeded: &Value) -> Vec<String> {
    assert_eq!(succeeded["event"], "pusher_internal:subscription_succeeded");
    let data = data_of(succeeded);
    let mut ids: Vec<String> = data["presence"]["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    assert_eq!(data["presence"]["count"], ids.len());
    ids
}

fn subscription_count(server: &Server, channel: &str) -> u64 {
    let path = format!("/apps/{APP_ID}/channels/{channel}");
    let body = get_json(server, &path, &[("info", "subscription_count")]);
    body["subscription_count"].as_u64().unwrap()
}

#[test]
fn presence_has_one_member_per_user_across_nodes_with_exact_events() {
    let redis = Redis::start();
    let nodes = [node(&redis), node(&redis), node(&redis)];
    let mut a = nodes[0].connect();
    let ok = a.subscribe_presence(ROOM, "u1", json!({"name": "one"}));
    assert_eq!(ids_of(&ok), ["u1"]);
    let mut b = nodes[1].connect();
    let ok = b.subscribe_presence(ROOM, "u2", json!(null));
    assert_eq!(ids_of(&ok), ["u1", "u2"]);
    assert_eq!(
        data_of(&ok)["presence"]["hash"]["u1"],
        json!({"name": "one"})
    );
    let added = Some(("added".to_owned(), "u2".to_owned()));
    assert_eq!(next_member_event(&mut a, Duration::from_secs(5)), added);
    assert!(b.try_recv(QUIET).is_none(), "no member_added for oneself");

    // u1's second connection, on a third node: a member already, so no event anywhere.
    let mut c = nodes[2].connect();
    let ok = c.subscribe_presence(ROOM, "u1", json!({"name": "one"}));
    assert_eq!(ids_of(&ok), ["u1", "u2"]);
    for client in [&mut a, &mut b] {
        assert_eq!(next_member_event(client, QUIET), None);
    }
    for n in &nodes {
        assert_eq!(
            presence_users(n, ROOM),
            ["u1", "u2"],
            "the same users from every node"
        );
    }

    // u1 leaves node A but is still on C: nothing. Then C too: member_removed, once.
    unsubscribe(&mut a, ROOM);
    assert_eq!(next_member_event(&mut b, QUIET), None);
    unsubscribe(&mut c, ROOM);
    let removed = Some(("removed".to_owned(), "u1".to_owned()));
    assert_eq!(next_member_event(&mut b, Duration::from_secs(5)), removed);
    assert_eq!(next_member_event(&mut b, QUIET), None);
    eventually("u1 is gone on every node", || {
        nodes.iter().all(|n| presence_users(n, ROOM) == ["u2"])
    });
}

#[test]
fn counts_and_channel_lists_are_the_clusters_on_every_node() {
    let redis = Redis::start();
    let nodes = [node(&redis), node(&redis), node(&redis)];
    let mut clients = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let mut news = n.connect();
        news.subscribe("news");
        let mut member = n.connect();
        member.subscribe_presence("presence-x", ["u0", "u1", "u0"][i], json!(1));
        clients.push(news);
        clients.push(member);
    }
    for n in &nodes {
        assert_eq!(subscription_count(n, "news"), 3);
        let path = format!("/apps/{APP_ID}/channels/presence-x");
        let info = [("info", "user_count,subscription_count")];
        let body = get_json(n, &path, &info);
        assert_eq!(body["occupied"], true);
        assert_eq!(
            (
                body["user_count"].as_u64(),
                body["subscription_count"].as_u64()
            ),
            (Some(2), Some(3))
        );
        let list = get_json(n, &format!("/apps/{APP_ID}/channels"), &[]);
        assert_eq!(list, json!({"channels": {"news": {}, "presence-x": {}}}));
        let params = [("filter_by_prefix", "presence-"), ("info", "user_count")];
        let list = get_json(n, &format!("/apps/{APP_ID}/channels"), &params);
        assert_eq!(list, json!({"channels": {"presence-x": {"user_count": 2}}}));
    }
    // One node's news subscriber leaves; every node counts 2.
    unsubscribe(&mut clients[0], "news");
    eventually("the count drops everywhere", || {
        nodes.iter().all(|n| subscription_count(n, "news") == 2)
    });
    drop(clients);
    eventually("every channel is vacated", || {
        let list = get_json(&nodes[1], &format!("/apps/{APP_ID}/channels"), &[]);
        list == json!({"channels": {}})
    });
}

#[test]
fn a_killed_nodes_members_and_counts_disappear_within_the_node_timeout() {
    let redis = Redis::start();
    let survivor = node(&redis);
    let doomed = node(&redis);
    let mut watcher = survivor.connect();
    watcher.subscribe_presence(ROOM, "stays", json!(null));
    let mut news = survivor.connect();
    news.subscribe("news");
    let mut victims = Vec::new();
    for user in ["leaves", "stays"] {
        let mut c = doomed.connect();
        c.subscribe_presence(ROOM, user, json!(null));
        c.subscribe("news");
        victims.push(c);
    }
    let added = Some(("added".to_owned(), "leaves".to_owned()));
    assert_eq!(
        next_member_event(&mut watcher, Duration::from_secs(5)),
        added
    );
    // A node's later subscribers are confirmed without waiting for Redis: their counts follow
    // within a round trip.
    eventually("3 news subscribers", || {
        subscription_count(&survivor, "news") == 3
    });

    let killed = Instant::now();
    drop(doomed); // SIGKILL
                  // 10 s node timeout; a little over for the test's own polling.
    let removed = next_member_event(&mut watcher, Duration::from_secs(12));
    assert_eq!(removed, Some(("removed".to_owned(), "leaves".to_owned())));
    let noticed = killed.elapsed();
    assert!(
        noticed <= Duration::from_secs(11),
        "member_removed after {noticed:?}"
    );
    // The user still connected to the survivor stays, with no event.
    assert_eq!(next_member_event(&mut watcher, QUIET), None);
    assert_eq!(presence_users(&survivor, ROOM), ["stays"]);
    assert_eq!(subscription_count(&survivor, "news"), 1);
}

#[test]
fn a_node_restarted_under_its_id_inherits_no_ghosts() {
    let redis = Redis::start();
    let settings = "node_id = \"fixed\"\nnode_timeout = 120\n";
    let other = cluster_node(&redis, "node_timeout = 120\n", "");
    let mut watcher = other.connect();
    watcher.subscribe_presence(ROOM, "watcher", json!(null));
    let first = cluster_node(&redis, settings, "");
    let mut ghost = first.connect();
    ghost.subscribe_presence(ROOM, "ghost", json!(null));
    ghost.subscribe("news");
    let added = Some(("added".to_owned(), "ghost".to_owned()));
    assert_eq!(
        next_member_event(&mut watcher, Duration::from_secs(5)),
        added
    );
    // Killed with its sockets open: nothing of the leave reaches Redis.
    unsafe { libc::kill(first.pid() as i32, libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        presence_users(&other, ROOM),
        ["ghost", "watcher"],
        "a ghost until noticed"
    );
    let again = cluster_node(&redis, settings, "");
    let removed = Some(("removed".to_owned(), "ghost".to_owned()));
    assert_eq!(
        next_member_event(&mut watcher, Duration::from_secs(10)),
        removed
    );
    assert_eq!(presence_users(&again, ROOM), ["watcher"]);
    assert_eq!(subscription_count(&other, "news"), 0);
    drop(first);
}

#[test]
fn redis_restarted_empty_is_rebuilt_and_members_catch_up() {
    let redis = Redis::start();
    let port = redis.port;
    let (a, b) = (node(&redis), node(&redis));
    let mut on_a = a.connect();
    on_a.subscribe_presence(ROOM, "u1", json!(null));
    let mut on_b = b.connect();
    on_b.subscribe_presence(ROOM, "u2", json!(null));
    let added = Some(("added".to_owned(), "u2".to_owned()));
    assert_eq!(next_member_event(&mut on_a, Duration::from_secs(5)), added);
    let mut news = b.connect();
    news.subscribe("news");

    redis.stop();
    // While Redis is away, cluster-wide numbers cannot be given: 503, not a wrong answer.
    let path = format!("/apps/{APP_ID}/channels/news");
    let (status, body) = a.api("GET", &path, &[("info", "subscription_count")], "");
    assert_eq!(status, 503, "{body}");
    // u2 leaves and u3 joins on node B; node A cannot hear of it yet.
    unsubscribe(&mut on_b, ROOM);
    let mut u3 = b.connect();
    u3.subscribe_presence(ROOM, "u3", json!(null));

    let _redis = Redis::start_on(port);
    // Node A's subscriber learns both, once each, when the state is rebuilt.
    let mut seen = Vec::new();
    while seen.len() < 2 {
        match next_member_event(&mut on_a, Duration::from_secs(10)) {
            Some(event) => seen.push(event),
            None => panic!("only {seen:?} within 10 s"),
        }
    }
    seen.sort();
    let expected = [
        ("added".to_owned(), "u3".to_owned()),
        ("removed".to_owned(), "u2".to_owned()),
    ];
    assert_eq!(seen, expected);
    assert_eq!(next_member_event(&mut on_a, QUIET), None);
    eventually("the state is rebuilt", || {
        let (status, _) = a.api("GET", &path, &[("info", "subscription_count")], "");
        status == 200
            && subscription_count(&a, "news") == 1
            && presence_users(&a, ROOM) == ["u1", "u3"]
    });
}

/// The next `subscription_count` a client gets.
fn next_count(client: &mut Client, wait: Duration) -> Option<u64> {
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let m = client.try_recv(left)?;
        if m["event"] == "pusher_internal:subscription_count" {
            return data_of(&m)["subscription_count"].as_u64();
        }
    }
}

#[test]
fn subscription_count_events_count_every_node_and_drop_a_dead_ones_share() {
    let redis = Redis::start();
    let counted = "enable_subscription_count = true";
    let a = cluster_node(&redis, "", counted);
    let b = cluster_node(&redis, "", counted);
    let mut on_a = a.connect();
    on_a.subscribe("counted");
    assert_eq!(next_count(&mut on_a, Duration::from_secs(5)), Some(1));
    let mut on_b = b.connect();
    assert_eq!(
        on_b.subscribe("counted")["event"],
        "pusher_internal:subscription_succeeded"
    );
    assert_eq!(
        next_count(&mut on_b, Duration::from_secs(5)),
        Some(2),
        "counts node A too"
    );
    assert_eq!(
        next_count(&mut on_a, Duration::from_secs(5)),
        Some(2),
        "hears node B's"
    );
    let mut also_on_b = b.connect();
    also_on_b.subscribe("counted");
    assert_eq!(next_count(&mut on_a, Duration::from_secs(5)), Some(3));
    unsubscribe(&mut on_b, "counted");
    assert_eq!(next_count(&mut on_a, Duration::from_secs(5)), Some(2));
    drop(b); // SIGKILL: node A learns from the dead node's removal
    assert_eq!(next_count(&mut on_a, Duration::from_secs(12)), Some(1));
    assert_eq!(next_count(&mut on_a, QUIET), None);
}

#[test]
fn cache_channels_give_the_last_event_published_on_any_node() {
    let redis = Redis::start();
    let (a, b) = (node(&redis), node(&redis));
    // Published on A while nobody anywhere subscribes.
    for i in 0..3 {
        assert_eq!(a.trigger("cache-news", "pos", &format!("p{i}")).0, 200);
    }
    let mut on_b = b.connect();
    assert_eq!(
        on_b.subscribe("cache-news")["event"],
        "pusher_internal:subscription_succeeded"
    );
    let cached = on_b.recv();
    assert_eq!(
        (cached["event"].as_str(), cached["data"].as_str()),
        (Some("pos"), Some("p2"))
    );
    assert!(on_b.try_recv(QUIET).is_none(), "the cached event once");
    // Live events still arrive once; the next subscriber, on A, gets the newest.
    assert_eq!(b.trigger("cache-news", "pos", "p3").0, 200);
    assert_eq!(on_b.recv()["data"], "p3");
    assert!(on_b.try_recv(QUIET).is_none());
    let mut on_a = a.connect();
    on_a.subscribe("cache-news");
    assert_eq!(on_a.recv()["data"], "p3");
    let path = format!("/apps/{APP_ID}/channels/cache-news");
    let info = get_json(&b, &path, &[("info", "cache,subscription_count")]);
    assert_eq!(
        (
            info["cache"]["event"].as_str(),
            info["cache"]["data"].as_str()
        ),
        (Some("pos"), Some("p3"))
    );
    assert_eq!(info["subscription_count"], 2);
    let ttl = info["cache"]["ttl"].as_u64().unwrap();
    assert!((1790..=1800).contains(&ttl), "ttl {ttl}");
    // A channel nothing was published to: a miss, from any node.
    let mut empty = a.connect();
    empty.subscribe("cache-empty");
    assert_eq!(empty.recv()["event"], "pusher:cache_miss");
}

/// Opens a connection; Some(error code) if the server refused it.
fn refusal(server: &Server) -> (Client, Option<u64>) {
    let mut c = server.ws();
    let first = c.recv();
    let code = (first["event"] == "pusher:error").then(|| first["data"]["code"].as_u64().unwrap());
    (c, code)
}

#[test]
fn an_apps_connection_limit_counts_every_node() {
    let redis = Redis::start();
    let capped = "max_connections = 3";
    let (a, b) = (
        cluster_node(&redis, "", capped),
        cluster_node(&redis, "", capped),
    );
    let on_a: Vec<Client> = (0..3).map(|_| a.connect()).collect();
    // Node B hears of node A's connections within a heartbeat or two (2 s each).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, code) = refusal(&b);
        if code == Some(4004) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node B still admits past the app's limit"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(on_a);
    let deadline = Instant::now() + Duration::from_secs(10);
    while refusal(&b).1.is_some() {
        assert!(
            Instant::now() < deadline,
            "node B still refuses after node A's closed"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A node of the cluster with `role`.
fn node_with_role(redis: &Redis, role: &str) -> Server {
    let top = format!("role = \"{role}\"");
    Server::with_config(&cluster_toml(&redis.url(), &top, "", ""))
}

/// The status line and body of a WebSocket upgrade request.
fn upgrade_status(server: &Server) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    let request = format!(
        "GET /app/{KEY}?protocol=7 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut response = vec![0u8; 4096];
    let n = stream.read(&mut response).unwrap();
    parse_response(&response[..n])
}

#[test]
fn api_and_websocket_roles_split_the_work() {
    let redis = Redis::start();
    let api = node_with_role(&redis, "api");
    let sockets = node_with_role(&redis, "websocket");
    let mut member = sockets.connect();
    member.subscribe_presence(ROOM, "u1", json!(null));
    let mut news = sockets.connect();
    news.subscribe("news");

    // The API node publishes through Redis and answers from the cluster's state.
    assert_eq!(api.trigger("news", "hello", "x").0, 200);
    assert_eq!(news.recv_event("hello")["channel"], "news");
    assert_eq!(presence_users(&api, ROOM), ["u1"]);
    assert_eq!(subscription_count(&api, "news"), 1);
    let list = get_json(&api, &format!("/apps/{APP_ID}/channels"), &[]);
    assert_eq!(list, json!({"channels": {"news": {}, "presence-room": {}}}));

    // Each refuses the other's work with a clear answer.
    let (status, body) = upgrade_status(&api);
    assert_eq!(status, 404);
    assert!(body.contains("role = api"), "{body}");
    let (status, body) = sockets.trigger("news", "hello", "x");
    assert_eq!(status, 404);
    assert!(body.contains("role = websocket"), "{body}");
    assert!(news.try_recv(QUIET).is_none());
}
