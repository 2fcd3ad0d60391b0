//! Signed-in users against the real server (2 shards): `pusher:signin`, `#server-to-user-`
//! delivery, presence from the sign-in, terminate_connections, watchlists, authorized connections.

mod common;

use common::*;
use serde_json::json;
use std::time::Duration;

const QUIET: Duration = Duration::from_millis(300);

fn user(id: &str) -> String {
    json!({"id": id, "user_info": {"name": format!("User {id}")}}).to_string()
}

fn watching(id: &str, watchlist: &[&str]) -> String {
    json!({"id": id, "watchlist": watchlist}).to_string()
}

fn error_code(m: &serde_json::Value) -> Option<u64> {
    assert_eq!(m["event"], "pusher:error", "{m}");
    m["data"]["code"].as_u64()
}

#[test]
fn signin_replies_with_object_data_and_refuses_bad_or_conflicting_signins() {
    let server = Server::start();
    let mut c = server.connect();
    let data = user("42");

    c.send_json(json!({"event":"pusher:signin","data":{"auth":format!("{KEY}:{}", "0".repeat(64)),"user_data":data}}));
    let m = c.recv();
    assert_eq!(error_code(&m), Some(4009));
    assert!(m["data"]["message"].as_str().unwrap().contains("::user::"));
    c.send_json(json!({"event":"pusher:signin","data":{"auth":c.user_auth(&data)}}));
    assert_eq!(error_code(&c.recv()), Some(4009), "user_data is required");
    let bad = r#"{"user_info":{}}"#;
    c.send_json(json!({"event":"pusher:signin","data":{"auth":c.user_auth(bad),"user_data":bad}}));
    assert_eq!(error_code(&c.recv()), Some(4009), "an id is required");

    let ok = c.signin(&data);
    assert_eq!(ok["event"], "pusher:signin_success");
    assert_eq!(ok["data"]["user_data"], data.as_str(), "the exact string");
    assert_eq!(c.signin(&data)["event"], "pusher:signin_success");
    assert_eq!(error_code(&c.signin(&user("43"))), Some(4009));

    let own = c.subscribe("#server-to-user-42");
    assert_eq!(own["event"], "pusher_internal:subscription_succeeded");
    assert_eq!(own["data"], "{}");
    assert_eq!(error_code(&c.subscribe("#server-to-user-43")), None);
    let mut stranger = server.connect();
    assert_eq!(error_code(&stranger.subscribe("#server-to-user-42")), None);
    // Still open and working after every refusal.
    assert_eq!(
        c.subscribe("news")["event"],
        "pusher_internal:subscription_succeeded"
    );
}

#[test]
fn signin_can_be_switched_off_per_app() {
    let server = Server::with_config(&config_toml("", "enable_user_authentication = false", ""));
    let mut c = server.connect();
    let m = c.signin(&user("1"));
    assert_eq!(error_code(&m), Some(4009));
    assert!(m["data"]["message"]
        .as_str()
        .unwrap()
        .contains("not enabled"));
}

#[test]
fn server_to_user_events_reach_every_connection_of_the_user_on_every_shard() {
    let server = Server::start();
    let mut a0 = server.connect_on_shard(0);
    let mut a1 = server.connect_on_shard(1);
    let mut other = server.connect();
    for c in [&mut a0, &mut a1] {
        assert_eq!(c.signin(&user("ann"))["event"], "pusher:signin_success");
    }
    assert_eq!(other.signin(&user("bob"))["event"], "pusher:signin_success");
    // Subscribing is optional (pusher-js does it); it must not double the delivery.
    a0.subscribe("#server-to-user-ann");

    for i in 0..5 {
        let (status, body) = server.trigger("#server-to-user-ann", "note", &i.to_string());
        assert_eq!((status, body.as_str()), (200, "{}"));
    }
    for c in [&mut a0, &mut a1] {
        for i in 0..5 {
            let m = c.recv();
            assert_eq!(m["event"], "note");
            assert_eq!(m["channel"], "#server-to-user-ann");
            assert_eq!(m["data"], i.to_string());
        }
        assert!(c.try_recv(QUIET).is_none(), "exactly once");
    }
    assert!(other.try_recv(QUIET).is_none(), "other users get nothing");

    let (status, body) = server.api("GET", &format!("/apps/{APP_ID}/channels"), &[], "");
    assert_eq!(status, 200);
    assert!(!body.contains("server-to-user"), "{body}");

    // After the user's connections are gone, events for them go nowhere (and fail nothing).
    drop(a0);
    drop(a1);
    std::thread::sleep(QUIET);
    assert_eq!(server.trigger("#server-to-user-ann", "note", "x").0, 200);
}

#[test]
fn presence_without_channel_data_takes_the_member_from_the_signin() {
    let server = Server::start();
    let mut a = server.connect();
    let mut b = server.connect();
    let channel = "presence-room";

    let sign_only = |c: &Client| c.auth_for(channel, None);
    let auth = sign_only(&a);
    a.send_json(json!({"event":"pusher:subscribe","data":{"auth":auth,"channel":channel}}));
    assert_eq!(error_code(&a.recv()), None, "not signed in yet");

    assert_eq!(a.signin(&user("7"))["event"], "pusher:signin_success");
    let auth = sign_only(&a);
    a.send_json(json!({"event":"pusher:subscribe","data":{"auth":auth,"channel":channel}}));
    let ok = a.recv();
    assert_eq!(ok["event"], "pusher_internal:subscription_succeeded");
    let presence = &data_of(&ok)["presence"];
    assert_eq!(presence["ids"], json!(["7"]));
    assert_eq!(presence["hash"]["7"], json!({"name": "User 7"}));

    // channel_data, when given, wins over the sign-in.
    assert_eq!(b.signin(&user("8"))["event"], "pusher:signin_success");
    let ok = b.subscribe_presence(channel, "eight", json!({"seat": 2}));
    assert_eq!(
        data_of(&ok)["presence"]["hash"]["eight"],
        json!({"seat": 2})
    );
    let added = a.recv();
    assert_eq!(added["event"], "pusher_internal:member_added");
    assert_eq!(data_of(&added)["user_id"], "eight");
}

#[test]
fn terminate_closes_every_connection_of_the_user_with_4009_on_both_routes() {
    let server = Server::start();
    for (round, prefixed) in [(0, true), (1, false)] {
        let id = format!("victim{round}");
        let mut v0 = server.connect_on_shard(0);
        let mut v1 = server.connect_on_shard(1);
        let mut bystander = server.connect();
        // Same id in presence only, not signed in: not affected (reference §5.9).
        let mut presence_only = server.connect();
        presence_only.subscribe_presence("presence-x", &id, json!(null));
        for c in [&mut v0, &mut v1] {
            assert_eq!(c.signin(&user(&id))["event"], "pusher:signin_success");
        }
        assert_eq!(
            bystander.signin(&user("safe"))["event"],
            "pusher:signin_success"
        );

        let path = match prefixed {
            true => format!("/apps/{APP_ID}/users/{id}/terminate_connections"),
            false => format!("/users/{id}/terminate_connections"),
        };
        let (status, body) = server.api("POST", &path, &[], "{}");
        assert_eq!((status, body.as_str()), (200, "{}"), "{path}");
        for c in [&mut v0, &mut v1] {
            let m = c.recv();
            assert_eq!(error_code(&m), Some(4009));
            assert_eq!(c.expect_close(), Some(4009));
        }
        assert!(bystander.try_recv(QUIET).is_none());
        bystander.send_json(json!({"event":"pusher:ping"}));
        assert_eq!(bystander.recv()["event"], "pusher:pong");
        presence_only.send_json(json!({"event":"pusher:ping"}));
        assert_eq!(
            presence_only.recv_event("pusher:pong")["event"],
            "pusher:pong"
        );
    }
    let (status, _) = server.api(
        "GET",
        &format!("/apps/{APP_ID}/users/x/terminate_connections"),
        &[],
        "",
    );
    assert_eq!(status, 405);
    let (status, _) = server.api(
        "POST",
        &format!("/apps/{APP_ID}/users//terminate_connections"),
        &[],
        "{}",
    );
    assert_eq!(status, 400);
    // The unprefixed route still checks the signature.
    let (status, _) = raw_http(
        server.port,
        "POST",
        "/users/x/terminate_connections?auth_key=test-key&auth_timestamp=1&auth_version=1.0&auth_signature=00",
        "{}",
    );
    assert_eq!(status, 401);
}

/// `(online, offline)` user ids of a `pusher_internal:watchlist_events` message.
fn statuses(m: &serde_json::Value) -> (Vec<String>, Vec<String>) {
    assert_eq!(m["event"], "pusher_internal:watchlist_events", "{m}");
    assert!(m["data"].is_object(), "object data: {m}");
    let mut online = Vec::new();
    let mut offline = Vec::new();
    for e in m["data"]["events"].as_array().unwrap() {
        let ids = e["user_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().expect("ids are strings").to_owned());
        match e["name"].as_str().unwrap() {
            "online" => online.extend(ids),
            "offline" => offline.extend(ids),
            other => panic!("unexpected watchlist event {other}"),
        }
    }
    online.sort();
    offline.sort();
    (online, offline)
}

#[test]
fn watchlist_reports_the_current_state_then_each_change_across_shards() {
    let server = Server::with_config(&config_toml(
        "",
        "enable_watchlist_events = true\nmax_watchlist_size = 3",
        "",
    ));
    // Users on both shards; some online before the watcher signs in.
    let mut a = server.connect_on_shard(0);
    let mut b_first = server.connect_on_shard(1);
    assert_eq!(a.signin(&user("a"))["event"], "pusher:signin_success");
    assert_eq!(b_first.signin(&user("b"))["event"], "pusher:signin_success");

    for watcher_shard in [0, 1] {
        let mut w = server.connect_on_shard(watcher_shard);
        let ok = w.signin(&watching(
            &format!("w{watcher_shard}"),
            &["a", "b", "c", "a"],
        ));
        assert_eq!(ok["event"], "pusher:signin_success");
        let (online, offline) = statuses(&w.recv());
        assert_eq!(online, ["a", "b"]);
        assert_eq!(offline, ["c"]);

        let mut c = server.connect_on_shard(1 - watcher_shard);
        assert_eq!(c.signin(&user("c"))["event"], "pusher:signin_success");
        assert_eq!(statuses(&w.recv()), (vec!["c".to_owned()], vec![]));
        // A second connection of an online user changes nothing.
        let mut c_again = server.connect();
        assert_eq!(c_again.signin(&user("c"))["event"], "pusher:signin_success");
        assert!(w.try_recv(QUIET).is_none());
        drop(c);
        assert!(w.try_recv(QUIET).is_none(), "c is still online elsewhere");
        drop(c_again);
        assert_eq!(statuses(&w.recv()), (vec![], vec!["c".to_owned()]));
    }

    // Over the limit: the first ids are watched, and error 4302 follows the success.
    let mut w = server.connect();
    let ok = w.signin(&watching("many", &["a", "b", "c", "d"]));
    assert_eq!(ok["event"], "pusher:signin_success");
    let mut rest = [w.recv(), w.recv()];
    rest.sort_by_key(|m| m["event"].as_str().unwrap().to_owned());
    assert_eq!(error_code(&rest[0]), Some(4302));
    let (online, offline) = statuses(&rest[1]);
    assert_eq!(
        (online, offline),
        (vec!["a".into(), "b".into()], vec!["c".to_owned()])
    );

    // Leaving: the watcher of b hears b go offline.
    drop(b_first);
    assert_eq!(statuses(&w.recv()), (vec![], vec!["b".to_owned()]));
    a.send_json(json!({"event":"pusher:ping"}));
    assert_eq!(a.recv()["event"], "pusher:pong");
}

#[test]
fn watchlists_are_ignored_when_the_app_has_them_off() {
    let server = Server::start();
    let mut a = server.connect();
    a.signin(&user("a"));
    let mut w = server.connect();
    assert_eq!(
        w.signin(&watching("w", &["a"]))["event"],
        "pusher:signin_success"
    );
    assert!(w.try_recv(QUIET).is_none());
}

#[test]
fn authorized_connections_close_sockets_that_do_not_authorize_in_time() {
    let server = Server::with_config(&config_toml(
        "",
        "enable_authorized_connections = true\nauthorization_timeout = 1",
        "",
    ));
    let mut idle = server.connect();
    let mut public_only = server.connect();
    let mut private = server.connect();
    let mut signed = server.connect();
    public_only.subscribe("news");
    assert_eq!(
        private.subscribe_private("private-a")["event"],
        "pusher_internal:subscription_succeeded"
    );
    assert_eq!(signed.signin(&user("s"))["event"], "pusher:signin_success");

    for c in [&mut idle, &mut public_only] {
        let m = c.recv();
        assert_eq!(error_code(&m), Some(4009));
        assert_eq!(c.expect_close(), Some(4009));
    }
    for c in [&mut private, &mut signed] {
        assert!(c.try_recv(Duration::from_millis(1500)).is_none());
        c.send_json(json!({"event":"pusher:ping"}));
        assert_eq!(c.recv()["event"], "pusher:pong");
    }
}
