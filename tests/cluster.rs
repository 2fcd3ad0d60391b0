//! Several nodes through a real `redis-server` of the test's own (3 nodes of 2 shards): what is
//! published on any node reaches subscribers on every node once, per-channel routing, and the
//! nodes riding out a Redis restart.

mod common;

use common::*;
use serde_json::json;
use std::time::{Duration, Instant};

const QUIET: Duration = Duration::from_millis(300);

fn node(redis: &Redis) -> Server {
    cluster_node(redis, "", "")
}

fn node_with(redis: &Redis, cluster_extra: &str) -> Server {
    cluster_node(redis, cluster_extra, "")
}

fn trigger_with(server: &Server, channel: &str, event: &str, socket_id: &str) -> u16 {
    let body = json!({"name": event, "channel": channel, "data": "x", "socket_id": socket_id});
    let path = format!("/apps/{APP_ID}/events");
    server.api("POST", &path, &[], &body.to_string()).0
}

#[test]
fn a_publish_on_any_node_reaches_every_node_once_and_honours_socket_id() {
    let redis = Redis::start();
    let nodes = [node(&redis), node(&redis), node(&redis)];
    let mut subscribers: Vec<Client> = Vec::new();
    for n in &nodes {
        for shard in 0..2 {
            let mut c = n.connect_on_shard(shard);
            c.subscribe("news");
            subscribers.push(c);
        }
    }
    for (i, publisher) in nodes.iter().enumerate() {
        let event = format!("from-{i}");
        assert_eq!(publisher.trigger("news", &event, "x").0, 200);
        for c in subscribers.iter_mut() {
            assert_eq!(c.recv_event(&event)["channel"], "news");
        }
    }
    for c in subscribers.iter_mut() {
        assert!(c.try_recv(QUIET).is_none(), "each event arrives once");
    }
    // The publisher's socket_id leaves out that socket, on whichever node it is.
    let excluded = subscribers[4].socket_id.clone();
    assert_eq!(trigger_with(&nodes[0], "news", "not-you", &excluded), 200);
    for (i, c) in subscribers.iter_mut().enumerate() {
        match i {
            4 => assert!(c.try_recv(QUIET).is_none()),
            _ => assert_eq!(c.recv_event("not-you")["event"], "not-you"),
        }
    }
}

#[test]
fn client_events_cross_nodes_and_skip_their_sender() {
    let redis = Redis::start();
    let (a, b) = (node(&redis), node(&redis));
    let mut sender = a.connect();
    let mut receiver = b.connect();
    receiver.subscribe_private("private-chat");
    sender.subscribe_private("private-chat");
    sender.send_json(json!({"event":"client-hi","channel":"private-chat","data":{"n":1}}));
    let got = receiver.recv_event("client-hi");
    assert_eq!(got["data"], json!({"n":1}).to_string());
    assert!(sender.try_recv(QUIET).is_none(), "not echoed to the sender");
}

#[test]
fn a_node_receives_only_the_channels_it_serves() {
    let redis = Redis::start();
    let (a, b, c) = (node(&redis), node(&redis), node(&redis));
    let topic = format!("t:{{{APP_ID}:routed}}");
    let mut on_a = a.connect();
    let mut on_b = b.connect();
    on_a.subscribe("routed");
    // A second socket of the same node adds no Redis subscription.
    let mut also_on_a = a.connect();
    also_on_a.subscribe("routed");
    on_b.subscribe("routed");
    assert_eq!(
        redis.subscribers(&topic),
        2,
        "one subscription per node that serves it"
    );
    assert_eq!(c.trigger("routed", "e", "x").0, 200, "any node can publish");
    on_a.recv_event("e");
    on_b.recv_event("e");
    on_b.send_json(json!({"event":"pusher:unsubscribe","data":{"channel":"routed"}}));
    eventually("node B unsubscribes", || redis.subscribers(&topic) == 1);
    drop(on_a);
    drop(also_on_a);
    eventually("node A unsubscribes", || redis.subscribers(&topic) == 0);
}

#[test]
fn a_confirmed_subscriber_gets_what_any_node_publishes_next() {
    let redis = Redis::start();
    let (a, b) = (node(&redis), node(&redis));
    let mut client = a.connect();
    // The confirmation waits for Redis to have the node's subscription: a publish right after
    // it, through another node, is never lost.
    for i in 0..20 {
        let channel = format!("fresh-{i}");
        client.subscribe(&channel);
        assert_eq!(b.trigger(&channel, "first", "x").0, 200);
        assert_eq!(client.recv_event("first")["channel"], channel.as_str());
    }
}

#[test]
fn nodes_serve_locally_without_redis_and_resubscribe_when_it_returns() {
    let redis = Redis::start();
    let port = redis.port;
    let (a, b) = (node(&redis), node(&redis));
    let mut on_a = a.connect();
    on_a.subscribe("steady");
    let mut on_b = b.connect();
    on_b.subscribe("steady");
    redis.stop();
    // Local delivery goes on.
    assert_eq!(a.trigger("steady", "local", "x").0, 200);
    assert_eq!(on_a.recv_event("local")["event"], "local");
    // Redis comes back empty; the nodes reconnect and subscribe again.
    let redis = Redis::start_on(port);
    let topic = format!("t:{{{APP_ID}:steady}}");
    eventually("both nodes resubscribe", || redis.subscribers(&topic) == 2);
    assert_eq!(b.trigger("steady", "again", "x").0, 200);
    assert_eq!(on_a.recv_event("again")["event"], "again");
    assert_eq!(on_b.recv_event("again")["event"], "again");
}

#[test]
fn a_publish_other_nodes_cannot_get_is_answered_503_not_200() {
    let redis = Redis::start();
    let a = node_with(&redis, "max_queued_messages = 3");
    let mut local = a.connect();
    local.subscribe("outage");
    redis.stop();
    // Three publishes wait for Redis; after that the node refuses to pretend.
    let mut statuses = Vec::new();
    for i in 0..6 {
        let (status, body) = a.trigger("outage", &format!("e{i}"), "x");
        if status == 503 {
            assert!(body.contains("Redis is unreachable"), "{body}");
        }
        statuses.push(status);
        // Delivered on this node either way.
        assert_eq!(local.recv_event(&format!("e{i}"))["channel"], "outage");
    }
    // Three wait for Redis (a fourth may have been written just as the connection broke); then
    // every publish is refused.
    let accepted = statuses.iter().take_while(|&&s| s == 200).count();
    assert!((3..=4).contains(&accepted), "{statuses:?}");
    assert!(
        statuses[accepted..].iter().all(|&s| s == 503),
        "{statuses:?}"
    );
}

#[test]
fn a_stalled_redis_is_given_up_and_subscribers_are_still_confirmed() {
    let redis = Redis::start();
    let a = node_with(&redis, "heartbeat_interval = 1\nnode_timeout = 3");
    let mut first = a.connect();
    first.subscribe("before");
    // Redis stops answering without closing anything.
    redis.pause();
    std::thread::sleep(Duration::from_millis(300));
    let mut client = a.connect();
    // A node's first subscriber waits for Redis, but not past node_timeout: the link gives the
    // silent Redis up and the subscription is confirmed (local delivery works).
    client.send_json(json!({"event":"pusher:subscribe","data":{"channel":"during"}}));
    let started = Instant::now();
    let confirmed = loop {
        if let Some(m) = client.try_recv(Duration::from_millis(500)) {
            break m;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "never confirmed"
        );
    };
    assert_eq!(confirmed["event"], "pusher_internal:subscription_succeeded");
    assert_eq!(a.trigger("during", "local", "x").0, 200);
    assert_eq!(client.recv_event("local")["event"], "local");
    redis.resume();
    let topic = format!("t:{{{APP_ID}:during}}");
    eventually("the node resubscribes", || redis.subscribers(&topic) == 1);
}

#[test]
fn send_to_user_reaches_their_connections_on_every_node_once() {
    let redis = Redis::start();
    let (a, b, c) = (node(&redis), node(&redis), node(&redis));
    let (mut on_a, mut on_b) = (a.connect(), b.connect());
    let user_data = json!({"id": "ann"}).to_string();
    for client in [&mut on_a, &mut on_b] {
        assert_eq!(client.signin(&user_data)["event"], "pusher:signin_success");
    }
    assert_eq!(c.trigger("#server-to-user-ann", "note", "1").0, 200);
    for client in [&mut on_a, &mut on_b] {
        assert_eq!(client.recv_event("note")["channel"], "#server-to-user-ann");
        assert!(client.try_recv(QUIET).is_none(), "exactly once");
    }
}

#[test]
fn terminate_connections_on_any_node_closes_the_user_everywhere() {
    let redis = Redis::start();
    let (a, b, c) = (node(&redis), node(&redis), node(&redis));
    let (mut on_a, mut on_b, mut other) = (a.connect(), b.connect(), b.connect());
    let ann = json!({"id": "ann"}).to_string();
    for client in [&mut on_a, &mut on_b] {
        assert_eq!(client.signin(&ann)["event"], "pusher:signin_success");
    }
    let bob = json!({"id": "bob"}).to_string();
    assert_eq!(other.signin(&bob)["event"], "pusher:signin_success");
    let path = format!("/apps/{APP_ID}/users/ann/terminate_connections");
    assert_eq!(c.api("POST", &path, &[], "{}").0, 200);
    for client in [&mut on_a, &mut on_b] {
        assert_eq!(client.expect_close(), Some(4009));
    }
    assert!(other.try_recv(QUIET).is_none(), "another user stays");
}

/// `(online, offline)` user ids of a `pusher_internal:watchlist_events` message.
fn statuses(m: &serde_json::Value) -> (Vec<String>, Vec<String>) {
    assert_eq!(m["event"], "pusher_internal:watchlist_events", "{m}");
    let (mut online, mut offline) = (Vec::new(), Vec::new());
    for e in m["data"]["events"].as_array().unwrap() {
        let ids = e["user_ids"].as_array().unwrap().iter();
        let ids = ids.map(|v| v.as_str().unwrap().to_owned());
        match e["name"].as_str().unwrap() {
            "online" => online.extend(ids),
            _ => offline.extend(ids),
        }
    }
    online.sort();
    offline.sort();
    (online, offline)
}

#[test]
fn watchlists_follow_users_on_every_node_and_a_dead_nodes_users_go_offline() {
    let redis = Redis::start();
    let watchlists = "enable_watchlist_events = true";
    let a = cluster_node(&redis, "", watchlists);
    let b = cluster_node(&redis, "", watchlists);
    let c = cluster_node(&redis, "", watchlists);
    let mut ann = a.connect();
    assert_eq!(
        ann.signin(&json!({"id": "ann"}).to_string())["event"],
        "pusher:signin_success"
    );
    let mut watcher = b.connect();
    let watching = json!({"id": "w", "watchlist": ["ann", "bob"]}).to_string();
    assert_eq!(watcher.signin(&watching)["event"], "pusher:signin_success");
    let first = statuses(&watcher.recv());
    assert_eq!(first, (vec!["ann".to_owned()], vec!["bob".to_owned()]));

    let bob = json!({"id": "bob"}).to_string();
    let mut bob_on_c = c.connect();
    assert_eq!(bob_on_c.signin(&bob)["event"], "pusher:signin_success");
    assert_eq!(statuses(&watcher.recv()), (vec!["bob".to_owned()], vec![]));
    let mut bob_on_a = a.connect();
    assert_eq!(bob_on_a.signin(&bob)["event"], "pusher:signin_success");
    assert!(watcher.try_recv(QUIET).is_none(), "bob was online already");
    drop(bob_on_c);
    assert!(
        watcher.try_recv(QUIET).is_none(),
        "bob is still online on node A"
    );
    drop(bob_on_a);
    assert_eq!(statuses(&watcher.recv()), (vec![], vec!["bob".to_owned()]));

    drop(a); // SIGKILL: ann's node dies with her connection open
    let offline = watcher
        .try_recv(Duration::from_secs(12))
        .expect("ann goes offline");
    assert_eq!(statuses(&offline), (vec![], vec!["ann".to_owned()]));
}
