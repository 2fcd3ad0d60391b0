//! The cluster when its links fail in ways a plain Redis restart does not show, through a TCP
//! proxy in front of a real `redis-server` that can hold Redis's replies, refuse connections,
//! and cut one shard's link: a topic subscribed while a link's handshake is unanswered, a node
//! taken for dead while only one of its links was away, Redis restarted empty with nobody
//! leaving, and a channel left while a node's links were away.

mod common;

use common::*;
use serde_json::json;
use shardpush::channels::ChannelKey;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// When a proxied connection last sent the heartbeat script.
type LastBeat = Arc<Mutex<Option<Instant>>>;

/// A TCP proxy in front of Redis. `hold`: Redis's bytes to the nodes wait. `refuse`: new
/// connections are closed at once. Each connection is recorded with the time it last sent the
/// HEARTBEAT script (only shard 0 sends one periodically).
struct Proxy {
    port: u16,
    hold: Arc<AtomicBool>,
    refuse: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    conns: Arc<Mutex<Vec<(TcpStream, LastBeat)>>>,
}

impl Proxy {
    fn start(redis_port: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let hold = Arc::new(AtomicBool::new(false));
        let refuse = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let (h, r, a, c) = (
            hold.clone(),
            refuse.clone(),
            accepted.clone(),
            conns.clone(),
        );
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if r.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                a.fetch_add(1, Ordering::SeqCst);
                let server = TcpStream::connect(("127.0.0.1", redis_port)).unwrap();
                let beat = Arc::new(Mutex::new(None));
                c.lock()
                    .unwrap()
                    .push((client.try_clone().unwrap(), beat.clone()));
                let (mut c_in, mut s_out) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || {
                    let mut buf = [0u8; 65536];
                    loop {
                        let n = match c_in.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let text = String::from_utf8_lossy(&buf[..n]);
                        if text.contains(shardpush::cluster::state::heartbeat_sha()) {
                            *beat.lock().unwrap() = Some(Instant::now());
                        }
                        if s_out.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = s_out.shutdown(Shutdown::Both);
                });
                let (mut s_in, mut c_out) = (server, client);
                let h = h.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 65536];
                    loop {
                        let n = match s_in.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        while h.load(Ordering::SeqCst) {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        if c_out.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = c_out.shutdown(Shutdown::Both);
                });
            }
        });
        Proxy {
            port,
            hold,
            refuse,
            accepted,
            conns,
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

fn node_at(url: &str, extra: &str) -> Server {
    Server::with_config(&cluster_toml(url, "", extra, ""))
}

/// A channel name with the given prefix whose home is `shard` (of 2).
fn homed_on(prefix: &str, shard: usize) -> String {
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .find(|n| ChannelKey::new(0, n).home(2) == shard)
        .unwrap()
}

/// A link builds its SUBSCRIBEs when it connects; a node's first subscriber before Redis has
/// answered the handshake must still get its topic subscribed.
#[test]
fn a_topic_subscribed_before_the_handshake_is_answered_is_subscribed() {
    let redis = Redis::start();
    let proxy = Proxy::start(redis.port);
    proxy.hold.store(true, Ordering::SeqCst);
    let a = node_at(&proxy.url(), "");
    let deadline = Instant::now() + Duration::from_secs(5);
    while proxy.accepted.load(Ordering::SeqCst) < 2 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(200));
    // Both links are connected, HELLO is unanswered: `up` is false.
    let mut watcher = a.connect();
    watcher.subscribe_presence("presence-room", "w", json!(null));
    let mut news = a.connect();
    news.subscribe("news");
    proxy.hold.store(false, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(500));

    let b = node_at(&redis.url(), "");
    let mut other = b.connect();
    other.subscribe_presence("presence-room", "u2", json!(null));
    let event = next_member_event(&mut watcher, Duration::from_secs(3));
    assert_eq!(event, Some(("added".to_owned(), "u2".to_owned())));
    assert_eq!(redis.subscribers("t:{test-id:news}"), 1, "node A's topic");
    assert_eq!(
        redis.subscribers("t:{test-id:presence-room}"),
        2,
        "both nodes'"
    );
}

/// Shard 0's link away longer than the node's life gets the node taken for dead; when it comes
/// back, every shard (those whose links never dropped too) asserts its share again.
#[test]
fn a_node_taken_for_dead_while_one_link_was_away_reasserts_every_shard() {
    let redis = Redis::start();
    let proxy = Proxy::start(redis.port);
    let fast = "heartbeat_interval = 1\nnode_timeout = 3\n";
    let a = node_at(&proxy.url(), fast);
    let b = node_at(&redis.url(), fast);
    let room = homed_on("presence-r", 1);
    let mut on_a = a.connect();
    on_a.subscribe_presence(&room, "ua", json!(null));
    let mut watcher = b.connect();
    watcher.subscribe_presence(&room, "w", json!(null));
    assert_eq!(presence_users(&b, &room), ["ua", "w"]);
    // Find shard 0's connection: the one that sent the periodic heartbeat most recently.
    std::thread::sleep(Duration::from_millis(2500));
    {
        let conns = proxy.conns.lock().unwrap();
        let recent: Vec<_> = conns
            .iter()
            .filter(|(_, beat)| {
                beat.lock()
                    .unwrap()
                    .is_some_and(|t| t.elapsed() < Duration::from_millis(1500))
            })
            .collect();
        assert_eq!(recent.len(), 1, "one connection heartbeats");
        proxy.refuse.store(true, Ordering::SeqCst);
        let _ = recent[0].0.shutdown(Shutdown::Both);
    }
    // B reaps A (its registration lives 2 s); ua is removed on B.
    assert_eq!(
        next_member_event(&mut watcher, Duration::from_secs(6)),
        Some(("removed".to_owned(), "ua".to_owned()))
    );
    proxy.refuse.store(false, Ordering::SeqCst);
    // Shard 0 reconnects; ua is still connected to A: it must come back on B.
    let event = next_member_event(&mut watcher, Duration::from_secs(8));
    let now = presence_users(&b, &room);
    assert_eq!(
        (event, now),
        (
            Some(("added".to_owned(), "ua".to_owned())),
            vec!["ua".to_owned(), "w".to_owned()]
        ),
        "node A's shard 1 asserts its members again"
    );
}

/// After Redis restarts empty, the nodes assert their members one after the other: a member
/// not asserted yet has not left, and no subscriber may hear otherwise, not even when the
/// member lists are reconciled a few seconds later.
#[test]
fn redis_restarted_empty_makes_no_member_flap() {
    let redis = Redis::start();
    let port = redis.port;
    let (a, b) = (node_at(&redis.url(), ""), node_at(&redis.url(), ""));
    let mut on_a = a.connect();
    on_a.subscribe_presence("presence-room", "u1", json!(null));
    let mut on_b = b.connect();
    on_b.subscribe_presence("presence-room", "u2", json!(null));
    assert_eq!(
        next_member_event(&mut on_a, Duration::from_secs(5)),
        Some(("added".to_owned(), "u2".to_owned()))
    );
    redis.stop();
    std::thread::sleep(Duration::from_millis(300));
    let _redis = Redis::start_on(port);
    // Nobody left or joined: no presence event may reach either client (reconciliation runs
    // about two heartbeat intervals after the links are back).
    let seen_a = next_member_event(&mut on_a, Duration::from_secs(8));
    let seen_b = next_member_event(&mut on_b, Duration::from_millis(100));
    assert_eq!((seen_a, seen_b), (None, None));
}

/// A node whose links are away for a moment (shorter than the node timeout, so nobody takes
/// it for dead) while its last subscriber of a channel leaves: once the links are back, that
/// departure reaches the cluster (the member is removed, the channel is no longer occupied).
#[test]
fn a_channel_left_while_the_links_were_away_is_left_in_the_cluster_too() {
    let redis = Redis::start();
    let proxy = Proxy::start(redis.port);
    let a = node_at(&proxy.url(), "");
    let b = node_at(&redis.url(), "");
    let mut on_a = a.connect();
    on_a.subscribe("gone");
    on_a.subscribe_presence("presence-gone", "ua", json!(null));
    let mut watcher = b.connect();
    let joined = watcher.subscribe_presence("presence-gone", "w", json!(null));
    assert_eq!(joined["event"], "pusher_internal:subscription_succeeded");
    assert_eq!(presence_users(&b, "presence-gone"), ["ua", "w"]);
    // The watcher knows `ua` before the outage: listed when it joined, or announced since (node
    // A's announcement can come after node B answered the watcher's join).
    let ids = data_of(&joined)["presence"]["ids"].clone();
    if !ids.as_array().unwrap().iter().any(|id| id == "ua") {
        assert_eq!(
            next_member_event(&mut watcher, Duration::from_secs(5)),
            Some(("added".to_owned(), "ua".to_owned()))
        );
    }
    // Every link of node A away; its client leaves meanwhile.
    proxy.refuse.store(true, Ordering::SeqCst);
    for (conn, _) in proxy.conns.lock().unwrap().iter() {
        let _ = conn.shutdown(Shutdown::Both);
    }
    std::thread::sleep(Duration::from_millis(300));
    drop(on_a);
    std::thread::sleep(Duration::from_millis(700));
    proxy.refuse.store(false, Ordering::SeqCst);
    assert_eq!(
        next_member_event(&mut watcher, Duration::from_secs(8)),
        Some(("removed".to_owned(), "ua".to_owned()))
    );
    eventually("the channel is no longer occupied", || {
        let body = get_json(&b, &format!("/apps/{APP_ID}/channels"), &[]);
        body["channels"].get("gone").is_none()
    });
    assert_eq!(presence_users(&b, "presence-gone"), ["w"]);
}
